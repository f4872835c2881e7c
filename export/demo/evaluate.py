"""Evaluate the exported demo model on held-out shapes: accuracy, and whether rollout finds them.

    python -m export.demo.evaluate --repo model_repo --images 500

Runs the repository's graphs with ONNX Runtime (what the service runs) on images generated
with a seed no training run used, and reports:
- top-1 accuracy of model.onnx;
- for model.rollout.onnx (mean head fusion, nothing discarded): how often the rollout's peak
  patch lies on the object (any object pixel in it, and at least half of it object), and the
  share of the rollout's mass on the object against what a uniform map would put there.
Figures are printed and written to JSON.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from app.models.spec import GRAPH_FILENAME, ROLLOUT_GRAPH_FILENAME, SPEC_FILENAME, ModelSpec
from export.demo.shapes import generate

EVAL_SEED = 4242  # neither the training chunks' seeds nor the training run's held-out seed


@dataclass
class DemoEvaluation:
    images: int
    seed: int
    top1: float
    peak_on_object: float  # peak patch holds any object pixel
    peak_mostly_object: float  # peak patch is at least half object
    mass_on_object: float  # mean share of rollout mass on object pixels
    uniform_mass_on_object: float  # the same share for a uniform map (the object's area)
    mass_ratio: float  # mean over images of mass_on_object / uniform


def _patch_coverage(masks: NDArray[np.bool_], patch: int) -> NDArray[np.float64]:
    """(n, H, W) masks -> (n, H/P, W/P) fraction of each patch covered by the object."""
    n, h, w = masks.shape
    blocks = masks.reshape(n, h // patch, patch, w // patch, patch)
    coverage: NDArray[np.float64] = blocks.mean(axis=(2, 4), dtype=np.float64)
    return coverage


def _patchify(images: NDArray[np.uint8], patch: int) -> NDArray[np.uint8]:
    n, h, w, c = images.shape
    x = images.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return np.ascontiguousarray(x.reshape(n, h // patch, w // patch, patch * patch * c))


def evaluate(repo: Path, name: str, images: int, seed: int = EVAL_SEED) -> DemoEvaluation:
    spec = ModelSpec.load(repo / name / SPEC_FILENAME)
    version_dir = repo / name / str(max(spec.versions))
    providers = ["CPUExecutionProvider"]
    plain = ort.InferenceSession(str(version_dir / GRAPH_FILENAME), providers=providers)
    with_rollout = ort.InferenceSession(
        str(version_dir / ROLLOUT_GRAPH_FILENAME), providers=providers
    )
    P = spec.architecture.patch_size
    gh, _ = spec.architecture.grid
    batch = generate(images, seed=seed, size=gh * P)
    patches = _patchify(batch.images, P)
    preds, maps = [], []
    for i in range(0, images, 100):
        (logits,) = plain.run(["logits"], {"patches": patches[i : i + 100]})
        preds.append(logits.argmax(axis=1))
        feeds = {
            "patches": patches[i : i + 100],
            "head_fusion": np.array(0, np.int64),
            "discard_ratio": np.array(0.0, np.float32),
        }
        (rollout,) = with_rollout.run(["rollout"], feeds)
        maps.append(rollout)
    top1 = float((np.concatenate(preds) == batch.labels).mean())
    rollout = np.concatenate(maps).astype(np.float64)  # (n, gh, gw)
    coverage = _patch_coverage(batch.masks, P)  # (n, gh, gw)
    flat_map, flat_cov = rollout.reshape(images, -1), coverage.reshape(images, -1)
    peak = flat_map.argmax(axis=1)
    peak_cov = flat_cov[np.arange(images), peak]
    share = (flat_map * flat_cov).sum(axis=1) / flat_map.sum(axis=1)
    uniform = flat_cov.mean(axis=1)
    return DemoEvaluation(
        images=images,
        seed=seed,
        top1=top1,
        peak_on_object=float((peak_cov > 0).mean()),
        peak_mostly_object=float((peak_cov >= 0.5).mean()),
        mass_on_object=float(share.mean()),
        uniform_mass_on_object=float(uniform.mean()),
        mass_ratio=float((share / uniform).mean()),
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repo", type=Path, default=Path("model_repo"))
    p.add_argument("--name", default="demo-shapes")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--out", type=Path, default=Path("bench/results/demo_eval.json"))
    a = p.parse_args(argv)
    result = evaluate(a.repo, a.name, a.images)
    for key, value in asdict(result).items():
        print(f"{key:>24}: {value:.4f}" if isinstance(value, float) else f"{key:>24}: {value}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(asdict(result), indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
