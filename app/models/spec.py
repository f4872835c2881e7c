"""The ModelSpec: the `model.json` contract between the export step and the service.

The service reads only this file and the ONNX graphs beside it, so everything needed to feed a
graph (patch size, native grid, the resize policy the weights were trained with, the labels)
travels with the weights and cannot drift from training. The export step writes it; the service
never imports the export code.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SPEC_FILENAME = "model.json"
GRAPH_FILENAME = "model.onnx"
ROLLOUT_GRAPH_FILENAME = "model.rollout.onnx"
# What a ViT has learned (paper Fig. 7), computed at export beside the graphs.
INTROSPECTION_FILENAME = "introspection.json"
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Backbone(_Frozen):
    """A hybrid's CNN (paper §3.1): the tokens are its feature map's cells, not pixel patches.

    The contract is unchanged: `patch_size` is then the CNN's total stride, so each input patch
    is the pixels of one token's cell.
    """

    kind: str = Field(description="the CNN's family, e.g. resnetv2")
    description: str = Field(description="a short human name, e.g. 'ResNetV2 stem+[2,2,2,2]'")
    stride: int = Field(gt=0, description="pixels per token on each axis (= patch_size)")
    feature_stride: int = Field(gt=0, description="pixels per feature-map cell")
    feature_channels: int = Field(gt=0)
    config: dict[str, object] = Field(default_factory=dict, description="the export's config")


class Architecture(_Frozen):
    """The shape of the network: what a grid of patches must look like to enter it."""

    patch_size: int = Field(gt=0)
    channels: Literal[3] = 3
    grid: tuple[int, int] = Field(description="native (grid_h, grid_w) the weights were trained at")
    embed_dim: int = Field(gt=0)
    depth: int = Field(gt=0)
    heads: int = Field(gt=0)
    num_classes: int = Field(gt=0)
    backbone: Backbone | None = Field(default=None, description="hybrids only: the CNN")

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.channels

    @property
    def native_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def input_size(self) -> tuple[int, int]:
        """The (height, width) in pixels of the native grid."""
        return self.grid[0] * self.patch_size, self.grid[1] * self.patch_size


class Preprocess(_Frozen):
    """The resize policy the weights were trained with (the `crop` policy reproduces it)."""

    resize_mode: Literal["shorter_side", "squash"] = Field(
        default="shorter_side",
        description="shorter_side: scale the shorter side to input/crop_pct, then centre-crop "
        "(timm, torchvision); squash: resize both sides to input/crop_pct, then centre-crop "
        "(Hugging Face; timm's squash crop mode)",
    )
    crop_pct: float = Field(default=1.0, gt=0.0, le=1.0)
    interpolation: Interpolation = "bilinear"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


class TensorSpec(_Frozen):
    name: str
    dtype: Literal["uint8", "int64", "float32", "float16"]
    shape: list[str | int]


class Source(_Frozen):
    framework: str = Field(description="where the weights came from: vit-serve, timm, ...")
    checkpoint: str = ""
    notes: str = ""


OptimizationLevel = Literal["none", "fused", "fp16", "int8"]

HeadFusion = Literal["mean", "max", "min"]
HEAD_FUSIONS: tuple[HeadFusion, ...] = get_args(HeadFusion)


@dataclass(frozen=True)
class RolloutParams:
    """What a request asks of the rollout graph (its two scalar inputs); equal ones batch."""

    head_fusion: HeadFusion = "mean"
    discard_ratio: float = 0.0  # in [0, 1): the fraction of lowest attentions zeroed per block


class Int8Gate(_Frozen):
    """The int8 graph against the fused fp32 graph on held-out inputs, measured at export.

    The export writes an int8 graph only when it passed: top-1 agreement at least
    `min_agreement` and, where the inputs are labelled, accuracy at most `max_accuracy_drop`
    below the fp32 graph's.
    """

    method: str = Field(description="how the graph was quantised")
    held_out: str = Field(description="the held-out inputs the gate ran on")
    inputs: int = Field(gt=0)
    top1_agreement: float = Field(description="share of inputs with the fp32 graph's top-1")
    max_abs_logit_diff: float = Field(description="worst |logit_int8 - logit_fp32|")
    accuracy_fp32: float | None = Field(default=None, description="labelled inputs only")
    accuracy_int8: float | None = Field(default=None, description="labelled inputs only")
    min_agreement: float
    max_accuracy_drop: float | None = None


class GraphOptimization(_Frozen):
    """What the export step did to model.onnx after tracing it (model.rollout.onnx: nothing).

    Either way the contract holds (uint8 `patches`, float32 `logits`); the service needs none
    of this to feed the graph, it is the record of how the graph was made and checked.
    """

    level: OptimizationLevel = Field(
        default="none",
        description="none: as traced, fp32; fused: ONNX Runtime fused ops (attention, "
        "LayerNormalization, BiasGelu) and unread rows left out, fp32; fp16: fused, float16 "
        "inside; int8: fused, int8 weights and activations in the matrix products",
    )
    fused_ops: dict[str, int] = Field(
        default_factory=dict, description="fused operator type -> nodes in the graph"
    )
    class_token_tail: bool = Field(
        default=False,
        description="the last block computes only the class token's row, the one the head "
        "reads (token pooling)",
    )
    max_abs_diff: float | None = Field(
        default=None,
        description="worst |logit - PyTorch's| over the parity grids (fp16: against the "
        "fused fp32 graph)",
    )
    int8: Int8Gate | None = Field(
        default=None, description="int8 only: the accuracy gate the graph passed at export"
    )


class GraphFiles(_Frozen):
    """sha256 of each graph file of one version, checked when the version is loaded."""

    model: str = Field(description="sha256 of model.onnx")
    rollout: str | None = Field(default=None, description="sha256 of model.rollout.onnx")
    introspection: str | None = Field(
        default=None,
        description="sha256 of introspection.json; set only where this version's rollout graph "
        "has the introspection outputs (RolloutGraph.introspection)",
    )
    # Per version, not per model: versions of one model may be exported differently.
    optimization: GraphOptimization = Field(default_factory=GraphOptimization)


class RolloutGraph(_Frozen):
    """The rollout graph's contract: same weights, a `rollout` output, two extra inputs."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    head_fusions: list[str] = Field(
        default=["mean", "max", "min"], description="the `head_fusion` input's values, in order"
    )
    # Outputs beyond `outputs` that only the introspection endpoints fetch (attention distance
    # per block and head, the grid's position embeddings); the rollout path never asks for them.
    introspection: list[TensorSpec] = Field(default_factory=list)


