"""The device-decode path end to end, driven by the host stand-in (Pillow behind the device
decoder's protocol): which image goes where and why, the bytes handed over, the fallback to
the CPU path when the device refuses, and the counts in /metrics and /models."""

from __future__ import annotations

import re

import httpx
import pytest

from app.core.settings import Settings
from app.runtime.devicedecode import EncodedImage
from app.runtime.hostdecode import HostDecoder
from tests.images import encode, jpeg, smooth
from tests.support import ODD_IMAGES, PHOTOS, TinyRepo, need_folder, remote_of, serve

pytestmark = pytest.mark.anyio


def counted(metrics: str, path: str, reason: str) -> float:
    found = re.search(
        rf'vit_serve_decode_images_total\{{model="tiny",path="{path}",reason="{reason}"\}} (\S+)',
        metrics,
    )
    return float(found.group(1)) if found else 0.0


async def classify(client: httpx.AsyncClient, files: list[tuple[str, bytes]]) -> httpx.Response:
    parts = [("image", (name, data, "image/jpeg")) for name, data in files]
    return await client.post("/classify", params={"top_k": 10}, files=parts)


async def test_jpegs_go_to_the_device_with_their_bytes_others_stay_and_answers_match(
    tiny_repo: TinyRepo,
) -> None:
    decoder = HostDecoder()
    files = [
        ("a.jpg", jpeg(96, 72, seed=1)),
        ("p.jpg", jpeg(96, 72, seed=2, progressive=True)),
        ("b.png", encode(smooth(50, 70), "PNG")),
        ("c.jpg", jpeg(72, 96, seed=3, subsampling=0)),
    ]
    settings = Settings(model_repo=tiny_repo.root)
    async with serve(settings, device_decoder=decoder) as client:
        gpu = await classify(client, files)
        models = (await client.get("/models")).json()["models"][0]
        metrics = (await client.get("/metrics")).text
    async with serve(settings) as client:  # today's path for all four
        cpu = await classify(client, files)
    assert gpu.status_code == cpu.status_code == 200, gpu.text
    # Only the two baseline JPEGs reached the decoder, in one request's order, as uploaded.
    assert [image.name for image in decoder.seen] == ["'a.jpg'", "'c.jpg'"]
    assert [image.data for image in decoder.seen] == [files[0][1], files[3][1]]
    # Small images: no reduced-scale decode on the CPU path, so the patches, and the answers,
    # are the same to the bit.
    assert gpu.json()["results"] == cpu.json()["results"]
    assert counted(metrics, "gpu", "jpeg") == 2
    assert counted(metrics, "cpu", "progressive") == 1
    assert counted(metrics, "cpu", "format") == 1
    assert models["decode"] == {
        "where": "gpu",
        "decoder": "host stand-in (Pillow)",
        "images": {"gpu/jpeg": 2, "cpu/progressive": 1, "cpu/format": 1},
    }


async def test_what_the_device_refuses_is_decoded_on_the_cpu_and_answered(
    tiny_repo: TinyRepo,
) -> None:
    def refuse(image: EncodedImage) -> str | None:
        return "the hardware backend does not take it" if image.name == "'r.jpg'" else None

    decoder = HostDecoder(refuse)
    files = [("k.jpg", jpeg(seed=4)), ("r.jpg", jpeg(seed=5))]
    settings = Settings(model_repo=tiny_repo.root)
    async with serve(settings, device_decoder=decoder) as client:
        gpu = await classify(client, files)
        metrics = (await client.get("/metrics")).text
    async with serve(settings) as client:
        cpu = await classify(client, files)
    assert gpu.status_code == 200, gpu.text
    assert gpu.json()["results"] == cpu.json()["results"]
    assert len(decoder.seen) == 2
    assert (counted(metrics, "gpu", "jpeg"), counted(metrics, "cpu", "refused")) == (1, 1)


async def test_a_corrupt_jpeg_the_device_refuses_gets_the_cpu_paths_400(
    tiny_repo: TinyRepo,
) -> None:
    corrupt = bytearray(jpeg())
    sos = corrupt.index(b"\xff\xda")
    corrupt[sos + 6] = 0x33  # the scan names Huffman tables the file does not define
    decoder = HostDecoder()  # Pillow fails on it too: refused, with its error
    async with serve(Settings(model_repo=tiny_repo.root), device_decoder=decoder) as client:
        response = await classify(client, [("ok.jpg", jpeg()), ("bad.jpg", bytes(corrupt))])
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 400
    assert response.json()["detail"] == (
        "could not decode image 'bad.jpg': the JPEG file is truncated or corrupt; "
        "send the complete file"
    )
    assert [image.name for image in decoder.seen] == ["'ok.jpg'", "'bad.jpg'"]
    assert counted(metrics, "cpu", "refused") == 1


