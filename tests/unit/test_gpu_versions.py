"""The GPU image's CUDA, the pip extras' CUDA and TensorRT, and onnxruntime-gpu's own, agree.

Each is read from its source, never from a constant copied here: the Dockerfile's GPU base
image tag and its wheel pins, pyproject.toml's `gpu` extra, and the installed
onnxruntime-gpu wheel (its build info, and the SONAMEs its provider libraries link against).
When onnxruntime-gpu moves to another CUDA major, or the image's base does, these fail until
the others follow: otherwise the image's sessions would quietly run on the CPU.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import onnxruntime as ort
import pytest

from app.runtime import native
from app.runtime.native import CUDA_PROVIDER_LIBRARY, TENSORRT_PROVIDER_LIBRARY

ROOT = Path(__file__).resolve().parents[2]
_ARG = re.compile(r"^ARG\s+([A-Za-z_][A-Za-z0-9_]*)(?:=(.*))?$")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def dockerfile_args(text: str) -> dict[str, str]:
    """Every ARG's default, `${...}` resolved against the ARGs before it; quotes dropped."""
    args: dict[str, str] = {}
    for line in text.splitlines():
        match = _ARG.match(line.strip())
        if match is None or match.group(2) is None:
            continue
        value = match.group(2).strip().strip('"').strip("'")
        args[match.group(1)] = _VAR.sub(lambda m: args.get(m.group(1) or m.group(2), ""), value)
    return args


def gpu_base_image(text: str) -> str:
    """The image the GPU variant is built FROM (its stage `base-gpu`), ARGs resolved."""
    args = dockerfile_args(text)
    for line in text.splitlines():
        match = re.match(r"^FROM\s+(\S+)\s+AS\s+base-gpu\s*$", line.strip(), re.IGNORECASE)
        if match:
            return _VAR.sub(lambda m: args.get(m.group(1) or m.group(2), ""), match.group(1))
    raise AssertionError("the Dockerfile has no stage `base-gpu`")


def cuda_major_of_image(image: str) -> int:
    """nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 -> 13."""
    repository, _, tag = image.partition(":")
    assert repository.endswith("nvidia/cuda"), f"the GPU base is not an nvidia/cuda image: {image}"
    match = re.match(r"(\d+)\.\d+", tag)
    assert match, f"no CUDA version in the GPU base image's tag: {image}"
    return int(match.group(1))


def soname_major(sonames: tuple[str, ...] | list[str], stem: str) -> int:
    """The major a library is linked at: ('libcudart.so.13', ...), 'libcudart' -> 13."""
    majors = {
        int(s.rsplit(".so.", 1)[1].split(".")[0]) for s in sonames if s.startswith(f"{stem}.so.")
    }
    assert len(majors) == 1, f"{stem}: {sorted(sonames)}"
    return majors.pop()


def installed_wheel() -> tuple[int, tuple[str, ...], tuple[str, ...]]:
    """The installed onnxruntime-gpu: its CUDA major (build info), and the SONAMEs its CUDA and
    TensorRT providers link against."""
    cuda_library = native.provider_library(CUDA_PROVIDER_LIBRARY)
    tensorrt_library = native.provider_library(TENSORRT_PROVIDER_LIBRARY)
    version = native.wheel_cuda_version()
    if cuda_library is None or tensorrt_library is None or version is None:
        pytest.skip("onnxruntime-gpu is not installed here (a CPU build of ONNX Runtime)")
    return (
        int(version.split(".")[0]),
        tuple(native.needed_libraries(cuda_library)),
        tuple(native.needed_libraries(tensorrt_library)),
    )


def extra(name: str) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["optional-dependencies"][name])


