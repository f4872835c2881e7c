"""What the GPU check needs on a lent GPU machine, made here: the service's locked wheels for
CPython 3.12 on manylinux x86-64 and the 100 shared photos, in parts that a call can carry.

    .venv/bin/python -m bench.gpu_bundle            # .whl/, .photos/, .whl-parts/part-00 ...

That machine reaches no registry and gets the working tree alone (not ../shared), at most 64 MiB
a call with the tree itself counted. So, here:

1. the wheels: exactly the versions of requirements/serve.txt (the hashed export of uv.lock),
   each entry's environment marker evaluated for the machine's Python, not for this one's (pip
   evaluates a requirement file's markers for the Python it runs under, whatever
   --python-version says: run from 3.11 it takes numpy 2.4.6, the lock's pick for < 3.12, where
   3.12 gets 2.5.5), then `pip download --no-deps --require-hashes` of that list into .whl/;
2. the photos copied into .photos/ (for `bench.gpu_check --photos`, here too);
3. both in one tar stream (`whl/`, `photos/`), split into .whl-parts/part-NN of at most 36 MiB,
   smaller where the working tree leaves less of the 64 MiB (the tree is measured here).

Only the locked wheels go into the parts, whatever else .whl/ holds. The folders are ignored
(.gitignore). docs/performance.md, "Running it on a lent GPU machine", has the calls that carry
the parts and the last one that installs them and runs the check.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from packaging.markers import Marker
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "serve.txt"
# The device decoder's wheels (issue 24), from the GPU image's export, with --decoder: about
# 150 MiB more, so five more parts; the check skips its decoder steps, saying why, without them.
DECODER_LOCK = ROOT / "requirements" / "image-gpu.txt"
DECODER = ("cvcuda-cu13", "nvidia-nvimgcodec-cu13", "nvidia-nvjpeg")
PHOTOS = ROOT.parent / "shared" / "testdata" / "photos"
WHEELS = ROOT / ".whl"
PHOTO_COPY = ROOT / ".photos"
PARTS = ROOT / ".whl-parts"

MIB = 1 << 20
CALL_LIMIT = 64 * MIB  # what one device call carries, the working tree included
MAX_PART = 36 * MIB  # the recipe's part; 44 MiB parts with the tree were over the limit
MARGIN = 1 * MIB  # for files the tree gains between now and the calls
# The lent machine's Python (3.12 on the H200 of 2026-11-30) and the wheel tags taken for it
# (manylinux_2_28 and older, as the recipe before this took them); pip matches each tag
# exactly, so every one is named.
PYTHON = "3.12"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)


@dataclass(frozen=True)
class Locked:
    """One entry of the lock's export: a pinned version and the hashes of its files."""

    name: str  # canonical
    version: str
    hashes: tuple[str, ...]  # "sha256:..."

    def line(self) -> str:
        return f"{self.name}=={self.version} " + " ".join(f"--hash={h}" for h in self.hashes)


def target_environment(python: str) -> dict[str, str]:
    """The marker environment of CPython `python` (major.minor) on Linux x86-64."""
    return {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "implementation_name": "cpython",
        "implementation_version": f"{python}.0",
        "platform_python_implementation": "CPython",
        "platform_machine": "x86_64",
        "platform_system": "Linux",
        "sys_platform": "linux",
        "os_name": "posix",
        "extra": "",
    }


def logical_lines(text: str) -> Iterable[str]:
    """A requirement file's entries: continuation lines joined, comments and blanks dropped."""
    entry: list[str] = []
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        continued = line.endswith("\\")
        if line:
            entry.append(line.removesuffix("\\").strip())
        if not continued and entry:
            yield " ".join(entry)
            entry = []
    if entry:
        yield " ".join(entry)


def locked_for(text: str, python: str = PYTHON) -> list[Locked]:
    """The lock's entries whose markers hold on CPython `python` on Linux x86-64, one per
    package (an error where two versions of one would both be taken)."""
    environment = target_environment(python)
    chosen: dict[str, Locked] = {}
    for entry in logical_lines(text):
        words = entry.split()
        hashes = tuple(w.removeprefix("--hash=") for w in words if w.startswith("--hash="))
        requirement = " ".join(w for w in words if not w.startswith("--hash="))
        pin, _, marker = requirement.partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate(environment):
            continue
        name, sep, version = pin.strip().partition("==")
        if not sep or not hashes:
            raise ValueError(f"not a pinned, hashed entry: {entry[:80]!r}")
        found = Locked(canonicalize_name(name), version.strip(), hashes)
        if found.name in chosen:
            raise ValueError(f"two versions of {found.name} for Python {python}")
        chosen[found.name] = found
    return sorted(chosen.values(), key=lambda locked: locked.name)


