"""Service settings: each limit is an environment variable `VIT_SERVE_<NAME>` with a default."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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
    max_queue_delay_ms: float = Field(
        default=0.0,
        ge=0,
        description="a free runtime may wait this long after a batch's oldest image for a "
        "fuller batch; 0: never waits (CPU, where a batch costs about its size)",
    )
    runtime_instances: int = Field(
        default=1,
        gt=0,
        description="sessions per model version, each run by its own thread; 1 on a CPU, where "
        "one session's intra-op threads already use every core",
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0, description="a request may lower it: X-Request-Timeout-Ms, timeout_ms"
    )
    drain_timeout_s: float = Field(default=10.0, ge=0, description="shutdown: finish queued work")
    shutdown_delay_s: float = Field(
        default=5.0,
        ge=0,
        description="on SIGTERM, readiness off and new requests 503 for this long before the "
        "listener closes, so load balancers stop sending first (python -m app.server)",
    )

    # Threads and execution providers.
    preprocess_threads: int = Field(default=2, gt=0)
    intra_op_threads: int = Field(default=0, ge=0, description="0: ONNX Runtime's default")
    intra_op_spinning: bool = Field(
        default=False,
        description="ONNX Runtime's threads spin-wait between runs: off, so that they leave the "
        "CPU to preprocessing and the event loop",
    )
    providers: list[str] | None = Field(
        default=None,
        description="ONNX Runtime providers in order of preference; None: CUDA when it works, "
        "else CPU (JSON list in the environment)",
    )
    warmup: bool = Field(default=True, description="run each model once at start")
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = Field(
        default="json", description="json: one object per line with the request id"
    )

    # The HTTP server (python -m app.server).
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    keep_alive_timeout_s: int = Field(
        default=75, gt=0, description="longer than the load balancer's idle upstream timeout"
    )
    forwarded_allow_ips: str = Field(
        default="127.0.0.1", description="proxies whose X-Forwarded-For is trusted ('*': any)"
    )
