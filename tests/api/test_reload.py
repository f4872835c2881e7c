"""Hot reload: new versions swap in, removed ones drain, bad pushes never take down a version."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from app.core.settings import Settings
from tests.fakes import FakeBackends
from tests.images import jpeg
from tests.support import TinyRepo, serve

pytestmark = pytest.mark.anyio

KEY = "admin-secret"
ADMIN = {"Authorization": f"Bearer {KEY}"}


def raw(data: bytes) -> dict[str, Any]:
    return {"content": data, "headers": {"content-type": "image/jpeg"}}


@pytest.fixture
def root(tiny_repo: TinyRepo, tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo.root, repo)
    return repo


def add_version(root: Path, new: int, like: int = 2) -> None:
    """Drop version `new` into the repository as an export would: its folder, then its sha."""
    shutil.copytree(root / "tiny" / str(like), root / "tiny" / str(new))
    spec = root / "tiny" / "model.json"
    raw_spec = json.loads(spec.read_text())
    raw_spec["versions"][str(new)] = raw_spec["versions"][str(like)]
    spec.write_text(json.dumps(raw_spec))


def remove_version(root: Path, version: int) -> None:
    shutil.rmtree(root / "tiny" / str(version))
    spec = root / "tiny" / "model.json"
    raw_spec = json.loads(spec.read_text())
    del raw_spec["versions"][str(version)]
    spec.write_text(json.dumps(raw_spec))


async def reload(c: httpx.AsyncClient) -> dict[str, Any]:
    response = await c.post("/admin/reload", headers=ADMIN)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.parametrize("instances", [1, 2])
async def test_a_new_version_is_loaded_and_becomes_the_default(root: Path, instances: int) -> None:
    settings = Settings(model_repo=root, admin_api_key=SecretStr(KEY), runtime_instances=instances)
    async with serve(settings) as c:
        add_version(root, 3)
        assert await reload(c) == {
            "loaded": ["tiny/3"],
            "unloaded": [],
            "unchanged": ["tiny/1", "tiny/2"],
            "failed": [],
        }
        model = (await c.get("/models")).json()["models"][0]
        assert (model["versions"], model["default_version"]) == ([1, 2, 3], 3)
        answer = await c.post("/classify", **raw(jpeg()))
        assert (answer.status_code, answer.json()["version"]) == (200, 3)
        assert (
            'vit_serve_model_info{grid="8x8",model="tiny",optimization="fused",'
            'provider="CPUExecutionProvider",version="3",wanted="' in (await c.get("/metrics")).text
        )
        # Nothing changed on disk: nothing is loaded again.
        assert (await reload(c))["loaded"] == []


async def test_reload_under_load_fails_no_request(root: Path) -> None:
    """Versions come and go while clients send requests naming no version: all get 200."""
    statuses: Counter[int] = Counter()
    versions: Counter[int] = Counter()
    async with serve(Settings(model_repo=root, admin_api_key=SecretStr(KEY))) as c:
        done = asyncio.Event()

        async def client() -> None:
            while not done.is_set():
                response = await c.post("/classify", **raw(jpeg()))
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    versions[response.json()["version"]] += 1

        clients = [asyncio.create_task(client()) for _ in range(4)]
        await asyncio.sleep(0.3)
        add_version(root, 3)
        assert (await reload(c))["loaded"] == ["tiny/3"]
        await asyncio.sleep(0.3)
        remove_version(root, 2)
        remove_version(root, 3)
        assert (await reload(c))["unloaded"] == ["tiny/2", "tiny/3"]
        await asyncio.sleep(0.3)
        done.set()
        await asyncio.gather(*clients)
    assert set(statuses) == {200}, statuses
    assert {2, 3, 1} <= set(versions), versions  # every stage served some of the load
    assert sum(statuses.values()) > 20


async def test_a_removed_version_drains_before_it_is_released(root: Path) -> None:
    fakes = FakeBackends()
    async with serve(
        Settings(model_repo=root, admin_api_key=SecretStr(KEY), warmup=False), fakes
    ) as c:
        old = fakes.made[("tiny", 1)]
        old.gate.clear()  # the next batch of version 1 holds in the inference thread
        running = asyncio.create_task(c.post("/classify", params={"version": 1}, **raw(jpeg())))
        assert await asyncio.to_thread(old.started.wait, 10)
        remove_version(root, 1)
        reloading = asyncio.create_task(c.post("/admin/reload", headers=ADMIN))
        await asyncio.sleep(0.2)
        assert not reloading.done()  # waiting for the running request
        # Already out of the table: a new request for it is a 404, not a failure mid-flight.
        gone = await c.post("/classify", params={"version": 1}, **raw(jpeg()))
        assert (gone.status_code, gone.json()) == (
            404,
            {"detail": "model 'tiny' has no version 1; served versions: 2"},
        )
        old.gate.set()
        assert (await running).status_code == 200
        report = await reloading
        assert report.json()["unloaded"] == ["tiny/1"]


async def test_a_bad_push_is_reported_and_never_replaces_a_working_version(root: Path) -> None:
    async with serve(Settings(model_repo=root, admin_api_key=SecretStr(KEY))) as c:
        add_version(root, 3)
        graph = root / "tiny" / "3" / "model.onnx"
        graph.write_bytes(graph.read_bytes()[:1000])  # a half-copied graph
        existing = root / "tiny" / "2" / "model.onnx"
        existing.write_bytes(existing.read_bytes() + b"\0")  # a damaged one in place
        report = await reload(c)
        assert report["loaded"] == []
        assert sorted((f["model"], f["version"]) for f in report["failed"]) == [
            ("tiny", 2),
            ("tiny", 3),
        ]
        models = (await c.get("/models")).json()
        assert models["models"][0]["versions"] == [1, 2]  # 2 serves on from memory
        assert [(n["model"], n["version"]) for n in models["not_ready"]] == [("tiny", 3)]
        answer = await c.post("/classify", **raw(jpeg()))
        assert (answer.status_code, answer.json()["version"]) == (200, 2)
        refused = await c.post("/classify", params={"version": 3}, **raw(jpeg()))
        assert refused.status_code == 503
        # The copy completes: the next reload serves it.
        shutil.copytree(root / "tiny" / "1", root / "tiny" / "3", dirs_exist_ok=True)
        spec = root / "tiny" / "model.json"
        raw_spec = json.loads(spec.read_text())
        raw_spec["versions"]["3"] = raw_spec["versions"]["1"]
        spec.write_text(json.dumps(raw_spec))
        assert (await reload(c))["loaded"] == ["tiny/3"]


async def test_a_version_taken_out_for_failing_comes_back_on_reload(root: Path) -> None:
    fakes = FakeBackends()
    settings = Settings(
        model_repo=root, admin_api_key=SecretStr(KEY), warmup=False, model_failure_threshold=1
    )
    async with serve(settings, fakes) as c:
        fakes.made[("tiny", 2)].fail = True
        assert (await c.post("/classify", **raw(jpeg()))).status_code == 503
        assert (await c.get("/models")).json()["models"][0]["versions"] == [1]
        report = await reload(c)  # the factory makes a fresh, working session
        assert (report["loaded"], report["unchanged"]) == (["tiny/2"], ["tiny/1"])
        answer = await c.post("/classify", **raw(jpeg()))
        assert (answer.status_code, answer.json()["version"]) == (200, 2)
        assert (await c.get("/models")).json()["not_ready"] == []


async def test_the_repository_is_polled_when_asked_to(root: Path) -> None:
    async with serve(Settings(model_repo=root, model_repo_poll_s=0.05)) as c:
        add_version(root, 3)
        for _ in range(200):
            model = (await c.get("/models")).json()["models"][0]
            if model["versions"] == [1, 2, 3]:
                break
            await asyncio.sleep(0.05)
        assert model["default_version"] == 3


async def test_reload_is_an_admin_endpoint(root: Path) -> None:
    async with serve(Settings(model_repo=root)) as c:
        off = await c.post("/admin/reload", headers=ADMIN)
        assert off.status_code == 403
    async with serve(Settings(model_repo=root, admin_api_key=SecretStr(KEY))) as c:
        assert (await c.post("/admin/reload")).status_code == 401
        wrong = await c.post("/admin/reload", headers={"X-API-Key": "guess"})
        assert wrong.status_code == 401
        assert (await c.post("/admin/reload", headers={"X-API-Key": KEY})).status_code == 200


async def test_a_repository_that_vanished_changes_nothing(root: Path, tmp_path: Path) -> None:
    async with serve(Settings(model_repo=root, admin_api_key=SecretStr(KEY))) as c:
        root.rename(tmp_path / "moved")
        response = await c.post("/admin/reload", headers=ADMIN)
        assert (response.status_code, response.json()) == (
            409,
            {"detail": f"model repository {root} is not a folder; nothing was reloaded"},
        )
        assert (await c.post("/classify", **raw(jpeg()))).status_code == 200
