"""FastAPI dependencies: the running classifier, or a 503 while there is none."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.classifier import Classifier
from app.errors import NotReadyError


async def get_classifier(request: Request) -> Classifier:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per request.
    classifier = getattr(request.app.state, "classifier", None)
    if not isinstance(classifier, Classifier) or not classifier.ready:
        raise NotReadyError("the models are not loaded yet or the server is stopping; retry")
    return classifier


ClassifierDep = Annotated[Classifier, Depends(get_classifier)]
