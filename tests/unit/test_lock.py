"""The lock (scripts/lock) is what pyproject.toml gives, and every install reads it.

`scripts/lock --check` asks uv, offline, whether uv.lock still satisfies pyproject.toml, then
exports every requirements file again and compares it with the one checked in: a dependency
added, removed or re-pinned without `scripts/lock` fails here, with the command that mends it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCKED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)\s*(?:;|\\|$)", re.MULTILINE)


def uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if found is None:
        pytest.skip("uv is not installed (the `test` extra brings it)")
    return found


def lock_check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(root / "scripts" / "lock"), "--check"],
        cwd=root,
        env={**os.environ, "UV": uv()},
        capture_output=True,
        text=True,
        timeout=120,
    )


def copy_project(destination: Path) -> Path:
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy2(ROOT / name, destination / name)
    for name in ("scripts", "requirements"):
        shutil.copytree(ROOT / name, destination / name)
    return destination


def test_the_lock_and_its_exports_are_what_pyproject_gives() -> None:
    checked = lock_check(ROOT)
    assert checked.returncode == 0, checked.stderr


def test_a_requirement_changed_without_relocking_fails_the_check(tmp_path: Path) -> None:
    project = copy_project(tmp_path)
    pyproject = project / "pyproject.toml"
    text = pyproject.read_text()
    assert '"pillow>=10.4",' in text
    pyproject.write_text(text.replace('"pillow>=10.4",', '"pillow>=10.4",\n    "idna>=3",', 1))
    checked = lock_check(project)
    assert checked.returncode == 1
    assert "uv.lock does not match pyproject.toml: run scripts/lock" in checked.stderr


def test_an_edited_export_fails_the_check(tmp_path: Path) -> None:
    project = copy_project(tmp_path)
    serve = project / "requirements" / "serve.txt"
    serve.write_text(re.sub(r"^fastapi==\S+", "fastapi==0.115.0", serve.read_text(), flags=re.M))
    checked = lock_check(project)
    assert checked.returncode == 1
    assert "requirements/serve.txt" in checked.stderr and "run scripts/lock" in checked.stderr


def locked(name: str) -> dict[str, str]:
    return dict(LOCKED.findall((ROOT / "requirements" / name).read_text()))


def test_every_locked_requirement_is_pinned_and_hashed() -> None:
    for path in sorted((ROOT / "requirements").glob("*.txt")):
        blocks = re.split(r"\n(?=[A-Za-z0-9])", path.read_text().split("\n", 1)[1])
        for block in blocks:
            name = block.split("==", 1)[0]
            assert LOCKED.match(block), f"{path.name}: {name} is not pinned with =="
            assert "--hash=sha256:" in block, f"{path.name}: {name} has no hash"


def test_the_exports_hold_what_each_install_needs() -> None:
    serve, dev, gpu, cpu = (locked(f) for f in ("serve.txt", "dev.txt", "gpu.txt", "image-cpu.txt"))
    # torch and torchvision keep the pins whose builds lie on the machines' disk.
    assert (dev["torch"], dev["torchvision"]) == ("2.14.1", "0.29.1")
    assert "torch" not in serve and "torch" not in cpu and "torch" not in gpu
    # One ONNX Runtime each: the CPU image's is the CPU wheel, at the same release.
    assert serve["onnxruntime-gpu"] == dev["onnxruntime-gpu"] == cpu["onnxruntime"]
    assert "onnxruntime" not in serve and "onnxruntime-gpu" not in cpu
    assert {"nvidia-cublas", "nvidia-cudnn-cu13"} <= set(gpu)
    # The build backend is locked too: installs build the project without isolation.
    assert all("setuptools" in f for f in (serve, dev, gpu, cpu))
    # What is locked for serving is what the tests run against.
    assert {k: dev[k] for k in serve} == serve


@pytest.mark.parametrize(
    "script", ["scripts/install", "scripts/serve", "Dockerfile"], ids=lambda s: s.split("/")[-1]
)
def test_every_install_reads_the_lock_with_hashes(script: str) -> None:
    text = (ROOT / script).read_text()
    installs = [line for line in text.splitlines() if re.search(r"pip install\b", line)]
    assert installs, f"{script} installs nothing"
    for line in installs:
        assert "--require-hashes -r" in line or "--no-deps" in line, (
            f"{script}: an install that resolves on the day: {line.strip()}"
        )
