"""REST bodies of the Open Inference Protocol, with Triton's binary tensor data extension.

A request may be its JSON alone, or its JSON followed by raw tensor data: then the header
`Inference-Header-Content-Length` gives the JSON's length, and each input whose parameters hold
`binary_data_size` takes that many bytes, in the order of the inputs. An answer is binary the
same way for each output asked for with `binary_data: true` (or every output, with the request
parameter `binary_data_output: true`); JSON values otherwise.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from app.core.errors import InvalidInputError, PayloadTooLargeError, UnsupportedMediaTypeError
from app.http.v2.inference import (
    InferRequest,
    InferResponse,
    InputTensor,
    Parameter,
    RequestedOutput,
)
from app.http.v2.schemas import InferenceRequest, RequestInput
from app.http.v2.tensors import BYTES, element_count, from_raw, from_values, join_bytes, to_raw
from app.http.v2.tensors import split_bytes as split_bytes_elements

HEADER_LENGTH = "inference-header-content-length"
BINARY_SIZE = "binary_data_size"


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """A body sent with Content-Encoding gzip or deflate (tritonclient can), at most `limit`
    bytes once inflated."""
    if not encoding or encoding.strip().lower() == "identity":
        return body
    kind = encoding.strip().lower()
    if kind not in ("gzip", "deflate"):
        raise UnsupportedMediaTypeError(
            f"Content-Encoding '{kind[:40]}' is not supported: send gzip, deflate or none"
        )
    inflater = zlib.decompressobj(wbits=31 if kind == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInputError(f"the {kind} body cannot be inflated: {exc}") from exc
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLargeError(
            f"the request body inflates to more than the limit of {limit} bytes"
        )
    return out


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else error["msg"])
    return "the inference request is not valid: " + "; ".join(parts[:5])


def parse_request(body: bytes, header_length: str | None, model: str, version: str) -> InferRequest:
    """An inference request from its REST body (InvalidInputError naming what is wrong)."""
    if header_length is None:
        header, binary = body, memoryview(b"")
    else:
        if not header_length.strip().isdigit() or not 0 < int(header_length) <= len(body):
            raise InvalidInputError(
                f"header Inference-Header-Content-Length must be the JSON's length in bytes, "
                f"at most the body's {len(body)}; got {header_length[:40]!r}"
            )
        length = int(header_length)
        header, binary = body[:length], memoryview(body)[length:]
    try:
        parsed = InferenceRequest.model_validate_json(header)
    except ValidationError as exc:
        raise InvalidInputError(_describe(exc)) from None
    offset = 0
    inputs = []
    for tensor in parsed.inputs:
        size = (tensor.parameters or {}).get(BINARY_SIZE)
        if size is None:
            inputs.append(_from_json(tensor))
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInputError(f"input '{tensor.name}': binary_data_size must be a count")
        if offset + size > len(binary):
            raise InvalidInputError(
                f"input '{tensor.name}' declares {size} bytes of binary data; the body holds "
                f"{len(binary) - offset} more after the JSON"
            )
        inputs.append(_from_binary(tensor, binary[offset : offset + size]))
        offset += size
    if offset != len(binary):
        raise InvalidInputError(
            f"{len(binary) - offset} bytes after the JSON and the inputs' binary_data_size"
        )
    outputs = (
        None
        if parsed.outputs is None
        else [RequestedOutput(o.name, dict(o.parameters or {})) for o in parsed.outputs]
    )
    return InferRequest(
        model=model,
        version=version,
        id=parsed.id or "",
        parameters=dict(parsed.parameters or {}),
        inputs=inputs,
        outputs=outputs,
    )


def _from_binary(tensor: RequestInput, raw: memoryview) -> InputTensor:
    if tensor.data is not None:
        raise InvalidInputError(f"input '{tensor.name}' has both data and binary_data_size")
    if tensor.datatype == BYTES:
        count = element_count(tensor.name, tensor.shape)
        elements = split_bytes_elements(tensor.name, raw, count)
        return InputTensor(tensor.name, BYTES, tensor.shape, elements=elements)
    array = from_raw(tensor.name, tensor.datatype, tensor.shape, bytes(raw))
    return InputTensor(tensor.name, tensor.datatype, tensor.shape, array=array)


def _flatten(values: Any) -> list[Any]:
    if not isinstance(values, list):
        return [values]
    flat: list[Any] = []
    for value in values:
        flat.extend(_flatten(value) if isinstance(value, list) else [value])
    return flat


def _from_json(tensor: RequestInput) -> InputTensor:
    if tensor.data is None:
        raise InvalidInputError(
            f"input '{tensor.name}' has no data: send it as 'data' or as binary data "
            "(parameter binary_data_size)"
        )
    if tensor.datatype == BYTES:
        values = _flatten(tensor.data)
        if not all(isinstance(v, str) for v in values):
            raise InvalidInputError(
                f"input '{tensor.name}': BYTES data in JSON must be strings; send images as "
                "binary data (tritonclient does by default)"
            )
        count = element_count(tensor.name, tensor.shape)
        if len(values) != count:
            raise InvalidInputError(
                f"input '{tensor.name}' of shape {tensor.shape} needs {count} values, "
                f"got {len(values)}"
            )
        elements = [v.encode("utf-8", "surrogateescape") for v in values]
        return InputTensor(tensor.name, BYTES, tensor.shape, elements=elements)
    array = from_values(tensor.name, tensor.datatype, tensor.shape, tensor.data)
    return InputTensor(tensor.name, tensor.datatype, tensor.shape, array=array)


def _binary(output: RequestedOutput, all_binary: bool) -> bool:
    flag = output.parameters.get("binary_data")
    return all_binary if flag is None else flag is True


def encode_response(
    response: InferResponse, parameters: Mapping[str, Parameter]
) -> tuple[bytes, int | None]:
    """The body, and the JSON's length when binary data follows it (else None)."""
    all_binary = parameters.get("binary_data_output") is True
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for tensor, requested in zip(response.outputs, response.requested, strict=True):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": tensor.shape,
        }
        if _binary(requested, all_binary):
            if tensor.elements is not None:
                raw = join_bytes(tensor.elements)
            else:
                assert tensor.array is not None
                raw = to_raw(tensor.array)
            entry["parameters"] = {BINARY_SIZE: len(raw)}
            chunks.append(raw)
        elif tensor.elements is not None:
            entry["data"] = [e.decode("utf-8", "replace") for e in tensor.elements]
        else:
            assert tensor.array is not None
            entry["data"] = tensor.array.ravel().tolist()
        outputs.append(entry)
    header = json.dumps(
        {
            "model_name": response.model,
            "model_version": response.version,
            "id": response.id,
            "outputs": outputs,
        },
        separators=(",", ":"),
    ).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)