class ModelSpec(_Frozen):
    name: str = Field(pattern=MODEL_NAME_PATTERN)
    architecture: Architecture
    preprocess: Preprocess
    labels: list[str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    rollout: RolloutGraph | None = None
    source: Source
    versions: dict[int, GraphFiles] = Field(default_factory=dict)

    @field_validator("labels")
    @classmethod
    def _labels_not_empty(cls, labels: list[str]) -> list[str]:
        if not labels:
            raise ValueError("labels must not be empty")
        return labels

    @model_validator(mode="after")
    def _labels_match_classes(self) -> ModelSpec:
        if len(self.labels) != self.architecture.num_classes:
            raise ValueError(
                f"{len(self.labels)} labels for {self.architecture.num_classes} classes"
            )
        return self

    @property
    def input_name(self) -> str:
        return self.inputs[0].name

    @classmethod
    def load(cls, path: Path) -> ModelSpec:
        return cls.model_validate(json.loads(path.read_text()))

    def dump(self, path: Path) -> None:
        """Write `path` whole or not at all: the server polls the repository and may read
        model.json at any moment, so the new text goes to a hidden temporary file beside it
        (not matched by the poller's `*/model.json`), reaches the disk, and then replaces the
        old file in one rename. A reader sees the old file or the new one, never a part."""
        text = self.model_dump_json(indent=2) + "\n"
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as file:
                os.fchmod(file.fileno(), mode)  # mkstemp's 0600 would hide it from the server
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        # The rename is an entry in the folder: sync that too, or a crash may undo it.
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def contract_tensors(
    arch: Architecture,
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph inputs and outputs the ONNX contract fixes for an architecture."""
    inputs = [
        TensorSpec(
            name="patches", dtype="uint8", shape=["batch", "grid_h", "grid_w", arch.patch_dim]
        )
    ]
    outputs = [TensorSpec(name="logits", dtype="float32", shape=["batch", arch.num_classes])]
    return inputs, outputs


def rollout_contract(arch: Architecture) -> RolloutGraph:
    """The rollout graph's inputs and outputs for an architecture."""
    inputs, outputs = contract_tensors(arch)
    return RolloutGraph(
        inputs=[
            *inputs,
            TensorSpec(name="head_fusion", dtype="int64", shape=[]),
            TensorSpec(name="discard_ratio", dtype="float32", shape=[]),
        ],
        outputs=[
            *outputs,
            TensorSpec(name="rollout", dtype="float32", shape=["batch", "grid_h", "grid_w"]),
        ],
    )
