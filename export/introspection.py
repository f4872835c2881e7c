"""What a ViT has learned (paper §4.5, Fig. 7), computed at export, beside the graphs.

Three panels, per model version:

- the principal components of the patch embedding's filters (Fig. 7 left): the rows of E are
  filters over a patch's P*P*C normalised pixels; their first 28 principal components (centred
  over the D filters) are shown as RGB patches. A hybrid has no pixel filters: its E is the
  projection of the CNN's feature-map cells, so its components are vectors over the feature
  channels (times the projection's kxk cells), shown as tiles of channel weights;
- the cosine similarity of the position embeddings (Fig. 7 centre): served from the rollout
  graph's `position_embeddings` output, at the native grid or any grid the graph is fed, so
  a resampled grid shows exactly what the served graph adds to its tokens (§3.2);
- the mean attention distance per head and depth (Fig. 7 right): for each patch query, the
  distance in input pixels to every patch key weighted by its attention (renormalised over the
  patch keys: the class token has no position in the image), averaged over the queries. The
  rollout graph computes it in-graph as its `attention_distance` output, so the service can
  measure one uploaded image on ONNX Runtime alone; here it is averaged over held-out images.

`python -m export.introspection` adds these to versions exported before they existed, from the
checkpoint they were exported from (checked against each version's graph first).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from numpy.typing import NDArray
from torch import Tensor

from app.models.spec import (
    INTROSPECTION_FILENAME,
    ROLLOUT_GRAPH_FILENAME,
    SPEC_FILENAME,
    ModelSpec,
    TensorSpec,
)
from export.hybrid import HybridPatchEmbed
from export.rollout import RolloutViT, rollout
from export.vit import VisionTransformer

log = logging.getLogger(__name__)

COMPONENTS = 28  # Fig. 7 shows the first 28
DISTANCE_ATOL = 1e-4  # pixels: the in-graph attention distance against PyTorch's
INTROSPECTION_FORMAT = "vit-serve-introspection/1"


def introspection_outputs(embed_dim: int, depth: int, heads: int) -> list[TensorSpec]:
    """The rollout graph's outputs beyond `logits` and `rollout` (the service's introspection)."""
    return [
        TensorSpec(name="attention_distance", dtype="float32", shape=["batch", depth, heads]),
        TensorSpec(
            name="position_embeddings", dtype="float32", shape=["grid_h", "grid_w", embed_dim]
        ),
    ]


def patch_distances(grid_h: int, grid_w: int, pixels_per_patch: int) -> Tensor:
    """(N, N) distances in input pixels between patch centres, N = grid_h * grid_w.

    Built from the sizes with tensor arithmetic, so a traced graph computes it for its grid.
    """
    rows = torch.arange(grid_h, dtype=torch.float32)[:, None].expand(grid_h, grid_w).reshape(-1)
    cols = torch.arange(grid_w, dtype=torch.float32)[None, :].expand(grid_h, grid_w).reshape(-1)
    dy = rows[:, None] - rows[None, :]
    dx = cols[:, None] - cols[None, :]
    return torch.sqrt(dy * dy + dx * dx) * float(pixels_per_patch)


def attention_distance(
    attentions: list[Tensor], grid_h: int, grid_w: int, pixels_per_patch: int
) -> Tensor:
    """Per-block (B, nh, T, T) probabilities -> (B, depth, nh) mean attention distance, pixels."""
    dist = patch_distances(grid_h, grid_w, pixels_per_patch)  # (N, N)
    per_block = []
    for attn in attentions:
        patches = attn[:, :, 1:, 1:]  # (B, nh, N, N): patch queries and keys
        weighted = (patches * dist).sum(dim=-1) / patches.sum(dim=-1)  # (B, nh, N)
        per_block.append(weighted.mean(dim=-1))  # (B, nh)
    return torch.stack(per_block, dim=1)  # (B, depth, nh)


class IntrospectionRolloutViT(RolloutViT):
    """The rollout graph's module: rollout, plus the attention distance and the grid's position
    embeddings, which cost the graph little: its attentions and resampled embeddings are there."""

    def forward(  # type: ignore[override]
        self, patches: Tensor, head_fusion: Tensor, discard_ratio: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pixels = patches.to(torch.float32)  # cast first, as the plain graph (export/vit.py)
        B, grid_h, grid_w, _ = pixels.shape
        out = self.model.forward_features(pixels, need_probs=True)
        joint = rollout(out.attentions, head_fusion, discard_ratio)
        cls_row = joint[:, 0, 1:]  # (B, N): what the class token gathered from each patch
        distance = attention_distance(out.attentions, grid_h, grid_w, self.model.cfg.patch_size)
        pos = self.model.position_embeddings(grid_h, grid_w)[0, 1:]  # (N, D), the patches'
        return (
            out.logits,
            cls_row.reshape(B, grid_h, grid_w),
            distance,
            pos.reshape(grid_h, grid_w, -1),
        )


# ---------------------------------------------------------------------------------------------
# The filters' principal components


@dataclass
class FilterComponents:
    components: NDArray[np.float64]  # (k, dim), orthonormal rows
    explained_variance_ratio: NDArray[np.float64]  # (k,)
    shape: list[int]  # how one component is laid out: [P, P, C] or [channels, k, k]
    shown: str


def filter_matrix(model: VisionTransformer) -> tuple[NDArray[np.float64], list[int], str]:
    """E's rows as (D, dim) in the units the model normalises to, and how to lay one out."""
    pe = model.patch_embed
    if isinstance(pe, HybridPatchEmbed):
        w = pe.proj.weight.detach().double()  # (D, C_feat, k, k)
        D, C, k, _ = w.shape
        shown = (
            f"the patch projection E over the CNN's {C}-channel feature map "
            f"({k}x{k} cells; a hybrid has no pixel filters): each component is a vector over "
            "the channels, drawn as a tile of channel weights"
        )
        return w.reshape(D, -1).numpy(), [C, k, k], shown
    cfg = model.cfg
    w = pe.proj.weight.detach().double()  # (D, P*P*C) in (row, col, channel) order
    if pe.folded:
        # Undo the fold: the filters act on normalised pixels, as the paper's do.
        w = w / pe.scale.double()[None, :]
    shown = f"the patch embedding's {cfg.patch_size}x{cfg.patch_size} RGB filters"
    return w.numpy(), [cfg.patch_size, cfg.patch_size, cfg.channels], shown


