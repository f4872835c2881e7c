"""Softmax and top-k of app.pipeline.postprocess."""

from __future__ import annotations

import numpy as np

from app.engine import softmax
from app.pipeline.postprocess import Prediction, predictions, top_k

LABELS = ["a", "b", "c", "d"]


def test_softmax_does_not_overflow_on_huge_logits() -> None:
    # An unshifted exp(1000) overflows (a RuntimeWarning, an error under the test settings).
    probs = softmax(np.array([1000.0, 1000.0, -1000.0], dtype=np.float32))
    np.testing.assert_allclose(probs, [0.5, 0.5, 0.0])


def test_softmax_sums_to_one_per_row() -> None:
    logits = np.random.default_rng(0).normal(0, 30, (5, 1000)).astype(np.float32)
    probs = softmax(logits)
    assert probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-12)


def test_top_k_is_sorted_by_score_with_labels_and_indices() -> None:
    probs = np.array([0.1, 0.5, 0.15, 0.25])
    assert top_k(probs, 3, LABELS) == [
        Prediction(label="b", index=1, score=0.5),
        Prediction(label="d", index=3, score=0.25),
        Prediction(label="c", index=2, score=0.15),
    ]


def test_top_k_larger_than_the_classes_returns_every_class() -> None:
    assert [p.index for p in top_k(np.array([0.1, 0.2, 0.3, 0.4]), 50, LABELS)] == [3, 2, 1, 0]


def test_tied_scores_keep_the_lower_index_first() -> None:
    assert [p.index for p in top_k(np.full(4, 0.25), 4, LABELS)] == [0, 1, 2, 3]


def test_predictions_turn_logits_into_probabilities() -> None:
    top = predictions(np.array([0.0, 0.0, 0.0, np.log(3.0)]), 2, LABELS)
    assert [p.label for p in top] == ["d", "a"]
    np.testing.assert_allclose([p.score for p in top], [0.5, 1 / 6])


def test_a_batchs_softmax_is_each_rows_own_bit_for_bit() -> None:
    # The inference thread computes it per batch; answers must not depend on the batch.
    rng = np.random.default_rng(1)
    for classes in (1, 3, 10, 1000, 1001, 21843):
        for batch in (1, 2, 8, 33):
            logits = rng.normal(0, 5, (batch, classes)).astype(np.float32)
            probs = softmax(logits)
            for i in range(batch):
                assert np.array_equal(probs[i], softmax(logits[i]))


def full_sort(probs: np.ndarray, k: int) -> list[int]:
    return [int(i) for i in np.argsort(-probs, kind="stable")[: max(0, k)]]


def test_top_k_over_many_classes_orders_as_a_full_stable_sort() -> None:
    # Above 64 classes top_k sorts only the candidates: ties across the k-th place, repeated
    # scores and NaNs must come out as a full stable sort orders them.
    rng = np.random.default_rng(2)
    labels = [f"c{i}" for i in range(1000)]
    coarse = rng.integers(0, 20, 1000).astype(np.float64) / 20  # many exact ties
    with_nan = rng.random(1000)
    with_nan[[3, 500, 999]] = np.nan
    for probs in (rng.random(1000), coarse, np.full(1000, 0.001), with_nan):
        for k in (0, 1, 5, 37, 100, 999, 1000, 1500):
            top = top_k(probs, k, labels)
            assert [p.index for p in top] == full_sort(probs, k)
            assert [p.label for p in top] == [labels[p.index] for p in top]
            assert all(p.score == float(probs[p.index]) or np.isnan(p.score) for p in top)


def test_predictions_from_probabilities_made_beforehand() -> None:
    # The service ranks the inference thread's probabilities (`Output.probs`) with top_k.
    logits = np.array([0.5, 2.0, -1.0, 2.0], dtype=np.float32)
    assert top_k(softmax(logits), 3, LABELS) == predictions(logits, 3, LABELS)
