"""Patchify as a three-node ONNX graph, so that pixels on the GPU become patches there.

`[N, H, W, C]` uint8 -> Reshape `[N, gh, P, gw, P, C]` -> Transpose (swap the P rows with
the patch columns) -> Reshape `[N, gh, gw, P*P*C]`: the layout `export.vit.patchify` and
app/pipeline/preprocess.py make, in (row, col, channel) order inside each patch. The target
shapes are inputs (a few int64s from the host), so one graph serves every grid and patch
size. ONNX Runtime's CUDA provider runs it on the decoder's output, bound with IO binding, and
its output is bound as the model's input: the pixels never leave the device.

The graph is written here as protobuf bytes by hand: the serving image has no `onnx`
package, and the message is small and fixed (ONNX's onnx.proto, IR version 8, opset 18).
"""

from __future__ import annotations

INPUT = "pixels"
SPLIT = "split"  # int64 [6]: N, gh, P, gw, P, C
MERGED = "merged"  # int64 [4]: N, gh, gw, P*P*C
OUTPUT = "patches"
IR_VERSION = 8
OPSET = 18
_UINT8 = 2  # TensorProto.DataType
_INT64 = 7
_INTS = 7  # AttributeProto.AttributeType


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _str(field: int, value: str) -> bytes:
    return _bytes(field, value.encode())


def _tensor_value(name: str, elem_type: int, dims: list[int | str]) -> bytes:
    """ValueInfoProto: name, TypeProto{tensor_type{elem_type, shape{dim...}}}."""
    shape = b"".join(_bytes(1, _int(1, d) if isinstance(d, int) else _str(2, d)) for d in dims)
    tensor = _int(1, elem_type) + _bytes(2, shape)
    return _str(1, name) + _bytes(2, _bytes(1, tensor))


def _node(op: str, inputs: list[str], outputs: list[str], name: str, attributes: bytes) -> bytes:
    return (
        b"".join(_str(1, i) for i in inputs)
        + b"".join(_str(2, o) for o in outputs)
        + _str(3, name)
        + _str(4, op)
        + attributes
    )


def _ints_attribute(name: str, values: list[int]) -> bytes:
    return _bytes(5, _str(1, name) + b"".join(_int(8, v) for v in values) + _int(20, _INTS))


def patchify_graph() -> bytes:
    """The serialised ModelProto."""
    nodes = [
        _node("Reshape", [INPUT, SPLIT], ["blocks"], "split_patches", b""),
        _node(
            "Transpose",
            ["blocks"],
            ["ordered"],
            "order_patches",
            _ints_attribute("perm", [0, 1, 3, 2, 4, 5]),
        ),
        _node("Reshape", ["ordered", MERGED], [OUTPUT], "merge_patches", b""),
    ]
    graph = (
        b"".join(_bytes(1, n) for n in nodes)
        + _str(2, "patchify")
        + _bytes(11, _tensor_value(INPUT, _UINT8, ["batch", "height", "width", "channels"]))
        + _bytes(11, _tensor_value(SPLIT, _INT64, [6]))
        + _bytes(11, _tensor_value(MERGED, _INT64, [4]))
        + _bytes(12, _tensor_value(OUTPUT, _UINT8, ["batch", "grid_h", "grid_w", "patch_dim"]))
    )
    opset = _str(1, "") + _int(2, OPSET)
    return _int(1, IR_VERSION) + _str(2, "vit-serve") + _bytes(7, graph) + _bytes(8, opset)


def shapes(
    batch: int, height: int, width: int, channels: int, patch: int
) -> tuple[list[int], list[int]]:
    """The graph's two shape inputs for a batch of `height` x `width` images."""
    gh, gw = height // patch, width // patch
    return [batch, gh, patch, gw, patch, channels], [batch, gh, gw, patch * patch * channels]
