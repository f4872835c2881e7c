"""The device path's parts that run anywhere (the patchify graph, the decode mode, encoded
images across the process boundary), and the GPU decoder itself where a GPU is."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import onnxruntime as ort
import pytest

from app.core.settings import Settings
from app.engine import wire
from app.engine.arena import Arena, Layout
from app.pipeline.preprocess import patchify, prepare
from app.pipeline.routing import DecodeRouter
from app.pipeline.workers import Upload
from app.runtime import nvdecode, patchgraph
from app.runtime.decodemode import DecodeUnavailableError, open_decoder
from app.runtime.devicedecode import EncodedImage
from app.runtime.hostdecode import HostDecoder
from app.runtime.providers import CPU, CUDA
from tests.images import jpeg
from tests.support import make_spec
from tests.unit.test_decode_routing import served

SPEC = make_spec()


@pytest.mark.parametrize(("height", "width", "patch"), [(32, 48, 16), (24, 8, 8), (14, 28, 14)])
def test_the_patchify_graph_makes_the_cpu_paths_patches(
    height: int, width: int, patch: int
) -> None:
    session = ort.InferenceSession(patchgraph.patchify_graph(), providers=[CPU])
    pixels = np.random.default_rng(0).integers(0, 256, (3, height, width, 3), dtype=np.uint8)
    split, merged = patchgraph.shapes(3, height, width, 3, patch)
    (patches,) = session.run(
        None,
        {patchgraph.INPUT: pixels, patchgraph.SPLIT: np.array(split), "merged": np.array(merged)},
    )
    assert patches.dtype == np.uint8
    for i in range(3):
        np.testing.assert_array_equal(patches[i], patchify(pixels[i], patch))


def test_decode_gpu_where_it_cannot_run_is_a_start_error_saying_why() -> None:
    with pytest.raises(DecodeUnavailableError) as raised:
        open_decoder("gpu", gpu_served=False)
    assert str(raised.value).startswith(
        "VIT_SERVE_DECODE=gpu, but images cannot be decoded on the GPU: no model version runs "
        "on a GPU (CUDA or TensorRT); install the gpu extra's decoder wheels"
    )
    assert open_decoder("auto", gpu_served=False) == (
        None,
        "no model version runs on a GPU (CUDA or TensorRT)",
    )
    assert open_decoder("cpu", gpu_served=True) == (None, "VIT_SERVE_DECODE=cpu")
    assert Settings().decode == "auto"


def _encoded(data: bytes) -> EncodedImage:
    route = DecodeRouter(Settings()).route(
        Upload(data, "'x.jpg'", "image/jpeg"), served(), "crop", rollout=False
    )
    assert route.encoded is not None
    return route.encoded


def test_encoded_images_cross_in_shared_memory_byte_for_byte_with_their_plans() -> None:
    images = [_encoded(jpeg(96, 72, seed=1)), _encoded(jpeg(64, 80, seed=2))]
    owner = Arena.create(1 << 20)
    engine = Arena.attach(os.dup(owner.fd), owner.size)
    patches = np.full((8, 8, SPEC.architecture.patch_dim), 7, dtype=np.uint8)
    layout = Layout(
        ((8, 8),), SPEC.architecture.patch_dim, 10, False, tuple(len(i.data) for i in images)
    )
    block = owner.alloc(layout.size)
    assert block is not None
    owner.patches(block, layout)[0][...] = patches
    for view, image in zip(owner.encoded(block, layout), images, strict=True):
        view[:] = image.data
    plans = wire.unpack(wire.pack({"plans": [wire.encoded_of(i) for i in images]}))["plans"]
    got = [
        wire.encoded_from(plan, bytes(view))
        for plan, view in zip(plans, engine.encoded(block, layout), strict=True)
    ]
    assert got == images
    np.testing.assert_array_equal(engine.patches(block, layout)[0], patches)
    assert engine.logits(block, layout).shape == (3, 10)  # a row per image, patches first


def test_the_stand_in_decodes_as_the_cpu_path_and_refuses_what_it_cannot() -> None:
    data = jpeg(96, 72, seed=3)
    decoder = HostDecoder()
    good = _encoded(data)
    broken = dataclasses.replace(good, data=data[: len(data) // 3])  # Pillow fails on it
    batch = decoder.decode([good, broken])
    cpu = prepare(data, SPEC, "crop", name="'x.jpg'", max_pixels=10**8, fit_max_tokens=128)
    assert batch.accepted == [0] and batch.host is not None
    np.testing.assert_array_equal(batch.host[0], cpu.patches)
    assert list(batch.refused) == [1]


# --- on a GPU ---------------------------------------------------------------------------------

needs_gpu_decoder = pytest.mark.skipif(
    nvdecode.problem() is not None or CUDA not in ort.get_available_providers(),
    reason=f"needs a GPU with the decoder's wheels: {nvdecode.problem()}",
)


@pytest.mark.gpu
@needs_gpu_decoder
@pytest.mark.parametrize("hardware", [True, False], ids=["hardware", "cuda"])
def test_the_gpu_decoder_makes_patches_close_to_the_cpu_paths(hardware: bool) -> None:
    images = [jpeg(96, 72, seed=s) for s in range(4)]
    decoder = nvdecode.NvDecoder(hardware=hardware)
    batch = decoder.decode([_encoded(d) for d in images])
    assert batch.accepted == [0, 1, 2, 3] and batch.refused == {}
    patches = batch.device.numpy()  # copied to the host here, for the comparison only
    for i, data in enumerate(images):
        cpu = prepare(data, SPEC, "crop", name="'x.jpg'", max_pixels=10**8, fit_max_tokens=128)
        diff = np.abs(patches[i].astype(np.int16) - cpu.patches.astype(np.int16))
        assert diff.mean() <= 1.5 and np.percentile(diff, 99) <= 8
