"""Scanning and checking the model repository (app.models.repository)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from app.models.repository import (
    ModelNotReadyError,
    RepositoryError,
    UnknownModelError,
    scan_repository,
    signature,
)
from tests.support import TinyRepo


@pytest.fixture
def repo(tiny_repo: TinyRepo, tmp_path: Path) -> Path:
    """A private copy of the tiny repository that a test may damage."""
    root = tmp_path / "repo"
    shutil.copytree(tiny_repo.root, root)
    return root


def test_every_integer_version_is_loaded_and_the_highest_is_the_default(repo: Path) -> None:
    repository = scan_repository(repo)
    assert repository.default_model == "tiny"
    entry = repository.models["tiny"]
    assert sorted(entry.versions) == [1, 2]
    assert entry.default_version == 2
    assert repository.resolve(None, None).version == 2
    assert repository.resolve("tiny", 1).graph_path == repo / "tiny" / "1" / "model.onnx"


def test_an_unknown_model_or_version_names_what_is_served(repo: Path) -> None:
    repository = scan_repository(repo)
    with pytest.raises(UnknownModelError) as info:
        repository.resolve("resnet", None)
    assert info.value.message == "unknown model 'resnet'; served models: tiny"
    with pytest.raises(UnknownModelError) as info:
        repository.resolve("tiny", 3)
    assert info.value.message == "model 'tiny' has no version 3; served versions: 1, 2"


def test_a_path_as_a_model_name_is_not_echoed_and_never_reaches_the_file_system(
    repo: Path,
) -> None:
    repository = scan_repository(repo)
    with pytest.raises(UnknownModelError) as info:
        repository.resolve("../tiny", None)
    assert info.value.message == "unknown model '(invalid name)'; served models: tiny"


def test_a_graph_that_does_not_match_its_sha256_is_not_ready_and_the_others_serve(
    repo: Path,
) -> None:
    graph = repo / "tiny" / "1" / "model.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    repository = scan_repository(repo)
    assert sorted(repository.models["tiny"].versions) == [2]
    reason = repository.unavailable[("tiny", 1)].reason
    assert re.fullmatch(
        rf"{re.escape(str(graph))} has sha256 [0-9a-f]{{64}} but model.json says [0-9a-f]{{64}}: "
        "the graph was changed or corrupted after export; re-export it",
        reason,
    )
    with pytest.raises(ModelNotReadyError) as info:
        repository.resolve("tiny", 1)
    assert info.value.message == f"model 'tiny' version 1 is not ready: {reason}"
    assert repository.resolve("tiny", None).version == 2


def test_a_missing_graph_or_sha256_makes_that_version_not_ready(repo: Path) -> None:
    shutil.copytree(repo / "tiny" / "2", repo / "tiny" / "3")
    (repo / "tiny" / "2" / "model.onnx").unlink()
    repository = scan_repository(repo)
    assert sorted(repository.models["tiny"].versions) == [1]
    assert repository.unavailable[("tiny", 2)].reason == f"{repo}/tiny/2/model.onnx is missing"
    assert repository.unavailable[("tiny", 3)].reason == (
        f"{repo}/tiny/3 has no sha256 in model.json (versions: [1, 2]): re-export it"
    )
    # The highest version that serves is the default.
    assert repository.resolve(None, None).version == 1


def test_folders_that_are_not_versions_or_models_are_skipped(repo: Path) -> None:
    shutil.copytree(repo / "tiny" / "2", repo / "tiny" / "latest")
    shutil.copytree(repo / "tiny" / "2", repo / "tiny" / "+4")
    shutil.copytree(repo / "tiny" / "2", repo / "tiny" / "02")
    shutil.copytree(repo / "tiny", repo / "Not_A_Name")
    (repo / "notes").mkdir()  # no model.json
    (repo / "README.md").write_text("models live here\n")
    repository = scan_repository(repo)
    assert list(repository.models) == ["tiny"]
    assert sorted(repository.models["tiny"].versions) == [1, 2]


def test_a_model_json_naming_another_model_makes_the_model_not_ready(repo: Path) -> None:
    shutil.move(repo / "tiny", repo / "other")
    repository = scan_repository(repo)
    assert repository.models == {}
    assert repository.default_model == "other"
    assert repository.unavailable[("other", None)].reason == (
        f"{repo}/other/model.json names the model 'tiny' but its folder is 'other'"
    )
    with pytest.raises(ModelNotReadyError) as info:
        repository.resolve(None, None)
    assert info.value.message.startswith("model 'other' is not ready: ")


def test_an_invalid_model_json_makes_the_model_not_ready(repo: Path, tmp_path: Path) -> None:
    shutil.copytree(repo / "tiny", repo / "twin")
    twin = repo / "twin" / "model.json"
    raw = json.loads(twin.read_text())
    raw["name"] = "twin"
    raw["labels"] = raw["labels"][:3]
    twin.write_text(json.dumps(raw))
    repository = scan_repository(repo)
    assert list(repository.models) == ["tiny"]  # the other model is untouched
    assert "3 labels for 10 classes" in repository.unavailable[("twin", None)].reason
    with pytest.raises(ModelNotReadyError, match=r"model 'twin' is not ready: .*3 labels"):
        repository.resolve("twin", 1)


def test_a_model_folder_linking_outside_the_repository_is_not_served(
    tiny_repo: TinyRepo, tmp_path: Path
) -> None:
    root = tmp_path / "linked"
    root.mkdir()
    (root / "tiny").symlink_to(tiny_repo.root / "tiny", target_is_directory=True)
    repository = scan_repository(root)
    assert repository.models == {}
    assert "resolves outside the model repository" in repository.unavailable[("tiny", None)].reason


def test_an_empty_repository_serves_nothing_and_bad_configuration_stops_the_start(
    repo: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = scan_repository(empty)
    assert (nothing.models, nothing.unavailable, nothing.default_model) == ({}, {}, None)
    with pytest.raises(ModelNotReadyError) as info:
        nothing.resolve(None, None)
    assert info.value.message == "no model is being served: the model repository is empty"
    with pytest.raises(RepositoryError, match="default model 'vit-b' is not in"):
        scan_repository(repo, default_model="vit-b")
    with pytest.raises(RepositoryError, match="is not a folder"):
        scan_repository(tmp_path / "missing")


def test_a_rollout_graph_is_checked_like_the_main_graph(repo: Path) -> None:
    rollout = repo / "tiny" / "1" / "model.rollout.onnx"
    if not rollout.exists():
        pytest.skip("this export step writes no rollout graph")
    assert scan_repository(repo).resolve("tiny", 1).rollout_path == rollout
    rollout.write_bytes(rollout.read_bytes() + b"\0")
    repository = scan_repository(repo)
    assert "model.rollout.onnx has sha256" in repository.unavailable[("tiny", 1)].reason


def test_the_signature_changes_when_a_version_is_added_or_a_graph_rewritten(repo: Path) -> None:
    before = signature(repo)
    assert [path for path, _, _ in before] == [
        "tiny/1/model.onnx",
        "tiny/1/model.rollout.onnx",
        "tiny/2/model.onnx",
        "tiny/2/model.rollout.onnx",
        "tiny/model.json",
    ]
    assert signature(repo) == before
    shutil.copytree(repo / "tiny" / "2", repo / "tiny" / "3")
    added = signature(repo)
    assert added != before
    graph = repo / "tiny" / "1" / "model.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    assert signature(repo) != added