async def test_with_decode_cpu_or_a_rollout_nothing_reaches_the_decoder(
    tiny_repo: TinyRepo,
) -> None:
    decoder = HostDecoder()
    async with serve(Settings(model_repo=tiny_repo.root, decode="cpu")) as client:
        response = await classify(client, [("a.jpg", jpeg())])
        models = (await client.get("/models")).json()["models"][0]
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 200
    assert models["decode"]["where"] == "cpu"
    assert models["decode"]["decoder"] == "VIT_SERVE_DECODE=cpu"
    assert counted(metrics, "cpu", "off") == 1
    async with serve(Settings(model_repo=tiny_repo.root), device_decoder=decoder) as client:
        parts = [("image", ("a.jpg", jpeg(), "image/jpeg"))]
        response = await client.post("/classify", params={"rollout": "true"}, files=parts)
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 200, response.text
    assert decoder.seen == [] and counted(metrics, "cpu", "rollout") == 1


async def test_auto_on_a_cpu_host_decodes_on_the_cpu_and_says_why(tiny_repo: TinyRepo) -> None:
    async with serve(Settings(model_repo=tiny_repo.root)) as client:
        models = (await client.get("/models")).json()["models"][0]
    assert models["decode"]["where"] == "cpu"
    assert models["decode"]["decoder"] == "no model version runs on a GPU (CUDA or TensorRT)"


@pytest.mark.needs_shared
async def test_the_shared_images_get_the_answers_they_get_today(tiny_repo: TinyRepo) -> None:
    need_folder(PHOTOS, "the shared photos")
    need_folder(ODD_IMAGES, "the shared odd images")
    paths = sorted(PHOTOS.glob("*.JPEG"))[:20] + sorted(ODD_IMAGES.iterdir())
    settings = Settings(model_repo=tiny_repo.root)
    answers: dict[str, list[tuple[int, str]]] = {"cpu": [], "gpu": []}
    decoder = HostDecoder()
    for where, device in (("cpu", None), ("gpu", decoder)):
        async with serve(settings, device_decoder=device) as client:
            for path in paths:
                parts = [("image", (path.name, path.read_bytes(), "application/octet-stream"))]
                response = await client.post("/classify", files=parts)
                assert response.status_code in (200, 400, 413), (path.name, response.text)
                body = response.json()
                key = body["detail"] if response.status_code != 200 else body["results"][0]["grid"]
                answers[where].append((response.status_code, str(key)))
            metrics = (await client.get("/metrics")).text
    assert [s for s, _ in answers["gpu"]] == [s for s, _ in answers["cpu"]]
    assert [k for _, k in answers["gpu"]] == [k for _, k in answers["cpu"]]
    assert counted(metrics, "gpu", "jpeg") >= 20  # the photos, at least
    assert len(decoder.seen) == counted(metrics, "gpu", "jpeg") + counted(metrics, "cpu", "refused")


async def test_encoded_images_cross_to_an_engine_process_and_refusals_come_back(
    tiny_repo: TinyRepo,
) -> None:
    """The engine's host and a front end's RemoteEngine over their Unix socket (one process
    here): the bytes the decoder gets are the upload's, and a refusal comes back as one."""
    import time

    from app.engine import Job, Refused
    from app.main import load_engine
    from app.pipeline.routing import DecodeRouter
    from app.pipeline.workers import Upload

    decoder = HostDecoder(lambda image: "no" if image.name == "'r.jpg'" else None)
    settings = Settings(model_repo=tiny_repo.root)
    engine = load_engine(settings, device_decoder=decoder)
    async with remote_of(engine) as remote:
        permit = await remote.admit(None, None)
        assert permit.served.device_decode
        router = DecodeRouter(settings)
        uploads = [Upload(jpeg(seed=7), "'k.jpg'"), Upload(jpeg(seed=8), "'r.jpg'")]
        encoded = []
        for upload in uploads:
            route = router.route(upload, permit.served, "crop", rollout=False)
            assert route.encoded is not None
            encoded.append(route.encoded)
        result = await remote.infer(permit, Job([], None, time.monotonic() + 10, encoded))
        permit.release()
        local = await engine.infer(
            engine.admit_now(None, None), Job([], None, time.monotonic() + 10, encoded[:1])
        )
    assert [image.data for image in decoder.seen[:2]] == [u.data for u in uploads]
    kept, refused = result.decoded
    assert refused == Refused("no")
    assert not isinstance(kept, Refused) and not isinstance(local.decoded[0], Refused)
    assert kept.logits.tolist() == local.decoded[0].logits.tolist()
