"""Scanning and checking the model repository (app.repository)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.repository import RepositoryError, UnknownModelError, scan_repository
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


def test_a_graph_that_does_not_match_its_sha256_stops_the_start(repo: Path) -> None:
    graph = repo / "tiny" / "1" / "model.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    with pytest.raises(RepositoryError, match=r"tiny/1/model\.onnx has sha256 [0-9a-f]{64} but"):
        scan_repository(repo)


def test_a_version_folder_missing_from_model_json_stops_the_start(repo: Path) -> None:
    shutil.copytree(repo / "tiny" / "2", repo / "tiny" / "3")
    with pytest.raises(RepositoryError, match=r"tiny/3/model\.onnx has no sha256 in"):
        scan_repository(repo)


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


def test_a_model_json_naming_another_model_stops_the_start(repo: Path) -> None:
    shutil.move(repo / "tiny", repo / "other")
    with pytest.raises(RepositoryError, match="names the model 'tiny' but its folder is 'other'"):
        scan_repository(repo)


def test_an_invalid_model_json_stops_the_start(repo: Path) -> None:
    spec = repo / "tiny" / "model.json"
    raw = json.loads(spec.read_text())
    raw["labels"] = raw["labels"][:3]
    spec.write_text(json.dumps(raw))
    with pytest.raises(RepositoryError, match="3 labels for 10 classes"):
        scan_repository(repo)


def test_a_model_folder_linking_outside_the_repository_stops_the_start(
    tiny_repo: TinyRepo, tmp_path: Path
) -> None:
    root = tmp_path / "linked"
    root.mkdir()
    (root / "tiny").symlink_to(tiny_repo.root / "tiny", target_is_directory=True)
    with pytest.raises(RepositoryError, match="resolves outside the model repository"):
        scan_repository(root)


def test_an_empty_repository_or_unknown_default_model_stops_the_start(
    repo: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RepositoryError, match="no models in"):
        scan_repository(empty)
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
    with pytest.raises(RepositoryError, match=r"model\.rollout\.onnx has sha256"):
        scan_repository(repo)
