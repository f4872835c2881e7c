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

import torch
from torch import Tensor, nn

from export.vit import VisionTransformer


class HeadFusion(enum.IntEnum):
    """How the heads of one block are fused; the rollout graph takes the number as an input."""

    MEAN = 0
    MAX = 1
    MIN = 2


def fuse_heads(attn: Tensor, fusion: Tensor) -> Tensor:
    """(B, nh, T, T) -> (B, T, T); `fusion` is a 0-d int64 tensor holding a HeadFusion."""
    mean, top, bottom = attn.mean(dim=1), attn.amax(dim=1), attn.amin(dim=1)
    # All three are cheap next to the attention itself; choosing by `where` keeps one graph
    # that serves every fusion instead of a graph per choice.
    return torch.where(
        fusion == HeadFusion.MAX, top, torch.where(fusion == HeadFusion.MIN, bottom, mean)
    )


def discard_lowest(fused: Tensor, ratio: Tensor) -> Tensor:
    """Zero the lowest `ratio` fraction of each image's (T, T) attentions, keeping cls -> cls."""
    B, T, _ = fused.shape
    flat = fused.reshape(B, T * T)
    k = torch.floor(ratio * (T * T)).to(torch.int64)  # how many to discard
    ranked, _ = torch.sort(flat, dim=1)
    kth = ranked.gather(1, (k - 1).clamp(min=0).reshape(1, 1).expand(B, 1))  # (B, 1)
    not_cls_self = torch.arange(T * T, device=fused.device) != 0
    drop = (flat <= kth) & (k > 0) & not_cls_self
    return flat.masked_fill(drop, 0.0).reshape(B, T, T)


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
        B, grid_h, grid_w, _ = patches.shape
        out = self.model.forward_features(patches, need_probs=True)
        joint = rollout(out.attentions, head_fusion, discard_ratio)
        cls_row = joint[:, 0, 1:]  # (B, N): what the class token gathered from each patch
        return out.logits, cls_row.reshape(B, grid_h, grid_w)
