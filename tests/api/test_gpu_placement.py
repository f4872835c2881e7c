"""Where each version's graph runs, as /models, model_info and /readyz say; VIT_SERVE_REQUIRE_GPU.

On this project's machines onnxruntime-gpu is installed and there is no GPU: asking for
TensorRT and CUDA is a real GPU failure (see tests/unit/test_gpu_fallback.py), and the service
must say so rather than claim a GPU. Fakes stand in for sessions that really ran on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from numpy.typing import NDArray

from app.core.settings import Settings
from app.main import create_app
from app.models.repository import ModelVersion
from app.runtime import placement as plan
from app.runtime.backends import Backend, RolloutBackend
from app.runtime.providers import CPU, CUDA, TENSORRT, Placement
from app.runtime.sessions import BackendFactory, RolloutBackendFactory

pytestmark = pytest.mark.anyio

DEMO_REPO = Path(__file__).resolve().parents[2] / "model_repo"


def demo_entry(models: dict[str, Any]) -> dict[str, Any]:
    """The demo ViT's entry in /models: the bundled repository also holds its hybrid."""
    found: dict[str, Any] = next(m for m in models["models"] if m["name"] == "demo-shapes")
    return found


gpu_build_without_gpu = pytest.mark.skipif(
    TENSORRT not in ort.get_available_providers() or plan._cuda_driver_present(),
    reason="needs onnxruntime-gpu on a machine without a GPU driver (its providers then fail)",
)


@contextlib.asynccontextmanager
async def serve(
    settings: Settings,
    factory: BackendFactory | None = None,
    rollout_factory: RolloutBackendFactory | None = None,
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, backend_factory=factory, rollout_factory=rollout_factory)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        yield client


class Placed:
    """A session that ran where its placement says; zero logits."""

    def __init__(self, version: ModelVersion, placement: Placement) -> None:
        self.num_classes = version.spec.architecture.num_classes
        self.placement = placement

    @property
    def provider(self) -> str:
        return self.placement.provider

    def run(self, patches: NDArray[np.uint8]) -> NDArray[np.float32]:
        return np.zeros((len(patches), self.num_classes), dtype=np.float32)


def placed(placement: Placement) -> BackendFactory:
    def make(version: ModelVersion) -> Backend:
        return Placed(version, placement)

    return make


def no_rollout(version: ModelVersion) -> RolloutBackend | None:
    return None


ON_TENSORRT = Placement(TENSORRT, ((TENSORRT, 380), (CPU, 20)), ((TENSORRT, 38),), wanted=TENSORRT)
ON_CPU_AFTER_FALLBACK = Placement(
    CPU,
    ((CPU, 400),),
    ((CPU, 38),),
    wanted=TENSORRT,
    fallback=f"{TENSORRT}: engine build failed; {CUDA}: libcublas.so.13 not found",
)


async def test_models_show_where_the_nodes_run_on_the_cpu() -> None:
    async with serve(Settings(model_repo=DEMO_REPO, providers=[CPU])) as client:
        model = demo_entry((await client.get("/models")).json())
        metrics = (await client.get("/metrics")).text
        ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert (model["provider"], model["wanted_provider"], model["fallback"]) == (CPU, CPU, None)
    assert set(model["placement"]) == {CPU} and model["placement"][CPU] > 100
    assert (
        'vit_serve_model_info{grid="8x8",model="demo-shapes",optimization="none",'
        f'provider="{CPU}",version="1",wanted="{CPU}"}} 1.0' in metrics
    )


async def test_models_show_a_gpu_placement_and_tensorrts_precision() -> None:
    settings = Settings(model_repo=DEMO_REPO, require_gpu=True)
    async with serve(settings, placed(ON_TENSORRT), no_rollout) as client:
        model = demo_entry((await client.get("/models")).json())
        ready = await client.get("/readyz")
        metrics = (await client.get("/metrics")).text
    assert ready.status_code == 200 and "\nvit_serve_ready 1.0\n" in metrics
    assert model["placement"] == {TENSORRT: 380, CPU: 20}
    assert (model["provider"], model["fallback"], model["tensorrt_fp16"]) == (TENSORRT, None, True)


