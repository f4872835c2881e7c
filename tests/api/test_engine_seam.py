"""What the engine seam guarantees every front door: one readiness answer, results that carry
the spec they were made with, and refusals before inference where the answer cannot be made.

Each of these failed before the engine owned what is served: the V2 ready probes ignored
VIT_SERVE_REQUIRE_GPU, a V2 answer read its labels from the repository after a reload had
removed the model (a 500), and V2 refused rollout maps of mixed grids only after running them.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton

from app.core.settings import Settings
from app.main import create_app
from app.models.repository import ModelVersion
from app.runtime.backends import Backend
from app.runtime.providers import CPU, CUDA, TENSORRT, Placement
from tests.api.test_gpu_placement import DEMO_REPO, ON_TENSORRT, Placed, no_rollout
from tests.api.test_v2_rest import image_input, infer, patches_input, result
from tests.images import png
from tests.support import TINY, TINY_REPO
from tests.v2_support import HeldBackends, live_server, wait_until

pytestmark = pytest.mark.anyio

ON_CPU = Placement(CPU, ((CPU, 400),), ((CPU, 38),), wanted=TENSORRT, fallback=f"{CUDA}: no device")


def version_one_on_the_gpu(version: ModelVersion) -> Backend:
    """Version 1's sessions on TensorRT, every other version's fallen back to the CPU."""
    return Placed(version, ON_TENSORRT if version.version == 1 else ON_CPU)


def test_every_ready_probe_gives_readyz_answer_under_require_gpu() -> None:
    # Version 1 serves on the GPU; version 2's sessions landed on the CPU, which
    # VIT_SERVE_REQUIRE_GPU refuses: the replica must be out of every load balancer.
    settings = Settings(model_repo=DEMO_REPO, require_gpu=True, warmup=False)
    with live_server(settings, version_one_on_the_gpu, no_rollout) as live:
        readyz = httpx.get(f"{live.url}/readyz")
        v2_ready = httpx.get(f"{live.url}/v2/health/ready")
        grpc_ready = triton_grpc.InferenceServerClient(live.grpc).is_server_ready()
        http_ready = triton.InferenceServerClient(live.http).is_server_ready()
        models = httpx.get(f"{live.url}/models").json()
    served = {m["name"]: m["versions"] for m in models["models"]}
    assert served["demo-shapes"] == [1]  # version 1 does serve
    assert readyz.status_code == 503
    assert "demo-shapes/2: " in readyz.json()["detail"]
    assert (v2_ready.status_code, v2_ready.json()) == (503, {"ready": False})
    assert (grpc_ready, http_ready) == (False, False)


def _own_repo(root: Path) -> Path:
    shutil.copytree(TINY_REPO / TINY, root / TINY)
    return root


async def test_a_v2_answer_keeps_its_labels_when_a_reload_removes_the_model(
    tmp_path: Path,
) -> None:
    repo = _own_repo(tmp_path / "repo")
    backends = HeldBackends()
    app = create_app(Settings(model_repo=repo, warmup=False), backend_factory=backends)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        engine = app.state.engine
        backends.gate.clear()
        outputs = [triton.InferRequestedOutput("probabilities", class_count=2)]
        grids = np.zeros((1, 8, 8, 192), np.uint8)
        request = asyncio.create_task(infer(client, [patches_input(grids)], outputs))
        await wait_until(backends.started)  # in its batch, held there
        shutil.rmtree(repo / TINY)
        reload = asyncio.create_task(engine.reload())
        await wait_until(lambda: TINY not in engine.table.repository.models)
        backends.gate.set()
        answer = await request
        report = await reload
    assert sorted(report.unloaded) == ["tiny/1", "tiny/2"]
    top = result(answer).as_numpy("probabilities")
    # HeldBackend's logits rise with the class index: class 9 first, then 8.
    assert [row.decode().split(":", 1)[1] for row in top[0]] == ["9:class-9", "8:class-8"]


async def test_v2_refuses_rollout_over_mixed_grids_before_inference(tmp_path: Path) -> None:
    repo = _own_repo(tmp_path / "repo")
    backends = HeldBackends()
    calls: list[Any] = []

    def rollout_factory(version: ModelVersion) -> Any:
        class Logged:
            provider = "fake"

            def run(self, patches: np.ndarray, params: Any) -> tuple[np.ndarray, np.ndarray]:
                calls.append(patches.shape)
                n, gh, gw = patches.shape[:3]
                return np.zeros((n, 10), np.float32), np.ones((n, gh, gw), np.float32)

        return Logged()

    app = create_app(
        Settings(model_repo=repo, warmup=False),
        backend_factory=backends,
        rollout_factory=rollout_factory,
    )
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        wide, square = png(96, 64), png(64, 64)
        answer = await infer(
            client,
            [image_input(wide, square)],
            [triton.InferRequestedOutput("rollout")],
            resize="fit",
        )
        assert calls == []
        assert [b.batches for b in backends.made if b.batches] == []
        same = await infer(
            client,
            [image_input(square, square)],
            [triton.InferRequestedOutput("rollout")],
            resize="fit",
        )
    assert answer.status_code == 400
    assert "have different grids (" in answer.json()["error"]
    assert result(same).as_numpy("rollout").shape == (2, 8, 8)
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("query", "v2_parameters", "headers", "message"),
    [
        (
            "rollout=true&discard_ratio=1.5",
            {"rollout": True, "discard_ratio": 1.5},
            {},
            "parameter 'discard_ratio': Input should be less than 1",
        ),
        (
            "rollout=true&head_fusion=median",
            {"rollout": True, "head_fusion": "median"},
            {},
            "parameter 'head_fusion': Input should be 'mean', 'max' or 'min'",
        ),
        (
            "",
            {},
            {"x-request-timeout-ms": "-3"},
            "header 'x-request-timeout-ms': Input should be greater than 0",
        ),
    ],
    ids=["discard-ratio", "head-fusion", "timeout-header"],
)
async def test_the_same_mistake_gets_the_same_message_on_every_door(
    tmp_path: Path,
    query: str,
    v2_parameters: dict[str, Any],
    headers: dict[str, str],
    message: str,
) -> None:
    repo = _own_repo(tmp_path / "repo")
    app = create_app(Settings(model_repo=repo, warmup=False))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        classify = await client.post(
            f"/classify?{query}",
            content=png(64, 64),
            headers={"content-type": "image/png", **headers},
        )
        v2 = await infer(client, [image_input(png(64, 64))], headers=headers, **v2_parameters)
    # /classify's 422 and the protocol's 400 (one status for every bad input), one message.
    assert classify.status_code == 422 and classify.json()["detail"].endswith(message)
    assert v2.status_code == 400 and v2.json()["error"].endswith(message)
