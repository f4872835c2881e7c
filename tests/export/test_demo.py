"""The demo data set and its training script (a few-step smoke run, not the full training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from app.models.spec import SPEC_FILENAME, ModelSpec
from export.__main__ import main as export_main
from export.demo import train
from export.demo.shapes import CLASSES, generate


def test_a_seed_names_a_data_set() -> None:
    a, b, c = generate(8, seed=3), generate(8, seed=3), generate(8, seed=4)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)


def test_every_image_has_one_object_with_a_mask_inside_the_frame() -> None:
    batch = generate(40, seed=5)
    assert batch.images.shape == (40, 64, 64, 3) and batch.images.dtype == np.uint8
    assert set(batch.labels.tolist()) <= set(range(len(CLASSES)))
    covered = batch.masks.mean(axis=(1, 2))
    assert (covered > 0.02).all() and (covered < 0.6).all()


def test_the_object_differs_from_its_background() -> None:
    batch = generate(20, seed=6)
    for image, mask in zip(batch.images, batch.masks, strict=True):
        inside = image[mask].astype(float).mean(axis=0)
        outside = image[~mask].astype(float).mean(axis=0)
        assert np.linalg.norm(inside - outside) > 20


def test_clutter_zero_leaves_a_smooth_background() -> None:
    def roughness(clutter: float) -> float:
        batch = generate(6, seed=7, clutter=clutter)
        steps = np.abs(np.diff(batch.images.astype(int), axis=2))
        background = ~batch.masks[:, :, 1:] & ~batch.masks[:, :, :-1]
        return float(steps[background].mean())

    assert roughness(0.0) < 1.5 < 3 * roughness(0.0) < roughness(1.0)


def test_a_smoke_training_run_writes_a_checkpoint_that_exports(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    train.main(["--out", str(out), "--steps", "3", "--batch-size", "8", "--held-out", "20"])
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 3 and record["images_seen"] == 24
    assert record["classes"] == list(CLASSES)
    assert 0.0 <= record["held_out_top1"] <= 1.0

    repo = tmp_path / "repo"
    rc = export_main(
        ["--checkpoint", str(out / "checkpoint.pt"), "--name", "demo-smoke", "--repo", str(repo)]
    )
    assert rc == 0
    spec = ModelSpec.load(repo / "demo-smoke" / SPEC_FILENAME)
    assert spec.labels == list(CLASSES)
    assert spec.preprocess.std == (0.25, 0.25, 0.25)
    assert (repo / "demo-smoke" / "1" / "model.onnx").exists()
