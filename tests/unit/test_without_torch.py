"""The service's tests need no PyTorch, as the serving image has none.

In a fresh interpreter where every `import torch` fails, each module of the app imports, pytest
collects tests/api and tests/unit (importing every test module, conftest and helper they use),
and some API tests run on the shared fixtures (the tiny repository, the clients) and fakes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

WITHOUT_TORCH = """
import importlib
import importlib.abc
import pkgutil
import sys


class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None


class ImportTheApp:
    # Once pytest has loaded its plugins (what they import first cannot be assertion-rewritten).
    def pytest_sessionstart(self, session):
        import app

        for found in pkgutil.walk_packages(app.__path__, "app."):
            importlib.import_module(found.name)


sys.meta_path.insert(0, NoTorch())
import pytest

sys.exit(pytest.main(sys.argv[1:], plugins=[ImportTheApp()]))
"""

# Modules whose tests run: the tiny repository and create_app, serve with the fake backends,
# and the make_client fixture.
RUN = "test_health or test_model_faults or test_metrics"


def test_the_app_and_its_api_and_unit_tests_need_no_pytorch() -> None:
    args = ["tests/api", "tests/unit", "-k", RUN, "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert " passed" in report and "deselected" in report, report
