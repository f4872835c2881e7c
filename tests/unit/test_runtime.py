"""ONNX Runtime sessions (app.models.runtime) against the PyTorch model they were exported from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.models.repository import scan_repository
from app.models.runtime import CPU, OnnxBackend, RuntimeLoadError, candidate_providers
from app.pipeline.imaging import prepare
from tests.images import png
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


@pytest.mark.parametrize(("policy", "size"), [("crop", (120, 90)), ("fit", (160, 64))])
def test_prepared_patches_give_the_logits_of_the_pytorch_model(
    tiny_repo: TinyRepo, policy: str, size: tuple[int, int]
) -> None:
    version = scan_repository(tiny_repo.root).resolve(None, 1)
    backend = OnnxBackend(version.graph_path, version.spec, [CPU])
    prepared = [
        prepare(
            png(*size, seed=seed),
            version.spec,
            "fit" if policy == "fit" else "crop",
            name="test",
            max_pixels=10**6,
            fit_max_tokens=128,
        )
        for seed in (1, 2)
    ]
    batch = np.stack([p.patches for p in prepared])
    with torch.no_grad():
        expected = tiny_repo.models[1](torch.from_numpy(batch)).numpy()
    got = backend.run(batch)
    assert got.dtype == np.float32
    assert got.shape == (2, 10)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_warm_up_runs_the_native_grid(tiny_repo: TinyRepo) -> None:
    version = scan_repository(tiny_repo.root).resolve(None, None)
    OnnxBackend(version.graph_path, version.spec, [CPU]).warm_up(batch=2)


def test_a_corrupt_graph_is_a_load_error(tiny_repo: TinyRepo, tmp_path: Path) -> None:
    version = scan_repository(tiny_repo.root).resolve(None, None)
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not a graph")
    with pytest.raises(RuntimeLoadError, match="could not load"):
        OnnxBackend(broken, version.spec, [CPU])
