"""Execution providers: which ONNX Runtime providers a graph is offered, and their options.

Everything here is pure (no ONNX Runtime, no GPU), so the choices are unit-tested on any machine;
`app.runtime.backends` asks ONNX Runtime and the driver what is present and opens the sessions.

TensorRT is first wherever it can take the whole graph, because that is what a user of an
inference server expects of a GPU and it is the fastest of the three. What used to keep it
opt-in was the engine build: without explicit profiles ONNX Runtime builds a TensorRT engine
for the shapes it has seen, and rebuilds it (seconds to minutes, the request waiting) whenever
a new grid falls outside them, and the `fit` policy sends many grids. Here every session gets
one explicit optimisation profile covering every (batch, grid) the service can send, so one
build, at load time (the warm-up), serves everything; and the engine cache on disk makes the
next start, and each further runtime instance, a load rather than a build.

Graphs whose form is not `none` (`fused`, `fp16`) carry ONNX Runtime's own contrib operators
(`com.microsoft` Attention, BiasGelu, ...), which TensorRT's ONNX parser does not know: ONNX
Runtime would cut such a graph into many small TensorRT engines between CUDA nodes, whose
inputs are inner tensors that no explicit profile names, so each would be rebuilt per new
shape range, the stall above. Those graphs, and the rollout graph (data-dependent `If` and
sorting nodes), go to CUDA first; export with `--optimize none` for TensorRT.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.models.grids import FIT_ASPECTS, fit_grid
from app.models.spec import Architecture, ModelSpec, OptimizationLevel

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = frozenset({CUDA, TENSORRT})
# One GPU per process: the operator picks it with CUDA_VISIBLE_DEVICES, so the process always
# sees it as device 0; the providers and the IO binding's outputs must name the same device.
DEVICE_ID = 0

Shape = tuple[int, int, int, int]  # (batch, grid_h, grid_w, P*P*C)


def _flag(on: bool) -> str:
    # ONNX Runtime parses provider options from strings; "1"/"0" is what every version's
    # boolean parser accepts.
    return "1" if on else "0"


def candidate_providers(
    requested: Sequence[str] | None,
    available: Sequence[str],
    driver: bool,
    tensorrt_libraries: bool,
    takes_tensorrt: bool,
    cuda_libraries: bool = True,
) -> list[str]:
    """The providers to offer a graph, best first; CPU always last.

    `requested`: the operator's list, less what this ONNX Runtime build lacks; None: TensorRT,
    CUDA, CPU, without TensorRT or CUDA where their libraries do not load, and nothing GPU
    without a driver (onnxruntime-gpu lists its GPU providers on every machine). A graph that
    does not `takes_tensorrt` gets CUDA in TensorRT's place, even when TensorRT was asked for;
    CUDA always follows TensorRT.
    """
    if requested is None:
        gpu = ([TENSORRT] if tensorrt_libraries else []) + ([CUDA] if cuda_libraries else [])
        wanted = gpu if driver else []
    else:
        wanted = list(requested)
    if not takes_tensorrt:
        wanted = [CUDA if p == TENSORRT else p for p in wanted]
    chosen = [p for p in dict.fromkeys(wanted) if p in available]  # first of each, in order
    if TENSORRT in chosen and CUDA not in chosen and CUDA in available:
        # What TensorRT leaves (nodes it cannot parse, grids outside its profile) runs on
        # CUDA, not on the CPU.
        chosen.insert(chosen.index(TENSORRT) + 1, CUDA)
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


def graph_form(spec: ModelSpec, version: int) -> OptimizationLevel:
    """A version's `model.onnx` form, from model.json (`none` where it does not say)."""
    files = spec.versions.get(version)
    return files.optimization.level if files is not None else "none"


def takes_tensorrt(level: OptimizationLevel, rollout: bool) -> bool:
    """Whether TensorRT can take this graph whole (see the module's docstring)."""
    return level == "none" and not rollout


