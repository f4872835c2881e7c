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


class InvalidParameterError(RequestError):
    """A query parameter outside what the settings or the model allow."""


class NotReadyError(ServiceError):
    """Models are not loaded yet, or the server is stopping."""