def filter_components(model: VisionTransformer, count: int = COMPONENTS) -> FilterComponents:
    """The first `count` principal components of E's filters (rows), signs fixed."""
    filters, shape, shown = filter_matrix(model)
    centred = filters - filters.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(count, vt.shape[0])
    comps = vt[:k]
    # An SVD's signs are arbitrary: make each component's largest entry positive, so exports
    # of the same weights draw the same picture.
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    comps = comps * signs[:, None]
    var = s**2
    return FilterComponents(comps, var[:k] / var.sum(), shape, shown)


# ---------------------------------------------------------------------------------------------
# Mean attention distance over held-out images, on the graph the service runs


def graph_attention_distance(
    graph: Path, patches: NDArray[np.uint8], batch: int = 50
) -> NDArray[np.float64]:
    """(n, depth, heads) attention distances of `patches` from a rollout graph (ONNX Runtime)."""
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    out = []
    for i in range(0, len(patches), batch):
        feeds = {
            "patches": patches[i : i + batch],
            "head_fusion": np.array(0, np.int64),
            "discard_ratio": np.array(0.0, np.float32),
        }
        (d,) = session.run(["attention_distance"], feeds)
        out.append(d.astype(np.float64))
    return np.concatenate(out)


def check_distance_parity(
    model: VisionTransformer, graph: Path, grids: list[tuple[int, int]], seed: int = 0
) -> dict[str, float]:
    """Max |distance_torch - distance_onnx| per grid; the caller holds it to DISTANCE_ATOL."""
    gen = torch.Generator().manual_seed(seed)
    report: dict[str, float] = {}
    for gh, gw in grids:
        patches = torch.randint(
            0, 256, (2, gh, gw, model.cfg.patch_dim), dtype=torch.uint8, generator=gen
        )
        with torch.no_grad():
            out = model.forward_features(patches, need_probs=True)
            want = attention_distance(out.attentions, gh, gw, model.cfg.patch_size).numpy()
        got = graph_attention_distance(graph, patches.numpy())
        report[f"{gh}x{gw}"] = float(np.abs(got - want).max())
    return report


def introspection_record(
    model: VisionTransformer,
    rollout_graph: Path,
    held_out: NDArray[np.uint8] | None,
    held_out_description: str,
) -> dict[str, Any]:
    """introspection.json's content for one version."""
    fc = filter_components(model)
    record: dict[str, Any] = {
        "format": INTROSPECTION_FORMAT,
        "filters": {
            "shown": fc.shown,
            "shape": fc.shape,
            "components": np.round(fc.components, 6).tolist(),
            "explained_variance_ratio": np.round(fc.explained_variance_ratio, 6).tolist(),
        },
        "attention_distance": None,
    }
    if held_out is not None and len(held_out):
        d = graph_attention_distance(rollout_graph, held_out)  # (n, depth, heads)
        record["attention_distance"] = {
            "images": int(d.shape[0]),
            "held_out": held_out_description,
            "grid": [int(held_out.shape[1]), int(held_out.shape[2])],
            "pixels_per_patch": model.cfg.patch_size,
            "mean_px": np.round(d.mean(axis=0), 4).tolist(),  # (depth, heads)
            "std_px": np.round(d.std(axis=0), 4).tolist(),
        }
    else:
        log.warning("no held-out images: introspection.json has no mean attention distance")
    return record


