"""Train the bundled demo model: a small ViT on the procedural shapes data set, on the CPU.

    python -m export.demo.train --out build/demo            # the full run (<= 20 min, 2 cores)
    python -m export.demo.train --steps 5 --out /tmp/smoke  # a smoke run
    python -m export.demo.train --hybrid --out build/demo-hybrid  # the hybrid (paper §3.1)

Every step sees freshly generated images (a new seeded chunk per pass), so the model never sees
an image twice and held-out accuracy tracks training accuracy. The held-out split comes from
another seed. Writes `checkpoint.pt` (our own checkpoint format, see export/checkpoints.py) and
`training.json`, the record of the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from export.checkpoints import load_checkpoint, save_checkpoint
from export.demo.hybrid import demo_hybrid, demo_hybrid_config
from export.demo.shapes import CLASSES, generate
from export.hybrid import HybridViT
from export.vit import VisionTransformer, ViTConfig, count_parameters, patchify

log = logging.getLogger(__name__)

IMAGE_SIZE = 64
TRAIN_SEED = 1
HELD_OUT_SEED = 20261123


def demo_config() -> ViTConfig:
    return ViTConfig(
        patch_size=8,
        grid=(IMAGE_SIZE // 8, IMAGE_SIZE // 8),
        embed_dim=128,
        depth=6,
        heads=4,
        num_classes=len(CLASSES),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )


@dataclass
class TrainArgs:
    out: Path
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_steps: int = 150
    chunk_batches: int = 50
    held_out: int = 2000
    max_minutes: float = 19.0
    threads: int = 2
    resume: Path | None = None  # a checkpoint.pt (+ training.json beside it) to go on from
    hybrid: bool = False  # the hybrid of paper §3.1 (export/demo/hybrid.py) instead of the ViT
    eval_every: int = 100


def _to_patches(images: np.ndarray, patch_size: int) -> torch.Tensor:
    return patchify(torch.from_numpy(images), patch_size)


@torch.no_grad()
def evaluate(model: VisionTransformer, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), 250):
        patches = _to_patches(images[i : i + 250], model.cfg.patch_size)
        pred = model(patches).argmax(dim=1).numpy()
        correct += int((pred == labels[i : i + 250]).sum())
    model.train()
    return correct / len(images)


def progress_at(step: int, elapsed_s: float, args: TrainArgs) -> float:
    """0..1 through the run: by steps, or by the time budget if that runs out first.

    Scheduling on whichever comes first means a run on a slower or busier machine still
    anneals its learning rate fully inside the budget instead of stopping mid-schedule.
    """
    return min(1.0, max(step / args.steps, elapsed_s / (args.max_minutes * 60)))


def lr_at(step: int, progress: float, args: TrainArgs) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def clutter_at(progress: float) -> float:
    """A curriculum: sparse clutter first, the full data set from half-way on.

    A ViT has no convolutional prior; on fully cluttered images from the start it sits on its
    initial loss plateau for much of a CPU-sized budget.
    """
    return min(1.0, 0.2 + 0.8 * progress / 0.5)


def train(args: TrainArgs) -> dict[str, object]:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = demo_hybrid_config() if args.hybrid else demo_config()
    model = demo_hybrid(cfg) if args.hybrid else VisionTransformer(cfg)
    earlier: dict[str, Any] = {}
    if args.resume is not None:
        # A second leg starts a fresh warm-up and cosine cycle from the earlier weights; the
        # record adds up both legs, so its time and image counts stay the whole story.
        model.load_state_dict(load_checkpoint(args.resume).model.state_dict())
        earlier = json.loads((args.resume.parent / "training.json").read_text())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "pos_embed" in n]
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay},
    ]
    opt = torch.optim.AdamW(
        groups,
        lr=args.lr,
        weight_decay=0.0,
    )
    held = generate(args.held_out, seed=HELD_OUT_SEED, size=IMAGE_SIZE)
    log.info("model: %d parameters, %s", count_parameters(model), cfg)

    start = time.monotonic()
    history: list[dict[str, float]] = []
    chunk = None
    step = 0
    progress = 0.0
    while progress < 1.0:
        if step % args.chunk_batches == 0:
            leg = len(earlier.get("legs", []))  # a later leg draws images no earlier leg saw
            chunk_seed = TRAIN_SEED * 1_000_000 + leg * 100_000 + step // args.chunk_batches
            chunk = generate(
                args.batch_size * args.chunk_batches,
                seed=chunk_seed,
                size=IMAGE_SIZE,
                clutter=1.0 if earlier else clutter_at(progress),
            )
        assert chunk is not None
        j = (step % args.chunk_batches) * args.batch_size
        x = _to_patches(chunk.images[j : j + args.batch_size], cfg.patch_size)
        y = torch.from_numpy(chunk.labels[j : j + args.batch_size])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress, args)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        elapsed = time.monotonic() - start
        progress = progress_at(step, elapsed, args)
        if step % args.eval_every == 0 or progress >= 1.0:
            acc = evaluate(model, held.images[:500], held.labels[:500])
            history.append(
                {
                    "step": step,
                    "loss": float(loss.detach()),
                    "held_out_acc_500": acc,
                    "minutes": elapsed / 60,
                }
            )
            log.info(
                "step %d loss %.3f held-out(500) %.3f %.1f min",
                step,
                float(loss.detach()),
                acc,
                elapsed / 60,
            )
    stopped_early = step < args.steps
    if stopped_early:
        log.warning("time budget of %.1f min spent at step %d", args.max_minutes, step)

    minutes = (time.monotonic() - start) / 60
    accuracy = evaluate(model, held.images, held.labels)
    record: dict[str, object] = {
        "classes": list(CLASSES),
        "config": cfg.to_dict(),
        **({"backbone": model.backbone.to_dict()} if isinstance(model, HybridViT) else {}),
        "parameters": count_parameters(model),
        "steps": step,
        "stopped_early": stopped_early,
        "batch_size": args.batch_size,
        "images_seen": step * args.batch_size + earlier.get("images_seen", 0),
        "train_seed": TRAIN_SEED,
        "held_out_seed": HELD_OUT_SEED,
        "held_out_images": args.held_out,
        "held_out_top1": accuracy,
        "train_minutes": round(minutes + earlier.get("train_minutes", 0.0), 2),
        "legs": [
            *earlier.get("legs", []),
            {
                "steps": step,
                "minutes": round(minutes, 2),
                "lr": args.lr,
                "resumed": args.resume is not None,
            },
        ],
        "threads": args.threads,
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "torch": torch.__version__,
        "history": [*earlier.get("history", []), *history],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        args.out / "checkpoint.pt",
        model,
        labels=list(CLASSES),
        source="vit-serve demo: procedural shapes (export/demo)",
        crop_pct=1.0,
        interpolation="bilinear",
    )
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("held-out top-1 %.4f over %d images in %.1f min", accuracy, args.held_out, minutes)
    return record


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--out", type=Path, required=True, help="folder for checkpoint.pt + training.json"
    )
    p.add_argument("--steps", type=int, default=TrainArgs.steps)
    p.add_argument("--batch-size", type=int, default=TrainArgs.batch_size)
    p.add_argument("--held-out", type=int, default=TrainArgs.held_out)
    p.add_argument("--max-minutes", type=float, default=TrainArgs.max_minutes)
    p.add_argument("--lr", type=float, default=TrainArgs.lr)
    p.add_argument("--threads", type=int, default=TrainArgs.threads)
    p.add_argument("--resume", type=Path, default=None, help="go on from this checkpoint.pt")
    p.add_argument("--hybrid", action="store_true", help="train the hybrid (CNN stem + ViT)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train(
        TrainArgs(
            out=a.out,
            steps=a.steps,
            batch_size=a.batch_size,
            held_out=a.held_out,
            max_minutes=a.max_minutes,
            lr=a.lr,
            threads=a.threads,
            resume=a.resume,
            hybrid=a.hybrid,
            warmup_steps=min(TrainArgs.warmup_steps, max(1, a.steps // 10)),
        )
    )


if __name__ == "__main__":
    main()
