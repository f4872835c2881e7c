"""Service settings: each limit is an environment variable `VIT_SERVE_<NAME>` with a default."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VIT_SERVE_", frozen=True, extra="ignore")

    model_repo: Path = Path("model_repo")
    default_model: str | None = Field(
        default=None, description="served when a request names no model; None: the first by name"
    )

    # Input limits: checked before any expensive work.
    upload_max_bytes: int = Field(default=20 * MIB, gt=0, description="whole request body")
    image_max_pixels: int = Field(
        default=40_000_000, gt=0, description="width*height read from the header, before decoding"
    )
    images_per_request_max: int = Field(default=16, gt=0)
    top_k_default: int = Field(default=5, gt=0)
    top_k_max: int = Field(default=100, gt=0, description="answers are also clipped to the classes")
    fit_max_tokens: int | None = Field(
        default=None, gt=0, description="token cap of the `fit` policy; None: 2x the native tokens"
    )
    jpeg_draft: bool = Field(
        default=True, description="let libjpeg decode large JPEGs at 1/2..1/8 scale (>= 2x target)"
    )

    # Batching and deadlines.
    max_batch_size: int = Field(default=32, gt=0)
    max_batch_tokens: int = Field(default=8192, gt=0, description="sum of grid_h*grid_w per batch")
    max_queue_images: int = Field(default=256, gt=0, description="beyond this: 503 overloaded")
    request_timeout_s: float = Field(default=30.0, gt=0)
    drain_timeout_s: float = Field(default=10.0, ge=0, description="shutdown: finish queued work")

    # Threads and execution providers.
    preprocess_threads: int = Field(default=2, gt=0)
    intra_op_threads: int = Field(default=0, ge=0, description="0: ONNX Runtime's default")
    providers: list[str] | None = Field(
        default=None,
        description="ONNX Runtime providers in order of preference; None: CUDA when it works, "
        "else CPU (JSON list in the environment)",
    )
    warmup: bool = Field(default=True, description="run each model once at start")
    log_level: str = "INFO"
