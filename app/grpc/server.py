"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService` on its own port
(`VIT_SERVE_GRPC_PORT`), served by grpc.aio in the same process and event loop as HTTP.

It answers as the REST front door does, through the same `protocol` module and the same
`ClassifyService.infer`: the same admission, queue, batcher, deadlines and messages. Errors map
to status codes from the HTTP status the same error gets: 400/413/415 INVALID_ARGUMENT, 401
UNAUTHENTICATED, 404 NOT_FOUND, 503 UNAVAILABLE (with `retry-after` in the trailing metadata),
504 DEADLINE_EXCEEDED. The call's own deadline (grpc-timeout) lowers the request's, as
X-Request-Timeout-Ms does over HTTP. The inference key, where the server has one, travels in
the metadata as over HTTP: `authorization: Bearer <key>` or `x-api-key: <key>`.
Each call is logged and counted like an HTTP request (route: the method's path, protocol
v2-grpc). While the server drains for shutdown (app/server.py) readiness is off (ServerReady,
ModelReady: false) and calls are served as HTTP requests are; the lifespan's shutdown then stops
the server, which lets calls in flight finish for up to `drain_timeout_s`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from pydantic import SecretStr

from app.core.errors import (
    ErrorKind,
    InvalidInputError,
    InvalidKeyError,
    MissingKeyError,
    NotReadyError,
    ServiceError,
)
from app.core.logs import request_id_var
from app.core.records import RequestRecord, request_scope
from app.core.settings import Settings
from app.engine import LOADING_MESSAGE
from app.grpc.proto import grpc_service_pb2 as pb
from app.grpc.proto import grpc_service_pb2_grpc as pb_grpc
from app.http.auth import FORMS
from app.http.frontdoor import RETRY_AFTER_S, readiness
from app.http.metrics import V2_GRPC, Metrics, error_reason
from app.http.middleware import Lifecycle
from app.http.v2 import inference as protocol
from app.http.v2.rest import status_of
from app.http.v2.tensors import BYTES, element_count, from_raw, from_values, join_bytes, to_raw
from app.http.v2.tensors import split_bytes as split_bytes_elements
from app.models.repository import ModelNotReadyError, UnknownModelError
from app.pipeline.service import ClassifyService

log = logging.getLogger(__name__)
access_log = logging.getLogger("app.access")

SERVICE = "inference.GRPCInferenceService"
T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]

# Each error kind's gRPC code (HTTP's statuses: app/http/frontdoor.py's table); the metrics
# and the access log count a gRPC answer under the HTTP status the same answer gets over REST.
GRPC_CODE: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.BAD_INPUT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.INVALID_PARAMETER: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.UNAUTHORIZED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.CONFLICT: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.BODY_TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.UNSUPPORTED_MEDIA: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.SHED: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
}
CLIENT_CLOSED = 499  # the client cancelled, or its deadline passed (nginx's number)


def _metadata(context: Context) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            found.setdefault(key.lower(), value)
    return found


def check_key(key: SecretStr | None, metadata: dict[str, str]) -> None:
    """The inference key as `check_api_key` checks it, read from the call's metadata."""
    if key is None:
        return
    scheme, _, token = metadata.get("authorization", "").partition(" ")
    bearer = token.strip() if scheme.lower() == "bearer" else ""
    presented = [k for k in (bearer, metadata.get("x-api-key", "")) if k]
    if not presented:
        raise MissingKeyError(f"this endpoint needs an API key: send it as {FORMS}")
    expected = key.get_secret_value().encode("ascii")
    results = [secrets.compare_digest(k.encode("utf-8", "replace"), expected) for k in presented]
    if not any(results):
        raise InvalidKeyError(
            f"the API key is not valid: send the key set in VIT_SERVE_API_KEY as {FORMS}"
        )


def _parameter(value: pb.InferParameter) -> protocol.Parameter:
    kind = value.WhichOneof("parameter_choice")
    if kind is None:
        raise InvalidInputError("a parameter has no value")
    found: protocol.Parameter = getattr(value, kind)
    return found


def _parameters(params: Any) -> dict[str, protocol.Parameter]:
    return {name: _parameter(value) for name, value in params.items()}


