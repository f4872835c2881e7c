"""The production entry point, `python -m app.server`: uvicorn that drains on SIGTERM.

On SIGTERM (what `docker stop` and Kubernetes send):
1. Readiness turns off at once (/readyz answers 503, so Kubernetes takes the pod out of its
   Service), and for `shutdown_delay_s` the server goes on serving normally: load balancers and
   kube-proxy take seconds to notice, and a request they send meanwhile gets its answer, not a
   503 that a client without retries would see as an error. Every answer now carries
   `Connection: close`, so kept-alive connections (a client's pool, nginx's upstream pool, a
   connection kube-proxy pinned to this pod) move to other replicas as they are used.
2. Then the listener closes (app/transport/listener.py): new handshakes are refused first, those
   under way and the connections the kernel has already accepted are taken, so that every
   client that got a connection gets an answer, and from then on a connect is refused (never
   reset after its request was sent). uvicorn's shutdown follows: in-flight
   requests finish; kept-alive and new connections keep their own timeouts and what arrives on
   them is answered, then closed (app/transport/httptools.py: closing them at once would reset a
   request a client sent as the server closed); all within `drain_timeout_s`; then the
   lifespan's shutdown (the batcher finishes what is queued within `drain_timeout_s` and answers
   the rest 503).
A second SIGTERM skips what is left of the delay; with it, as with a delay of 0, the drain
still runs and the process exits 0. SIGINT (Ctrl-C) is uvicorn's: no delay, and a second one
stops at once. Plain `uvicorn app.main:create_app --factory` also works, without step 1, the
connection limits (app/transport/connections.py) or the lingering close: it stops listening at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import logging.config
import math
import os
import signal
import socket
import sys
import time
from types import FrameType
from typing import Any

import uvicorn
import uvloop

from app.core.settings import Settings
from app.engine import EngineHost
from app.http.metrics import MULTIPROC_ENV, Metrics
from app.http.middleware import Lifecycle
from app.main import create_app, load_engine
from app.runtime.native import driver_present
from app.runtime.providers import CPU
from app.supervisor import Supervisor, default_workers
from app.transport.connections import (
    ConnectionLimits,
    ConnectionRegistry,
    open_files_limit,
    raise_open_files_limit,
)
from app.transport.httptools import protocol_class
from app.transport.listener import HANDSHAKE_GRACE_S, refuse_new_handshakes, stop_listening

# Not __name__: run as `python -m app.server` that is "__main__", outside the "app" loggers.
log = logging.getLogger("app.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, delay_s: float) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.delay_s = delay_s
        self.drain_deadline: float | None = None
        self.announced = False
        self.listeners: list[socket.socket] = []

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: set flags only (no logging, no locks); on_tick acts on them.
        self.lifecycle.begin_drain()
        if sig != signal.SIGTERM:
            super().handle_exit(sig, frame)  # SIGINT: uvicorn's (re-raised once it has stopped)
            return
        if self.drain_deadline is None and self.delay_s > 0 and not self.should_exit:
            self.drain_deadline = time.monotonic() + self.delay_s
            return
        # Delay 0 or a second SIGTERM: stop now and drain. uvicorn would also record the signal
        # and raise it again once stopped, ending a clean drain killed by it (exit 143).
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        deadline = self.drain_deadline
        if deadline is not None and not self.announced:
            self.announced = True
            log.info("SIGTERM: draining, the listener closes in %.1f s", self.delay_s)
        if deadline is not None and not self.should_exit and time.monotonic() >= deadline:
            self.should_exit = True
        return await super().on_tick(counter)

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        # The server binds its own listener, so that shutdown() can empty its accept queue.
        self.listeners = sockets if sockets is not None else [self.config.bind_socket()]
        super().run(sockets=self.listeners)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.lifecycle.begin_drain()
        if refuse_new_handshakes(self.listeners):
            # The handshakes under way complete meanwhile, accepted and served as usual.
            await asyncio.sleep(HANDSHAKE_GRACE_S)
        accepted = stop_listening(self.listeners)
        for server in getattr(self, "servers", []):
            server.close()  # no await since the queue was emptied: nothing more is accepted
        if accepted:
            loop = asyncio.get_running_loop()

            def new_protocol() -> asyncio.Protocol:
                protocol: asyncio.Protocol = self.config.http_protocol_class(  # type: ignore[call-arg]
                    config=self.config,
                    server_state=self.server_state,
                    app_state=self.lifespan.state,
                    _loop=loop,
                )
                return protocol

            for conn in accepted:
                await loop.connect_accepted_socket(new_protocol, conn)
            log.info("took %d connection(s) waiting as the listener closed", len(accepted))
        await super().shutdown(sockets)


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


def build_server(settings: Settings, engine_address: str | None = None) -> DrainingServer:
    """The HTTP server, its app holding the engine, or a front end of the engine at
    `engine_address` (app/supervisor.py)."""
    app = create_app(settings, engine_address=engine_address)
    limits = ConnectionLimits.from_settings(settings, open_files_limit())
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        # httptools with the service's limits, its JSON errors and a lingering close.
        http=protocol_class(ConnectionRegistry(limits)),
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
    log.info(
        "open files: %d; connections: at most %d (answered 503 up to %d)",
        open_files_limit(),
        limits.max_connections,
        limits.ceiling,
    )
    return DrainingServer(config, app.state.lifecycle, settings.shutdown_delay_s)


def shared_listener(settings: Settings) -> socket.socket:
    """This front end's own listener on the replica's port: SO_REUSEPORT, so that each front
    end has its own accept queue (and closes only its own when it drains), and the kernel
    spreads new connections over them. Bound, not listening: uvicorn listens once the app has
    started, so that no connection waits in the queue of a front end still starting."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.host, settings.port))
    return sock


async def serve_engine(settings: Settings, address: str) -> None:
    """The engine process: load and warm the models, serve the front ends until SIGTERM, then
    finish what is queued (within `drain_timeout_s`)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    engine = await asyncio.to_thread(load_engine, settings)
    # Its batches' metrics, to the replica's folder: the front ends add them up.
    engine.observe(Metrics(multiprocess_dir=os.environ.get(MULTIPROC_ENV)))
    host = EngineHost(engine)
    engine.start()
    await host.start(address)
    log.info("engine: serving the front ends")
    await stop.wait()
    log.info("engine: stopping")
    await engine.stop()
    await host.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the model repository over HTTP.")
    parser.add_argument("--host", help="default: VIT_SERVE_HOST or 127.0.0.1")
    parser.add_argument("--port", type=int, help="default: VIT_SERVE_PORT or 8000")
    parser.add_argument(
        "--role",
        choices=["server", "engine", "front-end"],
        default="server",
        help="what this process is (the supervisor starts engine and front-end processes)",
    )
    parser.add_argument("--engine", help="the engine process's address (for its children)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = Settings(**overrides)
    if args.role == "engine":
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor says when to stop
        logging.config.dictConfig(log_config(settings))
        uvloop.run(serve_engine(settings, args.engine))
        return
    # Before anything opens files: every connection holds one.
    raise_open_files_limit()
    if args.role == "front-end":
        build_server(settings, engine_address=args.engine).run(sockets=[shared_listener(settings)])
    else:
        cores = len(os.sched_getaffinity(0))
        offered = settings.providers is None or any(p != CPU for p in settings.providers)
        workers = settings.workers or default_workers(offered and driver_present(), cores)
        if workers > 1:
            logging.config.dictConfig(log_config(settings))
            sys.exit(Supervisor(settings, workers).run())
        build_server(settings).run()


if __name__ == "__main__":
    main()
