"""The one error root of the service, `ServiceError`, and the errors about a request as a whole.

Every error the service answers with a status is a `ServiceError` (image content errors live
in imaging, model lookups in the repository, queueing in the engine's batches), carrying a
`message` a person can act on and a `kind`: what went wrong, in the terms a client acts on.
Each front door maps kinds to its own codes in one table (app/http/frontdoor.py: HTTP statuses;
app/grpc/server.py: gRPC codes), so the same mistake gets the same answer everywhere.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class ErrorKind(enum.Enum):
    BAD_INPUT = "bad_input"  # not an image, a broken body, a tensor the model cannot take
    INVALID_PARAMETER = "invalid_parameter"  # a parameter outside what is allowed
    UNAUTHORIZED = "unauthorized"  # no key, or the wrong one
    FORBIDDEN = "forbidden"  # an endpoint that is off
    NOT_FOUND = "not_found"  # no such model or version
    CONFLICT = "conflict"  # the repository cannot be read as it is
    BODY_TIMEOUT = "body_timeout"  # the body did not arrive in time
    TOO_LARGE = "too_large"  # body, image pixels or image count over a limit
    UNSUPPORTED_MEDIA = "unsupported_media"  # not a media type the door takes
    UNAVAILABLE = "unavailable"  # cannot serve now: not ready, a model failing; retry
    SHED = "shed"  # refused to keep up (full queue, every place taken, stopping); retry
    DEADLINE = "deadline"  # not done before the request's deadline


class ServiceError(Exception):
    kind: ClassVar[ErrorKind] = ErrorKind.BAD_INPUT

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def service_errors() -> dict[str, type[ServiceError]]:
    """Every error class of the service defined so far (ServiceError and its subclasses, in
    the modules imported), by name: the engine's wire raises them again by name."""
    found: dict[str, type[ServiceError]] = {}
    pending: list[type[ServiceError]] = [ServiceError]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found


class RequestError(ServiceError):
    """Something in what the client sent; the message says what to change."""


class NoImageError(RequestError):
    """The request carries no image."""


class BadRequestBodyError(RequestError):
    """The body cannot be parsed (a broken multipart body, a text field where a file belongs)."""


class UnsupportedMediaTypeError(RequestError):
    """Neither an image/* body nor multipart, or a part that is neither declared nor decodable."""

    kind = ErrorKind.UNSUPPORTED_MEDIA


class PayloadTooLargeError(RequestError):
    """More bytes than `upload_max_bytes`."""

    kind = ErrorKind.TOO_LARGE


class TooManyImagesError(RequestError):
    """More images in one request than `images_per_request_max`."""

    kind = ErrorKind.TOO_LARGE


class RolloutUnavailableError(RequestError):
    """A rollout map asked of a model version exported without its rollout graph."""


class InvalidInputError(RequestError):
    """A tensor that does not fit the model or the protocol (name, type, shape, size, data); the
    Open Inference Protocol's front doors answer it 400 (INVALID_ARGUMENT over gRPC)."""


class InvalidParameterError(RequestError):
    """A query parameter outside what the settings or the model allow."""

    kind = ErrorKind.INVALID_PARAMETER


class NotReadyError(ServiceError):
    """Models are not loaded yet, or the server is stopping."""

    kind = ErrorKind.UNAVAILABLE


class BodyTimeoutError(RequestError):
    """The body did not arrive within `body_read_timeout_s` (a stalled or trickling client)."""

    kind = ErrorKind.BODY_TIMEOUT


class UnauthorizedError(RequestError):
    """No key, or not the right one, where a key is required (answered with WWW-Authenticate)."""

    kind = ErrorKind.UNAUTHORIZED


class MissingKeyError(UnauthorizedError):
    """The request carries no key at all."""


class InvalidKeyError(UnauthorizedError):
    """The request carries a key, and it is not the configured one."""


class AdminDisabledError(ServiceError):
    """An admin endpoint asked of a server with no admin key: admin endpoints are off."""

    kind = ErrorKind.FORBIDDEN


class BusyError(ServiceError):
    """Every request place is taken. Raised by the route, before the body is read, for a
    request that got past the middleware's own check (so answered with `Connection: close`:
    the unread body must not be taken for the next request)."""

    kind = ErrorKind.SHED
