"""ModelSpec.dump replaces model.json whole: the server polls the repository it is written into."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from app.models.spec import SPEC_FILENAME, ModelSpec
from tests.support import TINY, TINY_REPO


@pytest.fixture
def spec() -> ModelSpec:
    return ModelSpec.load(TINY_REPO / TINY / SPEC_FILENAME)


def relabelled(spec: ModelSpec) -> ModelSpec:
    return spec.model_copy(update={"labels": [f"renamed-{i}" for i in range(len(spec.labels))]})


def test_a_reader_of_the_old_file_reads_it_whole_while_the_new_one_is_written(
    tmp_path: Path, spec: ModelSpec
) -> None:
    path = tmp_path / SPEC_FILENAME
    spec.dump(path)
    old_text = path.read_text()
    with path.open() as reader:  # the poller, mid-read
        reader.read(10)
        relabelled(spec).dump(path)
        # Written in place, the old file would have been truncated under the reader.
        assert old_text[:10] + reader.read() == old_text
    assert ModelSpec.load(path) == relabelled(spec)
    assert [p.name for p in tmp_path.iterdir()] == [SPEC_FILENAME]  # no temporary file left


def test_a_write_interrupted_before_it_reached_the_disk_leaves_the_old_file(
    tmp_path: Path, spec: ModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / SPEC_FILENAME
    spec.dump(path)
    before = path.read_bytes()

    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        relabelled(spec).dump(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [SPEC_FILENAME]


def test_the_new_file_keeps_the_old_ones_permissions(tmp_path: Path, spec: ModelSpec) -> None:
    # The temporary file is made 0600; the server may read the repository as another user.
    path = tmp_path / SPEC_FILENAME
    spec.dump(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    path.chmod(0o640)
    relabelled(spec).dump(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
