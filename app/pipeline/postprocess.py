"""Logits -> probabilities -> the top k labelled predictions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: float


def softmax(logits: NDArray[np.floating]) -> NDArray[np.float64]:
    """Softmax over the last axis, in float64 and shifted by the max so exp never overflows."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return np.asarray(e / e.sum(axis=-1, keepdims=True), dtype=np.float64)


def top_k(probs: NDArray[np.float64], k: int, labels: list[str]) -> list[Prediction]:
    """The k most probable classes, by score descending; ties keep the lower index first."""
    # A stable sort of the negated scores: exact ties keep the lower index first. (Sorting all
    # classes costs well under a millisecond even for 21k classes.)
    order = np.argsort(-probs, kind="stable")[: max(0, k)]
    return [Prediction(label=labels[i], index=int(i), score=float(probs[i])) for i in order]


def predictions(logits: NDArray[np.floating], k: int, labels: list[str]) -> list[Prediction]:
    """One image's logits (num_classes,) -> its top-k predictions."""
    return top_k(softmax(logits), k, labels)
