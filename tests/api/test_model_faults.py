"""Model faults: a broken graph, model.json or session takes out that model only, with why."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from app.core.settings import Settings
from app.models.repository import ModelVersion
from app.runtime.backends import Backend
from tests.fakes import FakeBackends
from tests.images import jpeg
from tests.support import TinyRepo, serve

pytestmark = pytest.mark.anyio

SHA = "[0-9a-f]{64}"


def raw(data: bytes) -> dict[str, Any]:
    return {"content": data, "headers": {"content-type": "image/jpeg"}}


def copy_repo(tiny_repo: TinyRepo, tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(tiny_repo.root, root)
    return root


def add_model(root: Path, name: str) -> Path:
    """A second model: the tiny one under another name."""
    shutil.copytree(root / "tiny", root / name)
    spec = root / name / "model.json"
    raw_spec = json.loads(spec.read_text())
    raw_spec["name"] = name
    spec.write_text(json.dumps(raw_spec))
    return spec


async def test_a_corrupted_graph_takes_out_its_version_and_the_rest_serves(
    tiny_repo: TinyRepo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = copy_repo(tiny_repo, tmp_path)
    graph = root / "tiny" / "2" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:-100])
    with caplog.at_level(logging.ERROR, logger="app.models.repository"):
        async with serve(Settings(model_repo=root)) as c:
            assert (await c.get("/readyz")).status_code == 200
            models = (await c.get("/models")).json()
            assert [m["versions"] for m in models["models"]] == [[1]]
            [entry] = models["not_ready"]
            assert (entry["model"], entry["version"]) == ("tiny", 2)
            assert re.fullmatch(
                f"{re.escape(str(graph))} has sha256 {SHA} but model.json says {SHA}: the graph "
                "was changed or corrupted after export; re-export it",
                entry["reason"],
            )
            refused = await c.post("/classify", params={"version": 2}, **raw(jpeg()))
            assert refused.status_code == 503
            assert refused.json() == {
                "detail": f"model 'tiny' version 2 is not ready: {entry['reason']}"
            }
            assert refused.headers["retry-after"] == "1"
            served = await c.post("/classify", **raw(jpeg()))
            assert (served.status_code, served.json()["version"]) == (200, 1)
    assert f"model 'tiny' version 2 is not ready: {entry['reason']}" in caplog.text


async def test_a_broken_model_json_or_a_graph_that_will_not_load_is_not_ready_by_name(
    tiny_repo: TinyRepo, tmp_path: Path
) -> None:
    root = copy_repo(tiny_repo, tmp_path)
    add_model(root, "broken-spec").write_text("{ not json")
    add_model(root, "no-session")
    made = FakeBackends()

    def factory(version: ModelVersion) -> Backend:
        if version.name == "no-session":
            raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH")
        return made(version)

    async with serve(Settings(model_repo=root, default_model="tiny"), factory) as c:
        models = (await c.get("/models")).json()
        assert [m["name"] for m in models["models"]] == ["tiny"]
        reasons = {(n["model"], n["version"]): n["reason"] for n in models["not_ready"]}
        assert set(reasons) == {("broken-spec", None), ("no-session", 1), ("no-session", 2)}
        assert reasons[("broken-spec", None)].startswith(
            f"{root}/broken-spec/model.json is invalid"
        )
        assert reasons[("no-session", 1)] == (
            "its graph could not be loaded (RuntimeError: [ONNXRuntimeError] : 10 : INVALID_GRAPH)"
        )
        spec = await c.post("/classify", params={"model": "broken-spec"}, **raw(jpeg()))
        assert spec.status_code == 503
        assert spec.json()["detail"].startswith("model 'broken-spec' is not ready: ")
        session = await c.post("/classify", params={"model": "no-session"}, **raw(jpeg()))
        assert session.status_code == 503
        assert session.json()["detail"] == (
            "model 'no-session' version 1 is not ready: its graph could not be loaded "
            "(RuntimeError: [ONNXRuntimeError] : 10 : INVALID_GRAPH)"
        )
        assert (await c.post("/classify", **raw(jpeg()))).status_code == 200
        metrics = (await c.get("/metrics")).text
        assert "vit_serve_models_not_ready 3.0" in metrics


async def test_a_session_that_keeps_failing_is_marked_not_ready_and_other_versions_serve(
    tiny_repo: TinyRepo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fakes = FakeBackends()
    settings = Settings(model_repo=tiny_repo.root, warmup=False, model_failure_threshold=2)
    async with serve(settings, fakes) as c:
        fakes.made[("tiny", 2)].fail = True
        failing = "inference failed for model 'tiny' version 2 (RuntimeError); the error is logged"
        for _ in range(2):
            response = await c.post("/classify", params={"version": 2}, **raw(jpeg()))
            assert response.status_code == 503
            assert response.json()["detail"].startswith(failing)
        reason = (
            "inference failed on 2 batches in a row (last: RuntimeError: session exploded); "
            "reload the model to retry it"
        )
        refused = await c.post("/classify", params={"version": 2}, **raw(jpeg()))
        assert refused.json() == {"detail": f"model 'tiny' version 2 is not ready: {reason}"}
        assert refused.status_code == 503
        models = (await c.get("/models")).json()
        assert models["not_ready"] == [{"model": "tiny", "version": 2, "reason": reason}]
        assert models["models"][0]["versions"] == [1]
        # Requests that name no version go to the highest version that still serves.
        served = await c.post("/classify", **raw(jpeg()))
        assert (served.status_code, served.json()["version"]) == (200, 1)
        assert (await c.get("/readyz")).status_code == 200
    assert f"model tiny version 2 is not ready: {reason}" in caplog.text


async def test_one_failed_batch_among_good_ones_does_not_take_the_model_out(
    tiny_repo: TinyRepo,
) -> None:
    fakes = FakeBackends()
    settings = Settings(model_repo=tiny_repo.root, warmup=False, model_failure_threshold=2)
    async with serve(settings, fakes) as c:
        backend = fakes.made[("tiny", 2)]
        for _ in range(3):
            backend.fail = True
            assert (await c.post("/classify", **raw(jpeg()))).status_code == 503
            backend.fail = False
            assert (await c.post("/classify", **raw(jpeg()))).status_code == 200
        assert (await c.get("/models")).json()["not_ready"] == []


async def test_with_no_model_serving_the_service_stays_up_and_says_why(
    tiny_repo: TinyRepo, tmp_path: Path
) -> None:
    root = copy_repo(tiny_repo, tmp_path)
    (root / "tiny" / "model.json").write_text("[]")
    async with serve(Settings(model_repo=root)) as c:
        assert (await c.get("/healthz")).status_code == 200
        ready = await c.get("/readyz")
        assert (ready.status_code, ready.json()) == (
            503,
            {"detail": "no model can be served; GET /models lists each one's reason"},
        )
        refused = await c.post("/classify", **raw(jpeg()))
        assert refused.status_code == 503
        assert refused.json()["detail"].startswith("model 'tiny' is not ready: ")
        assert "vit_serve_ready 0.0" in (await c.get("/metrics")).text
        unknown = await c.post("/classify", params={"model": "other"}, **raw(jpeg()))
        assert (unknown.status_code, unknown.json()) == (
            404,
            {"detail": "unknown model 'other'; served models: none"},
        )
