"""`python -m app.probe [PATH]`: exit 0 when this host's server answers PATH (/readyz) with 200.

The image's HEALTHCHECK: the image has no curl, and Python is already there.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from app.core.settings import Settings


def probe(path: str = "/readyz", timeout_s: float = 2.0) -> bool:
    settings = Settings()
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    try:
        with urllib.request.urlopen(f"http://{host}:{settings.port}{path}", timeout=timeout_s) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


if __name__ == "__main__":
    sys.exit(0 if probe(sys.argv[1] if len(sys.argv) > 1 else "/readyz") else 1)
