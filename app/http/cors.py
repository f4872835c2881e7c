"""CORS: off unless `cors_allow_origins` is set; then pages on those origins may call the API.

Keys travel in headers, never in cookies, so credentials stay off (and '*' is a valid origin);
the headers a page sends (a key, a request id, a deadline) must still be allowed by name, since
browsers never let a wildcard cover Authorization.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

ALLOW_METHODS = ("GET", "POST")
ALLOW_HEADERS = (
    "Authorization",
    "Content-Type",  # image/* and multipart bodies are not a "simple" request's types
    "X-API-Key",
    "X-Request-ID",
    "X-Request-Timeout-Ms",
)
# What a page's script may read besides the safelisted headers: the id to quote in a bug
# report, and when to retry a 503.
EXPOSE_HEADERS = ("X-Request-ID", "Retry-After")


def install_cors(app: FastAPI, origins: list[str]) -> None:
    """Answer preflights and mark answers for `origins`; nothing at all when there are none.

    Call after the other middleware is added: it is then the outermost, so preflights are
    answered before the request metrics (they are not traffic) and every answer below it, the
    drain's 503 included, carries the headers a page needs to read it.
    """
    if not origins:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=ALLOW_METHODS,
        allow_headers=ALLOW_HEADERS,
        expose_headers=EXPOSE_HEADERS,
        allow_credentials=False,
    )
