"""The bundled demo model meets its targets on held-out shapes, and its rollout finds them."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.demo.evaluate import EVAL_SEED, DemoEvaluation, evaluate

REPO = Path(__file__).resolve().parents[2] / "model_repo"


@pytest.fixture(scope="module")
def evaluation() -> DemoEvaluation:
    if not (REPO / "demo-shapes").is_dir():
        pytest.skip(f"the bundled demo model is not at {REPO / 'demo-shapes'}")
    return evaluate(REPO, "demo-shapes", images=500, seed=EVAL_SEED)


def test_the_demo_model_classifies_held_out_shapes_at_95_percent(
    evaluation: DemoEvaluation,
) -> None:
    assert evaluation.top1 >= 0.95


def test_the_rollout_peak_lies_on_the_object_for_80_percent(evaluation: DemoEvaluation) -> None:
    assert evaluation.images >= 200
    assert evaluation.peak_on_object >= 0.80


def test_the_rollout_puts_twice_the_uniform_mass_on_the_object(evaluation: DemoEvaluation) -> None:
    assert evaluation.mass_ratio >= 2.0
    assert evaluation.mass_on_object >= 2.0 * evaluation.uniform_mass_on_object


def test_the_bundled_graphs_cast_the_patches_before_reading_the_grid() -> None:
    # Re-exported for TensorRT (see test_onnx_export.py): `patches` feeds one Cast, nothing else.
    import onnx

    for name in ("model.onnx", "model.rollout.onnx"):
        graph = onnx.load(str(REPO / "demo-shapes" / "1" / name))
        assert [n.op_type for n in graph.graph.node if "patches" in n.input] == ["Cast"], name
