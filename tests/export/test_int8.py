"""int8 graphs: the contract kept at every grid, the accuracy gate at export (recorded in
model.json, or nothing written and the reason given), the rollout graph left fp32."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from app.models.repository import sha256_of
from app.models.spec import (
    GRAPH_FILENAME,
    ROLLOUT_GRAPH_FILENAME,
    SPEC_FILENAME,
    Int8Gate,
    ModelSpec,
    Source,
)
from export.__main__ import main as export_main
from export.checkpoints import save_checkpoint
from export.onnx_export import export_graph, export_to_repository
from export.optimize import fuse, fused_model
from export.quantize import (
    MAX_ACCURACY_DROP,
    MIN_AGREEMENT,
    Gate,
    HeldOut,
    Int8GateError,
    Int8Method,
    demo_held_out,
    failures,
    quantize,
)
from tests.export.tiny import tiny_model
from tests.images import jpeg
from tests.support import DEMO_MODEL, TINY_LABELS, TINY_PREPROCESS

GRIDS = [(8, 8), (5, 5), (12, 12), (6, 11), (11, 3), (1, 1)]
CPU = ["CPUExecutionProvider"]
SOURCE = Source(framework="vit-serve", notes="test model")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _logits(graph: Path, patches: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(graph), providers=CPU)
    return np.asarray(session.run(["logits"], {"patches": patches})[0])


def _held_out(n: int = 64, seed: int = 0, labels: np.ndarray | None = None) -> HeldOut:
    rng = np.random.default_rng(seed)
    patches = rng.integers(0, 256, (n, 8, 8, 192), dtype=np.uint8)
    return HeldOut(patches=patches, labels=labels, description=f"{n} random inputs")


@pytest.fixture(scope="module")
def fused_and_int8(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("int8")
    model = tiny_model(3)
    traced, fused, int8 = tmp / "traced.onnx", tmp / "fused.onnx", tmp / "int8.onnx"
    export_graph(fused_model(model.folded()), traced)
    fuse(traced, fused, model.cfg)
    quantize(fused, int8)
    return fused, int8


def test_the_int8_graph_keeps_the_contract_at_every_grid(
    fused_and_int8: tuple[Path, Path],
) -> None:
    fused, int8 = fused_and_int8
    session = ort.InferenceSession(str(int8), providers=CPU)
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert (inp.name, inp.type) == ("patches", "tensor(uint8)")
    assert all(isinstance(d, str) for d in inp.shape[:3]), inp.shape  # dynamic, not baked in
    assert (out.name, out.type) == ("logits", "tensor(float)")
    rng = np.random.default_rng(1)
    for gh, gw in GRIDS:
        x = rng.integers(0, 256, (3, gh, gw, 192), dtype=np.uint8)
        (logits,) = session.run(None, {"patches": x})
        assert logits.shape == (3, 10) and logits.dtype == np.float32
        # Close to the fp32 graph at every grid, not only the native one.
        expected = _logits(fused, x)
        assert np.abs(logits - expected).max() < 0.05 * max(1.0, float(np.abs(expected).max()))


def test_the_int8_graph_quantises_the_products_and_attention(
    fused_and_int8: tuple[Path, Path],
) -> None:
    fused, int8 = fused_and_int8
    ops = [n.op_type for n in onnx.load(str(int8)).graph.node]
    # The tiny model: 2 blocks, the last with the class-token tail (plain MatMuls, no Attention).
    assert ops.count("QAttention") == 1 and "Attention" not in ops
    assert ops.count("MatMulInteger") >= 5  # patch embedding, 2 x (fc1, fc2), proj, ...
    weights = {t.name: t for t in onnx.load(str(int8)).graph.initializer}
    assert any(t.data_type == onnx.TensorProto.INT8 for t in weights.values())
    # The file shrinks: int8 weights.
    assert int8.stat().st_size < 0.6 * fused.stat().st_size


def test_per_channel_and_matmul_only_methods_also_keep_the_contract(
    fused_and_int8: tuple[Path, Path], tmp_path: Path
) -> None:
    fused, _ = fused_and_int8
    x = np.random.default_rng(2).integers(0, 256, (2, 6, 11, 192), dtype=np.uint8)
    for method in (Int8Method(per_channel=True), Int8Method(attention=False)):
        dst = tmp_path / "q.onnx"
        quantize(fused, dst, method)
        assert _logits(dst, x).shape == (2, 10)


def test_export_writes_an_int8_version_with_its_gate_in_model_json(tmp_path: Path) -> None:
    model = tiny_model(4)
    held_out = _held_out()
    result = export_to_repository(
        model,
        tmp_path,
        "q",
        TINY_LABELS,
        TINY_PREPROCESS,
        SOURCE,
        optimize="int8",
        held_out=held_out,
    )
    spec = ModelSpec.load(tmp_path / "q" / SPEC_FILENAME)
    files = spec.versions[1]
    assert files.model == sha256_of(tmp_path / "q" / "1" / GRAPH_FILENAME)
    opt = files.optimization
    assert opt.level == "int8" and opt.class_token_tail
    assert opt.fused_ops["QAttention"] == 1 and opt.fused_ops["MatMulInteger"] >= 5
    gate = opt.int8
    assert gate is not None
    assert gate.inputs == 64 and gate.held_out == "64 random inputs"
    assert gate.top1_agreement >= MIN_AGREEMENT
    assert gate.min_agreement == MIN_AGREEMENT and gate.max_accuracy_drop is None  # unlabelled
    assert gate.accuracy_fp32 is None and gate.accuracy_int8 is None
    assert "dynamic" in gate.method and "QAttention" in gate.method
    assert 0 < gate.max_abs_logit_diff == opt.max_abs_diff
    # The fused fp32 graph it came from met the usual bound; the rollout graph is fp32, as ever.
    assert result.parity.worst <= 1e-4 and result.rollout_parity.worst <= 1e-5
    rollout_ops = {
        n.op_type for n in onnx.load(str(tmp_path / "q" / "1" / ROLLOUT_GRAPH_FILENAME)).graph.node
    }
    assert not rollout_ops & {"MatMulInteger", "QAttention", "DynamicQuantizeLinear"}
    # The contract in model.json is unchanged.
    assert spec.inputs[0].dtype == "uint8" and spec.outputs[0].dtype == "float32"


def test_labelled_held_out_inputs_report_both_accuracies(tmp_path: Path) -> None:
    model = tiny_model(4)
    patches = _held_out().patches
    with torch.no_grad():
        labels = model(torch.from_numpy(patches)).argmax(dim=1).numpy()
    labels[:8] = (labels[:8] + 1) % 10  # fp32 right on 56 of 64
    result = export_to_repository(
        model,
        tmp_path,
        "q",
        TINY_LABELS,
        TINY_PREPROCESS,
        SOURCE,
        optimize="int8",
        held_out=HeldOut(patches, labels.astype(np.int64), "labelled"),
    )
    gate = result.optimization.int8
    assert gate is not None and gate.accuracy_fp32 == pytest.approx(56 / 64)
    assert gate.accuracy_fp32 is not None and gate.accuracy_int8 is not None
    assert gate.accuracy_fp32 - gate.accuracy_int8 <= MAX_ACCURACY_DROP
    assert gate.max_accuracy_drop == MAX_ACCURACY_DROP


def test_a_graph_that_fails_the_gate_is_not_written_and_the_export_says_why(
    tmp_path: Path,
) -> None:
    impossible = Gate(max_abs_logit_diff=1e-9)  # int8 never matches fp32 this closely
    with pytest.raises(Int8GateError, match=r"max \|logit diff\| .* > 1e-09; nothing written"):
        export_to_repository(
            tiny_model(4),
            tmp_path,
            "q",
            TINY_LABELS,
            TINY_PREPROCESS,
            SOURCE,
            optimize="int8",
            held_out=_held_out(),
            gate=impossible,
        )
    assert not (tmp_path / "q").exists()


def test_the_gate_names_each_reason_it_fails() -> None:
    record = Int8Gate(
        method="m",
        held_out="h",
        inputs=1000,
        top1_agreement=0.985,
        max_abs_logit_diff=0.3,
        accuracy_fp32=0.976,
        accuracy_int8=0.969,
        min_agreement=MIN_AGREEMENT,
        max_accuracy_drop=MAX_ACCURACY_DROP,
    )
    why = failures(record, Gate())
    assert why == [
        "top-1 agreement with fp32 98.50% < 99.00%",
        "held-out accuracy 96.90% is 0.70 points below fp32's 97.60% (at most 0.50 allowed)",
    ]
    passing = record.model_copy(update={"top1_agreement": 0.995, "accuracy_int8": 0.972})
    assert failures(passing, Gate()) == []


def test_int8_needs_held_out_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="held-out inputs"):
        export_to_repository(
            tiny_model(4), tmp_path, "q", TINY_LABELS, TINY_PREPROCESS, SOURCE, optimize="int8"
        )
    assert not (tmp_path / "q").exists()


def _photos(folder: Path, count: int = 12) -> Path:
    folder.mkdir()
    for i in range(count):
        (folder / f"{i:02d}.jpg").write_bytes(jpeg(96 + 8 * i, 72, seed=i))
    return folder


def test_the_cli_exports_int8_past_the_gate_on_photos(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(checkpoint, tiny_model(4), TINY_LABELS, "test")
    photos = _photos(tmp_path / "photos")
    args = ["--checkpoint", str(checkpoint), "--name", "q", "--repo", str(tmp_path / "repo")]
    args += ["--optimize", "int8", "--held-out-photos", str(photos)]
    # A random model on noise photos has near-ties that int8 may break: a low bar here.
    with caplog.at_level(logging.INFO):
        assert export_main([*args, "--int8-min-agreement", "0.5"]) == 0
    spec = json.loads((tmp_path / "repo" / "q" / SPEC_FILENAME).read_text())
    gate = spec["versions"]["1"]["optimization"]["int8"]
    assert gate["inputs"] == 12 and "12 photos in photos/" in gate["held_out"]
    assert gate["min_agreement"] == 0.5 and gate["top1_agreement"] >= 0.5
    # An impossible gate: nothing more is written, and the log says why.
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert export_main([*args, "--int8-min-agreement", "1.01"]) == 1
    assert "fails its accuracy gate" in caplog.text and "< 101.00%" in caplog.text
    assert sorted(p.name for p in (tmp_path / "repo" / "q").iterdir()) == ["1", SPEC_FILENAME]


def test_the_demo_gate_runs_on_the_evaluation_split() -> None:
    spec = ModelSpec.load(DEMO_MODEL / SPEC_FILENAME)
    held_out = demo_held_out(spec, images=20)
    assert held_out.patches.shape == (20, 8, 8, 192) and held_out.patches.dtype == np.uint8
    assert held_out.labels is not None and held_out.labels.shape == (20,)
    assert "seed 4242" in held_out.description


def test_a_model_json_with_an_int8_version_round_trips(tmp_path: Path) -> None:
    written = json.loads((DEMO_MODEL / SPEC_FILENAME).read_text())
    files = written["versions"]["1"]
    files["optimization"] = {
        "level": "int8",
        "int8": {
            "method": "dynamic",
            "held_out": "demo",
            "inputs": 1000,
            "top1_agreement": 0.998,
            "max_abs_logit_diff": 0.18,
            "accuracy_fp32": 0.976,
            "accuracy_int8": 0.976,
            "min_agreement": 0.99,
            "max_accuracy_drop": 0.005,
        },
    }
    (tmp_path / SPEC_FILENAME).write_text(json.dumps(written))
    spec = ModelSpec.load(tmp_path / SPEC_FILENAME)
    gate = spec.versions[1].optimization.int8
    assert gate is not None and gate.accuracy_int8 == 0.976
    spec.dump(tmp_path / "again.json")
    assert ModelSpec.load(tmp_path / "again.json") == spec