_CONTENTS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def parse_request(message: pb.ModelInferRequest) -> protocol.InferRequest:
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise InvalidInputError(
            f"{len(raw)} raw_input_contents for {len(message.inputs)} inputs: send one per input"
        )
    inputs = []
    for index, tensor in enumerate(message.inputs):
        name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInputError(f"input '{name}' has both contents and raw contents")
            if datatype == BYTES:
                elements = split_bytes_elements(name, raw[index], element_count(name, shape))
                inputs.append(protocol.InputTensor(name, BYTES, shape, elements=elements))
            else:
                array = from_raw(name, datatype, shape, raw[index])
                inputs.append(protocol.InputTensor(name, datatype, shape, array=array))
        elif datatype == BYTES:
            elements = list(tensor.contents.bytes_contents)
            if len(elements) != element_count(name, shape):
                raise InvalidInputError(
                    f"input '{name}' of shape {shape} needs {element_count(name, shape)} "
                    f"values, got {len(elements)}"
                )
            inputs.append(protocol.InputTensor(name, BYTES, shape, elements=elements))
        else:
            field = _CONTENTS.get(datatype)
            if field is None:
                raise InvalidInputError(f"input '{name}': data type {datatype!r} is not supported")
            values = list(getattr(tensor.contents, field))
            array = from_values(name, datatype, shape, values)
            inputs.append(protocol.InputTensor(name, datatype, shape, array=array))
    outputs = [protocol.RequestedOutput(o.name, _parameters(o.parameters)) for o in message.outputs]
    return protocol.InferRequest(
        model=message.model_name,
        version=message.model_version,
        id=message.id,
        parameters=_parameters(message.parameters),
        inputs=inputs,
        outputs=outputs or None,
    )


