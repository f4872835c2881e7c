"""Settings from the environment (app.core.settings)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.core.settings import Settings


def test_defaults_are_the_documented_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(Settings.model_fields):
        monkeypatch.delenv(f"VIT_SERVE_{name.upper()}", raising=False)
    s = Settings()
    assert s.model_repo == Path("model_repo")
    assert s.default_model is None
    assert s.upload_max_bytes == 20 * 1024 * 1024
    assert s.image_max_pixels == 40_000_000
    assert (s.images_per_request_max, s.top_k_default, s.top_k_max) == (16, 5, 100)
    assert s.fit_max_tokens is None  # 2x each model's native tokens
    assert (s.max_batch_size, s.max_batch_tokens, s.max_queue_images) == (32, None, 256)
    # Unset, the token budget follows the device: 32 native grids of the demo model on a CPU.
    assert (s.batch_tokens(gpu=False), s.batch_tokens(gpu=True)) == (2048, 8192)
    assert Settings(max_batch_tokens=500).batch_tokens(gpu=False) == 500
    assert (s.request_timeout_s, s.preprocess_threads, s.intra_op_threads) == (30.0, 2, 0)
    assert s.providers is None


def test_every_setting_reads_its_vit_serve_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIT_SERVE_MODEL_REPO", "/models")
    monkeypatch.setenv("VIT_SERVE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("VIT_SERVE_REQUEST_TIMEOUT_S", "2.5")
    monkeypatch.setenv("VIT_SERVE_PROVIDERS", '["CUDAExecutionProvider", "CPUExecutionProvider"]')
    s = Settings()
    assert s.model_repo == Path("/models")
    assert s.max_batch_size == 8
    assert s.request_timeout_s == 2.5
    assert s.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_a_nonsense_limit_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIT_SERVE_MAX_QUEUE_IMAGES", "0")
    with pytest.raises(ValidationError, match="max_queue_images"):
        Settings()
