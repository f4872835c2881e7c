"""int8: the fused fp32 graph with int8 matrix products, written only past an accuracy gate.

Method (chosen by measurement, `python -m bench.int8 --methods`; docs/performance.md): ONNX
Runtime's dynamic quantisation (`onnxruntime.quantization.quantize_dynamic`) of the fused
graph. Weights of every MatMul with a constant right-hand side and of every fused `Attention`
node (its packed QKV projection: `QAttention`) are stored as int8, one scale per tensor;
activations are quantised to uint8 at run time, per batch, by `DynamicQuantizeLinear`, so no
calibration set is needed and nothing about the inputs is baked in. On a CPU with AVX-512 VNNI
the u8 x s8 products run on its int8 dot-product instructions. What stays float32: LayerNorm,
GELU, softmax inside attention, residual adds, the head (a `Gemm`) and the position-embedding
resampling, which is computed from the grid. The contract holds: `patches` uint8 with a dynamic
grid in, `logits` float32 out.

Tried and left (figures in docs/performance.md): static QDQ with calibration (slower on this
CPU: ONNX Runtime keeps Quantize/Dequantize pairs around every fused op it cannot run in int8,
and less accurate on the random-weight ViT-Ti), per-channel weights (no faster, no more
accurate here), MatMuls only with fp32 attention (slower: the QKV projection is the largest
product).

The gate: the int8 graph's logits against the fused fp32 graph's on held-out inputs (the
demo generator's evaluation seed for the demo model, photos through the service's own
preprocessing for other models): top-1 agreement at least `Gate.min_agreement` (99%), and on
labelled inputs accuracy no more than `Gate.max_accuracy_drop` (0.5 points) below fp32's. The
worst logit difference is reported. A graph that fails is not written (`Int8GateError` says
why).

No PyTorch at import: the service's tests quantise graphs with it.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray

from app.core.settings import Settings
from app.models.spec import Int8Gate, ModelSpec
from app.pipeline.preprocess import ImageError, prepare

log = logging.getLogger(__name__)

MIN_AGREEMENT = 0.99
MAX_ACCURACY_DROP = 0.005
DEMO_HELD_OUT_IMAGES = 1000
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
INT8_OPS = ("QAttention", "MatMulInteger", "DynamicQuantizeLinear")


class Int8GateError(RuntimeError):
    """The int8 graph lost too much against the fp32 one: nothing is written."""


@dataclass(frozen=True)
class Int8Method:
    """How the fused graph is quantised (dynamic quantisation, int8 weights)."""

    attention: bool = True  # the fused Attention nodes too (QAttention), not only MatMuls
    per_channel: bool = False  # one weight scale per output channel rather than per tensor

    def describe(self) -> str:
        ops = "MatMul + Attention (QAttention)" if self.attention else "MatMul"
        scale = "per channel" if self.per_channel else "per tensor"
        return f"dynamic: int8 weights ({scale}), uint8 activations at run time; {ops}"


DEFAULT_METHOD = Int8Method()


@dataclass(frozen=True)
class Gate:
    min_agreement: float = MIN_AGREEMENT
    max_accuracy_drop: float = MAX_ACCURACY_DROP  # on labelled inputs only
    # Off by default (logits' scale differs by model); a test forces an impossible one.
    max_abs_logit_diff: float | None = None


@dataclass(frozen=True)
class HeldOut:
    """Inputs no training or calibration saw, as the graph takes them."""

    patches: NDArray[np.uint8]  # (n, grid_h, grid_w, P*P*C), one grid for all
    labels: NDArray[np.int64] | None  # the true classes, where known
    description: str


def _patchify(images: NDArray[np.uint8], patch: int) -> NDArray[np.uint8]:
    n, h, w, c = images.shape
    x = images.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return np.ascontiguousarray(x.reshape(n, h // patch, w // patch, patch * patch * c))


def demo_held_out(spec: ModelSpec, images: int = DEMO_HELD_OUT_IMAGES) -> HeldOut:
    """The demo generator's evaluation split (`export.demo.evaluate`'s seed), labelled."""
    from export.demo.evaluate import EVAL_SEED
    from export.demo.shapes import generate

    arch = spec.architecture
    height, width = arch.input_size
    if height != width:
        raise ValueError("the demo generator draws square images; this model's grid is not")
    batch = generate(images, seed=EVAL_SEED, size=height)
    return HeldOut(
        patches=_patchify(batch.images, arch.patch_size),
        labels=batch.labels,
        description=f"demo generator, seed {EVAL_SEED}, {images} images (no training run's)",
    )


def photo_held_out(spec: ModelSpec, folder: Path) -> HeldOut:
    """Every photo in `folder` through the service's own `crop` preprocessing, unlabelled."""
    settings = Settings()
    fit_max_tokens = 2 * spec.architecture.native_tokens
    patches = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES):
        try:
            prepared = prepare(
                path.read_bytes(),
                spec,
                "crop",
                name=path.name,
                max_pixels=settings.image_max_pixels,
                fit_max_tokens=fit_max_tokens,
            )
        except ImageError as e:
            log.warning("held-out photo %s skipped: %s", path.name, e)
            continue
        patches.append(prepared.patches)
    if not patches:
        raise ValueError(f"no photos in {folder} for the int8 gate")
    return HeldOut(
        patches=np.stack(patches),
        labels=None,
        description=f"{len(patches)} photos in {folder.name}/, the service's crop preprocessing",
    )