def requirement_major(requirements: list[str], package: str) -> int:
    """The one major version a requirement allows: 'nvidia-cublas>=13,<14' -> 13."""
    (spec,) = [r for r in requirements if re.split(r"[\[<>=~! ]", r, maxsplit=1)[0] == package]
    low = re.search(r"(?:>=|==|~=)\s*(\d+)", spec)
    high = re.search(r"<\s*(\d+)", spec)
    assert low, f"{spec}: no lower bound"
    if not spec.count("=="):
        assert high and int(high.group(1)) == int(low.group(1)) + 1, f"{spec}: not one major"
    return int(low.group(1))


def test_the_wheels_build_info_and_its_libraries_name_the_same_cuda() -> None:
    major, cuda_needs, tensorrt_needs = installed_wheel()
    assert soname_major(cuda_needs, "libcudart") == major
    assert soname_major(cuda_needs, "libcublas") == major
    assert soname_major(tensorrt_needs, "libcudart") == major


def test_the_gpu_images_cuda_major_is_the_wheels() -> None:
    major, cuda_needs, _ = installed_wheel()
    image = gpu_base_image((ROOT / "Dockerfile").read_text())
    assert cuda_major_of_image(image) == major == soname_major(cuda_needs, "libcudart"), (
        f"the GPU image's base {image} is not CUDA {major}, which onnxruntime-gpu "
        f"{ort.__version__} is built for (its CUDA provider links {sorted(cuda_needs)}): "
        "its sessions would run on the CPU"
    )


def test_the_image_installs_the_onnx_runtime_read_here_and_tensorrt_at_its_sonames() -> None:
    major, _, tensorrt_needs = installed_wheel()
    wheels = dockerfile_args((ROOT / "Dockerfile").read_text()).get("GPU_WHEELS", "").split()
    pins = dict(w.split("==", 1) for w in wheels if "==" in w)
    lock = dockerfile_args((ROOT / "Dockerfile").read_text())["GPU_LOCK"]
    locked = re.search(r"^onnxruntime-gpu==([^\s;]+)", (ROOT / lock).read_text(), re.MULTILINE)
    assert locked, f"the GPU image's lock {lock} has no onnxruntime-gpu"
    assert locked.group(1) == ort.__version__, (
        f"the image installs onnxruntime-gpu {locked.group(1)}, this environment "
        f"{ort.__version__}: reinstall, or these checks read another wheel than the image's"
    )
    tensorrt = [(name, v) for name, v in pins.items() if re.fullmatch(r"tensorrt-cu\d+-libs", name)]
    if not tensorrt:
        pytest.skip("the GPU image installs no TensorRT wheel")
    ((name, version),) = tensorrt
    assert int(name.split("-cu")[1].split("-")[0]) == major, f"{name} is not for CUDA {major}"
    assert int(version.split(".")[0]) == soname_major(tensorrt_needs, "libnvinfer"), (
        f"the image's TensorRT {version} is not the major the provider links: "
        f"{sorted(s for s in tensorrt_needs if s.startswith('libnv'))}"
    )


def test_the_pip_extra_brings_the_wheels_cuda() -> None:
    major, _, _ = installed_wheel()
    gpu = extra("gpu")
    assert any(r.startswith("onnxruntime-gpu[") and "cuda" in r and "cudnn" in r for r in gpu)
    assert requirement_major(gpu, "nvidia-cublas") == major


def test_the_dockerfile_reader_resolves_args_and_finds_the_gpu_base() -> None:
    text = (
        "ARG VARIANT=gpu\n"
        "ARG CUDA=12.6.3\n"
        'ARG CUDA_IMAGE="nvidia/cuda:${CUDA}-cudnn-runtime-ubuntu24.04"\n'
        "FROM ${CUDA_IMAGE} AS base-gpu\n"
        "FROM debian:bookworm-slim AS base-cpu\n"
    )
    assert gpu_base_image(text) == "nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04"
    assert cuda_major_of_image(gpu_base_image(text)) == 12
    assert requirement_major(["nvidia-cublas>=13,<14"], "nvidia-cublas") == 13
