"""Debian's nginx on loopback, configured by deploy/nginx/nginx.conf, in front of servers
(`bench.hostile --through-nginx`, and tests/integration/stack.py renders its file here too):
each rewrite must match exactly once, so a changed deployment file fails loudly."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.harness import ROOT, free_port, wait_ready

NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"


def render(listen_port: int, upstreams: list[str], work: Path, max_conns: int | None = None) -> str:
    """The deployed file with loopback upstreams, listen port and paths under `work` (and,
    when given, another `max_conns` per upstream server)."""
    text = NGINX_CONF.read_text()

    def once(pattern: str, replace: str | Callable[[re.Match[str]], str]) -> None:
        nonlocal text
        text, n = re.subn(pattern, replace, text, flags=re.MULTILINE)
        if n != 1:
            raise ValueError(f"{pattern!r} matched {n} times in {NGINX_CONF}")

    def servers(match: re.Match[str]) -> str:
        # `resolve` needs nginx >= 1.27.3 and a DNS name; loopback addresses need neither.
        params = match.group(2).replace(" resolve", "")
        if max_conns is not None:
            params, n = re.subn(r"max_conns=\d+", f"max_conns={max_conns}", params)
            if n != 1:
                raise ValueError(f"no max_conns on the upstream server in {NGINX_CONF}")
        return "\n".join(f"{match.group(1)}server {u}{params};" for u in upstreams)

    once(r"^(\s*)server vit-serve:8000( [^;]*);", servers)
    once(r"^(\s*)listen 8080;", rf"\1listen 127.0.0.1:{listen_port};")
    once(r"^error_log \S+ (\w+);", rf"error_log {work}/error.log \1;")
    once(r"^pid \S+;", f"pid {work}/nginx.pid;")
    once(r"^(\s*)access_log \S+ vit_json;", rf"\1access_log {work}/access.log vit_json;")
    temp = "".join(
        f"    {kind}_temp_path {work}/{kind}_temp;\n" for kind in ("client_body", "proxy")
    )
    # Workers of a root master run as `nobody`, who may not enter private directories (such as
    # pytest's).
    user = "user root;\n" if os.geteuid() == 0 else ""
    once(r"^http \{\n", f"{user}http {{\n{temp}")
    return text


@contextlib.contextmanager
def in_front(upstreams: list[str], work: Path) -> Iterator[int]:
    """nginx balancing over `upstreams` ("127.0.0.1:port"): its port, for the block."""
    binary = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if binary is None:
        raise SystemExit("--through-nginx needs nginx (Debian: apt-get install nginx)")
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(render(port, upstreams, work))
    check = [binary, "-t", "-q", "-p", str(work), "-c", str(conf)]
    if (tested := subprocess.run(check, capture_output=True, text=True)).returncode:
        raise RuntimeError(f"nginx refuses {conf}: {tested.stderr}")
    with (work / "stderr.log").open("wb") as stderr:
        process = subprocess.Popen(
            [binary, "-p", str(work), "-c", str(conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        wait_ready(port, process, 15, path="/lb-healthz")
        yield port
    finally:
        process.terminate()
        process.wait(timeout=15)
