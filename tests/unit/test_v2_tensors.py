"""Tensor contents of the Open Inference Protocol: raw bytes, JSON values, BYTES elements, and
the REST binary data extension's framing, against tritonclient's own serialisation."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from app.core.errors import InvalidInputError, PayloadTooLargeError
from app.http.v2.binary import decompress, parse_request
from app.http.v2.tensors import from_raw, from_values, join_bytes, split_bytes, to_raw


def test_bytes_elements_as_tritonclient_frames_them() -> None:
    elements = [b"", b"\x00\xff" * 3, "é".encode()]
    framed = serialize_byte_tensor(np.array(elements, dtype=np.object_))
    theirs = framed.item() if framed.dtype == np.object_ else framed.tobytes()
    assert join_bytes(elements) == theirs
    assert split_bytes("image", theirs, 3) == elements
    assert list(deserialize_bytes_tensor(join_bytes(elements))) == elements


@pytest.mark.parametrize(
    ("raw", "count", "message"),
    [
        (b"\x05\x00\x00\x00ab", 1, "runs past the end"),
        (b"\x01\x00", 1, "ends inside an element's 4-byte length"),
        (join_bytes([b"a", b"b"]), 3, "of 3 elements holds 2 BYTES elements"),
    ],
)
def test_broken_bytes_framing(raw: bytes, count: int, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        split_bytes("image", raw, count)


def test_raw_numbers_round_trip_little_endian() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(from_raw("x", "FP32", [3, 4], to_raw(array)), array)
    big = array.astype(">f4")
    assert to_raw(big) == to_raw(array)
    with pytest.raises(InvalidInputError, match="needs 48 bytes of data, got 44"):
        from_raw("x", "FP32", [3, 4], to_raw(array)[:-4])
    with pytest.raises(InvalidInputError, match="not supported"):
        from_raw("x", "BF16", [1], b"\x00\x00")


def test_json_values() -> None:
    nested = [[[1, 2], [3, 4]]]
    assert from_values("p", "UINT8", [1, 2, 2], nested).tolist() == nested
    assert from_values("p", "UINT8", [4], [1, 2, 3, 4]).dtype == np.uint8
    for values, message in (
        ([1, 2, 300, 4], r"values must lie in \[0, 255\]"),
        ([1.5, 2, 3, 4], "takes integers only"),
        ([1, 2, 3], "needs 4 values, got 3"),
        ([[1, 2], [3]], "not a regular array"),
    ):
        with pytest.raises(InvalidInputError, match=message):
            from_values("p", "UINT8", [4], values)


def test_the_binary_extension_framing() -> None:
    def tensor(name: str, datatype: str, shape: list[int], size: int) -> dict[str, object]:
        return {
            "name": name,
            "shape": shape,
            "datatype": datatype,
            "parameters": {"binary_data_size": size},
        }

    inputs = [tensor("a", "UINT8", [2], 2), tensor("b", "BYTES", [1], 7)]
    header = json.dumps({"inputs": inputs, "parameters": {"resize": "fit"}}).encode()
    body = header + b"\x01\x02" + join_bytes([b"png"])
    request = parse_request(body, str(len(header)), "m", "3")
    assert (request.model, request.version, request.parameters) == ("m", "3", {"resize": "fit"})
    assert request.inputs[0].array is not None
    assert request.inputs[0].array.tolist() == [1, 2]
    assert request.inputs[1].elements == [b"png"]
    for length, message in (("0", "JSON's length"), ("x", "JSON's length")):
        with pytest.raises(InvalidInputError, match=message):
            parse_request(body, length, "m", "")
    with pytest.raises(InvalidInputError, match="1 bytes after the JSON"):
        parse_request(body + b"!", str(len(header)), "m", "")


def test_compressed_bodies_are_bounded() -> None:
    assert decompress(zlib.compress(b"abc"), "deflate", 10) == b"abc"
    bomb = zlib.compress(bytes(10_000))
    with pytest.raises(PayloadTooLargeError):
        decompress(bomb, "deflate", 1000)
    with pytest.raises(InvalidInputError, match="cannot be inflated"):
        decompress(b"not gzip", "gzip", 1000)
