"""Reading images out of a request: multipart field `image` (repeatable) or an image/* body.

The body is read with a byte limit before anything is parsed, so an oversized upload costs the
server at most the limit whether or not the client sent a Content-Length; and with a deadline
over the whole read, so a client that trickles its body holds a request for a bounded time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from app.core.errors import (
    BadRequestBodyError,
    BodyTimeoutError,
    NoImageError,
    PayloadTooLargeError,
    TooManyImagesError,
    UnsupportedMediaTypeError,
)
from app.core.settings import Settings
from app.http.frontdoor import shown
from app.pipeline.workers import Upload

FIELD = "image"
HOW_TO_SEND = (
    "send each image as a multipart/form-data file field named 'image', or one image as the raw "
    "body with an image/* Content-Type (e.g. image/jpeg)"
)


def _size(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB" if n >= 1024 * 1024 else f"{n} bytes"


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, or PayloadTooLargeError as soon as it is known to exceed `limit`, or
    BodyTimeoutError when it has not all arrived `timeout_s` after the read began."""
    too_large = f"the request body is larger than the limit of {_size(limit)}: send smaller images"
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(too_large)
    chunks: list[bytes] = []
    received = 0
    # The declared length can be absent (chunked) or wrong: count what actually arrives.
    try:
        # One deadline for the whole body, not one per chunk: a byte every second would
        # satisfy any per-chunk timeout forever.
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise PayloadTooLargeError(too_large)
                chunks.append(chunk)
    except TimeoutError as exc:
        raise BodyTimeoutError(
            f"the request body was not received within {timeout_s:g} s: send it without "
            "pauses, and on a slow link fewer or smaller images per request"
        ) from exc
    except ClientDisconnect as exc:
        # Nobody will read the answer; a 400 keeps it out of the server-error log.
        raise BadRequestBodyError("the client disconnected before sending the whole body") from exc
    return b"".join(chunks)


async def _once(body: bytes) -> AsyncGenerator[bytes, None]:
    yield body


async def _multipart_uploads(request: Request, body: bytes, settings: Settings) -> list[Upload]:
    parser = MultiPartParser(
        request.headers,
        _once(body),
        # Room for a few more files than allowed, so "too many images" gets its own message.
        max_files=settings.images_per_request_max + 16,
        max_fields=64,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise BadRequestBodyError(f"could not parse the multipart body: {exc.message}") from exc
    try:
        fields = form.multi_items()
        parts = [value for name, value in fields if name == FIELD]
        if not parts:
            found = sorted({shown(name, 40) for name, _ in fields})
            also = f" (found fields: {', '.join(found)})" if found else ""
            raise NoImageError(f"no form field '{FIELD}' in the request{also}; {HOW_TO_SEND}")
        if len(parts) > settings.images_per_request_max:
            raise TooManyImagesError(
                f"{len(parts)} images in one request; the limit is "
                f"{settings.images_per_request_max}: split them over several requests"
            )
        uploads = []
        for index, part in enumerate(parts, start=1):
            if not isinstance(part, UploadFile):
                raise BadRequestBodyError(
                    f"form field '{FIELD}' #{index} is text, not a file (its part has no "
                    "filename); send it as a file part, e.g. curl -F image=@photo.jpg"
                )
            name = f"'{shown(part.filename)}'" if part.filename else f"#{index}"
            uploads.append(
                Upload(
                    data=await part.read(),
                    name=name,
                    content_type=shown(part.content_type) if part.content_type else None,
                )
            )
        return uploads
    finally:
        await form.close()


async def read_uploads(request: Request, settings: Settings) -> list[Upload]:
    """Every image in the request, in the order sent; a RequestError when there is none."""
    content_type = request.headers.get("content-type", "")
    mime = content_type.split(";")[0].strip().lower()
    limit, timeout = settings.upload_max_bytes, settings.body_read_timeout_s
    if mime == "multipart/form-data":
        return await _multipart_uploads(request, await read_body(request, limit, timeout), settings)
    if mime.startswith("image/"):
        body = await read_body(request, limit, timeout)
        if not body:
            raise NoImageError(f"the request body is empty; {HOW_TO_SEND}")
        return [Upload(data=body, name="(request body)", content_type=mime)]
    if not mime:
        body = await read_body(request, limit, timeout)
        if not body:
            raise NoImageError(f"no image in the request; {HOW_TO_SEND}")
        raise UnsupportedMediaTypeError(f"the request has no Content-Type; {HOW_TO_SEND}")
    raise UnsupportedMediaTypeError(f"Content-Type '{shown(mime)}' is not supported; {HOW_TO_SEND}")
