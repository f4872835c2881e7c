"""The export's fixtures: PyTorch on one thread, and the tiny repository with its PyTorch models."""

from __future__ import annotations

import pytest
import torch

from tests.export.tiny import TINY_SEEDS, TinyTorchRepo, tiny_model
from tests.support import TinyRepo


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    # OpenMP workers spin while they wait, which on a small machine that is busy with other
    # work (a training run, a parallel test) turns a 1 s export into 15 s.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_repo(tiny_repo: TinyRepo) -> TinyTorchRepo:
    """tests/conftest.py's tiny repository, with the PyTorch model each version was exported
    from (here, where PyTorch is)."""
    models = {version: tiny_model(seed) for version, seed in TINY_SEEDS.items()}
    return TinyTorchRepo(root=tiny_repo.root, name=tiny_repo.name, models=models)