def cpu_only(level: OptimizationLevel, rollout: bool) -> bool:
    """Whether the graph is for CPUs only: the int8 form quantises activations to uint8 at run
    time (DynamicQuantizeLinear, which ONNX Runtime's CUDA provider lacks) and CUDA's int8
    kernels take int8 activations only, so on a GPU its matrix products would run on the CPU,
    copied to and fro around every node. Its rollout graph is fp32."""
    return level == "int8" and not rollout


def fallback_chain(providers: Sequence[str]) -> list[list[str]]:
    """The provider lists the service tries for one graph, in turn: all of them, then without
    the first, and so on down to the CPU alone ([TensorRT, CUDA, CPU] -> [CUDA, CPU] -> [CPU]).

    ONNX Runtime's own fallback is off (`app.runtime.backends.open_session`): the service moves
    down this chain itself, so each step is logged with its reason.
    """
    chain = [list(providers[i:]) for i in range(len(providers))]
    return [c for c in chain if c] or [[CPU]]


# Operators that carry a ViT's arithmetic: where these run is where the graph runs. (Shape
# arithmetic, reshapes and the like are put on the CPU by ONNX Runtime on purpose, whatever the
# provider, and say nothing about it.)
COMPUTE_OPS = frozenset(
    {
        "MatMul",
        "Gemm",
        "FusedMatMul",
        "MatMulInteger",
        "QLinearMatMul",
        "MatMulNBits",
        "Conv",
        "Attention",
        "MultiHeadAttention",
        "GroupQueryAttention",
        "PackedAttention",
    }
)


@dataclass(frozen=True)
class Placement:
    """Where one session's graph runs: the nodes ONNX Runtime assigned to each provider (its
    graph assignment record), not the providers it was offered.

    `provider`: the one that runs most of the graph's matrix products and attention (most
    nodes where there are none); `fallback`: why that is not the provider the service wanted
    first, or None.
    """

    provider: str
    nodes: tuple[tuple[str, int], ...] = ()  # (provider, nodes), most first; () not recorded
    compute: tuple[tuple[str, int], ...] = ()  # the same, of COMPUTE_OPS nodes only
    wanted: str | None = None
    fallback: str | None = None

    @classmethod
    def of_nodes(cls, assigned: Sequence[tuple[str, str]], registered: Sequence[str]) -> Placement:
        """From (provider, op type) per assigned node; `registered`: the session's providers,
        best first, to name one when nothing was recorded."""
        nodes = _counts(p for p, _ in assigned)
        compute = _counts(p for p, op in assigned if op in COMPUTE_OPS)
        ranked = compute or nodes
        provider = ranked[0][0] if ranked else (registered[0] if registered else CPU)
        return cls(provider, nodes, compute)

    def with_fallback(self, wanted: str, reason: str | None) -> Placement:
        """Marked with the provider wanted first and, where this is not it, why."""
        why = None if self.provider == wanted else (reason or f"{wanted} ran none of its nodes")
        return Placement(self.provider, self.nodes, self.compute, wanted, why)

    @property
    def on_gpu(self) -> bool:
        return self.provider in GPU_PROVIDERS

    def node_counts(self) -> dict[str, int]:
        return dict(self.nodes)

    def shown(self) -> str:
        """`TensorrtExecutionProvider (398 nodes, 96 compute), CPUExecutionProvider (12
        nodes)` for the log; the provider alone where nothing was recorded."""
        if not self.nodes:
            return self.provider
        compute = dict(self.compute)
        parts = []
        for provider, count in self.nodes:
            inner = f"{count} nodes" + (
                f", {compute[provider]} compute" if provider in compute else ""
            )
            parts.append(f"{provider} ({inner})")
        return ", ".join(parts)


def _counts(providers: Iterable[str]) -> tuple[tuple[str, int], ...]:
    counted: dict[str, int] = {}
    for p in providers:
        counted[p] = counted.get(p, 0) + 1
    return tuple(sorted(counted.items(), key=lambda kv: -kv[1]))


