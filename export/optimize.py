"""Graph optimisation after tracing: fused ONNX Runtime ops, and float16 with float32 IO kept.

`fused`: the graph is traced from `fused_model`: attention as `com.microsoft.Attention`
(export/fused_attention.py) and, with token pooling, a last block that computes only the class
token's row (export/class_token_tail.py). Then ONNX Runtime's transformer optimizer
(`model_type="vit"`)
fuses the exact erf GELU and its bias into BiasGelu (LayerNorm is already one
LayerNormalization node at opset 17+). No approximation is turned on (FastGelu's tanh GELU
would move logits by more than the 1e-4 parity bound), so the fused graph is still checked
against PyTorch to that bound. Residual adds are not fused into SkipLayerNormalization: ONNX
Runtime's CPU kernel for it measured slower than the Add and LayerNormalization it replaces
(`python -m bench.optimize` shows it), so `skip_layer_norm` is off unless asked for.

`fp16`: the fused graph's weights and activations in float16. The contract holds: `patches`
stays uint8 (its cast goes straight to float16, exact for 0..255) and `logits` stays float32.
The subgraph computed from the grid alone (the position embeddings' resampling weights, the
class token) stays float32: it is cheap, and it is where the grid's geometry becomes numbers.
Its parity is stated differently: top-1 agreement with the fp32 graph, and a max-abs bound.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray

from export.class_token_tail import ClassTokenBlock, with_class_token_tail
from export.fused_attention import with_fused_attention
from export.vit import VisionTransformer, ViTConfig

log = logging.getLogger(__name__)

# The fused operators worth recording in model.json (ONNX's own LayerNormalization included:
# the exporter emits it at opset 17+).
FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "LayerNormalization",
    "BiasGelu",
    "Gelu",
    "FastGelu",
)
# fp16: the largest |logit_fp16 - logit_fp32| allowed, as a fraction of the largest |logit| of
# the fp32 graph on the same inputs (at least 1.0). float16 keeps ~3 significant digits and
# errors scale with the logits, so an absolute bound would suit one model only. Measured:
# 0.1-0.2% (bench/results/optimize.json, tests/export/test_optimize.py); 1% leaves room for
# deeper and wider models without letting a broken conversion through.
FP16_RTOL = 1e-2


def fused_model(model: VisionTransformer) -> VisionTransformer:
    """The module the fused graph is traced from (given the folded model): the same weights
    and logits, fewer and larger nodes."""
    return with_fused_attention(with_class_token_tail(model))


def has_class_token_tail(model: VisionTransformer) -> bool:
    return any(isinstance(m, ClassTokenBlock) for m in model.modules())


def fused_op_counts(graph: Path | onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each fused operator type the graph holds (zero counts left out)."""
    model = onnx.load(str(graph), load_external_data=False) if isinstance(graph, Path) else graph
    counts = collections.Counter(n.op_type for n in model.graph.node if n.op_type in FUSED_OPS)
    return dict(sorted(counts.items()))


def fuse(src: Path, dst: Path, cfg: ViTConfig, skip_layer_norm: bool = False) -> dict[str, int]:
    """Run ONNX Runtime's transformer optimizer on a traced graph; returns the fused-op counts."""
    # Imported here: it puts its own folder on sys.path, which only the export step needs.
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("vit")
    # Exact GELU only: the tanh approximation would not pass the 1e-4 parity check.
    options.enable_gelu_approximation = False
    # Attention is already one node (exported fused); the optimizer's own attention fuser
    # looks for BERT's three Q/K/V MatMuls, which this graph does not have.
    options.enable_attention = False
    # Off by default: slower on CPU than Add + LayerNormalization (see the module docstring).
    options.enable_skip_layer_norm = skip_layer_norm
    options.enable_bias_skip_layer_norm = skip_layer_norm
    optimized = optimize_model(
        str(src),
        model_type="vit",
        num_heads=cfg.heads,
        hidden_size=cfg.embed_dim,
        optimization_options=options,
        # Level 1: ONNX Runtime's provider-independent rewrites (constant folding, redundant
        # casts) before the fusions; higher levels would save CPU-only layouts into the file.
        opt_level=1,
        use_gpu=False,
    )
    optimized.save_model_to_file(str(dst))
    counts = fused_op_counts(dst)
    log.info("fused graph: %s", counts)
    return counts


