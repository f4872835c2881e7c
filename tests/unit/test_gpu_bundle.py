"""bench/gpu_bundle.py: the locked wheels chosen for the GPU machine's Python, the part size the
working tree leaves, and the parts that join back into the bundle."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest

from bench.gpu_bundle import (
    CALL_LIMIT,
    LOCK,
    MAX_PART,
    MIB,
    Locked,
    locked_for,
    part_size,
    split,
    wheels_of,
)

EXPORT = """\
# Exported from uv.lock by scripts/lock (--group build); do not edit.
msgpack==1.2.4 ; python_full_version < '3.15' and sys_platform == 'linux' \\
    --hash=sha256:aaa \\
    --hash=sha256:bbb
    # via vit-serve
numpy==2.4.6 ; python_full_version < '3.12' and platform_machine == 'x86_64' \\
    --hash=sha256:old
    # via
    #   vit-serve
numpy==2.5.5 ; python_full_version >= '3.12' and python_full_version < '3.15' \\
    --hash=sha256:new
pywin32==311 ; sys_platform == 'win32' \\
    --hash=sha256:win
Setuptools==84.2.1 \\
    --hash=sha256:st
"""


def test_each_entry_is_taken_by_its_marker_for_the_machines_python_not_this_ones() -> None:
    for_312 = locked_for(EXPORT, "3.12")
    assert for_312 == [
        Locked("msgpack", "1.2.4", ("sha256:aaa", "sha256:bbb")),
        Locked("numpy", "2.5.5", ("sha256:new",)),
        Locked("setuptools", "84.2.1", ("sha256:st",)),  # no marker: always; name canonical
    ]
    assert [e.version for e in locked_for(EXPORT, "3.11") if e.name == "numpy"] == ["2.4.6"]
    assert for_312[0].line() == "msgpack==1.2.4 --hash=sha256:aaa --hash=sha256:bbb"


def test_two_versions_of_one_package_for_one_python_are_refused() -> None:
    twice = EXPORT.replace("python_full_version >= '3.12' and ", "")  # 2.5.5 for 3.11 too
    with pytest.raises(ValueError, match="two versions of numpy"):
        locked_for(twice, "3.11")
    with pytest.raises(ValueError, match="pinned, hashed"):
        locked_for("numpy>=2 \\\n    --hash=sha256:x\n", "3.12")


def test_the_services_lock_gives_one_wheel_each_with_msgpack_and_onnxruntime_gpu() -> None:
    locked = {e.name: e for e in locked_for(LOCK.read_text(), "3.12")}
    assert {"msgpack", "onnxruntime-gpu", "numpy", "fastapi", "grpcio", "uvicorn"} <= set(locked)
    assert locked["onnxruntime-gpu"].version == "1.31.1"
    assert all(e.hashes for e in locked.values())


def test_a_part_is_what_the_tree_leaves_of_a_call_at_most_36_mib() -> None:
    assert part_size(10 * MIB) == MAX_PART
    assert part_size(31 * MIB) == 32 * MIB  # 64 - 31 - 1 MiB of margin
    assert part_size(int(30.9 * MIB)) == 32 * MIB  # whole MiB, rounded down
    assert 31 * MIB + part_size(31 * MIB) < CALL_LIMIT
    with pytest.raises(ValueError, match="no room"):
        part_size(63 * MIB)


def test_the_parts_join_back_into_the_wheels_and_the_photos(tmp_path: Path) -> None:
    sources = tmp_path / "src"
    sources.mkdir()
    files = []
    for i, size in enumerate((3000, 10, 5000)):
        f = sources / f"f{i}.bin"
        f.write_bytes(bytes([i]) * size)
        files.append(f)
    parts = split({"whl": files[:2], "photos": files[2:]}, tmp_path / "parts", 4096)
    assert [p.name for p in parts[:2]] == ["part-00", "part-01"]
    assert all(p.stat().st_size == 4096 for p in parts[:-1])
    assert 0 < parts[-1].stat().st_size <= 4096
    # Another split removes the earlier parts: `cat part-*` must not join stale ones.
    again = split({"whl": files[1:2]}, tmp_path / "parts", 4096)
    assert sorted((tmp_path / "parts").iterdir()) == again
    parts = split({"whl": files[:2], "photos": files[2:]}, tmp_path / "parts", 4096)
    # As on the machine: cat part-* | tar -x.
    joined = tmp_path / "bundle.tar"
    joined.write_bytes(b"".join(p.read_bytes() for p in sorted(parts)))
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-xf", str(joined), "-C", str(out)], check=True)
    with tarfile.open(joined) as tar:
        assert tar.getnames() == ["whl/f0.bin", "whl/f1.bin", "photos/f2.bin"]
    for inside, f in (("whl", files[0]), ("whl", files[1]), ("photos", files[2])):
        assert (out / inside / f.name).read_bytes() == f.read_bytes()


def test_each_locked_entry_needs_its_own_wheel(tmp_path: Path) -> None:
    locked = [Locked("numpy", "2.5.5", ("sha256:x",)), Locked("msgpack", "1.2.4", ("sha256:y",))]
    numpy = tmp_path / "numpy-2.5.5-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl"
    numpy.touch()
    (tmp_path / "numpy-2.4.6-cp312-cp312-manylinux_2_28_x86_64.whl").touch()  # not locked
    with pytest.raises(FileNotFoundError, match=r"msgpack==1\.2\.4"):
        wheels_of(locked, tmp_path)
    msgpack = tmp_path / "msgpack-1.2.4-cp312-cp312-manylinux_2_17_x86_64.whl"
    msgpack.touch()
    assert wheels_of(locked, tmp_path) == [numpy, msgpack]
