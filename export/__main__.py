"""`python -m export`: turn a trained ViT into a model-repository entry the service can serve.

    python -m export --checkpoint build/demo/checkpoint.pt --name demo-shapes
    python -m export --timm vit_base_patch16_224 --pretrained --name vit-b16-timm
    python -m export --timm vit_base_patch16_224 --weights finetuned.safetensors --name mine
    python -m export --hf path/to/save_pretrained_dir --name vit-b16-hf
    python -m export --torchvision vit_b_16 --weights vit_b_16-c867db91.pth --name vit-b16-tv
    python -m export --checkpoint my_vit.pt --name my-vit --optimize fp16

Weights from timm, Hugging Face or torchvision are mapped into the reference ViT. The graph
is parity-checked against PyTorch at four grids (native, smaller, larger, non-square) before
anything is written and, where the source library is installed, against the library's own
forward: timm's (built with dynamic_img_size, resampling its own position embeddings) at the
same four grids, a library that runs only at its native size there; within the same bound
(--atol). `--optimize` picks the form of model.onnx: `fused` (the default: fused attention,
LayerNormalization and BiasGelu, a last block computing only the class token; fp32, within
the same parity bound), `none` (as traced), `fp16` (fused, float16 inside, float32
logits; checked against the fused fp32 graph by top-1 agreement and a max-abs bound) or `int8`
(fused, int8 matrix products; written only if it passes its accuracy gate against the fused
fp32 graph on held-out inputs: top-1 agreement >= 99%, and for the demo model held-out accuracy
within 0.5 points; export/quantize.py):

    python -m export --checkpoint export/demo/checkpoint.pt --name demo-shapes --optimize int8
    python -m export --timm vit_small_patch16_224 --pretrained --name vit-s16 --optimize int8 \
        --held-out-photos ../shared/testdata/photos
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import get_args

from app.models.spec import MODEL_NAME_PATTERN, OptimizationLevel, Source
from export.checkpoints import (
    LoadedViT,
    UnsupportedCheckpointError,
    load_checkpoint,
    source_gate,
)
from export.import_hf import load_hf
from export.import_timm import load_timm
from export.import_torchvision import TORCHVISION_ARCHS, load_torchvision
from export.onnx_export import (
    DEFAULT_OPTIMIZATION,
    PARITY_ATOL,
    ParityError,
    build_spec,
    export_to_repository,
)
from export.quantize import (
    MAX_ACCURACY_DROP,
    MIN_AGREEMENT,
    Gate,
    HeldOut,
    Int8GateError,
    demo_held_out,
    photo_held_out,
)

log = logging.getLogger("export")

DEFAULT_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "photos"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="a vit-serve checkpoint (.pt)")
    src.add_argument("--timm", metavar="MODEL", help="a timm model name, e.g. vit_base_patch16_224")
    src.add_argument("--hf", type=Path, metavar="DIR", help="a ViTForImageClassification directory")
    src.add_argument(
        "--torchvision",
        choices=sorted(TORCHVISION_ARCHS),
        help="a torchvision ViT (with --weights)",
    )
    p.add_argument("--weights", type=Path, help="weights file (.pth, .pt, .bin, .safetensors)")
    p.add_argument("--pretrained", action="store_true", help="timm: download timm's weights")
    p.add_argument(
        "--timm-args",
        type=json.loads,
        default=None,
        metavar="JSON",
        help='timm.create_model keyword arguments, e.g. \'{"global_pool": "avg"}\'',
    )
    p.add_argument(
        "--heads", type=int, default=None, help="torchvision: attention heads of a custom size"
    )
    p.add_argument(
        "--tv-weights",
        default=None,
        metavar="NAME",
        help="torchvision: the weights enum whose preprocessing to use, e.g. "
        "IMAGENET1K_SWAG_LINEAR_V1 (default: the first for the native size)",
    )
    p.add_argument("--name", required=True, help=f"model name, {MODEL_NAME_PATTERN}")
    p.add_argument("--repo", type=Path, default=Path("model_repo"), help="model repository root")
    p.add_argument("--version", type=int, default=None, help="default: the highest + 1")
    p.add_argument("--atol", type=float, default=PARITY_ATOL, help="max |logit diff| allowed")
    p.add_argument(
        "--optimize",
        choices=get_args(OptimizationLevel),
        default=DEFAULT_OPTIMIZATION,
        help="model.onnx as traced (none), with fused ONNX Runtime ops (fused), or fused and "
        f"float16 inside with float32 logits (fp16), or fused with int8 matrix products "
        f"(int8, past an accuracy gate); default: {DEFAULT_OPTIMIZATION}",
    )
    p.add_argument(
        "--held-out",
        choices=["auto", "demo", "photos"],
        default="auto",
        help="int8: the gate's held-out inputs: the demo generator's evaluation split "
        "(labelled), or photos through the service's preprocessing; auto: demo for a model "
        "with the demo's classes, photos otherwise",
    )
    p.add_argument(
        "--held-out-photos",
        type=Path,
        default=DEFAULT_PHOTOS,
        metavar="DIR",
        help=f"int8: folder of held-out photos (default: {DEFAULT_PHOTOS})",
    )
    p.add_argument(
        "--int8-min-agreement",
        type=float,
        default=MIN_AGREEMENT,
        help=f"int8 gate: least top-1 agreement with fp32 (default {MIN_AGREEMENT})",
    )
    p.add_argument(
        "--int8-max-accuracy-drop",
        type=float,
        default=MAX_ACCURACY_DROP,
        help="int8 gate, labelled inputs: most accuracy lost against fp32, as a fraction "
        f"(default {MAX_ACCURACY_DROP})",
    )
    p.add_argument(
        "--no-source-check",
        action="store_true",
        help="skip comparing the graph with the source library's own forward",
    )
    return p


def load(args: argparse.Namespace) -> LoadedViT:
    if args.checkpoint is not None:
        return load_checkpoint(args.checkpoint)
    if args.timm is not None:
        return load_timm(args.timm, args.pretrained, args.weights, args.timm_args)
    if args.hf is not None:
        return load_hf(args.hf)
    if args.weights is None:
        raise ValueError("--torchvision needs --weights (a state dict file)")
    return load_torchvision(args.torchvision, args.weights, args.heads, args.tv_weights)


def held_out_inputs(args: argparse.Namespace, loaded: LoadedViT) -> HeldOut:
    """The int8 gate's inputs for this model, as `--held-out` asks."""
    from export.demo.shapes import CLASSES

    spec = build_spec(
        args.name, loaded.model, loaded.labels, loaded.preprocess, Source(framework="-"), {}
    )
    kind = args.held_out
    if kind == "auto":
        kind = "demo" if tuple(loaded.labels) == CLASSES else "photos"
    if kind == "demo":
        return demo_held_out(spec)
    return photo_held_out(spec, args.held_out_photos)


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.pretrained and args.timm is None:
        p.error("--pretrained goes with --timm")
    if args.weights is not None and args.timm is None and args.torchvision is None:
        p.error("--weights goes with --timm or --torchvision")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    try:
        loaded = load(args)
    except ImportError as e:
        log.error("%s: install it to import from it (pip install %s)", e, e.name or "it")
        return 1
    except (UnsupportedCheckpointError, ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        return 1
    reference = None if args.no_source_check else source_gate(loaded)
    if reference is None and not args.no_source_check and loaded.framework != "vit-serve":
        log.info("source library not installed: the graph is not checked against it")
    held_out = None
    if args.optimize == "int8":
        try:
            held_out = held_out_inputs(args, loaded)
        except (ValueError, FileNotFoundError) as e:
            log.error("int8 gate: %s", e)
            return 1
    seen = held_out
    if seen is None:
        # The mean attention distance of introspection.json (export/introspection.py) is
        # averaged over the same held-out images; without them it is left out, not guessed.
        try:
            seen = held_out_inputs(args, loaded)
        except (ValueError, FileNotFoundError) as e:
            log.warning("introspection: no held-out images (%s); no mean attention distance", e)
    try:
        result = export_to_repository(
            loaded.model,
            repo=args.repo,
            name=args.name,
            labels=loaded.labels,
            preprocess=loaded.preprocess,
            source=Source(
                framework=loaded.framework,
                checkpoint=loaded.checkpoint,
                notes=loaded.source,
            ),
            version=args.version,
            atol=args.atol,
            optimize=args.optimize,
            held_out=held_out,
            gate=Gate(args.int8_min_agreement, args.int8_max_accuracy_drop),
            introspection_held_out=seen,
            reference=reference,
        )
    except (ParityError, Int8GateError) as e:
        log.error("%s", e)
        return 1
    versus = result.source_parity
    log.info(
        "exported %s version %d, %s (parity %.2e%s)",
        args.name,
        result.version,
        args.optimize,
        result.parity.worst,
        "" if versus is None else f"; against {loaded.framework} {versus.worst:.2e}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
