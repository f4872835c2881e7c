"""The real server for browser tests: uvicorn in a subprocess on 127.0.0.1, and where chromium is.

The browser is Debian's chromium driven by Playwright; nothing is downloaded (never
`playwright install`). `.ci/run` installs chromium and the `test` extra installs Playwright.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, free_port

ARTIFACTS = ROOT / "test-artifacts"
SERVER_START_TIMEOUT_S = 60.0
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass(frozen=True)
class LiveServer:
    base_url: str
    model_repo: Path
    model: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@contextlib.contextmanager
def run_server(model_repo: Path, model: str, log_path: Path) -> Iterator[LiveServer]:
    """`uvicorn app.main:create_app --factory` (the README's serve command) until the block ends."""
    env = {
        **os.environ,
        "VIT_SERVE_MODEL_REPO": str(model_repo),
        "VIT_SERVE_DEFAULT_MODEL": model,
        "VIT_SERVE_PROVIDERS": '["CPUExecutionProvider"]',
        "VIT_SERVE_INTRA_OP_THREADS": "1",
    }
    for attempt in range(3):
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory"),
                    *("--host", "127.0.0.1", "--port", str(port)),
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            if _wait_ready(proc, base_url):
                yield LiveServer(base_url, model_repo, model, log_path)
                return
            if attempt == 2 or "address already in use" not in log_path.read_text().lower():
                pytest.fail(f"the server did not become ready; its log:\n{log_path.read_text()}")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], base_url: str) -> bool:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return True
        time.sleep(0.1)
    return False


def chromium_path() -> str | None:
    """Debian's chromium (or VIT_SERVE_CHROMIUM), never a browser Playwright downloaded."""
    configured = os.environ.get("VIT_SERVE_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")
