"""The Open Inference Protocol over HTTP (/v2), over ASGI: bodies made and read by tritonclient's
own codec (`generate_request_body`, `parse_response_body`), and a few hand-made for what a
client library would never send."""

from __future__ import annotations

import gzip
import json
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from pydantic import SecretStr
from tritonclient.http import InferenceServerClient as Codec

from app.core.settings import Settings
from app.pipeline.service import ClassifyService
from tests.images import png
from tests.support import TinyRepo, serve
from tests.v2_support import HeldBackends, wait_until

pytestmark = pytest.mark.anyio

INFER = "/v2/models/tiny/infer"


def image_input(*images: bytes, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=binary)
    return tensor


def patches_input(patches: np.ndarray, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("patches", list(patches.shape), "UINT8")
    tensor.set_data_from_numpy(patches, binary_data=binary)
    return tensor


def service_of(client: httpx.AsyncClient) -> ClassifyService:
    transport = client._transport
    assert isinstance(transport, httpx.ASGITransport)
    service: ClassifyService = transport.app.state.service  # type: ignore[attr-defined]
    return service


def int32_patches(patches: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("patches", list(patches.shape), "INT32")
    tensor.set_data_from_numpy(patches)
    return tensor


async def infer(
    client: httpx.AsyncClient,
    inputs: list[triton.InferInput],
    outputs: list[triton.InferRequestedOutput] | None = None,
    path: str = INFER,
    headers: dict[str, str] | None = None,
    timeout_us: int | None = None,
    **parameters: Any,
) -> httpx.Response:
    body, json_size = Codec.generate_request_body(
        inputs, outputs=outputs, timeout=timeout_us, parameters=parameters or None
    )
    sent = dict(headers or {})
    if json_size is not None:
        sent["Inference-Header-Content-Length"] = str(json_size)
    return await client.post(path, content=body, headers=sent)


def result(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    length = response.headers.get("inference-header-content-length")
    return Codec.parse_response_body(
        response.content, header_length=int(length) if length else None
    )


@pytest.fixture(scope="module")
async def v2(tiny_repo: TinyRepo) -> Any:
    async with serve(Settings(model_repo=tiny_repo.root)) as client:
        yield client


async def test_server_metadata_and_health(v2: httpx.AsyncClient) -> None:
    meta = (await v2.get("/v2")).json()
    assert meta["name"] == "vit-serve"
    assert {"binary_tensor_data", "classification"} <= set(meta["extensions"])
    assert (await v2.get("/v2/health/live")).json() == {"live": True}
    assert (await v2.get("/v2/health/ready")).json() == {"ready": True}


@pytest.mark.parametrize("path", ["/v2/models/tiny", "/v2/models/tiny/versions/1"])
async def test_model_metadata(v2: httpx.AsyncClient, path: str) -> None:
    meta = (await v2.get(path)).json()
    assert meta["name"] == "tiny"
    assert meta["versions"] == ["1", "2"]
    assert meta["platform"] == "onnx_onnxv1"
    assert meta["inputs"] == [
        {"name": "image", "datatype": "BYTES", "shape": [-1]},
        {"name": "patches", "datatype": "UINT8", "shape": [-1, -1, -1, 192]},
    ]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities", "rollout"]
    assert meta["outputs"][0]["shape"] == [-1, 10]
    assert json.loads(meta["parameters"]["labels"]) == [f"class-{i}" for i in range(10)]
    assert meta["parameters"]["version"] == ("1" if path.endswith("/1") else "2")


async def test_model_ready_and_unknown_models(v2: httpx.AsyncClient) -> None:
    assert (await v2.get("/v2/models/tiny/ready")).json() == {"name": "tiny", "ready": True}
    assert (await v2.get("/v2/models/tiny/versions/2/ready")).status_code == 200
    for path in ("/v2/models/nope", "/v2/models/tiny/versions/9", "/v2/models/tiny/versions/x"):
        response = await v2.get(path)
        assert response.status_code == 404, path
        assert "error" in response.json()
    response = await v2.get("/v2/models/nope/ready")
    assert response.status_code == 404
    assert response.json() == {"error": "unknown model 'nope'; served models: tiny"}


async def test_image_bytes_answer_as_classify_does(v2: httpx.AsyncClient) -> None:
    images = [png(96, 72, seed=1), png(64, 64, seed=2)]
    answer = result(await infer(v2, [image_input(*images)]))
    logits, probs = answer.as_numpy("logits"), answer.as_numpy("probabilities")
    assert logits.shape == probs.shape == (2, 10)
    assert logits.dtype == np.float32
    assert answer.get_response()["model_version"] == "2"
    for i, image in enumerate(images):
        classify = await v2.post(
            "/classify?top_k=10", files={"image": ("a.png", image, "image/png")}
        )
        scores = {p["index"]: p["score"] for p in classify.json()["results"][0]["predictions"]}
        assert np.allclose([scores[c] for c in range(10)], probs[i], atol=1e-6)


async def test_patches_json_and_binary_give_the_same_logits(v2: httpx.AsyncClient) -> None:
    patches = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 192), dtype=np.uint8)
    binary = result(await infer(v2, [patches_input(patches)]))
    as_json = await infer(
        v2,
        [patches_input(patches, binary=False)],
        [triton.InferRequestedOutput("logits", binary_data=False)],
    )
    assert "inference-header-content-length" not in as_json.headers
    body = as_json.json()
    assert body["outputs"][0]["shape"] == [3, 10]
    assert np.allclose(
        np.array(body["outputs"][0]["data"]).reshape(3, 10), binary.as_numpy("logits"), atol=1e-5
    )
    # A different grid (the graph resamples its position embeddings), version 1.
    wide = result(
        await infer(
            v2,
            [patches_input(patches.reshape(3, 4, 16, 192))],
            path="/v2/models/tiny/versions/1/infer",
        )
    )
    assert wide.get_response()["model_version"] == "1"
    assert wide.as_numpy("logits").shape == (3, 10)


async def test_rollout_and_classification(v2: httpx.AsyncClient) -> None:
    outputs = [
        triton.InferRequestedOutput("probabilities", class_count=3),
        triton.InferRequestedOutput("rollout"),
    ]
    answer = result(
        await infer(v2, [image_input(png(seed=3))], outputs, head_fusion="max", discard_ratio=0.5)
    )
    rollout = answer.as_numpy("rollout")
    assert rollout.shape == (1, 8, 8)
    assert rollout.max() == pytest.approx(1.0)
    top = [entry.decode().split(":") for entry in answer.as_numpy("probabilities")[0]]
    assert len(top) == 3
    assert [float(s) for s, _, _ in top] == sorted((float(s) for s, _, _ in top), reverse=True)
    assert all(label == f"class-{index}" for _, index, label in top)


@pytest.mark.parametrize(
    ("inputs", "parameters", "message"),
    [
        (
            lambda: [patches_input(np.zeros((2, 8, 8, 100), np.uint8))],
            {},
            "patches of shape [2, 8, 8, 100]: model 'tiny' takes [N, grid_h, grid_w, 192]",
        ),
        (
            lambda: [patches_input(np.zeros((1, 40, 40, 192), np.uint8))],
            {},
            "a grid of 40x40 patches is over model 'tiny''s limit of 128 patches per image",
        ),
        (
            lambda: [int32_patches(np.zeros((2, 8, 8, 192), np.int32))],
            {},
            "input 'patches' must be UINT8",
        ),
        (lambda: [image_input(b"not an image")], {}, "could not decode image #1"),
        (
            lambda: [image_input(png()), patches_input(np.zeros((1, 8, 8, 192), np.uint8))],
            {},
            "a request takes exactly one input",
        ),
        (lambda: [image_input(png())], {"resize": "stretch"}, "parameter 'resize'"),
        (lambda: [image_input(png())], {"rollout": True, "head_fusion": "avg"}, "head_fusion"),
    ],
)
async def test_bad_input_is_400_with_the_reason(
    v2: httpx.AsyncClient, inputs: Any, parameters: dict[str, Any], message: str
) -> None:
    response = await infer(v2, inputs(), **parameters)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


async def test_hand_made_bodies(v2: httpx.AsyncClient) -> None:
    patches = np.zeros((1, 8, 8, 192), np.uint8)
    tensor: dict[str, Any] = {"name": "patches", "shape": [1, 8, 8, 192], "datatype": "UINT8"}
    tensor["data"] = patches.tolist()  # nested, not flat
    request: dict[str, Any] = {"id": "r-1", "inputs": [tensor], "outputs": [{"name": "logits"}]}
    response = await v2.post(INFER, json=request)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "r-1"
    assert len(response.json()["outputs"][0]["data"]) == 10
    # Compressed, as tritonclient sends with request_compression_algorithm="gzip".
    zipped = await v2.post(
        INFER,
        content=gzip.compress(json.dumps(request).encode()),
        headers={"Content-Encoding": "gzip"},
    )
    assert zipped.json()["outputs"] == response.json()["outputs"]
    cases: list[tuple[str, str]] = [
        ("{", "the inference request is not valid"),
        (json.dumps({**request, "inputs": [{**tensor, "data": [300]}]}), "needs"),
        (json.dumps({**request, "outputs": [{"name": "scores"}]}), "unknown output 'scores'"),
    ]
    for body, message in cases:
        bad = await v2.post(INFER, content=body)
        assert bad.status_code == 400, bad.text
        assert message in bad.json()["error"]
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "patches",
                    "shape": [1, 8, 8, 192],
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": 12288},
                }
            ]
        }
    ).encode()
    short = await v2.post(
        INFER,
        content=header + bytes(100),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert short.status_code == 400
    assert "declares 12288 bytes of binary data" in short.json()["error"]


async def test_overload_is_503_with_retry_after(tiny_repo: TinyRepo) -> None:
    backends = HeldBackends()
    settings = Settings(
        model_repo=tiny_repo.root, max_queue_images=2, max_batch_size=1, warmup=False
    )
    async with serve(settings, backends) as client:
        backends.gate.clear()
        patches = np.zeros((1, 8, 8, 192), np.uint8)
        async with anyio.create_task_group() as group:
            group.start_soon(infer, client, [patches_input(patches)])  # running
            await wait_until(backends.started)
            for _ in range(2):  # queued: every place is taken
                group.start_soon(infer, client, [patches_input(patches)])
            await wait_until(lambda: service_of(client).engine.busy)
            refused = await infer(client, [patches_input(patches)])
            backends.gate.set()
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert "connection" not in refused.headers  # its body was read: the connection goes on
        assert "overloaded" in refused.json()["error"]


async def test_deadline_is_504(tiny_repo: TinyRepo) -> None:
    backends = HeldBackends()
    settings = Settings(model_repo=tiny_repo.root, warmup=False)
    async with serve(settings, backends) as client:
        backends.gate.clear()
        patches = np.zeros((1, 8, 8, 192), np.uint8)
        async with anyio.create_task_group() as group:
            group.start_soon(infer, client, [patches_input(patches)])  # holds the runtime
            await wait_until(backends.started)
            late = await infer(client, [patches_input(patches)], timeout_us=50_000)  # 50 ms
            header = await infer(
                client, [patches_input(patches)], headers={"X-Request-Timeout-Ms": "50"}
            )
            backends.gate.set()
        for response in (late, header):
            assert response.status_code == 504, response.text
            assert "timed out" in response.json()["error"]


async def test_access_key_guards_inference_only(tiny_repo: TinyRepo) -> None:
    settings = Settings(model_repo=tiny_repo.root, api_key=SecretStr("s3cret-key"))
    async with serve(settings) as client:
        patches = [patches_input(np.zeros((1, 8, 8, 192), np.uint8))]
        refused = await infer(client, patches)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        assert "needs an API key" in refused.json()["error"]
        wrong = await infer(client, patches, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = await infer(client, patches, headers={"X-API-Key": "s3cret-key"})
        assert ok.status_code == 200
        assert (await client.get("/v2/models/tiny")).status_code == 200
        assert (await client.get("/v2/health/ready")).status_code == 200


async def test_routing_errors_under_v2_carry_the_protocols_error_key(v2: httpx.AsyncClient) -> None:
    # tritonclient reads {"error"}; a bare {"detail"} made it raise a KeyError instead.
    missing = await v2.get("/v2/no/such/route")
    assert (missing.status_code, missing.json()) == (404, {"error": "Not Found"})
    wrong_method = await v2.delete("/v2/models/tiny/infer")
    assert (wrong_method.status_code, wrong_method.json()) == (
        405,
        {"error": "Method Not Allowed"},
    )
    assert "allow" in wrong_method.headers
    # Elsewhere the service's own shape stays.
    elsewhere = await v2.get("/no/such/route")
    assert (elsewhere.status_code, elsewhere.json()) == (404, {"detail": "Not Found"})
