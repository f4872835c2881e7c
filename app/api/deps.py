"""FastAPI dependencies: the running classifier, or a 503 while there is none."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.classifier import Classifier
from app.errors import NotReadyError


def get_classifier(request: Request) -> Classifier:
    classifier = getattr(request.app.state, "classifier", None)
    if not isinstance(classifier, Classifier) or not classifier.ready:
        raise NotReadyError("the models are not loaded yet or the server is stopping; retry")
    return classifier


ClassifierDep = Annotated[Classifier, Depends(get_classifier)]
