"""ViT graphs for the GPU check, made where it runs without PyTorch (and without `onnx`).

    .venv/bin/python -m bench.gpu_graphs        # rewrites bench/graphs/ (needs PyTorch + onnx)

A machine with a GPU lent for minutes has no PyTorch and carries at most 64 MiB, and ViT-B/16's
graph is 330 MB. So each graph here is exported by the export step itself
(`export.onnx_export.stage_graph`, the forms `none`, `fused` and `fp16`, checked as
every export is), its large initializers moved out to external data, and only the graph
itself (the "skeleton", its nodes and small constants, a few hundred KB) and a manifest of the
moved tensors are committed. `materialise` (numpy only) writes random weights for those
tensors into the external data file, each drawn with its own tensor's mean and spread as the
export saw it (tensors of one value exactly: LayerNorm's ones, zero biases), and
`model_repository` puts the result in a model repository the service serves.

The weights are random, so logits mean nothing; what the GPU check measures of them (parity
between providers, throughput) does not depend on training. The graphs themselves are the
export's: the same operators, dynamic grid and cast-first input as a real model's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.models.spec import (
    GRAPH_FILENAME,
    SPEC_FILENAME,
    Architecture,
    GraphFiles,
    GraphOptimization,
    ModelSpec,
    Preprocess,
    Source,
    contract_tensors,
)

GRAPHS = Path(__file__).resolve().parent / "graphs"
DATA_FILENAME = "model.onnx.data"
# Initializers of at least this many bytes go to external data (the rest stay in the skeleton).
EXTERNAL_BYTES = 4096

# name -> the reference ViT's configuration (export.vit.ViTConfig fields).
SIZES: dict[str, dict[str, Any]] = {
    # ViT-B/16 at 224: 86M parameters, 196 patches of 768 values.
    "vit-b16": dict(
        patch_size=16, grid=(14, 14), embed_dim=768, depth=12, heads=12, num_classes=1000
    ),
    # The same input (224 px, 16 px patches) through a tiny encoder: the CPU smoke run.
    "vit-smoke": dict(patch_size=16, grid=(14, 14), embed_dim=64, depth=2, heads=2, num_classes=10),
}
FORMS = ("none", "fused", "fp16")
_DTYPES = {1: "float32", 10: "float16"}  # onnx.TensorProto data types kept external


@dataclass(frozen=True)
class GraphKit:
    """One committed skeleton and its manifest."""

    size: str
    form: str

    @property
    def name(self) -> str:
        return f"{self.size}-{self.form}"

    @property
    def skeleton(self) -> Path:
        return GRAPHS / f"{self.name}.onnx"

    @property
    def manifest_path(self) -> Path:
        return GRAPHS / f"{self.name}.json"

    def manifest(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.manifest_path.read_text())
        return loaded


def materialise(kit: GraphKit, folder: Path, seed: int = 0) -> Path:
    """`folder/model.onnx` and its external data, random weights as the manifest says; returns
    the graph's path. Numpy only."""
    manifest = kit.manifest()
    folder.mkdir(parents=True, exist_ok=True)
    graph = folder / GRAPH_FILENAME
    shutil.copyfile(kit.skeleton, graph)
    rng = np.random.default_rng(seed)
    with (folder / manifest["data_file"]).open("wb") as data:
        data.truncate(manifest["data_bytes"])
        for tensor in manifest["tensors"]:
            shape, dtype = tuple(tensor["shape"]), np.dtype(tensor["dtype"])
            kind, *params = tensor["fill"]
            if kind == "constant":
                values = np.full(shape, params[0], dtype=np.float32)
            else:
                mean, std = params
                values = rng.normal(mean, std, size=shape).astype(np.float32)
            raw = values.astype(dtype).tobytes()
            if len(raw) != tensor["length"]:
                raise ValueError(
                    f"{kit.name}: {tensor['name']} is {len(raw)} bytes, not {tensor['length']}"
                )
            data.seek(tensor["offset"])
            data.write(raw)
    return graph


def spec_of(kit: GraphKit, model_name: str, graph_sha256: str) -> ModelSpec:
    """The model.json of a materialised graph: the contract, ImageNet's preprocessing, numbered
    labels, and the form the graph was exported in."""
    manifest = kit.manifest()
    arch = Architecture(**manifest["architecture"])
    inputs, outputs = contract_tensors(arch)
    files = GraphFiles(
        model=graph_sha256,
        optimization=GraphOptimization(level=manifest["form"], max_abs_diff=manifest["parity"]),
    )
    return ModelSpec(
        name=model_name,
        architecture=arch,
        preprocess=Preprocess(
            resize_mode="shorter_side",
            crop_pct=0.875,
            interpolation="bicubic",
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
        ),
        labels=[f"class-{i}" for i in range(arch.num_classes)],
        inputs=inputs,
        outputs=outputs,
        rollout=None,
        source=Source(framework="vit-serve", notes=f"bench/graphs/{kit.name}: random weights"),
        versions={1: files},
    )


