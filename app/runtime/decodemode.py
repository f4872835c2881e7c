"""Which device decoder serves, from VIT_SERVE_DECODE and where the models run.

`cpu`: none, today's path. `gpu`: the GPU decoder (app/runtime/nvdecode.py), or a start error
saying why it cannot run here. `auto` (the default): the GPU decoder where its libraries load
and some model version runs on CUDA or TensorRT, else none, so a CPU host never imports them.
"""

from __future__ import annotations

import logging
from typing import Literal

from app.runtime import nvdecode
from app.runtime.devicedecode import DeviceDecoder

log = logging.getLogger(__name__)

DecodeMode = Literal["cpu", "gpu", "auto"]


class DecodeUnavailableError(RuntimeError):
    """VIT_SERVE_DECODE=gpu, and the device path cannot run here: why."""


def unavailable_reason() -> str | None:
    """Why the GPU decoder cannot run in this process, or None when it can (its libraries
    import and find a device)."""
    return nvdecode.problem()  # imports the libraries: only where VIT_SERVE_DECODE asks for them


def open_decoder(mode: DecodeMode, gpu_served: bool) -> tuple[DeviceDecoder | None, str]:
    """The decoder VIT_SERVE_DECODE asks for, and why (or why none), for the engine.

    `gpu_served`: some model version's sessions run on CUDA or TensorRT here.
    """
    if mode == "cpu":
        return None, "VIT_SERVE_DECODE=cpu"
    problem = None if gpu_served else "no model version runs on a GPU (CUDA or TensorRT)"
    if problem is None:
        problem = unavailable_reason()
    if problem is not None:
        if mode == "gpu":
            raise DecodeUnavailableError(
                f"VIT_SERVE_DECODE=gpu, but images cannot be decoded on the GPU: {problem}; "
                "install the gpu extra's decoder wheels (nvidia-nvimgcodec-cu13, nvidia-nvjpeg, "
                "cvcuda-cu13) and serve on CUDA or TensorRT, or set VIT_SERVE_DECODE=auto or cpu"
            )
        log.info("decoding on the CPU (VIT_SERVE_DECODE=auto): %s", problem)
        return None, problem
    decoder = nvdecode.NvDecoder()
    return decoder, f"VIT_SERVE_DECODE={mode}: {decoder.name}"
