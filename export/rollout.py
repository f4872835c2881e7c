"""Attention rollout (Abnar & Zuidema 2020) inside a graph: where the class token looked.

Per block the heads' attention probabilities are fused (mean, max or min), optionally the
lowest fraction of them is discarded (never the class token's attention to itself), the
identity is added for the residual connection and the rows are renormalised; the per-block
matrices are multiplied through the depth and the class token's row over the patches is
reshaped to the grid. Rows are normalised (the authors' `compute_joint_attention`), not columns.

This lives in a second graph beside the plain one: ONNX Runtime runs every node of a graph
whatever outputs are fetched, so a rollout in the plain graph would cost every request.
"""

from __future__ import annotations

import enum
import warnings

import torch
from torch import Tensor, nn

from export.vit import VisionTransformer


class HeadFusion(enum.IntEnum):
    """How the heads of one block are fused; the rollout graph takes the number as an input."""

    MEAN = 0
    MAX = 1
    MIN = 2


# Scripted, not traced: the TorchScript exporter turns their `if`s into ONNX `If` nodes, so the
# rollout graph runs only the fusion asked for, and sorts attentions only when some are to be
# discarded (the sort was over a third of the graph's time when it always ran).
def _fuse_heads(attn: Tensor, fusion: Tensor) -> Tensor:
    """(B, nh, T, T) -> (B, T, T); `fusion` is a 0-d int64 tensor holding a HeadFusion."""
    if bool(fusion == 1):  # HeadFusion.MAX
        return attn.amax(dim=1)
    if bool(fusion == 2):  # HeadFusion.MIN
        return attn.amin(dim=1)
    return attn.mean(dim=1)


def _discard_lowest(fused: Tensor, ratio: Tensor) -> Tensor:
    """Zero the lowest `ratio` fraction of each image's (T, T) attentions, keeping cls -> cls."""
    B, T, _ = fused.shape
    flat = fused.reshape(B, T * T)
    k = torch.floor(ratio * (T * T)).to(torch.int64)  # how many to discard
    if bool(k > 0):
        ranked, _ = torch.sort(flat, dim=1)
        kth = ranked.gather(1, (k - 1).reshape(1, 1).expand(B, 1))  # (B, 1)
        not_cls_self = torch.arange(T * T, device=fused.device) != 0
        flat = flat.masked_fill((flat <= kth) & not_cls_self, 0.0)
    return flat.reshape(B, T, T)


with warnings.catch_warnings():
    # torch.jit.script announces its deprecation; it is still what puts control flow into a
    # graph exported with the TorchScript exporter, which the rest of the export uses.
    # Its category differs between torch releases (DeprecationWarning, then FutureWarning).
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated")
    fuse_heads = torch.jit.script(_fuse_heads)
    discard_lowest = torch.jit.script(_discard_lowest)


def rollout(attentions: list[Tensor], fusion: Tensor, discard_ratio: Tensor) -> Tensor:
    """Per-block (B, nh, T, T) probabilities -> (B, T, T) joint attention R = Â_L ··· Â_1."""
    joint: Tensor | None = None
    for attn in attentions:
        a = discard_lowest(fuse_heads(attn, fusion), discard_ratio)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a + eye
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a if joint is None else a @ joint
    assert joint is not None, "a ViT has at least one block"
    return joint


class RolloutViT(nn.Module):
    """The same weights with a second output: `rollout` (B, grid_h, grid_w)."""

    def __init__(self, model: VisionTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, patches: Tensor, head_fusion: Tensor, discard_ratio: Tensor
    ) -> tuple[Tensor, Tensor]:
        pixels = patches.to(torch.float32)  # cast first, as the plain graph (export/vit.py)
        B, grid_h, grid_w, _ = pixels.shape
        out = self.model.forward_features(pixels, need_probs=True)
        joint = rollout(out.attentions, head_fusion, discard_ratio)
        cls_row = joint[:, 0, 1:]  # (B, N): what the class token gathered from each patch
        return out.logits, cls_row.reshape(B, grid_h, grid_w)
