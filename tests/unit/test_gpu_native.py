"""The GPU providers' native libraries (app.runtime.native): read from the provider libraries
themselves, looked for where NVIDIA's wheels put them, loaded by SONAME."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from app.runtime import native
from app.runtime.native import (
    CUDA_PROVIDER_LIBRARY,
    TENSORRT_PROVIDER_LIBRARY,
    ElfError,
    check_library,
    format_tensorrt_version,
    load_all,
    needed_libraries,
    provider_library,
    wheel_directories,
)

ZLIB = "libz.so.1"  # on every machine the project runs on: Python links it


def make_elf(needed: list[str]) -> bytes:
    """A minimal ELF64 shared object holding only a dynamic section with `needed` (not
    loadable: enough for a reader of DT_NEEDED). Its segment is mapped at 0x1000 past its file
    offset, so the string table's address must be translated to be found."""
    base = 0x1000
    strtab = b"\0" + b"".join(n.encode() + b"\0" for n in needed)
    str_off = 64 + 2 * 56
    offsets, at = [], 1
    for n in needed:
        offsets.append(at)
        at += len(n) + 1
    dyn_off = (str_off + len(strtab) + 7) // 8 * 8
    entries = [(1, o) for o in offsets] + [(5, base + str_off), (0, 0)]
    dynamic = b"".join(struct.pack("<qQ", tag, value) for tag, value in entries)
    size = dyn_off + len(dynamic)
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 64, 0, 0, 64, 56, 2, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 4, 0, base, base, size, size, 0x1000)
    dyn = struct.pack(
        "<IIQQQQQQ", 2, 4, dyn_off, base + dyn_off, base + dyn_off, len(dynamic), len(dynamic), 8
    )
    body = header + load + dyn + strtab
    return body + bytes(dyn_off - len(body)) + dynamic


def test_the_needed_sonames_are_read_from_the_dynamic_section(tmp_path: Path) -> None:
    library = tmp_path / "libprovider.so"
    library.write_bytes(make_elf(["libnvinfer.so.10", "libnvonnxparser.so.10", "libc.so.6"]))
    assert needed_libraries(library) == ["libnvinfer.so.10", "libnvonnxparser.so.10", "libc.so.6"]


def test_what_is_not_an_elf_shared_library_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_bytes(b"not a library" * 10)
    with pytest.raises(ElfError, match="not an ELF file"):
        needed_libraries(text)


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) is not installed")
@pytest.mark.parametrize("name", [CUDA_PROVIDER_LIBRARY, TENSORRT_PROVIDER_LIBRARY])
def test_the_providers_needs_are_what_readelf_lists(name: str) -> None:
    library = provider_library(name)
    if library is None:
        pytest.skip(f"this onnxruntime has no {name} (not onnxruntime-gpu)")
    dump = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True).stdout
    assert needed_libraries(library) == re.findall(r"\(NEEDED\)\s+Shared library: \[(.+)\]", dump)


def test_the_tensorrt_probe_checks_every_library_at_the_provider_s_sonames() -> None:
    # Not a hard-coded libnvinfer.so.10 (or .8): whatever the installed provider links against.
    library = provider_library(TENSORRT_PROVIDER_LIBRARY)
    if library is None:
        pytest.skip("this onnxruntime has no TensorRT provider (not onnxruntime-gpu)")
    probe = native.tensorrt_provider()
    assert probe.needed == tuple(needed_libraries(library))
    majors = {s.split(".so.")[0]: s.split(".so.")[1] for s in probe.needed if ".so." in s}
    assert majors["libnvinfer"] == majors["libnvonnxparser"]  # one TensorRT release
    assert "libcudnn" in majors and "libcublas" in majors and "libcudart" in majors


