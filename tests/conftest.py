"""Session fixtures: a tiny exported ViT in a throwaway model repository; anyio on asyncio."""

from __future__ import annotations

import pytest
import torch

from app.models.spec import Source
from export.onnx_export import export_to_repository
from export.vit import VisionTransformer
from tests.support import TINY, TINY_LABELS, TINY_PREPROCESS, TinyRepo, tiny_model


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> TinyRepo:
    """Model `tiny`, versions 1 and 2 (different weights), exported with parity checks."""
    # One thread: OpenMP workers spin while they wait, which on a small machine that is busy
    # with other work (a training run, a parallel test) turns a 1 s export into 15 s.
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("model_repo")
    models: dict[int, VisionTransformer] = {}
    for seed in (1, 2):
        model = tiny_model(seed)
        result = export_to_repository(
            model,
            root,
            TINY,
            TINY_LABELS,
            TINY_PREPROCESS,
            Source(framework="vit-serve", notes="test model"),
        )
        models[result.version] = model
    return TinyRepo(root=root, name=TINY, models=models)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests and fixtures run on asyncio (anyio's pytest plugin), one loop per session."""
    return "asyncio"
