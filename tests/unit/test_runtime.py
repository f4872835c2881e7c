"""ONNX Runtime sessions (app.runtime.backends): providers, loading, warm-up.
(Their logits against the PyTorch model's: tests/export/test_parity.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.models.repository import scan_repository
from app.runtime.backends import CPU, OnnxBackend, RuntimeLoadError
from app.runtime.placement import candidate_providers
from tests.support import TinyRepo


def test_cpu_is_always_the_last_resort() -> None:
    assert candidate_providers(None)[-1] == CPU
    assert candidate_providers([CPU]) == [CPU]


def test_unknown_providers_are_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    assert candidate_providers(["NoSuchExecutionProvider"]) == [CPU]
    assert "NoSuchExecutionProvider" in caplog.text


def test_the_provider_reported_is_the_one_in_use(tiny_repo: TinyRepo) -> None:
    version = scan_repository(tiny_repo.root).resolve(None, None)
    backend = OnnxBackend(version.graph_path, version.spec, candidate_providers(None))
    assert backend.provider == CPU  # no GPU on the test machines


def test_warm_up_runs_the_native_grid(tiny_repo: TinyRepo) -> None:
    version = scan_repository(tiny_repo.root).resolve(None, None)
    OnnxBackend(version.graph_path, version.spec, [CPU]).warm_up(batch=2)


def test_a_corrupt_graph_is_a_load_error(tiny_repo: TinyRepo, tmp_path: Path) -> None:
    version = scan_repository(tiny_repo.root).resolve(None, None)
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not a graph")
    with pytest.raises(RuntimeLoadError, match="could not load"):
        OnnxBackend(broken, version.spec, [CPU])
