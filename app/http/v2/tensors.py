"""Tensors of the Open Inference Protocol: data types, and tensor contents to and from bytes.

Raw tensor contents (the REST binary extension, gRPC's `raw_*_contents`) are the elements in
row-major order, little-endian, without padding; a BYTES element is its length as a 4-byte
little-endian unsigned integer, then its bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from app.core.errors import InvalidInputError

# The protocol's numeric data types (BYTES is a sequence of byte strings, BF16 not supported).
NUMPY_TYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
BYTES = "BYTES"
_LENGTH = struct.Struct("<I")


def element_count(name: str, shape: Sequence[int]) -> int:
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"input '{name}' has a negative dimension: shape {list(shape)}")
    return math.prod(shape)


def from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> NDArray[Any]:
    """A numeric tensor from its raw contents (not copied: read-only, over `raw`)."""
    dtype = NUMPY_TYPES.get(datatype)
    if dtype is None:
        raise InvalidInputError(f"input '{name}': data type {datatype!r} is not supported here")
    count = element_count(name, shape)
    if len(raw) != count * dtype.itemsize:
        raise InvalidInputError(
            f"input '{name}' of shape {list(shape)} and type {datatype} needs "
            f"{count * dtype.itemsize} bytes of data, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def from_values(name: str, datatype: str, shape: Sequence[int], values: Any) -> NDArray[Any]:
    """A numeric tensor from JSON or protobuf values, flat or nested in row-major order."""
    dtype = NUMPY_TYPES.get(datatype)
    if dtype is None:
        raise InvalidInputError(f"input '{name}': data type {datatype!r} is not supported here")
    count = element_count(name, shape)
    try:
        array = np.asarray(values)
    except ValueError as exc:  # ragged nesting
        raise InvalidInputError(f"input '{name}': its data is not a regular array") from exc
    if array.size != count:
        raise InvalidInputError(
            f"input '{name}' of shape {list(shape)} needs {count} values, got {array.size}"
        )
    if dtype.kind in "iu":
        if array.size and array.dtype.kind not in "iub":
            raise InvalidInputError(f"input '{name}' of type {datatype} takes integers only")
        info = np.iinfo(dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise InvalidInputError(
                f"input '{name}' of type {datatype}: values must lie in [{info.min}, {info.max}]"
            )
    elif dtype.kind == "f" and array.size and array.dtype.kind not in "iuf":
        raise InvalidInputError(f"input '{name}' of type {datatype} takes numbers only")
    return array.astype(dtype).reshape(shape)


def split_bytes(name: str, raw: bytes | memoryview, count: int) -> list[bytes]:
    """A BYTES tensor's elements from its raw contents."""
    view = memoryview(raw)
    elements: list[bytes] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise InvalidInputError(
                f"input '{name}': BYTES data ends inside an element's 4-byte length"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidInputError(
                f"input '{name}': a BYTES element of {length} bytes runs past the end of the data"
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    if len(elements) != count:
        raise InvalidInputError(
            f"input '{name}' of {count} elements holds {len(elements)} BYTES elements"
        )
    return elements


def join_bytes(elements: Sequence[bytes]) -> bytes:
    """A BYTES tensor's raw contents."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def to_raw(array: NDArray[Any]) -> bytes:
    """A numeric tensor's raw contents: little-endian, row-major."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
