"""The native libraries ONNX Runtime's GPU providers link against: which, where, and loading them.

onnxruntime-gpu's CUDA and TensorRT providers are shared libraries
(`onnxruntime/capi/libonnxruntime_providers_{cuda,tensorrt}.so`) that the dynamic loader links
against CUDA, cuDNN and TensorRT by SONAME (`libcublas.so.13`, `libnvinfer.so.10`, ...). When
one of those does not load, ONNX Runtime drops the provider with a line on stderr and the
session runs on the CPU. So the service asks first: it reads the SONAMEs each provider needs
from the provider library itself (its ELF `DT_NEEDED` entries: no version is written down
here), and loads each one, from the loader's path or, failing that, from the directories that
NVIDIA's wheels install them in (`site-packages/nvidia/*/lib` for CUDA and cuDNN,
`site-packages/tensorrt_libs` for TensorRT), which are not on the loader's path. A library
loaded by its full path satisfies a later `DT_NEEDED` of the same SONAME, so loading is also
preloading: what `onnxruntime.preload_dlls()` does for the CUDA and cuDNN wheels, extended to
TensorRT's wheel and to every site directory, and without printing.

Nothing here needs a GPU: on a machine without one the driver (`libcuda.so.1`) is what is
missing, and the answer says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import logging
import mmap
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime

log = logging.getLogger(__name__)

CUDA_PROVIDER_LIBRARY = "libonnxruntime_providers_cuda.so"
TENSORRT_PROVIDER_LIBRARY = "libonnxruntime_providers_tensorrt.so"
DRIVER = "libcuda.so.1"

_DT_NULL = 0
_DT_NEEDED = 1
_DT_STRTAB = 5
_PT_LOAD = 1
_PT_DYNAMIC = 2


class ElfError(ValueError):
    """Not an ELF shared library this reader understands."""


def needed_libraries(path: Path) -> list[str]:
    """The SONAMEs `path` (an ELF shared library) is linked against: its DT_NEEDED entries, in
    order, as `readelf -d` lists them. Read through a memory map: a provider library is
    hundreds of MB, of which this reads a few pages."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _needed(data, path)


def _needed(data: mmap.mmap, path: Path) -> list[str]:
    if data[:4] != b"\x7fELF":
        raise ElfError(f"{path}: not an ELF file")
    wide = {1: False, 2: True}.get(data[4])
    order = {1: "<", 2: ">"}.get(data[5])
    if wide is None or order is None:
        raise ElfError(f"{path}: unknown ELF class or byte order")
    # ELF header: where the program headers are; their layout; a dynamic entry's layout.
    if wide:
        (phoff,) = struct.unpack_from(order + "Q", data, 0x20)
        phentsize, phnum = struct.unpack_from(order + "HH", data, 0x36)
        segment, entry = order + "IIQQQQ", order + "qQ"  # p_type p_flags p_offset p_vaddr ...
    else:
        (phoff,) = struct.unpack_from(order + "I", data, 0x1C)
        phentsize, phnum = struct.unpack_from(order + "HH", data, 0x2A)
        segment, entry = order + "IIIII", order + "iI"  # p_type p_offset p_vaddr p_paddr ...
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz) of each PT_LOAD
    dynamic: tuple[int, int] | None = None  # (offset, filesz) of PT_DYNAMIC
    for i in range(phnum):
        fields = struct.unpack_from(segment, data, phoff + i * phentsize)
        if wide:
            p_type, _, p_offset, p_vaddr, _, p_filesz = fields
        else:
            p_type, p_offset, p_vaddr, _, p_filesz = fields
        if p_type == _PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        raise ElfError(f"{path}: no dynamic section (not a shared library?)")
    size = struct.calcsize(entry)
    needed: list[int] = []  # offsets into the string table
    strtab: int | None = None
    for offset in range(dynamic[0], dynamic[0] + dynamic[1] - size + 1, size):
        tag, value = struct.unpack_from(entry, data, offset)
        if tag == _DT_NULL:
            break
        if tag == _DT_NEEDED:
            needed.append(value)
        elif tag == _DT_STRTAB:
            strtab = value
    if strtab is None:
        raise ElfError(f"{path}: no string table in its dynamic section")
    # DT_STRTAB is an address: map it to the file through the segment that holds it.
    base = next((off + strtab - va for va, off, sz in loads if va <= strtab < va + sz), None)
    if base is None:
        raise ElfError(f"{path}: its string table lies outside every loaded segment")
    return [data[base + i : data.find(b"\0", base + i)].decode() for i in needed]


