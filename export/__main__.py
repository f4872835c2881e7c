"""`python -m export`: turn a trained ViT into a model-repository entry the service can serve.

    python -m export --checkpoint build/demo/checkpoint.pt --name demo-shapes --repo model_repo

The graph is parity-checked against PyTorch at several grids before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from app.spec import MODEL_NAME_PATTERN, Source
from export.checkpoints import load_checkpoint
from export.onnx_export import PARITY_ATOL, ParityError, export_to_repository


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="a vit-serve checkpoint (.pt)")
    p.add_argument("--name", required=True, help=f"model name, {MODEL_NAME_PATTERN}")
    p.add_argument("--repo", type=Path, default=Path("model_repo"), help="model repository root")
    p.add_argument("--version", type=int, default=None, help="default: the highest + 1")
    p.add_argument("--atol", type=float, default=PARITY_ATOL, help="max |logit diff| allowed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    loaded = load_checkpoint(args.checkpoint)
    try:
        result = export_to_repository(
            loaded.model,
            repo=args.repo,
            name=args.name,
            labels=loaded.labels,
            preprocess=loaded.preprocess,
            source=Source(
                framework="vit-serve", checkpoint=args.checkpoint.name, notes=loaded.source
            ),
            version=args.version,
            atol=args.atol,
        )
    except ParityError as e:
        logging.error("%s", e)
        return 1
    worst = result.parity.worst
    logging.info("exported %s version %d (parity %.2e)", args.name, result.version, worst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