async def test_a_fallback_is_shown_with_its_reason() -> None:
    async with serve(Settings(model_repo=DEMO_REPO), placed(ON_CPU_AFTER_FALLBACK)) as client:
        model = demo_entry((await client.get("/models")).json())
        metrics = (await client.get("/metrics")).text
        ready = await client.get("/readyz")
    assert ready.status_code == 200  # without require_gpu, a CPU replica still serves
    assert (model["provider"], model["wanted_provider"]) == (CPU, TENSORRT)
    assert model["fallback"] == ON_CPU_AFTER_FALLBACK.fallback
    assert f'provider="{CPU}",version="1",wanted="{TENSORRT}"}} 1.0' in metrics


async def test_require_gpu_keeps_a_replica_whose_sessions_landed_on_the_cpu_not_ready() -> None:
    settings = Settings(model_repo=DEMO_REPO, require_gpu=True)
    async with serve(settings, placed(ON_CPU_AFTER_FALLBACK), no_rollout) as client:
        ready = await client.get("/readyz")
        models = (await client.get("/models")).json()
        classify = await client.post(
            "/classify", content=b"x", headers={"content-type": "image/png"}
        )
        metrics = (await client.get("/metrics")).text
    assert ready.status_code == 503
    assert "\nvit_serve_ready 0.0\n" in metrics  # the gauge says what /readyz says
    detail = ready.json()["detail"]
    assert detail.startswith("VIT_SERVE_REQUIRE_GPU is set and sessions that should run on a GPU")
    assert "demo-shapes/1" in detail and "libcublas.so.13 not found" in detail
    assert models["models"] == []
    not_ready = models["not_ready"][0]  # then version 2 (int8), placed on the CPU here too
    assert (not_ready["model"], not_ready["version"]) == ("demo-shapes", 1)
    assert "its plain graph runs on CPUExecutionProvider" in not_ready["reason"]
    assert (
        models["replica_not_ready"] is not None and "demo-shapes/1" in models["replica_not_ready"]
    )
    assert classify.status_code == 503


async def test_require_gpu_also_refuses_a_replica_never_offered_a_gpu() -> None:
    # A CPU build of ONNX Runtime (the wrong image), or providers: [CPU], on a GPU deployment:
    # nothing fell back, and still nothing runs on a GPU.
    settings = Settings(model_repo=DEMO_REPO, providers=[CPU], require_gpu=True)
    async with serve(settings) as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert "no GPU provider was offered to it" in ready.json()["detail"]


@gpu_build_without_gpu
async def test_require_gpu_on_a_machine_whose_gpu_providers_fail() -> None:
    # The real thing: TensorRT raises, CUDA is dropped by ONNX Runtime, the graph runs on the
    # CPU; with require_gpu the replica says so instead of serving.
    settings = Settings(model_repo=DEMO_REPO, providers=[TENSORRT, CUDA, CPU], require_gpu=True)
    async with serve(settings) as client:
        ready = await client.get("/readyz")
        models = (await client.get("/models")).json()
    assert ready.status_code == 503
    assert "no NVIDIA driver" in ready.json()["detail"]
    reasons = {
        entry["version"]: entry["reason"]
        for entry in models["not_ready"]
        if entry["model"] == "demo-shapes"
    }
    assert "plain graph runs on CPUExecutionProvider" in reasons[1]
    assert "rollout graph runs on CPUExecutionProvider" in reasons[1]
    # Without the setting the same machine serves, on the CPU, and says why.
    settings = Settings(model_repo=DEMO_REPO, providers=[TENSORRT, CUDA, CPU])
    async with serve(settings) as client:
        model = demo_entry((await client.get("/models")).json())
        assert (await client.get("/readyz")).status_code == 200
    assert (model["provider"], model["wanted_provider"]) == (CPU, TENSORRT)
    assert model["fallback"].startswith(f"{TENSORRT}: no NVIDIA driver")