def grid_only_nodes(model: onnx.ModelProto, data_input: str) -> list[str]:
    """Names of the nodes whose outputs depend on the input's shape only, never its values.

    A value flows from `data_input` through every node except Shape and Size, which read only
    the shape; the nodes it never reaches compute from the grid alone (position-embedding
    resampling, the class token, reshape targets). Shape and Size themselves are neither: they
    read any element type, so blocking them would only make the converter add a float32 copy
    of the cast input for them to read (the grid is read from the cast `patches`).
    """
    reached = {data_input}
    grid_only: list[str] = []
    for node in model.graph.node:  # ONNX keeps nodes in topological order
        if node.op_type in ("Shape", "Size"):
            continue
        if reached.intersection(node.input):
            reached.update(node.output)
        else:
            grid_only.append(node.name)
    return grid_only


def to_fp16(src: Path, dst: Path, data_input: str = "patches") -> None:
    """Convert a fused fp32 graph to float16, keeping float32 graph outputs and grid-only nodes."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(src))
    for i, node in enumerate(model.graph.node):
        # The converter blocks nodes by name; the optimizer may leave new nodes unnamed.
        if not node.name:
            node.name = f"unnamed_{node.op_type}_{i}"
    blocked = grid_only_nodes(model, data_input)
    wrapped = OnnxModel(model)
    # keep_io_types: float32 graph inputs and outputs stay float32 (a Cast at each); `patches`
    # is uint8 and untouched either way.
    wrapped.convert_float_to_float16(keep_io_types=True, node_block_list=blocked)
    onnx.save(wrapped.model, str(dst))


@dataclass
class Fp16Report:
    """float16 against float32 logits on the same random inputs, per grid."""

    rtol: float
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # "gh x gw" -> max |diff|
    bound: dict[str, float] = field(default_factory=dict)  # "gh x gw" -> rtol * max |logit|
    compared: int = 0
    agreed: int = 0  # inputs whose top-1 class is the same in both graphs
    # Disagreements on inputs whose fp32 top-2 margin is within twice the bound: a near-tie
    # that float16 may fairly break either way.
    excused: int = 0

    @property
    def disagreed(self) -> int:
        return self.compared - self.agreed - self.excused

    @property
    def worst_ratio(self) -> float:
        """max |diff| / bound over the grids: at most 1 to pass."""
        return max(self.max_abs_diff[g] / self.bound[g] for g in self.max_abs_diff)

    @property
    def passed(self) -> bool:
        return self.disagreed == 0 and self.worst_ratio <= 1.0


def _logits(session: ort.InferenceSession, patches: NDArray[np.uint8]) -> NDArray[np.float32]:
    (out,) = session.run(["logits"], {"patches": patches})
    return np.asarray(out, dtype=np.float32)


def check_fp16(
    fp32_graph: Path,
    fp16_graph: Path,
    grids: list[tuple[int, int]],
    patch_dim: int,
    rtol: float = FP16_RTOL,
    batch: int = 8,
    seed: int = 0,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
) -> Fp16Report:
    """Top-1 agreement and max |logit diff| of the fp16 graph against the fp32 one.

    On a CPU, ONNX Runtime runs most float16 nodes as float32 between inserted Casts (its CPU
    kernels are float32), so what this measures there is the rounding of weights and
    activations to float16; on a GPU (`providers`) the arithmetic is float16 too.
    """
    fp32 = ort.InferenceSession(str(fp32_graph), providers=list(providers))
    fp16 = ort.InferenceSession(str(fp16_graph), providers=list(providers))
    rng = np.random.default_rng(seed)
    report = Fp16Report(rtol=rtol)
    for gh, gw in grids:
        patches = rng.integers(0, 256, (batch, gh, gw, patch_dim), dtype=np.uint8)
        expected, got = _logits(fp32, patches), _logits(fp16, patches)
        key = f"{gh}x{gw}"
        bound = rtol * max(1.0, float(np.abs(expected).max()))
        report.bound[key] = bound
        report.max_abs_diff[key] = float(np.abs(expected - got).max())
        top2 = np.sort(expected, axis=1)[:, -2:]
        tied = (top2[:, 1] - top2[:, 0]) <= 2 * bound
        same = expected.argmax(axis=1) == got.argmax(axis=1)
        report.compared += batch
        report.agreed += int(same.sum())
        report.excused += int((~same & tied).sum())
    return report