def fit_grids(
    arch: Architecture, fit_max_tokens: int, max_aspect: float
) -> frozenset[tuple[int, int]]:
    """Every grid `fit_grid` (app.models.grids) can return for images of aspect ratio (w/h) within
    [1/max_aspect, max_aspect].

    `fit_grid` sees an image only through its snapped aspect ratio: the ratios of
    `FIT_ASPECTS`, and beyond 4:1 the powers of two, up to the widest image there can be (an
    image of `image_max_pixels` pixels, one pixel high). So asking it once per snapped ratio
    gives the whole set, and it stays right if the snapping changes there.
    """
    native = arch.native_tokens
    widest = max(2, round(math.log2(max_aspect)))
    sides = [(round(a * 1_000_000), 1_000_000) for a in FIT_ASPECTS]
    sides += [(2**e, 1) for e in range(2, widest + 1)]
    sides += [(1, 2**e) for e in range(2, widest + 1)]
    return frozenset(fit_grid(w, h, native, fit_max_tokens) for w, h in sides)


# `fit` keeps photo shapes up to 4:1 (and 1:4) in `FIT_ASPECTS`; wider ones snap to powers of
# two and end as 1 x T or T x 1 grids. TensorRT's profile covers the first kind (see
# `served_profile`).
PROFILE_MAX_ASPECT = 4.0


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimisation profile for the `patches` input: every shape within [min,
    max] in each dimension runs; kernels are chosen for `opt`."""

    min: Shape
    opt: Shape
    max: Shape

    def covers(self, shape: Sequence[int]) -> bool:
        return all(lo <= d <= hi for lo, d, hi in zip(self.min, shape, self.max, strict=True))


def served_profile(
    arch: Architecture, fit_max_tokens: int, max_batch_size: int, max_batch_tokens: int
) -> Profile:
    """The profile for a version's graph: the native grid (`crop`) and every grid `fit` makes
    of images up to 4:1 either way, per dimension from the smallest to the largest; batch 1 up
    to the batch size, or fewer where the token budget cannot hold that many of the smallest
    grid (`app.engine.batcher` bounds a batch by both). Opt: the native grid at the largest batch
    of it the budget allows, what a loaded server runs most (a GPU is there for load).

    Not the grids of wider images (1 x T, T x 1; panoramas, strips): TensorRT bounds each
    dimension on its own, so covering them would make the box T x T tokens (ViT-B/16 at 224:
    392 x 392 = 153,664 tokens per image, 32 of them a batch) and TensorRT sizes its
    activation memory for the box's corner: tens of GB that no batch ever uses, or a failed
    build. Those rare batches run on a CUDA session of the same graph (`app.runtime.backends`).
    """
    grids = fit_grids(arch, fit_max_tokens, PROFILE_MAX_ASPECT) | {arch.grid}
    heights = [g[0] for g in grids]
    widths = [g[1] for g in grids]
    fewest_tokens = min(h * w for h, w in grids)
    max_batch = max(1, min(max_batch_size, max_batch_tokens // fewest_tokens))
    opt_batch = max(1, min(max_batch, max_batch_tokens // arch.native_tokens))
    dim = arch.patch_dim
    return Profile(
        min=(1, min(heights), min(widths), dim),
        opt=(opt_batch, *arch.grid, dim),
        max=(max_batch, max(heights), max(widths), dim),
    )


def shape_option(input_name: str, shape: Shape) -> str:
    """A profile shape as TensorRT's provider options write it: `patches:1x8x8x192`."""
    return f"{input_name}:{'x'.join(str(d) for d in shape)}"


def engine_cache_dir(
    root: Path, model: str, version: int, graph_sha256: str, options_key: str
) -> Path:
    """Where one graph's TensorRT engines are kept: under `root`, per model and version, then
    per graph file and options.

    ONNX Runtime names a cached engine after the graph's node names and its file path, not its
    weights, and does not notice changed profiles or precision, versions or GPUs: a re-exported
    graph, another batch size, an upgraded ONNX Runtime or TensorRT, or another GPU model
    finding the same directory would load a stale engine. Keying the directory by the graph's
    sha256 (from model.json) and `options_key` (`tensorrt_options_key`: profile, precision and
    `EnginePlatform`) makes a stale engine unreachable.
    """
    key = hashlib.sha256(f"{graph_sha256}|{options_key}".encode()).hexdigest()[:16]
    return root / model / str(version) / key


