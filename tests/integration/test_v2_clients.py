"""The Open Inference Protocol against real sockets with the clients people use, unmodified:
tritonclient over HTTP and gRPC, and the KServe SDK's V2 REST client (in a subprocess: its
generated protocol stubs and tritonclient's define the same protobuf names, which one process's
default descriptor pool refuses)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from pydantic import SecretStr
from tritonclient.utils import InferenceServerException

from app.core.settings import Settings
from app.pipeline.service import ClassifyService
from tests.images import jpeg, png
from tests.support import ROOT, TinyRepo
from tests.v2_support import HeldBackends, Live, live_server

pytestmark = pytest.mark.integration

Client = Any  # tritonclient's http or grpc InferenceServerClient (same methods)


@pytest.fixture(scope="module")
def live(tiny_repo: TinyRepo) -> Iterator[Live]:
    with live_server(Settings(model_repo=tiny_repo.root, log_level="WARNING")) as server:
        yield server


def clients(live: Live) -> list[tuple[Any, Client]]:
    return [
        (triton_http, triton_http.InferenceServerClient(live.http)),
        (triton_grpc, triton_grpc.InferenceServerClient(live.grpc)),
    ]


def images(module: Any, *encoded: bytes) -> Any:
    tensor = module.InferInput("image", [len(encoded)], "BYTES")
    tensor.set_data_from_numpy(np.array(encoded, dtype=np.object_))
    return tensor


def patches(module: Any, array: np.ndarray) -> Any:
    tensor = module.InferInput("patches", list(array.shape), "UINT8")
    tensor.set_data_from_numpy(array)
    return tensor


def status(exc: InferenceServerException) -> str:
    return str(exc.status())


def test_metadata_and_health(live: Live) -> None:
    for _, client in clients(live):
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("tiny")
        assert client.is_model_ready("tiny", "1")
        assert not client.is_model_ready("nope")
    http_meta = triton_http.InferenceServerClient(live.http).get_model_metadata("tiny")
    grpc_meta = triton_grpc.InferenceServerClient(live.grpc).get_model_metadata(
        "tiny", as_json=True
    )
    for meta in (http_meta, grpc_meta):
        assert meta["name"] == "tiny"
        assert meta["versions"] == ["1", "2"]
        assert [i["name"] for i in meta["inputs"]] == ["image", "patches"]
        assert [int(d) for d in meta["inputs"][1]["shape"]] == [-1, -1, -1, 192]
        assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities", "rollout"]
    server = triton_grpc.InferenceServerClient(live.grpc).get_server_metadata(as_json=True)
    assert server["name"] == "vit-serve"
    assert "binary_tensor_data" in server["extensions"]


def test_bytes_and_patches_agree_across_front_doors(live: Live) -> None:
    encoded = [jpeg(120, 90, seed=4), png(64, 64, seed=5)]
    grids = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 192), dtype=np.uint8)
    answers: dict[str, list[np.ndarray]] = {}
    for module, client in clients(live):
        by_bytes = client.infer("tiny", [images(module, *encoded)])
        by_patches = client.infer(
            "tiny",
            [patches(module, grids)],
            model_version="1",
            outputs=[module.InferRequestedOutput("logits")],
        )
        response = by_patches.get_response()
        version = (
            response["model_version"] if isinstance(response, dict) else response.model_version
        )
        assert version == "1"
        answers[module.__name__] = [
            by_bytes.as_numpy("probabilities"),
            by_bytes.as_numpy("logits"),
            by_patches.as_numpy("logits"),
        ]
        assert by_bytes.as_numpy("probabilities").shape == (2, 10)
        assert by_patches.as_numpy("probabilities") is None  # only what was asked for
    for http_array, grpc_array in zip(*answers.values(), strict=True):
        assert np.array_equal(http_array, grpc_array)
    # And as /classify answers the same image.
    classify = httpx.post(
        f"{live.url}/classify?top_k=10", files={"image": ("a.jpg", encoded[0], "image/jpeg")}
    ).json()
    scores = {p["index"]: p["score"] for p in classify["results"][0]["predictions"]}
    assert np.allclose([scores[i] for i in range(10)], answers["tritonclient.http"][0][0])


def test_rollout_and_classification_over_grpc(live: Live) -> None:
    client = triton_grpc.InferenceServerClient(live.grpc)
    answer = client.infer(
        "tiny",
        [images(triton_grpc, png(seed=6))],
        outputs=[
            triton_grpc.InferRequestedOutput("rollout"),
            triton_grpc.InferRequestedOutput("probabilities", class_count=2),
        ],
        parameters={"head_fusion": "min", "resize": "fit"},
    )
    assert answer.as_numpy("rollout").shape[0] == 1
    assert answer.as_numpy("rollout").max() == pytest.approx(1.0)
    assert answer.as_numpy("probabilities").shape == (1, 2)


def test_json_tensors_over_http(live: Live) -> None:
    client = triton_http.InferenceServerClient(live.http)
    grids = np.full((1, 8, 8, 192), 7, dtype=np.uint8)
    tensor = triton_http.InferInput("patches", [1, 8, 8, 192], "UINT8")
    tensor.set_data_from_numpy(grids, binary_data=False)
    as_json = client.infer(
        "tiny", [tensor], outputs=[triton_http.InferRequestedOutput("logits", binary_data=False)]
    )
    binary = client.infer("tiny", [patches(triton_http, grids)])
    assert np.allclose(as_json.as_numpy("logits"), binary.as_numpy("logits"), atol=1e-5)


@pytest.mark.parametrize(
    ("make", "http_status", "grpc_status", "message"),
    [
        (
            lambda m: ("tiny", [patches(m, np.zeros((1, 8, 8, 100), np.uint8))]),
            "400",
            "StatusCode.INVALID_ARGUMENT",
            "patches of shape [1, 8, 8, 100]: model 'tiny' takes [N, grid_h, grid_w, 192]",
        ),
        (
            lambda m: ("tiny", [images(m, b"GIF89a broken")]),
            "400",
            "StatusCode.INVALID_ARGUMENT",
            "could not decode image #1",
        ),
        (
            lambda m: ("nope", [patches(m, np.zeros((1, 8, 8, 192), np.uint8))]),
            "404",
            "StatusCode.NOT_FOUND",
            "unknown model 'nope'; served models: tiny",
        ),
    ],
)
def test_errors_have_the_same_message_over_both(
    live: Live, make: Callable[[Any], Any], http_status: str, grpc_status: str, message: str
) -> None:
    seen = []
    for module, client in clients(live):
        with pytest.raises(InferenceServerException) as caught:
            client.infer(*make(module))
        seen.append(status(caught.value))
        assert message in caught.value.message()
    assert seen == [http_status, grpc_status]


def _busy(service: ClassifyService) -> bool:
    return service.engine.busy


def _wait(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s  # bounds a broken run; nothing is timed
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met in {timeout_s} s")
        time.sleep(0.01)


def test_overload_and_deadline(tiny_repo: TinyRepo) -> None:
    backends = HeldBackends()
    settings = Settings(
        model_repo=tiny_repo.root,
        max_queue_images=2,
        max_batch_size=1,
        warmup=False,
        log_level="WARNING",
    )
    grids = np.zeros((1, 8, 8, 192), np.uint8)
    with live_server(settings, backends) as live, ThreadPoolExecutor(4) as pool:
        service: ClassifyService = live.app.state.service
        backends.gate.clear()
        pending: list[Future[Any]] = []
        try:
            pending.append(
                pool.submit(clients(live)[1][1].infer, "tiny", [patches(triton_grpc, grids)])
            )
            _wait(backends.started)
            # The gRPC call's own deadline passes while it waits for the runtime.
            with pytest.raises(InferenceServerException) as late:
                triton_grpc.InferenceServerClient(live.grpc).infer(
                    "tiny", [patches(triton_grpc, grids)], client_timeout=0.3
                )
            assert status(late.value) == "StatusCode.DEADLINE_EXCEEDED"
            _wait(lambda: live.app.state.engine.queued == 0)  # the server let it go
            for module, client in clients(live):
                pending.append(pool.submit(client.infer, "tiny", [patches(module, grids)]))
            _wait(lambda: _busy(service))
            refusals = []
            for module, client in clients(live):
                with pytest.raises(InferenceServerException) as refused:
                    client.infer("tiny", [patches(module, grids)])
                refusals.append((status(refused.value), refused.value.message()))
            assert [s for s, _ in refusals] == ["503", "StatusCode.UNAVAILABLE"]
            assert all("overloaded" in m for _, m in refusals)
        finally:
            backends.gate.set()
        for future in pending:
            assert future.result(timeout=10).as_numpy("logits").shape == (1, 10)
        metrics = httpx.get(f"{live.url}/metrics").text
    assert 'protocol="v2-grpc"' in metrics
    assert 'reason="busy",route="/inference.GRPCInferenceService/ModelInfer",status="503"' in (
        metrics.replace('protocol="v2-grpc",', "")
    )


def test_access_key_over_both(tiny_repo: TinyRepo) -> None:
    settings = Settings(model_repo=tiny_repo.root, api_key=SecretStr("k-123"), log_level="WARNING")
    grids = np.zeros((1, 8, 8, 192), np.uint8)
    with live_server(settings) as live:
        for module, client in clients(live):
            with pytest.raises(InferenceServerException) as refused:
                client.infer("tiny", [patches(module, grids)])
            assert status(refused.value) in ("401", "StatusCode.UNAUTHENTICATED")
            assert "needs an API key" in refused.value.message()
            answer = client.infer(
                "tiny", [patches(module, grids)], headers={"authorization": "Bearer k-123"}
            )
            assert answer.as_numpy("logits").shape == (1, 10)
            assert client.get_model_metadata("tiny")  # metadata stays open


KSERVE_CLIENT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceRESTClient, RESTConfig
from kserve.protocol.infer_type import InferInput, InferRequest

async def main(url):
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
    ready = await client.is_model_ready(url, "tiny")
    tensor = InferInput(name="patches", shape=[2, 8, 8, 192], datatype="UINT8")
    tensor.set_data_from_numpy(np.zeros((2, 8, 8, 192), np.uint8), binary_data=True)
    request = InferRequest(model_name="tiny", infer_inputs=[tensor], request_id="k-1")
    answer = await client.infer(url, request, model_name="tiny")
    out = {o.name: o.as_numpy().tolist() for o in answer.outputs}
    print(json.dumps({"ready": ready, "id": answer.id, "outputs": out}))
    await client.close()

asyncio.run(main(sys.argv[1]))
"""