def write_record(record: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(record, separators=(",", ":")) + "\n")


# ---------------------------------------------------------------------------------------------
# Adding introspection to versions exported before it


def add_to_repository(
    model: VisionTransformer,
    repo: Path,
    name: str,
    held_out: NDArray[np.uint8] | None,
    held_out_description: str,
    versions: list[int] | None = None,
) -> ModelSpec:
    """Re-export each version's rollout graph with the introspection outputs, and write
    introspection.json beside it; `model` must be what the versions were exported from."""
    from app.models.repository import sha256_of
    from export.onnx_export import (
        ParityError,
        _log_and_check,
        check_rollout_parity,
        export_rollout_graph,
        parity_grids,
    )

    spec_path = repo / name / SPEC_FILENAME
    spec = ModelSpec.load(spec_path)
    model = model.eval()
    grids = parity_grids(model.cfg.grid)
    files = dict(spec.versions)
    for version in versions or sorted(files):
        folder = repo / name / str(version)
        # The old rollout graph is fp32 as traced whatever the version's form: it says whether
        # these weights are the version's.
        old = check_rollout_parity(model, folder / ROLLOUT_GRAPH_FILENAME, [model.cfg.grid])
        if not old.passed:
            raise ParityError(
                f"{name} version {version} was not exported from these weights "
                f"(max |rollout diff| {old.worst:.2e} > {old.atol:.0e}); nothing written"
            )
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / ROLLOUT_GRAPH_FILENAME
            export_rollout_graph(model.folded(), staged)
            _log_and_check("rollout", check_rollout_parity(model, staged, grids))
            check_distances(model, staged, grids)
            record = introspection_record(model, staged, held_out, held_out_description)
            staged_record = Path(tmp) / INTROSPECTION_FILENAME
            write_record(record, staged_record)
            shutil.move(staged, folder / ROLLOUT_GRAPH_FILENAME)
            shutil.move(staged_record, folder / INTROSPECTION_FILENAME)
        files[version] = files[version].model_copy(
            update={
                "rollout": sha256_of(folder / ROLLOUT_GRAPH_FILENAME),
                "introspection": sha256_of(folder / INTROSPECTION_FILENAME),
            }
        )
        log.info("%s version %d: rollout graph with introspection outputs", name, version)
    arch = spec.architecture
    assert spec.rollout is not None
    rollout_spec = spec.rollout.model_copy(
        update={"introspection": introspection_outputs(arch.embed_dim, arch.depth, arch.heads)}
    )
    spec = spec.model_copy(update={"versions": files, "rollout": rollout_spec})
    spec.dump(spec_path)
    return spec


def check_distances(model: VisionTransformer, graph: Path, grids: list[tuple[int, int]]) -> None:
    from export.onnx_export import ParityError

    report = check_distance_parity(model, graph, grids)
    for grid, diff in report.items():
        log.info("attention distance parity at grid %s: max |diff| %.2e px", grid, diff)
    worst = max(report.values())
    if worst > DISTANCE_ATOL:
        raise ParityError(
            f"the rollout graph's attention distances differ from PyTorch's by {worst:.2e} px "
            f"> {DISTANCE_ATOL:.0e} ({report}); nothing written"
        )


def main(argv: list[str] | None = None) -> int:
    from export.checkpoints import load_checkpoint
    from export.onnx_export import ParityError
    from export.quantize import demo_held_out

    p = argparse.ArgumentParser(prog="python -m export.introspection", description=__doc__)
    p.add_argument("--checkpoint", type=Path, required=True, help="what the versions came from")
    p.add_argument("--name", required=True)
    p.add_argument("--repo", type=Path, default=Path("model_repo"))
    p.add_argument("--version", type=int, action="append", help="default: every version")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    loaded = load_checkpoint(args.checkpoint)
    spec = ModelSpec.load(args.repo / args.name / SPEC_FILENAME)
    held = demo_held_out(spec)
    try:
        add_to_repository(
            loaded.model, args.repo, args.name, held.patches, held.description, args.version
        )
    except ParityError as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
