"""The GPU decoder: nvImageCodec decodes, CV-CUDA resizes and crops, ONNX Runtime patchifies.

Per batch (one model version and grid, in the engine's inference thread):
1. nvImageCodec decodes every JPEG into device memory as RGB, the EXIF orientation applied
   (`DecodeParams.apply_exif_orientation`); its backends in order: the hardware JPEG decoder
   (A100, A30, H100, H200, ...), then nvJPEG on the CUDA cores. An image neither takes comes
   back as None and is refused, as is one whose decoded size is not what the header said.
2. CV-CUDA resizes each one with Pillow's filters (`pillowresize`: the same support and
   antialiasing as Pillow's resize, so the patches stay within a few levels of the CPU path)
   and crops the plan's box (`customcrop`), then stacks them `[A, H, W, 3]`.
3. The patchify graph (app/runtime/patchgraph.py) runs on ONNX Runtime's CUDA provider with
   the stacked pixels bound by device pointer, into an OrtValue on the GPU that the model's
   session binds as its input (app/runtime/backends.py, `OnnxBackend.run_device`).

Everything runs on one CUDA stream, synchronised before ONNX Runtime reads it. The libraries
are imported here only, and this module only where VIT_SERVE_DECODE asks for the GPU.
Written against nvImageCodec 0.9 and CV-CUDA 0.19's Python APIs, as locked; the tests that run
it are marked `gpu`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from app.models.spec import Interpolation
from app.runtime import patchgraph
from app.runtime import providers as prov
from app.runtime.devicedecode import DecodedBatch, EncodedImage

log = logging.getLogger(__name__)


def problem() -> str | None:
    """Why this process cannot decode on the GPU, or None."""
    try:
        import cvcuda  # noqa: F401
        from nvidia import nvimgcodec  # noqa: F401
    except Exception as exc:  # ImportError, or a library that fails to load (OSError)
        return f"the decoder's libraries do not load ({type(exc).__name__}: {exc})"
    import onnxruntime as ort

    if prov.CUDA not in ort.get_available_providers():
        return "ONNX Runtime here has no CUDA provider (the patchify step runs on it)"
    return None


def _interp(cvcuda: Any, interpolation: Interpolation) -> Any:
    return {
        "nearest": cvcuda.Interp.NEAREST,
        "bilinear": cvcuda.Interp.LINEAR,
        "bicubic": cvcuda.Interp.CUBIC,
        "lanczos": cvcuda.Interp.LANCZOS,
    }[interpolation]


class NvDecoder:
    """nvImageCodec + CV-CUDA + the patchify graph on one GPU (`prov.DEVICE_ID`)."""

    def __init__(self, hardware: bool = True) -> None:
        """`hardware`: try the hardware JPEG decoder first (False: nvJPEG on the CUDA cores
        only, for the benchmark's comparison)."""
        import cvcuda
        import onnxruntime as ort
        from nvidia import nvimgcodec

        self._cvcuda = cvcuda
        self._nvimgcodec = nvimgcodec
        kinds = [nvimgcodec.BackendKind.GPU_ONLY]
        if hardware:
            kinds.insert(0, nvimgcodec.BackendKind.HW_GPU_ONLY)
        self.hardware = hardware
        self._decoder = nvimgcodec.Decoder(
            device_id=prov.DEVICE_ID,
            backends=[nvimgcodec.Backend(kind) for kind in kinds],
            # Chroma upsampled as libjpeg (Pillow's) does by default, not by replication:
            # the CPU path's patches are the reference (issue 24's parity).
            options=":fancy_upsampling=1",
        )
        # sRGB, interleaved RGB: a grayscale JPEG comes out with three equal channels, as the
        # CPU path's convert("RGB") makes it.
        self._params = nvimgcodec.DecodeParams(
            apply_exif_orientation=True,
            color_spec=nvimgcodec.ColorSpec.SRGB,
            sample_format=nvimgcodec.SampleFormat.I_RGB,
        )
        self._stream = cvcuda.Stream()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self._patchify = ort.InferenceSession(
            patchgraph.patchify_graph(),
            options,
            providers=[(prov.CUDA, {"device_id": str(prov.DEVICE_ID)})],
        )

    @property
    def name(self) -> str:
        backends = "hardware, then CUDA" if self.hardware else "CUDA"
        return f"nvImageCodec ({backends}) + CV-CUDA"

    def serves(self, provider: str) -> bool:
        return provider in prov.GPU_PROVIDERS

    def decode(self, images: Sequence[EncodedImage]) -> DecodedBatch:
        cvcuda = self._cvcuda
        stream = self._stream
        outcome = DecodedBatch(accepted=[])
        try:
            streams = [self._nvimgcodec.CodeStream(image.data) for image in images]
            decoded = self._decoder.decode(streams, params=self._params, cuda_stream=stream.handle)
        except Exception as exc:  # the whole batch refused: each goes the CPU path
            log.warning("nvImageCodec failed on a batch of %d: %s", len(images), exc)
            outcome.refused = {i: f"nvImageCodec: {exc}" for i in range(len(images))}
            return outcome
        tensors = []
        for i, (image, out) in enumerate(zip(images, decoded, strict=True)):
            reason = self._check(image, out)
            if reason is not None:
                outcome.refused[i] = reason
                continue
            height, width = image.size[1], image.size[0]
            pixels = cvcuda.as_tensor(out, "HWC")
            resized = cvcuda.pillowresize(
                pixels,
                (height, width, 3),
                cvcuda.Format.RGB8,
                _interp(cvcuda, image.interpolation),
                stream=stream,
            )
            if image.box is not None:
                left, top, right, bottom = image.box
                resized = cvcuda.customcrop(
                    resized, cvcuda.RectI(left, top, right - left, bottom - top), stream=stream
                )
            tensors.append(resized)
            outcome.accepted.append(i)
        if not tensors:
            return outcome
        batch = cvcuda.TensorBatch(len(tensors))
        batch.pushback(tensors)
        stacked = cvcuda.stack(batch, stream=stream)  # [A, H, W, 3]; one shape: one grid
        stream.sync()  # ONNX Runtime's stream reads what CV-CUDA's wrote
        outcome.device = self._patchified(stacked, images[outcome.accepted[0]])
        return outcome

    def _check(self, image: EncodedImage, out: Any) -> str | None:
        """Why a decoded image cannot be used, or None."""
        if out is None:
            return "nvImageCodec's backends did not take it"
        if out.buffer_kind != self._nvimgcodec.ImageBufferKind.STRIDED_DEVICE:
            return "decoded into host memory, not the GPU's"
        height, width = int(out.shape[0]), int(out.shape[1])
        channels = int(out.shape[2]) if len(out.shape) > 2 else 1
        if (width, height) != image.image_size or channels != 3:
            return (
                f"decoded {width}x{height}x{channels}, the header said "
                f"{image.image_size[0]}x{image.image_size[1]}x3"
            )
        return None

    def _patchified(self, stacked: Any, first: EncodedImage) -> Any:
        """`stacked` pixels [A, H, W, 3] on the GPU -> an OrtValue [A, gh, gw, P*P*3] there."""
        import onnxruntime as ort

        count, height, width, channels = (int(d) for d in stacked.shape)
        split, merged = patchgraph.shapes(count, height, width, channels, first.patch_size)
        pointer = stacked.cuda().__cuda_array_interface__["data"][0]
        output = ort.OrtValue.ortvalue_from_shape_and_type(merged, np.uint8, "cuda", prov.DEVICE_ID)
        binding = self._patchify.io_binding()
        binding.bind_input(
            patchgraph.INPUT,
            "cuda",
            prov.DEVICE_ID,
            np.uint8,
            [count, height, width, channels],
            pointer,
        )
        binding.bind_cpu_input(patchgraph.SPLIT, np.array(split, dtype=np.int64))
        binding.bind_cpu_input(patchgraph.MERGED, np.array(merged, dtype=np.int64))
        binding.bind_ortvalue_output(patchgraph.OUTPUT, output)
        self._patchify.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return output
