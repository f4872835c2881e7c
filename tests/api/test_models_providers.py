"""What GET /models and the model_info metric say about how each version runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from app.core.settings import Settings
from app.models.repository import ModelVersion
from app.runtime.backends import Backend
from app.runtime.providers import TENSORRT
from tests.support import TinyRepo, serve

pytestmark = pytest.mark.anyio

DEMO_REPO = Path(__file__).resolve().parents[2] / "model_repo"


def demo_entry(models: dict[str, Any]) -> dict[str, Any]:
    """The demo ViT's entry in /models: the bundled repository also holds its hybrid."""
    found: dict[str, Any] = next(m for m in models["models"] if m["name"] == "demo-shapes")
    return found


class OnTensorrt:
    """Reports TensorRT, as a session on a GPU would; zero logits."""

    provider = TENSORRT

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def run(self, patches: NDArray[np.uint8]) -> NDArray[np.float32]:
        return np.zeros((len(patches), self.num_classes), dtype=np.float32)


def on_tensorrt(version: ModelVersion) -> Backend:
    return OnTensorrt(version.spec.architecture.num_classes)


async def test_the_demo_model_shows_its_graph_form_and_no_tensorrt_precision() -> None:
    async with serve(Settings(model_repo=DEMO_REPO)) as client:
        model = demo_entry((await client.get("/models")).json())
        metrics = (await client.get("/metrics")).text
    # The default is version 2, int8 (README: why), beside version 1, the plain fp32 graph.
    assert (model["provider"], model["optimization"], model["tensorrt_fp16"]) == (
        "CPUExecutionProvider",
        "int8",
        None,
    )
    assert model["version_optimization"] == {"1": "none", "2": "int8"}
    # `wanted`: CUDA or TensorRT where onnxruntime-gpu is installed, the CPU with a CPU build.
    assert (
        'vit_serve_model_info{grid="8x8",model="demo-shapes",optimization="none",'
        'provider="CPUExecutionProvider",version="1",wanted="' in metrics
    )


async def test_on_tensorrt_models_show_whether_fp16_is_on(tiny_repo: TinyRepo) -> None:
    for fp16 in (True, False):
        settings = Settings(model_repo=tiny_repo.root, trt_fp16=fp16)
        async with serve(settings, on_tensorrt, lambda version: None) as client:
            (model,) = (await client.get("/models")).json()["models"]
            metrics = (await client.get("/metrics")).text
        assert (model["provider"], model["optimization"], model["tensorrt_fp16"]) == (
            TENSORRT,
            "fused",
            fp16,
        )
        assert (
            'vit_serve_model_info{grid="8x8",model="tiny",optimization="fused",'
            f'provider="{TENSORRT}",version="2",wanted="{TENSORRT}"}} 1.0' in metrics
        )