def int8_op_counts(graph: Path) -> dict[str, int]:
    """The fused operators and the int8 ones the graph holds (zero counts left out)."""
    from export.optimize import fused_op_counts  # PyTorch: not at import, the service's tests

    model = onnx.load(str(graph), load_external_data=False)
    counts = collections.Counter(n.op_type for n in model.graph.node if n.op_type in INT8_OPS)
    return dict(sorted({**fused_op_counts(model), **counts}.items()))


def quantize(fused: Path, dst: Path, method: Int8Method = DEFAULT_METHOD) -> None:
    """Write `fused` (an fp32 graph) with int8 weights to `dst`, as `method` says."""

    ops = ["MatMul", "Attention"] if method.attention else ["MatMul"]
    # The quantiser logs a line per tensor on the root logger at INFO; only its warnings here.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        _quantize_dynamic(fused, dst, ops, method.per_channel)
    finally:
        root.setLevel(level)


def _quantize_dynamic(fused: Path, dst: Path, ops: list[str], per_channel: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(fused),
        str(dst),
        op_types_to_quantize=ops,
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
        extra_options={
            # ONNX shape inference does not know the contrib ops (BiasGelu, Attention): the
            # tensors after them are float32, which is all the quantiser needs to be told.
            "DefaultTensorType": onnx.TensorProto.FLOAT,
            # Only products with a constant weight: attention's own QK^T and PV stay float32
            # inside the (Q)Attention kernel, and the grid's resampling MatMuls stay exact.
            "MatMulConstBOnly": True,
        },
    )


def _session(graph: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])


def _logits(
    session: ort.InferenceSession, patches: NDArray[np.uint8], batch: int = 50
) -> NDArray[np.float32]:
    out = [
        session.run(["logits"], {"patches": patches[i : i + batch]})[0]
        for i in range(0, len(patches), batch)
    ]
    return np.concatenate(out).astype(np.float32)


def check_grids(
    graph: Path, grids: Iterable[tuple[int, int]], patch_dim: int, classes: int
) -> None:
    """The int8 graph runs at every grid and keeps the contract (float32 [batch, classes])."""
    session = _session(graph)
    rng = np.random.default_rng(0)
    for gh, gw in grids:
        x = rng.integers(0, 256, (2, gh, gw, patch_dim), dtype=np.uint8)
        (out,) = session.run(["logits"], {"patches": x})
        if out.dtype != np.float32 or out.shape != (2, classes) or not np.isfinite(out).all():
            raise Int8GateError(
                f"the int8 graph at grid {gh}x{gw} gave {out.dtype} {out.shape}, "
                f"expected float32 (2, {classes}), finite; nothing written"
            )