def test_nvidia_wheel_directories_are_found_in_every_site_directory(tmp_path: Path) -> None:
    for folder in ("a/nvidia/cu13/lib", "a/nvidia/cudnn/lib", "a/tensorrt_libs", "b/nvidia/x"):
        (tmp_path / folder).mkdir(parents=True)
    found = wheel_directories([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")])
    assert found == [
        tmp_path / "a/nvidia/cu13/lib",
        tmp_path / "a/nvidia/cudnn/lib",
        tmp_path / "a/tensorrt_libs",
    ]


def test_a_library_off_the_loader_path_is_loaded_from_tensorrt_libs(tmp_path: Path) -> None:
    zlib = next(
        (p for d in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/lib64")
         if (p := Path(d) / ZLIB).exists()),
        None,
    )  # fmt: skip
    if zlib is None:
        pytest.skip(f"{ZLIB} is not where this test looks for it")
    (tmp_path / "tensorrt_libs").mkdir()
    shutil.copy(zlib, tmp_path / "tensorrt_libs" / "libvitserve-probe.so.10")
    loaded, missing = load_all(
        ["libvitserve-probe.so.10", "libvitserve-missing.so.10"], [tmp_path / "tensorrt_libs"]
    )
    assert (loaded.error, loaded.path) == (
        None,
        str(tmp_path / "tensorrt_libs" / "libvitserve-probe.so.10"),
    )
    assert missing.error is not None and missing.path is None


def test_the_reason_names_each_library_that_does_not_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(native, "DRIVER", ZLIB)  # a "driver" that loads on any machine
    library = tmp_path / "libonnxruntime_providers_tensorrt.so"
    library.write_bytes(make_elf([ZLIB, "libnvinfer.so.99", "libnvonnxparser.so.99"]))
    found = check_library(library, [])
    assert not found.present
    assert [m.soname for m in found.missing] == ["libnvinfer.so.99", "libnvonnxparser.so.99"]
    reason = found.reason()
    assert reason is not None and "needs libnvinfer.so.99, libnvonnxparser.so.99" in reason
    assert "site-packages/tensorrt_libs" in reason
    library.write_bytes(make_elf([ZLIB]))
    assert check_library(library, []).reason() is None


@pytest.mark.skipif(native.driver_present(), reason="this machine has a GPU driver")
def test_without_a_driver_nothing_else_is_loaded() -> None:
    library = provider_library(CUDA_PROVIDER_LIBRARY)
    if library is None:
        pytest.skip("this onnxruntime has no CUDA provider (not onnxruntime-gpu)")
    found = check_library(library)
    assert [m.soname for m in found.missing] == [native.DRIVER]
    assert found.reason() == f"no NVIDIA driver ({native.DRIVER} does not load)"
    assert native.gpu() is None


def test_tensorrt_versions_read_as_released() -> None:
    assert format_tensorrt_version(101601) == "10.16.1"
    assert format_tensorrt_version(100003) == "10.0.3"
    assert format_tensorrt_version(8601) == "8.6.1"


def test_the_wheels_cuda_version_is_its_build_info() -> None:
    version = native.wheel_cuda_version()
    if provider_library(CUDA_PROVIDER_LIBRARY) is None:
        pytest.skip("not onnxruntime-gpu")
    assert version is not None and re.fullmatch(r"\d+\.\d+", version)


def test_onnx_runtimes_preload_runs_only_with_a_driver_and_prints_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnxruntime

    calls: list[str] = []

    def preload_dlls() -> None:
        calls.append("called")
        print("Failed to load libcudnn.so.9: not found")  # what it prints where one is missing

    monkeypatch.setattr(onnxruntime, "preload_dlls", preload_dlls, raising=False)
    monkeypatch.setattr(native, "driver_present", lambda: False)
    native.preload_nvidia_wheels()
    assert calls == []
    monkeypatch.setattr(native, "driver_present", lambda: True)
    nvidia = Path(onnxruntime.__file__).parent.parent / "nvidia"
    native.preload_nvidia_wheels()
    assert calls == (["called"] if nvidia.is_dir() else [])  # NVIDIA's wheels beside it
    assert capsys.readouterr().out == ""  # to the debug log, never stdout