def provider_library(name: str) -> Path | None:
    """A provider library of the installed onnxruntime (`onnxruntime/capi/<name>`), if any."""
    path = Path(onnxruntime.__file__).parent / "capi" / name
    return path if path.is_file() else None


def wheel_directories(paths: Iterable[str] | None = None) -> list[Path]:
    """Where NVIDIA's wheels put their shared libraries, in every site directory on
    `sys.path`: `nvidia/*/lib` (CUDA, cuDNN) and `tensorrt_libs` (TensorRT)."""
    found: list[Path] = []
    for entry in sys.path if paths is None else paths:
        root = Path(entry or ".")
        if not root.is_dir():
            continue
        found += sorted(p for p in root.glob("nvidia/*/lib") if p.is_dir())
        if (root / "tensorrt_libs").is_dir():
            found.append(root / "tensorrt_libs")
    return list(dict.fromkeys(found))


@dataclass(frozen=True)
class Loaded:
    soname: str
    path: str | None  # the file loaded by its full path; None: found on the loader's path
    error: str | None  # why it did not load; None: it did


def load_library(soname: str, directories: Sequence[Path]) -> Loaded:
    """Load `soname` from the loader's path, or else from the first of `directories` that
    holds it (then a later DT_NEEDED of that SONAME resolves to it)."""
    try:
        ctypes.CDLL(soname)
        return Loaded(soname, None, None)
    except OSError as exc:
        first_error = str(exc)
    for directory in directories:
        candidate = directory / soname
        if candidate.exists():
            try:
                ctypes.CDLL(str(candidate))
                return Loaded(soname, str(candidate), None)
            except OSError as exc:
                return Loaded(soname, str(candidate), str(exc))
    return Loaded(soname, None, first_error)


def load_all(sonames: Sequence[str], directories: Sequence[Path]) -> list[Loaded]:
    """Load every SONAME; a library whose own dependencies come later in the list is tried
    again once the others are loaded (libcublas needs libcublasLt, found beside it or not)."""
    results = {s: load_library(s, directories) for s in sonames}
    for soname in [s for s, r in results.items() if r.error is not None]:
        results[soname] = load_library(soname, directories)
    return [results[s] for s in sonames]


@dataclass(frozen=True)
class ProviderLibraries:
    """What a GPU provider library links against, and what of that does not load here."""

    provider_library: str
    needed: tuple[str, ...]
    missing: tuple[Loaded, ...]

    @property
    def present(self) -> bool:
        return not self.missing

    def reason(self) -> str | None:
        """Why the provider cannot load here, naming the libraries; None where it can."""
        if not self.missing:
            return None
        names = ", ".join(m.soname for m in self.missing)
        if [m.soname for m in self.missing] == [DRIVER]:
            return f"no NVIDIA driver ({DRIVER} does not load)"
        where = "the loader's path, site-packages/nvidia/*/lib and site-packages/tensorrt_libs"
        return f"{self.provider_library} needs {names}, not found or not loadable in {where}"


def check_provider(name: str, directories: Sequence[Path] | None = None) -> ProviderLibraries:
    """Load every library provider library `name` of the installed onnxruntime needs."""
    library = provider_library(name)
    if library is None:
        return ProviderLibraries(name, (), (Loaded(name, None, "not in this onnxruntime"),))
    return check_library(library, directories)


def check_library(library: Path, directories: Sequence[Path] | None = None) -> ProviderLibraries:
    """Load every library `library` links against (its DT_NEEDED SONAMEs) from the loader's
    path or `directories` (default: NVIDIA's wheels on sys.path); the driver first: without it
    nothing else is loaded (CUDA's libraries are hundreds of MB to map for nothing)."""
    needed = tuple(needed_libraries(library))
    driver = load_library(DRIVER, [])
    if driver.error is not None:  # every GPU provider needs it, directly or through CUDA's
        return ProviderLibraries(library.name, needed, (driver,))
    dirs = wheel_directories() if directories is None else directories
    missing = tuple(r for r in load_all(needed, dirs) if r.error is not None)
    for r in missing:
        log.debug("%s: %s does not load: %s", library.name, r.soname, r.error)
    return ProviderLibraries(library.name, needed, missing)


def driver_present() -> bool:
    return load_library(DRIVER, []).error is None