def download(locked: list[Locked], dest: Path, python: str = PYTHON) -> list[Path]:
    """Each locked wheel for the target in `dest` (pip checks every file against its hashes);
    the files, one per entry."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = dest / f"requirements-cp{python.replace('.', '')}.txt"
    wanted.write_text("".join(entry.line() + "\n" for entry in locked))
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes"]
    target = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    subprocess.run(
        [*pip, *target, *platforms, "--dest", str(dest), "--requirement", str(wanted)],
        check=True,
    )
    return wheels_of(locked, dest)


def wheels_of(locked: list[Locked], folder: Path) -> list[Path]:
    """The wheel in `folder` of each locked entry; an error where one is missing."""
    found: dict[tuple[str, Version], Path] = {}
    for wheel in folder.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        found[(str(name), version)] = wheel
    keys = [(e.name, Version(e.version)) for e in locked]
    missing = [f"{name}=={version}" for name, version in keys if (name, version) not in found]
    if missing:
        raise FileNotFoundError(f"no wheel in {folder} for {', '.join(missing)}")
    return [found[key] for key in keys]


def copy_photos(source: Path, dest: Path) -> list[Path]:
    """The photos of `source` in `dest` (those already there and the same size left as they
    are)."""
    files = sorted(p for p in source.iterdir() if p.is_file())
    if not files:
        raise FileNotFoundError(f"no photos in {source}")
    dest.mkdir(parents=True, exist_ok=True)
    copies = []
    for photo in files:
        copy = dest / photo.name
        if not copy.exists() or copy.stat().st_size != photo.stat().st_size:
            shutil.copyfile(photo, copy)
        copies.append(copy)
    return copies


def tree_bytes(root: Path = ROOT) -> int:
    """What a call carries of the checkout besides the paths it names: tracked files and
    untracked ones git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout
    paths = {root / name for name in listed.decode().split("\0") if name}
    return sum(p.stat().st_size for p in paths if p.is_file())


def part_size(tree: int) -> int:
    """The largest part (whole MiB) that a call carries beside a working tree of `tree` bytes."""
    room = (CALL_LIMIT - tree - MARGIN) // MIB * MIB
    if room < MIB:
        raise ValueError(f"the working tree ({tree / MIB:.1f} MiB) leaves no room for a part")
    return min(MAX_PART, room)


class Parts(io.RawIOBase):
    """A stream written as files of at most `size` bytes: folder/part-00, part-01, ..."""

    def __init__(self, folder: Path, size: int) -> None:
        super().__init__()
        self.folder, self.size = folder, size
        self.files: list[Path] = []
        self._current: io.BufferedWriter | None = None
        self._left = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            if self._current is None or self._left == 0:
                self._next()
            assert self._current is not None
            n = min(self._left, len(view) - done)
            self._current.write(view[done : done + n])
            self._left -= n
            done += n
        return done

    def _next(self) -> None:
        if self._current is not None:
            self._current.close()
        path = self.folder / f"part-{len(self.files):02d}"
        self.files.append(path)
        self._current = path.open("wb")
        self._left = self.size

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
        super().close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


def split(members: dict[str, list[Path]], folder: Path, size: int) -> list[Path]:
    """One tar stream of `members` ({folder in the tar: files}) in parts of `size` bytes in
    `folder`, whose earlier parts are removed first (`cat part-* | tar -x` takes them all)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("part-*"):
        old.unlink()
    with Parts(folder, size) as parts, tarfile.open(fileobj=parts, mode="w|") as tar:
        for inside, files in members.items():
            for file in files:
                tar.add(file, arcname=f"{inside}/{file.name}", recursive=False)
    return parts.files


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--python", default=PYTHON, help="the machine's Python, major.minor")
    p.add_argument("--photos", type=Path, default=PHOTOS, help="the shared photos' folder")
    p.add_argument("--part-mib", type=int, help="part size; default: what the tree leaves, <= 36")
    p.add_argument("--decoder", action="store_true", help="and the device decoder's wheels")
    a = p.parse_args(argv)
    locked = locked_for(LOCK.read_text(), a.python)
    if a.decoder:
        extra = locked_for(DECODER_LOCK.read_text(), a.python)
        locked += [entry for entry in extra if entry.name in DECODER]
    print(f"{len(locked)} locked packages for CPython {a.python} ({LOCK.relative_to(ROOT)})")
    wheels = download(locked, WHEELS, a.python)
    photos = copy_photos(a.photos, PHOTO_COPY)
    tree = tree_bytes()
    size = a.part_mib * MIB if a.part_mib else part_size(tree)
    if tree + size > CALL_LIMIT:
        raise SystemExit(f"a {size // MIB} MiB part and the {tree / MIB:.1f} MiB tree are over 64")
    parts = split({"whl": wheels, "photos": photos}, PARTS, size)
    wheel_bytes = sum(w.stat().st_size for w in wheels)
    photo_bytes = sum(f.stat().st_size for f in photos)
    print(f"{len(wheels)} wheels, {wheel_bytes / MIB:.1f} MiB; {len(photos)} photos, "
          f"{photo_bytes / MIB:.1f} MiB")  # fmt: skip
    print(f"working tree {tree / MIB:.1f} MiB: parts of at most {size // MIB} MiB")
    for part in parts:
        print(f"  {part.relative_to(ROOT)}  {part.stat().st_size / MIB:6.1f} MiB")
    print(f"{len(parts)} parts, {sum(q.stat().st_size for q in parts) / MIB:.1f} MiB")


if __name__ == "__main__":
    main()