@dataclass(frozen=True)
class TensorrtConfig:
    """What the operator's settings say about TensorRT, for one graph."""

    input_name: str
    profile: Profile
    fp16: bool
    cache_root: Path  # the timing cache, shared by every graph (its entries are per layer)
    engine_dir: Path


def tensorrt_options(config: TensorrtConfig) -> dict[str, str]:
    """TensorRT provider options: explicit profile, engine and timing caches, precision."""
    name, profile = config.input_name, config.profile
    return {
        "device_id": str(DEVICE_ID),
        "trt_fp16_enable": _flag(config.fp16),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": str(config.engine_dir),
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": str(config.cache_root),
        "trt_profile_min_shapes": shape_option(name, profile.min),
        "trt_profile_opt_shapes": shape_option(name, profile.opt),
        "trt_profile_max_shapes": shape_option(name, profile.max),
    }


@dataclass(frozen=True)
class EnginePlatform:
    """What a TensorRT engine is built for besides the graph and its options. Engines are not
    portable across ONNX Runtime or TensorRT versions nor across GPUs: a cache kept on a volume
    across an upgrade would otherwise hand the new build an engine it cannot deserialise."""

    onnxruntime: str
    tensorrt: str | None  # None: not known (its library did not say)
    gpu: str | None  # the GPU's name; None: not known
    capability: tuple[int, int] | None  # compute capability, (9, 0) for an H100 or H200

    def key(self) -> str:
        cc = f"sm_{self.capability[0]}{self.capability[1]}" if self.capability else "sm_unknown"
        return f"ort={self.onnxruntime}|trt={self.tensorrt}|gpu={self.gpu}|{cc}"


def tensorrt_options_key(profile: Profile, fp16: bool, platform: EnginePlatform) -> str:
    """What changes the engine built (for `engine_cache_dir`): the profile, the precision, and
    the versions and GPU it is built with and for."""
    return f"{profile.min}|{profile.opt}|{profile.max}|fp16={fp16}|{platform.key()}"


def cuda_options(tf32: bool = True) -> dict[str, str]:
    """CUDA provider options: the defaults, but for the device pinned and TF32 said outright.

    `use_tf32` (ONNX Runtime 1.18 on; on by default, `CUDAExecutionProviderInfo::use_tf32`)
    is always written, so that the log line of a loaded graph says which float32 it runs:
    TF32's products round their inputs to 10 mantissa bits, which is why fp32 on CUDA missed
    the 1e-3 parity bound on an H200 (bench.gpu_check) and met it with TF32 off.

    Left at their defaults on purpose: `cudnn_conv_algo_search` (the graph has no convolution:
    the patch embedding is a MatMul over patches the service already cut out),
    `do_copy_in_default_stream` (on by default: the input copy and the kernels stay ordered on
    one stream, which the IO binding relies on), `enable_cuda_graph` (needs fixed shapes, and
    the grids vary).
    """
    return {"device_id": str(DEVICE_ID), "use_tf32": _flag(tf32)}


def provider_options(
    providers: Sequence[str], tensorrt: TensorrtConfig | None, cuda_tf32: bool = True
) -> dict[str, dict[str, str]]:
    """Options for each provider offered that has any (CPU takes the session's); `cuda_tf32`:
    the CUDA provider's TF32 (`Settings.cuda_tf32`)."""
    options: dict[str, dict[str, str]] = {}
    if TENSORRT in providers and tensorrt is not None:
        options[TENSORRT] = tensorrt_options(tensorrt)
    if CUDA in providers:
        options[CUDA] = cuda_options(cuda_tf32)
    return options


def options_shown(provider: str, options: dict[str, dict[str, str]]) -> str:
    """The options that matter for the log line of a loaded graph."""
    chosen = options.get(provider, {})
    if provider == TENSORRT:
        keys = (
            "trt_fp16_enable",
            "trt_profile_min_shapes",
            "trt_profile_opt_shapes",
            "trt_profile_max_shapes",
            "trt_engine_cache_path",
        )
        return ", ".join(f"{k}={chosen[k]}" for k in keys if k in chosen)
    return ", ".join(f"{k}={v}" for k, v in sorted(chosen.items()))