def measure_gate(
    fp32_graph: Path, int8_graph: Path, held_out: HeldOut, gate: Gate, method: str
) -> Int8Gate:
    """The gate's figures (not yet judged: see `failures`)."""
    expected = _logits(_session(fp32_graph), held_out.patches)
    got = _logits(_session(int8_graph), held_out.patches)
    agreement = float((expected.argmax(axis=1) == got.argmax(axis=1)).mean())
    acc32 = acc8 = None
    if held_out.labels is not None:
        acc32 = float((expected.argmax(axis=1) == held_out.labels).mean())
        acc8 = float((got.argmax(axis=1) == held_out.labels).mean())
    return Int8Gate(
        method=method,
        held_out=held_out.description,
        inputs=len(held_out.patches),
        top1_agreement=agreement,
        max_abs_logit_diff=float(np.abs(expected - got).max()),
        accuracy_fp32=acc32,
        accuracy_int8=acc8,
        min_agreement=gate.min_agreement,
        max_accuracy_drop=gate.max_accuracy_drop if held_out.labels is not None else None,
    )


def failures(record: Int8Gate, gate: Gate) -> list[str]:
    """Why the gate fails, one reason each; empty when it passes."""
    why = []
    if record.top1_agreement < gate.min_agreement:
        why.append(
            f"top-1 agreement with fp32 {record.top1_agreement:.2%} < {gate.min_agreement:.2%}"
        )
    if record.accuracy_fp32 is not None and record.accuracy_int8 is not None:
        drop = record.accuracy_fp32 - record.accuracy_int8
        if drop > gate.max_accuracy_drop:
            why.append(
                f"held-out accuracy {record.accuracy_int8:.2%} is {100 * drop:.2f} points "
                f"below fp32's {record.accuracy_fp32:.2%} (at most "
                f"{100 * gate.max_accuracy_drop:.2f} allowed)"
            )
    if gate.max_abs_logit_diff is not None and record.max_abs_logit_diff > gate.max_abs_logit_diff:
        why.append(
            f"max |logit diff| {record.max_abs_logit_diff:.3g} > {gate.max_abs_logit_diff:.3g}"
        )
    return why


def stage_int8(
    fused: Path,
    dst: Path,
    held_out: HeldOut,
    grids: Iterable[tuple[int, int]],
    patch_dim: int,
    classes: int,
    gate: Gate | None = None,
    method: Int8Method = DEFAULT_METHOD,
) -> Int8Gate:
    """Quantise `fused` into `dst`, check it at `grids` and on `held_out`; Int8GateError if
    it fails (then `dst` is removed)."""
    gate = gate or Gate()
    quantize(fused, dst, method)
    try:
        check_grids(dst, grids, patch_dim, classes)
        record = measure_gate(fused, dst, held_out, gate, method.describe())
        log.info(
            "int8 gate on %s: top-1 agreement %.2f%%, max |logit diff| %.3g%s",
            record.held_out,
            100 * record.top1_agreement,
            record.max_abs_logit_diff,
            ""
            if record.accuracy_fp32 is None or record.accuracy_int8 is None
            else f", accuracy {100 * record.accuracy_int8:.2f}% (fp32 "
            f"{100 * record.accuracy_fp32:.2f}%)",
        )
        why = failures(record, gate)
        if why:
            raise Int8GateError(
                "the int8 graph fails its accuracy gate on "
                f"{record.held_out}: {'; '.join(why)}; nothing written"
            )
    except Exception:
        dst.unlink(missing_ok=True)
        raise
    return record