def test_kserve_v2_rest_client(live: Live) -> None:
    if importlib.util.find_spec("kserve") is None:  # not imported here: see the docstring
        pytest.skip("the KServe SDK (the `test` extra) is not installed")
    run = subprocess.run(
        [sys.executable, "-c", KSERVE_CLIENT, live.url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    answer = json.loads(run.stdout.strip().splitlines()[-1])
    assert answer["ready"] is True
    assert answer["id"] == "k-1"
    ours = triton_http.InferenceServerClient(live.http).infer(
        "tiny", [patches(triton_http, np.zeros((2, 8, 8, 192), np.uint8))]
    )
    assert np.allclose(answer["outputs"]["logits"], ours.as_numpy("logits"), atol=1e-6)
    assert np.allclose(answer["outputs"]["probabilities"], ours.as_numpy("probabilities"))


def test_draining_turns_readiness_off_and_shutdown_stops_grpc(tiny_repo: TinyRepo) -> None:
    settings = Settings(model_repo=tiny_repo.root, log_level="WARNING")
    grids = np.zeros((1, 8, 8, 192), np.uint8)
    with live_server(settings) as live:
        live.app.state.lifecycle.begin_drain()
        client = triton_grpc.InferenceServerClient(live.grpc)
        assert not client.is_server_ready()
        assert not client.is_model_ready("tiny")
        assert httpx.get(f"{live.url}/v2/health/ready").status_code == 503
        # Served as HTTP requests are while load balancers notice.
        assert client.infer("tiny", [patches(triton_grpc, grids)]).as_numpy("logits") is not None
        address = live.grpc
    with pytest.raises(InferenceServerException) as gone:
        triton_grpc.InferenceServerClient(address).is_server_live(client_timeout=2)
    assert status(gone.value) in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