@functools.cache
def cuda_provider() -> ProviderLibraries:
    """The CUDA provider's libraries, loaded once per process (loading cannot be undone).

    cuDNN is not among them: the provider opens it when a kernel first needs it, by SONAME, and
    finds it only where the loader looks or where it is already loaded. So cuDNN is loaded here
    too where it can be, at the SONAME the TensorRT provider of the same build links against
    (libcudnn.so.9), without counting against the provider when it cannot (a ViT's graph has
    no convolution)."""
    found = check_provider(CUDA_PROVIDER_LIBRARY)
    tensorrt = provider_library(TENSORRT_PROVIDER_LIBRARY)
    if found.present and tensorrt is not None:
        cudnn = [s for s in needed_libraries(tensorrt) if s.startswith("libcudnn.so.")]
        for loaded in load_all(cudnn, wheel_directories()):
            if loaded.error is not None:
                log.debug("cuDNN (%s) does not load: %s", loaded.soname, loaded.error)
    return found


@functools.cache
def tensorrt_provider() -> ProviderLibraries:
    """The TensorRT provider's libraries (libnvinfer, libnvonnxparser, cuDNN, ...)."""
    return check_provider(TENSORRT_PROVIDER_LIBRARY)


def preload_nvidia_wheels() -> None:
    """`onnxruntime.preload_dlls()` where it helps: a driver, and NVIDIA's CUDA wheels beside
    onnxruntime (its `cuda` and `cudnn` extras). What it prints about libraries it cannot load
    goes to this module's debug log, not stdout; `check_provider` then says what is missing."""
    if not hasattr(onnxruntime, "preload_dlls") or not driver_present():
        return
    if not (Path(onnxruntime.__file__).parent.parent / "nvidia").is_dir():
        return
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            onnxruntime.preload_dlls()
        except Exception as exc:  # it raises for a directory it cannot find, on odd installs
            log.debug("onnxruntime.preload_dlls() failed: %s", exc)
    if printed.getvalue().strip():
        log.debug("onnxruntime.preload_dlls(): %s", printed.getvalue().strip())


def wheel_cuda_version() -> str | None:
    """The CUDA version the installed onnxruntime was built for (its build_and_package_info:
    '13.0'), None for a CPU build."""
    try:
        from onnxruntime.capi import build_and_package_info
    except ImportError:  # a build without the file
        return None
    version = getattr(build_and_package_info, "cuda_version", None)
    return str(version) if version else None


# --- versions that key the TensorRT engine cache ----------------------------------------------


def tensorrt_version() -> str | None:
    """TensorRT's version from libnvinfer itself (`getInferLibVersion`), where it loads:
    '10.16.1'. None where it does not."""
    sonames = [s for s in tensorrt_provider().needed if s.startswith("libnvinfer.so")]
    for soname in sonames or ["libnvinfer.so.10"]:
        loaded = load_library(soname, wheel_directories())
        if loaded.error is not None:
            continue
        try:
            lib = ctypes.CDLL(loaded.path or soname)
            number = int(lib.getInferLibVersion())
        except (OSError, AttributeError):
            return soname.rsplit(".so.", 1)[-1]
        return format_tensorrt_version(number)
    return None


def format_tensorrt_version(number: int) -> str:
    """NV_TENSORRT_VERSION as a string: 10.x on encodes major*10000 + minor*100 + patch
    (101601: 10.16.1); releases before 10 encoded major*1000 + minor*100 + patch (8601)."""
    if number >= 100_000:
        return f"{number // 10000}.{number // 100 % 100}.{number % 100}"
    return f"{number // 1000}.{number // 100 % 10}.{number % 100}"


@dataclass(frozen=True)
class Gpu:
    name: str
    capability: tuple[int, int]  # compute capability: (9, 0) for an H100 or H200

    def shown(self) -> str:
        return f"{self.name} (sm_{self.capability[0]}{self.capability[1]})"


# CUdevice_attribute values (cuda.h): compute capability major and minor.
_CC_MAJOR = 75
_CC_MINOR = 76


@functools.cache
def gpu() -> Gpu | None:
    """The GPU this process runs on (device 0 of what CUDA_VISIBLE_DEVICES leaves it), read
    through the driver API; None without a driver or a device."""
    try:
        cuda = ctypes.CDLL(DRIVER)
    except OSError:
        return None
    device = ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(device), 0) != 0:
        return None
    name = ctypes.create_string_buffer(256)
    major, minor = ctypes.c_int(), ctypes.c_int()
    if (
        cuda.cuDeviceGetName(name, len(name), device) != 0
        or cuda.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, device) != 0
        or cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, device) != 0
    ):
        return None
    return Gpu(name.value.decode(errors="replace"), (major.value, minor.value))
