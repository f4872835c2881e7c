"""The tiny repository the service's tests run on (tests/model_repo, read without PyTorch) is
what the export writes today, compared as the service sees it, not byte for byte.

The graphs' bytes depend on the day's torch, onnx and ONNX Runtime releases (node names, the
order of initializers, the opsets ONNX Runtime's optimizer imports), none of which the service
reads. What is compared instead, stored against a fresh export of the same weights:

- the contract: each graph's inputs and outputs, their names, element types and dimensions
  (the dynamic ones by name);
- the structure: the default and com.microsoft opset versions; the count of each op that
  stands for a part of the model (fused attention, BiasGelu, LayerNormalization, Softmax, the
  position embedding's Resize): a release may rewrite the glue between them (Shape, Gather,
  Concat, Constant or initializer), not these; and the number of float parameters in the
  initializers (a transposed or renamed weight keeps it, another architecture does not);
- the outputs: ONNX Runtime on both on the same fixed patches, at the parity grids (native,
  smaller, larger, non-square), within twice the export's bound against PyTorch (each graph
  is within it, so the two are within twice it): other weights or another rollout do not pass;
- model.json, less what varies with the release or the CPU (the sha256 of the graphs and the
  measured parity), and that its sha256 are those of the stored graphs.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from app.models.repository import sha256_of
from app.models.spec import GRAPH_FILENAME, ROLLOUT_GRAPH_FILENAME, SPEC_FILENAME
from export.onnx_export import PARITY_ATOL, ROLLOUT_ATOL, export_graph, parity_grids
from tests.export.tiny import TINY_SEEDS, export_tiny, tiny_model
from tests.support import TINY, TINY_REPO

REWRITE = "`.venv/bin/python -m tests.export.tiny`"
MODEL_OPS = ("Attention", "BiasGelu", "LayerNormalization", "Softmax", "Resize")
OPSET_DOMAINS = ("", "com.microsoft")  # ONNX Runtime's optimizer imports others, unused
GRAPHS = {GRAPH_FILENAME: 2 * PARITY_ATOL, ROLLOUT_GRAPH_FILENAME: 2 * ROLLOUT_ATOL}
BATCH = 2


def _value_info(values: Any) -> list[tuple[str, int, list[str | int]]]:
    return [
        (
            v.name,
            v.type.tensor_type.elem_type,
            [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
        )
        for v in values
    ]


def contract(model: onnx.ModelProto) -> dict[str, Any]:
    return {"inputs": _value_info(model.graph.input), "outputs": _value_info(model.graph.output)}


def structure(model: onnx.ModelProto) -> dict[str, Any]:
    graph = model.graph
    ops = Counter(node.op_type for node in graph.node if node.op_type in MODEL_OPS)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    parameters = sum(
        int(np.prod(t.dims)) for t in graph.initializer if t.data_type in floats and t.dims
    )
    opsets = {o.domain: o.version for o in model.opset_import if o.domain in OPSET_DOMAINS}
    return {"ops": dict(sorted(ops.items())), "float parameters": parameters, "opsets": opsets}


def feeds(model: onnx.ModelProto, grid: tuple[int, int], head_fusion: int) -> dict[str, Any]:
    """Fixed inputs for a graph: the same patches for each grid, whatever the graph."""
    patch_dim = model.graph.input[0].type.tensor_type.shape.dim[3].dim_value
    rng = np.random.default_rng(grid[0] * 100 + grid[1])
    out: dict[str, Any] = {
        "patches": rng.integers(0, 256, (BATCH, *grid, patch_dim), dtype=np.uint8)
    }
    names = {i.name for i in model.graph.input}
    if "head_fusion" in names:
        out["head_fusion"] = np.array(head_fusion, dtype=np.int64)
    if "discard_ratio" in names:
        out["discard_ratio"] = np.array(0.0, dtype=np.float32)
    return out


def outputs_differ(
    stored: Path, fresh: Path, model: onnx.ModelProto, grids: list[tuple[int, int]], atol: float
) -> list[str]:
    sessions = [
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for path in (stored, fresh)
    ]
    fusions = range(3) if any(i.name == "head_fusion" for i in model.graph.input) else [0]
    found = []
    for grid in grids:
        for fusion in fusions:
            inputs = feeds(model, grid, fusion)
            ours, theirs = (s.run(None, inputs) for s in sessions)
            names = [o.name for o in sessions[0].get_outputs()]
            for name, a, b in zip(names, ours, theirs, strict=True):
                worst = float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")
                if not worst <= atol:
                    found.append(
                        f"{name} at grid {grid[0]}x{grid[1]} (head fusion {fusion}) differs by "
                        f"{worst:.2e} > {atol:.0e}"
                    )
    return found


def spec_without_hashes(root: Path) -> dict[str, Any]:
    spec: dict[str, Any] = json.loads((root / TINY / SPEC_FILENAME).read_text())
    for files in spec["versions"].values():
        del files["model"], files["rollout"], files["optimization"]["max_abs_diff"]
    return spec


def differences(stored: Path, fresh: Path) -> list[str]:
    """What a stored repository has that the export no longer writes (nothing when current)."""
    found: list[str] = []
    ours, theirs = spec_without_hashes(stored), spec_without_hashes(fresh)
    for key in sorted(ours.keys() | theirs.keys()):
        if ours.get(key) != theirs.get(key):
            found.append(f"{SPEC_FILENAME} {key!r}: {ours.get(key)!r} != {theirs.get(key)!r}")
    spec = json.loads((stored / TINY / SPEC_FILENAME).read_text())
    native = tuple(spec["architecture"]["grid"])
    for version in sorted(TINY_SEEDS):
        files = spec["versions"].get(str(version), {})
        for filename, atol in GRAPHS.items():
            what = f"version {version} {filename}"
            path, new = (
                stored / TINY / str(version) / filename,
                fresh / TINY / str(version) / filename,
            )
            if not path.is_file():
                found.append(f"{what} is missing")
                continue
            key = "model" if filename == GRAPH_FILENAME else "rollout"
            if files.get(key) != sha256_of(path):
                found.append(f"{what}: its sha256 is not the one in {SPEC_FILENAME}")
            model, current = onnx.load(str(path)), onnx.load(str(new))
            for part in (contract, structure):
                if part(model) != part(current):
                    found.append(f"{what} {part.__name__}: {part(model)} != {part(current)}")
            if contract(model) == contract(current):
                grids = parity_grids((int(native[0]), int(native[1])))
                found += [f"{what} {d}" for d in outputs_differ(path, new, model, grids, atol)]
    return found


def assert_current(stored: Path, fresh: Path) -> None:
    found = differences(stored, fresh)
    assert not found, (
        f"tests/model_repo is not what the export writes now ({'; '.join(found)}): rewrite it "
        f"with {REWRITE}"
    )


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fresh")
    export_tiny(root)
    return root


def test_the_tiny_repository_is_what_the_export_writes_today(fresh: Path) -> None:
    assert_current(TINY_REPO, fresh)


# --- the check fails on a stale repository ----------------------------------------------------


@pytest.fixture
def stale(tmp_path: Path) -> Path:
    """A copy of the stored repository, to be made stale."""
    shutil.copytree(TINY_REPO, tmp_path / "repo")
    return tmp_path / "repo"


def rewrite_spec(root: Path, change: Any) -> None:
    path = root / TINY / SPEC_FILENAME
    spec = json.loads(path.read_text())
    change(spec)
    path.write_text(json.dumps(spec, indent=2) + "\n")


def refused(stale: Path, fresh: Path) -> str:
    with pytest.raises(AssertionError) as info:
        assert_current(stale, fresh)
    message = str(info.value)
    assert f"rewrite it with {REWRITE}" in message
    return message


def test_the_unchanged_copy_passes(stale: Path, fresh: Path) -> None:
    assert_current(stale, fresh)  # so that what fails below fails for its change alone


def test_other_weights_fail_on_the_outputs(stale: Path, fresh: Path) -> None:
    # Version 1 holds version 2's graphs, with their sha256: a consistent, stale repository.
    for filename in (GRAPH_FILENAME, ROLLOUT_GRAPH_FILENAME):
        shutil.copy(stale / TINY / "2" / filename, stale / TINY / "1" / filename)

    def swap(spec: dict[str, Any]) -> None:
        spec["versions"]["1"] = spec["versions"]["2"]

    rewrite_spec(stale, swap)
    message = refused(stale, fresh)
    assert "version 1 model.onnx logits at grid 8x8" in message
    assert "version 1 model.rollout.onnx rollout at grid" in message
    assert "version 2" not in message


def test_a_missing_output_fails_on_the_contract(stale: Path, fresh: Path) -> None:
    path = stale / TINY / "1" / ROLLOUT_GRAPH_FILENAME
    model = onnx.load(str(path))
    (rollout,) = [o for o in model.graph.output if o.name == "rollout"]
    model.graph.output.remove(rollout)
    onnx.save(model, str(path))

    def rehash(spec: dict[str, Any]) -> None:
        spec["versions"]["1"]["rollout"] = sha256_of(path)

    rewrite_spec(stale, rehash)
    message = refused(stale, fresh)
    assert "version 1 model.rollout.onnx contract" in message
    assert "sha256" not in message


def test_changed_labels_fail_on_model_json(stale: Path, fresh: Path) -> None:
    def relabel(spec: dict[str, Any]) -> None:
        spec["labels"][3] = "cat"

    rewrite_spec(stale, relabel)
    assert "model.json 'labels'" in refused(stale, fresh)


def test_a_graph_without_its_fused_attention_fails_on_the_structure(
    stale: Path, fresh: Path
) -> None:
    # model.onnx as traced, unfused (as an export before fusion was the default wrote it):
    # the same contract and the same logits, but no Attention or BiasGelu.
    path = stale / TINY / "1" / GRAPH_FILENAME
    export_graph(tiny_model(TINY_SEEDS[1]).folded(), path)

    def rehash(spec: dict[str, Any]) -> None:
        spec["versions"]["1"]["model"] = sha256_of(path)

    rewrite_spec(stale, rehash)
    message = refused(stale, fresh)
    assert "version 1 model.onnx structure" in message
    assert "'Attention': 1" in message
    assert "contract" not in message


def test_graphs_rewritten_without_model_json_fail_on_its_sha256(stale: Path, fresh: Path) -> None:
    shutil.copy(fresh / TINY / "1" / GRAPH_FILENAME, stale / TINY / "1" / GRAPH_FILENAME)
    path = stale / TINY / "1" / GRAPH_FILENAME
    model = onnx.load(str(path))
    model.producer_name = "edited"  # whatever the day's export wrote, these bytes differ
    onnx.save(model, str(path))
    assert "version 1 model.onnx: its sha256 is not the one in model.json" in refused(stale, fresh)
