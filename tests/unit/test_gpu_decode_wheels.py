"""The GPU decoder's wheels: the `gpu` extra and the GPU image's group name the same three."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DECODER_WHEELS = ("nvidia-nvimgcodec-cu13", "nvidia-nvjpeg", "cvcuda-cu13")


def test_the_gpu_extra_and_the_gpu_images_group_pin_the_decoder_alike() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extra = project["project"]["optional-dependencies"]["gpu"]
    group = project["dependency-groups"]["image-gpu"]
    decoder = [r for r in extra if r.startswith(DECODER_WHEELS)]
    assert decoder == group
    assert [r.split(">=")[0] for r in group] == list(DECODER_WHEELS)


def test_the_gpu_image_installs_the_export_that_holds_them() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG GPU_LOCK=requirements/image-gpu.txt" in dockerfile
    exported = (ROOT / "requirements" / "image-gpu.txt").read_text()
    for name in DECODER_WHEELS:
        assert f"\n{name}==" in exported, name
    assert "\nonnxruntime-gpu==" in exported