def model_repository(kit: GraphKit, root: Path, seed: int = 0) -> tuple[str, Path]:
    """A model repository at `root` serving the materialised graph as model `kit.name`,
    version 1 (no rollout graph); returns the model's name and its graph's path."""
    graph = materialise(kit, root / kit.name / "1", seed)
    digest = hashlib.sha256(graph.read_bytes()).hexdigest()
    spec_of(kit, kit.name, digest).dump(root / kit.name / SPEC_FILENAME)
    return kit.name, graph


# --- writing the kits (PyTorch and onnx: on a development machine) ------------------------------


def _fill(values: np.ndarray) -> list[Any]:
    flat = values.astype(np.float64).ravel()
    if flat.size and np.all(flat == flat[0]):
        return ["constant", float(flat[0])]
    return ["normal", float(flat.mean()), float(flat.std())]


def write_kit(size: str, form: str, out: Path = GRAPHS) -> dict[str, Any]:
    """Export the reference ViT of `size` in `form`, keep its skeleton and manifest in `out`."""
    import onnx
    import torch
    from onnx import external_data_helper, numpy_helper

    from export.onnx_export import architecture_of, parity_grids, stage_graph
    from export.vit import VisionTransformer, ViTConfig

    torch.manual_seed(0)
    cfg = ViTConfig(**SIZES[size], mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    model = VisionTransformer(cfg).eval()
    with torch.no_grad():  # the reference initialises the head to zero: all logits equal
        model.head.weight.normal_(0.0, 0.2)
    kit = GraphKit(size, form)
    with tempfile.TemporaryDirectory() as tmp:
        staged = stage_graph(model, Path(tmp), form, parity_grids(cfg.grid)[:3])  # type: ignore[arg-type]
        graph = onnx.load(str(staged.path))
        external_data_helper.convert_model_to_external_data(
            graph,
            all_tensors_to_one_file=True,
            location=DATA_FILENAME,
            size_threshold=EXTERNAL_BYTES,
            convert_attribute=False,
        )
        folder = Path(tmp) / "kit"
        folder.mkdir()
        onnx.save_model(graph, str(folder / GRAPH_FILENAME))  # writes the data file beside it
        saved = onnx.load(str(folder / GRAPH_FILENAME), load_external_data=False)
        tensors = []
        for init in saved.graph.initializer:
            if not external_data_helper.uses_external_data(init):
                continue
            if init.data_type not in _DTYPES:
                raise ValueError(
                    f"{kit.name}: {init.name} is external and not float: {init.data_type}"
                )
            where = {e.key: e.value for e in init.external_data}
            values = numpy_helper.to_array(init, base_dir=str(folder))
            tensors.append(
                {
                    "name": init.name,
                    "dtype": _DTYPES[init.data_type],
                    "shape": list(init.dims),
                    "offset": int(where.get("offset", 0)),
                    "length": int(where["length"]),
                    "fill": _fill(values),
                }
            )
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / GRAPH_FILENAME, kit.skeleton)
        manifest = {
            "name": kit.name,
            "form": form,
            "architecture": architecture_of(cfg).model_dump(mode="json"),
            "parity": staged.optimization.max_abs_diff,
            "data_file": DATA_FILENAME,
            "data_bytes": (folder / DATA_FILENAME).stat().st_size,
            "skeleton_sha256": hashlib.sha256(kit.skeleton.read_bytes()).hexdigest(),
            "tensors": tensors,
        }
        kit.manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=sorted(SIZES), choices=sorted(SIZES))
    p.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    a = p.parse_args(argv)
    for size in a.sizes:
        for form in a.forms:
            manifest = write_kit(size, form)
            kit = GraphKit(size, form)
            print(
                f"{kit.name}: skeleton {kit.skeleton.stat().st_size / 1024:.0f} KiB, "
                f"{len(manifest['tensors'])} external tensors, "
                f"{manifest['data_bytes'] / 2**20:.1f} MiB of weights at run time, "
                f"parity {manifest['parity']:.2e}"
            )


if __name__ == "__main__":
    main()