def encode_response(answer: protocol.InferResponse) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=answer.model, model_version=answer.version, id=answer.id
    )
    for tensor in answer.outputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        if tensor.elements is not None:
            response.raw_output_contents.append(join_bytes(tensor.elements))
        else:
            assert tensor.array is not None
            response.raw_output_contents.append(to_raw(tensor.array))
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self, service: ClassifyService, settings: Settings, metrics: Metrics, lifecycle: Lifecycle
    ) -> None:
        self.service = service
        self.settings = settings
        self.metrics = metrics
        self.lifecycle = lifecycle

    async def _call(self, method: str, context: Context, handler: Callable[[], Awaitable[T]]) -> T:
        """Run one call: its request id, record, access log line and metrics, its errors
        mapped to status codes."""
        started = time.perf_counter()
        metadata = _metadata(context)
        request_id = metadata.get("x-request-id") or uuid.uuid4().hex
        record = RequestRecord(request_id=request_id[:128])
        route = f"/{SERVICE}/{method}"
        token = request_id_var.set(record.request_id)
        self.metrics.in_flight.inc()
        status, failure = 200, None
        try:
            with request_scope(record):
                try:
                    return await handler()
                except asyncio.CancelledError:
                    status, record.error_reason = CLIENT_CLOSED, "cancelled"
                    raise
                except Exception as exc:
                    record.error_reason = error_reason(exc)
                    known = status_of(exc)
                    if known is None or not isinstance(exc, ServiceError):
                        log.error("gRPC %s failed", method, exc_info=exc)
                        status, message = 500, "internal server error; see the server log"
                        failure = (grpc.StatusCode.INTERNAL, message)
                    else:
                        status, message = known, exc.message
                        failure = (GRPC_CODE[exc.kind], message)
                    if status == 503:
                        context.set_trailing_metadata((("retry-after", str(RETRY_AFTER_S)),))
        finally:
            seconds = time.perf_counter() - started
            self.metrics.in_flight.dec()
            self.metrics.request_done(route, status, seconds, record, protocol=V2_GRPC)
            access_log.info(
                "gRPC %s %d",
                method,
                status,
                extra={
                    "method": "gRPC",
                    "path": route,
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1e3, 3),
                    "model": record.model or None,
                    "images": record.images or None,
                    "error_reason": record.error_reason if status >= 400 else None,
                    "client": context.peer(),
                },
            )
            request_id_var.reset(token)
        assert failure is not None
        await context.abort(*failure)
        raise AssertionError("abort returned")  # abort always raises

    def _ready(self) -> ClassifyService:
        if not self.service.engine.readiness().loaded:
            raise NotReadyError(LOADING_MESSAGE)
        return self.service

    async def ServerLive(  # noqa: N802 (the protocol's method names)
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        async def live() -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        return await self._call("ServerLive", context, live)

    async def ServerReady(  # noqa: N802
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        async def ready() -> pb.ServerReadyResponse:
            # The one readiness answer, as GET /readyz and /v2/health/ready give it.
            answer = readiness(self.service.engine, self.lifecycle.draining)
            return pb.ServerReadyResponse(ready=answer.ready)

        return await self._call("ServerReady", context, ready)

    async def ModelReady(  # noqa: N802
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        async def ready() -> pb.ModelReadyResponse:
            try:
                up = await protocol.model_ready(self._ready(), request.name, request.version)
            except (ModelNotReadyError, UnknownModelError):  # as Triton: not ready, no error
                up = False
            return pb.ModelReadyResponse(ready=up and not self.lifecycle.draining)

        return await self._call("ModelReady", context, ready)

    async def ServerMetadata(  # noqa: N802
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        async def meta() -> pb.ServerMetadataResponse:
            return pb.ServerMetadataResponse(
                name=protocol.SERVER_NAME,
                version=protocol.server_version(),
                extensions=list(protocol.EXTENSIONS),
            )

        return await self._call("ServerMetadata", context, meta)

    async def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        async def meta() -> pb.ModelMetadataResponse:
            found = await protocol.model_metadata(self._ready(), request.name, request.version)
            response = pb.ModelMetadataResponse(
                name=found.name,
                versions=found.versions,
                platform=found.platform,
                properties=found.properties,
            )
            for t in found.inputs:
                response.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
            for t in found.outputs:
                response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
            return response

        return await self._call("ModelMetadata", context, meta)

    async def ModelInfer(  # noqa: N802
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        arrived = time.monotonic()

        async def infer() -> pb.ModelInferResponse:
            check_key(self.settings.api_key, _metadata(context))
            service = self._ready()
            remaining = context.time_remaining()
            parsed = parse_request(request)
            version = protocol.parse_version(parsed.model, parsed.version)
            permit = await service.engine.admit(parsed.model, version)
            try:
                answer = await protocol.infer(
                    service,
                    permit,
                    parsed,
                    timeout_ms=None if remaining is None else remaining * 1e3,
                    arrived=arrived,
                )
            finally:
                permit.release()
            return encode_response(answer)

        return await self._call("ModelInfer", context, infer)


class GrpcFrontDoor:
    """The gRPC server: started after the service, stopped before it (app/main.py's lifespan)."""

    def __init__(
        self,
        service: ClassifyService,
        settings: Settings,
        metrics: Metrics,
        lifecycle: Lifecycle,
        shared_port: bool = False,
    ) -> None:
        """`shared_port`: one of several front-end processes on the same port (SO_REUSEPORT,
        as their HTTP listeners: the kernel spreads the connections over them)."""
        self.settings = settings
        self.shared_port = shared_port
        self.servicer = InferenceServicer(service, settings, metrics, lifecycle)
        self.server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Listen on `grpc_port` (0: a free one); returns the port."""
        settings = self.settings
        server = grpc.aio.server(
            options=[
                # Alone, a second server on the same port is an error, not half of the traffic.
                ("grpc.so_reuseport", 1 if self.shared_port else 0),
                # Requests as large as an HTTP body may be (images as BYTES).
                ("grpc.max_receive_message_length", settings.upload_max_bytes + 64 * 1024),
                ("grpc.max_send_message_length", -1),
            ]
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        port = server.add_insecure_port(f"{host}:{settings.grpc_port or 0}")
        if port == 0:
            raise RuntimeError(f"gRPC cannot listen on {host}:{settings.grpc_port}")
        await server.start()
        self.server = server
        log.info("gRPC (Open Inference Protocol) listening on %s:%d", host, port)
        return port

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, let calls in flight finish for up to `grace_s`, cancel the rest."""
        if self.server is not None:
            await self.server.stop(grace_s)
            self.server = None
