"""POST /classify: answers, parameters and every client error with its status and message.
(The answers against the PyTorch model's: tests/export/test_parity.py.)"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

import app.pipeline.workers as preprocessing_module
from app.pipeline.preprocess import PreparedImage, prepare
from tests.fakes import FakeBackends
from tests.images import jpeg, png
from tests.support import FORMATS_HINT, ClientFactory

pytestmark = pytest.mark.anyio

HOW_TO_SEND = (
    "send each image as a multipart/form-data file field named 'image', or one image as the raw "
    "body with an image/* Content-Type (e.g. image/jpeg)"
)


def raw(data: bytes, content_type: str = "image/jpeg") -> dict[str, Any]:
    return {"content": data, "headers": {"content-type": content_type}}


# --- answers ------------------------------------------------------------------------------------


async def test_top_k_is_clipped_to_the_number_of_classes(client: httpx.AsyncClient) -> None:
    response = await client.post("/classify", params={"top_k": 100}, **raw(jpeg()))
    predictions = response.json()["results"][0]["predictions"]
    assert sorted(p["index"] for p in predictions) == list(range(10))
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-6)


async def test_a_part_sent_as_octet_stream_or_mislabelled_but_decodable_is_accepted(
    client: httpx.AsyncClient,
) -> None:
    files = [
        ("image", ("a.png", png(), "application/octet-stream")),
        ("image", ("b.png", png(), "text/plain")),
    ]
    response = await client.post("/classify", files=files)
    assert response.status_code == 200
    assert len(response.json()["results"]) == 2


async def test_concurrent_requests_are_each_answered(client: httpx.AsyncClient) -> None:
    responses = await asyncio.gather(
        *(client.post("/classify", **raw(jpeg(80, 60, seed=i))) for i in range(12))
    )
    assert [r.status_code for r in responses] == [200] * 12


# --- client errors: exact status and message ----------------------------------------------------


async def expect(response: httpx.Response, status: int, detail: str) -> None:
    assert (response.status_code, response.json()) == (status, {"detail": detail})


async def test_a_text_body_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post("/classify", **raw(b"hello", "text/plain; charset=utf-8"))
    await expect(response, 415, f"Content-Type 'text/plain' is not supported; {HOW_TO_SEND}")


async def test_a_body_without_content_type_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post("/classify", content=jpeg(), headers={"content-type": ""})
    await expect(response, 415, f"the request has no Content-Type; {HOW_TO_SEND}")


async def test_a_request_without_an_image_is_400(client: httpx.AsyncClient) -> None:
    await expect(await client.post("/classify"), 400, f"no image in the request; {HOW_TO_SEND}")
    empty = await client.post("/classify", **raw(b""))
    await expect(empty, 400, f"the request body is empty; {HOW_TO_SEND}")


async def test_a_truncated_jpeg_is_a_400_not_a_500(client: httpx.AsyncClient) -> None:
    data = jpeg(96, 72)
    response = await client.post("/classify", **raw(data[: len(data) * 2 // 3]))
    await expect(
        response,
        400,
        "could not decode image (request body): the JPEG file is truncated or corrupt; "
        "send the complete file",
    )


async def test_a_declared_image_that_is_not_one_is_400_naming_the_file(
    client: httpx.AsyncClient,
) -> None:
    files = [
        ("image", ("ok.png", png(), "image/png")),
        ("image", ("foo.jpg", b"GIF", "image/jpeg")),
    ]
    response = await client.post("/classify", files=files)
    await expect(
        response,
        400,
        f"could not decode image 'foo.jpg': it is not an image in a supported format; "
        f"{FORMATS_HINT}",
    )


async def test_a_part_that_is_neither_declared_nor_decodable_as_an_image_is_415(
    client: httpx.AsyncClient,
) -> None:
    files = [("image", ("notes.txt", b"shopping list", "text/plain"))]
    response = await client.post("/classify", files=files)
    await expect(
        response,
        415,
        f"part 'notes.txt' is declared as 'text/plain' and is not an image; {FORMATS_HINT}",
    )


async def test_a_multipart_body_without_an_image_field_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/classify", files=[("file", ("a.jpg", jpeg(), "image/jpeg"))])
    await expect(
        response, 400, f"no form field 'image' in the request (found fields: file); {HOW_TO_SEND}"
    )


async def test_an_image_field_sent_as_text_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/classify", data={"image": "cat.jpg"}, files={"x": b"1"})
    await expect(
        response,
        400,
        "form field 'image' #1 is text, not a file (its part has no filename); send it as a "
        "file part, e.g. curl -F image=@photo.jpg",
    )


async def test_a_multipart_body_without_a_boundary_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/classify", **raw(b"--x--", "multipart/form-data"))
    await expect(
        response, 400, "could not parse the multipart body: Missing boundary in multipart."
    )


@pytest.mark.parametrize(
    ("params", "status", "detail"),
    [
        ({"model": "resnet"}, 404, "unknown model 'resnet'; served models: tiny"),
        ({"version": 7}, 404, "model 'tiny' has no version 7; served versions: 1, 2"),
        ({"top_k": 0}, 422, "query parameter 'top_k': Input should be greater than or equal to 1"),
        ({"top_k": 101}, 422, "top_k must be between 1 and 100, got 101"),
        (
            {"version": "latest"},
            422,
            "query parameter 'version': Input should be a valid integer, unable to parse string "
            "as an integer",
        ),
        ({"resize": "zoom"}, 422, "query parameter 'resize': Input should be 'crop' or 'fit'"),
    ],
)
async def test_unknown_models_and_bad_parameters(
    client: httpx.AsyncClient, params: dict[str, Any], status: int, detail: str
) -> None:
    await expect(await client.post("/classify", params=params, **raw(jpeg())), status, detail)


# --- limits (a service with small limits) -------------------------------------------------------


async def test_an_upload_over_the_byte_limit_is_413_from_its_content_length(
    make_client: ClientFactory,
) -> None:
    async with make_client(upload_max_bytes=2000) as c:
        response = await c.post("/classify", **raw(b"\xff" * 2001))
        await expect(
            response,
            413,
            "the request body is larger than the limit of 2000 bytes: send smaller images",
        )


async def test_an_upload_over_the_byte_limit_is_413_without_a_content_length(
    make_client: ClientFactory,
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"\xff" * 1000

    async with make_client(upload_max_bytes=2000) as c:
        response = await c.post(
            "/classify", content=chunks(), headers={"content-type": "image/png"}
        )
        assert "content-length" not in response.request.headers
        await expect(
            response,
            413,
            "the request body is larger than the limit of 2000 bytes: send smaller images",
        )


async def test_too_many_images_is_413(make_client: ClientFactory) -> None:
    async with make_client(images_per_request_max=2) as c:
        files = [("image", (f"{i}.png", png(), "image/png")) for i in range(3)]
        response = await c.post("/classify", files=files)
        await expect(
            response,
            413,
            "3 images in one request; the limit is 2: split them over several requests",
        )


async def test_an_image_over_the_pixel_limit_is_413(make_client: ClientFactory) -> None:
    async with make_client(image_max_pixels=5000) as c:
        files = [("image", ("big.png", png(100, 80), "image/png"))]
        response = await c.post("/classify", files=files)
        await expect(
            response,
            413,
            "image 'big.png' has 8000 pixels; the limit is 5000 pixels: "
            "downscale it and send it again",
        )


async def test_a_full_queue_is_503_with_retry_after_and_later_requests_work(
    make_client: ClientFactory,
) -> None:
    fakes = FakeBackends()
    async with make_client(fakes, max_queue_images=1) as c:
        backend = fakes.made[("tiny", 2)]
        backend.gate.clear()
        backend.started.clear()
        running = asyncio.create_task(c.post("/classify", **raw(jpeg())))
        assert await asyncio.to_thread(backend.started.wait, 10)
        queued = asyncio.create_task(c.post("/classify", **raw(jpeg())))
        await asyncio.sleep(0.1)  # let it reach the queue
        refused = await c.post("/classify", **raw(jpeg()))
        await expect(
            refused,
            503,
            "the server is overloaded (inference queue full at 1 images); retry shortly",
        )
        assert refused.headers["retry-after"] == "1"
        backend.gate.set()
        assert [(await t).status_code for t in (running, queued)] == [200, 200]
        assert (await c.post("/classify", **raw(jpeg()))).status_code == 200


async def test_with_every_request_place_taken_a_request_is_refused_at_the_door(
    make_client: ClientFactory,
) -> None:
    """Places = queue (1) + a batch (1): a third request is refused at the door, 503, its body
    read and dropped (never decoded), and counted as `busy`."""
    fakes = FakeBackends()
    async with make_client(
        fakes, max_queue_images=1, max_batch_size=1, upload_max_bytes=10_000
    ) as c:
        backend = fakes.made[("tiny", 2)]
        backend.gate.clear()
        backend.started.clear()
        running = asyncio.create_task(c.post("/classify", **raw(jpeg())))
        assert await asyncio.to_thread(backend.started.wait, 10)
        queued = asyncio.create_task(c.post("/classify", **raw(jpeg())))
        await asyncio.sleep(0.1)  # let it reach the queue
        refused = await c.post("/classify", **raw(jpeg()))
        await expect(
            refused, 503, "the server is overloaded (every request place is taken); retry shortly"
        )
        assert refused.headers["retry-after"] == "1"
        assert "connection" not in refused.headers  # its body was read: the connection is kept
        # A body over the upload limit is not read to its end: that connection is closed.
        large = await c.post("/classify", **raw(jpeg(600, 400, seed=1)))
        assert len(large.request.content) > 10_000
        assert (large.status_code, large.headers["connection"]) == (503, "close")
        assert (await c.get("/healthz")).status_code == 200  # other routes are not refused
        backend.gate.set()
        assert [(await t).status_code for t in (running, queued)] == [200, 200]
        assert (await c.post("/classify", **raw(jpeg()))).status_code == 200
        metrics = (await c.get("/metrics")).text
        assert 'reason="busy",route="/classify",status="503"} 2.0' in metrics


async def test_a_request_still_queued_at_its_deadline_is_504(make_client: ClientFactory) -> None:
    fakes = FakeBackends()
    async with make_client(fakes, request_timeout_s=0.3) as c:
        backend = fakes.made[("tiny", 2)]
        backend.gate.clear()
        backend.started.clear()
        running = asyncio.create_task(c.post("/classify", **raw(jpeg())))
        assert await asyncio.to_thread(backend.started.wait, 10)
        late = await c.post("/classify", **raw(jpeg()))
        await expect(late, 504, "the request timed out waiting for inference")
        backend.gate.set()
        assert (await running).status_code == 200


async def test_a_failing_session_is_a_503_with_a_message_and_the_service_survives(
    make_client: ClientFactory,
) -> None:
    fakes = FakeBackends(fail=True)
    async with make_client(fakes, warmup=False) as c:
        failed = await c.post("/classify", **raw(jpeg()))
        await expect(
            failed,
            503,
            "inference failed for model 'tiny' version 2 (RuntimeError); "
            "the error is logged on the server",
        )
        fakes.made[("tiny", 2)].fail = False
        assert (await c.post("/classify", **raw(jpeg()))).status_code == 200


class HeldDecoder:
    """Stands in for imaging.prepare: waits for `release` before doing the real work."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> PreparedImage:
        self.entered.set()
        self.release.wait(timeout=10)
        return prepare(*args, **kwargs)


async def test_a_request_still_decoding_at_its_deadline_is_504(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoder = HeldDecoder()
    monkeypatch.setattr(preprocessing_module, "prepare", decoder)
    async with make_client(request_timeout_s=0.2) as c:
        response = await c.post("/classify", **raw(jpeg()))
        decoder.release.set()
        await expect(response, 504, "the request timed out while its images were being decoded")


async def test_a_full_decode_queue_is_503(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoder = HeldDecoder()
    monkeypatch.setattr(preprocessing_module, "prepare", decoder)
    async with make_client(max_queue_images=1) as c:
        first = asyncio.create_task(c.post("/classify", **raw(jpeg())))
        assert await asyncio.to_thread(decoder.entered.wait, 10)
        refused = await c.post("/classify", **raw(jpeg()))
        await expect(
            refused, 503, "the server is overloaded (decode queue full at 1 images); retry shortly"
        )
        decoder.release.set()
        assert (await first).status_code == 200
