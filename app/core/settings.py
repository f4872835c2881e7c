"""Service settings: each limit is an environment variable `VIT_SERVE_<NAME>` with a default."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024
# Keys travel in HTTP headers, which carry Latin-1 and lose surrounding spaces: visible ASCII
# only, so that what the operator set is exactly what a client can send.
_KEY = re.compile(r"[\x21-\x7e]+")
# An Origin header is scheme://host[:port], nothing after: an entry with a path or a trailing
# slash would never match one, and CORS would silently stay off for it.
_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/?#\s]+")


# Default batch token budgets (`Settings.batch_tokens`), measured with bench.load's raw sweep:
# on a CPU the best batch holds about 2048 tokens (the demo model at 32 images of 64 tokens,
# ViT-Ti/16 at 8 to 10 of 196); a GPU keeps gaining past it.
CPU_BATCH_TOKENS = 2048
GPU_BATCH_TOKENS = 8192


class Settings(BaseSettings):
    # Errors name the setting and what is wrong without echoing the value: it may be a key.
    model_config = SettingsConfigDict(
        env_prefix="VIT_SERVE_", frozen=True, extra="ignore", hide_input_in_errors=True
    )

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
    decode: Literal["cpu", "gpu", "auto"] = Field(
        default="auto",
        description="where JPEGs are decoded, resized and patchified: cpu, in the front ends' "
        "threads (Pillow); gpu, in the engine on the device (nvImageCodec, CV-CUDA), a start "
        "error where its libraries do not load or no model runs on a GPU; auto: gpu where its "
        "libraries load and a GPU (CUDA or TensorRT) runs the model, else cpu. What the device "
        "does not take (other formats, progressive JPEGs, CMYK, ...) is decoded on the CPU, "
        "each image counted with its reason",
    )
    jpeg_draft: bool = Field(
        default=True, description="let libjpeg decode large JPEGs at 1/2..1/8 scale (>= 2x target)"
    )

    # Batching and deadlines.
    max_batch_size: int = Field(default=32, gt=0)
    max_batch_tokens: int | None = Field(
        default=None,
        gt=0,
        description="sum of grid_h*grid_w per batch; None: 2048 on a CPU, where larger batches "
        "outgrow the caches and run slower per image (ViT-Ti/16 at 224: best at 8 to 10 images), "
        "8192 on a GPU",
    )
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
    body_read_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="the whole request body must arrive within this long (408 beyond), so a "
        "client that trickles its upload cannot hold a request open",
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0, description="a request may lower it: X-Request-Timeout-Ms, timeout_ms"
    )
    drain_timeout_s: float = Field(
        default=10.0,
        ge=0,
        description="shutdown, once the listener has closed: at most this long for requests "
        "under way and for open connections to finish, then as long again for queued work",
    )
    shutdown_delay_s: float = Field(
        default=5.0,
        ge=0,
        description="on SIGTERM, readiness off for this long before the listener closes, "
        "serving as usual with every answer closing its connection, so load balancers stop "
        "sending first (python -m app.server)",
    )

    # Processes (python -m app.server).
    workers: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="front-end processes, each with the HTTP and gRPC doors and its own "
        "decode threads, beside one engine process that owns the sessions and the batcher; "
        "1: a single process holding both; None: 1 on a CPU host, and on a GPU host all cores "
        "but two (python -m app.server)",
    )
    shared_memory_bytes: int = Field(
        default=1 << 30,
        ge=1 << 20,
        description="each front end's shared memory with the engine (its requests' patches "
        "and outputs); pages are used as requests touch them, not reserved",
    )
    engine_start_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="how long a front end waits at start for the engine process (loading and "
        "warming models, building TensorRT engines)",
    )

    # Threads and execution providers.
    preprocess_threads: int = Field(default=2, gt=0)
    intra_op_threads: int = Field(default=0, ge=0, description="0: ONNX Runtime's default")
    worker_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="decode and inference threads run this much nicer than the event loop, "
        "which then keeps the CPU it needs to accept, refuse and answer under overload; 0: equal",
    )
    intra_op_spinning: bool = Field(
        default=False,
        description="ONNX Runtime's threads spin-wait between runs: off, so that they leave the "
        "CPU to preprocessing and the event loop",
    )
    providers: list[str] | None = Field(
        default=None,
        description="ONNX Runtime providers in order of preference; None: TensorRT (graphs "
        "exported with --optimize none), CUDA, where a GPU driver is present, else CPU (JSON "
        "list in the environment)",
    )
    trt_fp16: bool = Field(
        default=True,
        description="TensorRT may run layers in float16 (logits then differ from float32 by "
        "~1e-3, ranking hardly ever)",
    )
    cuda_tf32: bool = Field(
        default=True,
        description="the CUDA provider may run float32 matrix products in TF32 (ONNX Runtime's "
        "`use_tf32`, on by default: about 10 mantissa bits, ViT-B/16's logits ~1e-2 from the "
        "CPU's on an H200); false: exact float32, slower on Ampere and later GPUs. fp16 graphs "
        "and TensorRT are not affected",
    )
    # Not the model repository: it is mounted read-only in the deployments, and engines are
    # per GPU and per TensorRT version, not part of a model. /tmp is writable there (an
    # emptyDir in Kubernetes); mount a volume here to keep engines across restarts.
    trt_cache_dir: Path = Field(
        default=Path(tempfile.gettempdir()) / "vit-serve-tensorrt",
        description="TensorRT engine and timing caches (per model, version, graph sha256 and "
        "profile below it): a start finds its engines here instead of building them",
    )
    require_gpu: bool = Field(
        default=False,
        description="a GPU deployment: a model version whose sessions land on the CPU (no "
        "driver, CUDA or TensorRT libraries that do not load, a provider that fails) is not "
        "served and the replica is not ready, with the reason in /readyz and /models",
    )
    model_failure_threshold: int = Field(
        default=3,
        gt=0,
        description="a model version whose inference fails on this many batches in a row is "
        "marked not ready (503) until a reload",
    )
    model_repo_poll_s: float = Field(
        default=0.0,
        ge=0,
        description="look for new, changed or removed models this often and reload them; 0: "
        "only on POST /admin/reload",
    )
    simulated_curve: Path | None = Field(
        default=None,
        description="benchmarks only: serve every model version on a simulated accelerator that "
        "sleeps for the batch times in this JSON file (bench/results/gpu_check.json, or "
        '{"tokens_per_image": N, "points": [[batch, ms], ...]}) and answers made-up logits, '
        "so the service's own CPU cost can be measured without a GPU (app/runtime/simulated.py)",
    )
    warmup: bool = Field(default=True, description="run each model once at start")
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = Field(
        default="json", description="json: one object per line with the request id"
    )

    # The HTTP server (python -m app.server).
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    grpc_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="the Open Inference Protocol's gRPC service listens here, on `host`, in the "
        "same process and event loop (Triton's port is 8001); 0: any free port; None: no gRPC "
        "server (the default: a port opens only where it is asked for, so several servers and "
        "test apps on one machine never collide)",
    )
    backlog: int = Field(
        default=4096,
        gt=0,
        description="connections the kernel holds before they are accepted (capped by "
        "net.core.somaxconn); beyond it a burst's connections are reset, not refused",
    )
    keep_alive_timeout_s: int = Field(
        default=75, gt=0, description="longer than the load balancer's idle upstream timeout"
    )
    forwarded_allow_ips: str = Field(
        default="127.0.0.1", description="proxies whose X-Forwarded-For is trusted ('*': any)"
    )
    # Connection hygiene (python -m app.server: app/transport/connections.py).
    header_max_bytes: int = Field(
        default=32 * 1024,
        ge=1024,
        description="request line and headers together; beyond it 431 and the connection closes",
    )
    header_max_count: int = Field(
        default=100, gt=0, description="header fields in one request; beyond it 431"
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="a connection must deliver a request's line and headers within this long of "
        "connecting or of the request's first byte (408 if it began one, then closed; a silent "
        "connection is closed)",
    )
    max_connections: int = Field(
        default=4096,
        gt=0,
        description="open connections; beyond it the longest-idle one is closed, or with none "
        "idle the new one is answered 503; capped below the open-files limit, which the server "
        "raises to its hard limit at start",
    )

    # Access control.
    api_key: SecretStr | None = Field(
        default=None,
        description="when set, POST /classify needs it (Authorization: Bearer or X-API-Key); "
        "probes, /metrics and /models stay open",
    )
    admin_api_key: SecretStr | None = Field(
        default=None, description="admin endpoints need it; None: they answer 403 (disabled)"
    )
    cors_allow_origins: list[str] = Field(
        default=[],
        description="origins whose pages may call the API from a browser (JSON list in the "
        "environment, '*' for any); empty: CORS off",
    )

    def request_places(self) -> int:
        """Requests a replica holds at once (`Classifier.admission`): as many images as can wait
        in the queue plus one batch per runtime instance. A load balancer in front should hold
        each replica to this many connections (deploy/nginx/nginx.conf's max_conns)."""
        return self.max_queue_images + self.max_batch_size * self.runtime_instances

    def batch_tokens(self, gpu: bool) -> int:
        """The token budget of one batch: the setting, or the default for the device."""
        if self.max_batch_tokens is not None:
            return self.max_batch_tokens
        return GPU_BATCH_TOKENS if gpu else CPU_BATCH_TOKENS

    @field_validator("api_key", "admin_api_key")
    @classmethod
    def _key_is_sendable(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        # A key read from a file (a Kubernetes Secret) often ends in a newline.
        key = value.get_secret_value().strip()
        # An empty key would accept an empty header: refuse it at start rather than guess.
        if not _KEY.fullmatch(key):
            raise ValueError(
                "a key must be visible ASCII without spaces, e.g. the output of "
                "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        return SecretStr(key)

    @field_validator("cors_allow_origins")
    @classmethod
    def _origins_are_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"{origin!r} is not an origin: write scheme://host[:port] with no path "
                    "or trailing slash (e.g. https://app.example.com), or '*'"
                )
        return origins
