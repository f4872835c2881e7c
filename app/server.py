"""The production entry point, `python -m app.server`: uvicorn that drains on SIGTERM.

On SIGTERM (what `docker stop` and Kubernetes send):
1. The app starts draining at once: /readyz answers 503, new requests get a 503 with
   `Connection: close` (nginx retries them on another replica; Kubernetes takes the pod out of
   its Service), and requests already in flight go on. The listener stays open meanwhile, so a
   request that a load balancer sends before it notices gets an answer, not a reset connection.
2. After `shutdown_delay_s`, uvicorn's own shutdown: stop listening, close idle connections,
   wait up to `drain_timeout_s` for in-flight requests, then run the lifespan's shutdown (the
   batcher finishes what is queued within `drain_timeout_s` and answers the rest 503).
A second SIGTERM, or SIGINT (Ctrl-C), skips the delay. Plain `uvicorn app.main:create_app
--factory` also works, without step 1: it stops listening at once.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import time
from types import FrameType
from typing import Any

import uvicorn

from app.core.settings import Settings
from app.http.middleware import Lifecycle
from app.main import create_app

# Not __name__: run as `python -m app.server` that is "__main__", outside the "app" loggers.
log = logging.getLogger("app.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, delay_s: float) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.delay_s = delay_s
        self.drain_deadline: float | None = None
        self.announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: set flags only (no logging, no locks); on_tick acts on them.
        first_term = sig == signal.SIGTERM and self.drain_deadline is None
        if first_term and self.delay_s > 0 and not self.should_exit:
            self.lifecycle.begin_drain()
            self.drain_deadline = time.monotonic() + self.delay_s
            return
        self.lifecycle.begin_drain()
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        deadline = self.drain_deadline
        if deadline is not None and not self.announced:
            self.announced = True
            log.info("SIGTERM: draining, the listener closes in %.1f s", self.delay_s)
        if deadline is not None and not self.should_exit and time.monotonic() >= deadline:
            self.should_exit = True
        return await super().on_tick(counter)


def log_config(settings: Settings) -> dict[str, Any]:
    """uvicorn's own loggers in the service's format; its access log is replaced by ours."""
    formatter = (
        f"app.core.logs.{'JsonFormatter' if settings.log_format == 'json' else 'TextFormatter'}"
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"service": {"()": formatter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "service",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
            "app": {"handlers": ["stderr"], "level": settings.log_level.upper()},
        },
    }


def build_server(settings: Settings) -> DrainingServer:
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=log_config(settings),
        access_log=False,
        # Longer than nginx's upstream keepalive_timeout (60 s): the proxy, not the server,
        # closes idle connections, so no request is sent on a connection that is closing.
        timeout_keep_alive=settings.keep_alive_timeout_s,
        backlog=settings.backlog,
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s),
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )
    return DrainingServer(config, app.state.lifecycle, settings.shutdown_delay_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the model repository over HTTP.")
    parser.add_argument("--host", help="default: VIT_SERVE_HOST or 127.0.0.1")
    parser.add_argument("--port", type=int, help="default: VIT_SERVE_PORT or 8000")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    build_server(Settings(**overrides)).run()


if __name__ == "__main__":
    main()
