"""Logits -> probabilities -> the top k labelled predictions.

`softmax` (the engine's) runs per batch in the inference thread (app/engine/batches.py),
vectorised, each row the same as on its own; `top_k` runs per image on the event loop, so it
sorts only what it must.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from app.engine import softmax


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: float


# Above this many classes `top_k` partitions before sorting (below, a full sort is cheaper).
_PARTITION_ABOVE = 64


def top_k(probs: NDArray[np.float64], k: int, labels: list[str]) -> list[Prediction]:
    """The k most probable classes, by score descending; ties keep the lower index first."""
    # A stable sort of the negated scores: exact ties keep the lower index first.
    n = probs.shape[-1]
    k = max(0, min(k, n))
    order: NDArray[np.intp] | None = None
    if 0 < k < n and n > _PARTITION_ABOVE:
        # Only what is at or above the k-th largest score is sorted: every score above it and
        # each tie of it, in index order, so the stable sort orders them as a full one would.
        kth = np.partition(probs, n - k)[n - k]
        candidates = np.flatnonzero(probs >= kth)
        if len(candidates) >= k:  # fewer: NaNs (sorted last by a full sort), so sort them all
            order = candidates[np.argsort(-probs[candidates], kind="stable")[:k]]
    if order is None:
        order = np.argsort(-probs, kind="stable")[:k]
    indices: list[int] = order.tolist()
    scores: list[float] = probs[order].tolist()
    return [
        Prediction(label=labels[i], index=i, score=score)
        for i, score in zip(indices, scores, strict=True)
    ]


def predictions(logits: NDArray[np.floating], k: int, labels: list[str]) -> list[Prediction]:
    """One image's logits (num_classes,) -> its top-k predictions."""
    return top_k(softmax(logits), k, labels)
