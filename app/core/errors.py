"""Errors about a request as a whole (image content errors live in imaging, model lookups in
repository, queueing in batching); each carries a `message` a person can act on."""

from __future__ import annotations


class ServiceError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RequestError(ServiceError):
    """Something in what the client sent; the message says what to change."""


class NoImageError(RequestError):
    """The request carries no image."""


class BadRequestBodyError(RequestError):
    """The body cannot be parsed (a broken multipart body, a text field where a file belongs)."""


class UnsupportedMediaTypeError(RequestError):
    """Neither an image/* body nor multipart, or a part that is neither declared nor decodable."""


class PayloadTooLargeError(RequestError):
    """More bytes than `upload_max_bytes`."""


class TooManyImagesError(RequestError):
    """More images in one request than `images_per_request_max`."""


class RolloutUnavailableError(RequestError):
    """A rollout map asked of a model version exported without its rollout graph."""


class InvalidInputError(RequestError):
    """A tensor that does not fit the model or the protocol (name, type, shape, size, data); the
    Open Inference Protocol's front doors answer it 400 (INVALID_ARGUMENT over gRPC)."""


class InvalidParameterError(RequestError):
    """A query parameter outside what the settings or the model allow."""


class NotReadyError(ServiceError):
    """Models are not loaded yet, or the server is stopping."""


class BodyTimeoutError(RequestError):
    """The body did not arrive within `body_read_timeout_s` (a stalled or trickling client)."""


class UnauthorizedError(RequestError):
    """No key, or not the right one, where a key is required (answered with WWW-Authenticate)."""


class MissingKeyError(UnauthorizedError):
    """The request carries no key at all."""


class InvalidKeyError(UnauthorizedError):
    """The request carries a key, and it is not the configured one."""


class AdminDisabledError(ServiceError):
    """An admin endpoint asked of a server with no admin key: admin endpoints are off."""


class BusyError(ServiceError):
    """Every request place is taken. Raised by the route, before the body is read, for a
    request that got past the middleware's own check (so answered with `Connection: close`:
    the unread body must not be taken for the next request)."""
