"""Self-attention exported as one ONNX Runtime `com.microsoft.Attention` node per block.

ONNX Runtime's transformer optimizer fuses attention only when the graph projects Q, K and V
with three separate MatMuls in the shape BERT exports; the reference ViT's single `qkv`
projection never matches, so its attention would stay a dozen small nodes (reshapes,
transposes, two batched MatMuls, a softmax) per block. Instead the export swaps each block's
attention for `FusedAttention`, whose forward in PyTorch is the reference computation and whose
symbolic, for the TorchScript exporter, is the fused contrib op: the packed QKV projection,
scaling, softmax and the weighted sum in one kernel (CPU and CUDA). The output projection stays
a MatMul, as the op leaves it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from export.vit import Attention, Block, VisionTransformer

# The contrib operators' domain and the version `com.microsoft.Attention` is registered at.
CONTRIB_DOMAIN = "com.microsoft"
CONTRIB_OPSET = 1


class _AttentionOp(torch.autograd.Function):
    """softmax(q k^T / sqrt(head_dim)) v over a packed (D, 3D) projection; exports as one node."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, heads: int) -> Tensor:
        B, T, D = x.shape
        head_dim = D // heads
        qkv = (x @ weight + bias).reshape(B, T, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, nh, T, hd)
        probs = ((q * head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        out: Tensor = (probs @ v).transpose(1, 2).reshape(B, T, D)
        return out

    @staticmethod
    def symbolic(g: Any, x: Any, weight: Any, bias: Any, heads: int) -> Any:
        # Attention's weights are (input_hidden, 3 * hidden) with columns [Q | K | V], each
        # head's dims contiguous: exactly nn.Linear's (3D, D) qkv weight transposed, whose
        # output features are ordered (3, heads, head_dim). Its default scale is
        # 1/sqrt(head_dim), as the reference's.
        out = g.op(f"{CONTRIB_DOMAIN}::Attention", x, weight, bias, num_heads_i=heads)
        out.setType(x.type())
        return out


class FusedAttention(nn.Module):
    """The reference `Attention`'s weights, exported as `com.microsoft.Attention` + proj."""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.heads = attn.heads
        self.qkv = attn.qkv
        self.proj = attn.proj

    def forward(self, x: Tensor, need_probs: bool = False) -> tuple[Tensor, Tensor | None]:
        if need_probs:
            # A fused kernel never materialises the probabilities; the rollout graph keeps
            # the reference attention.
            raise ValueError("fused attention has no attention probabilities to return")
        bias = self.qkv.bias
        if bias is None:
            bias = torch.zeros(self.qkv.out_features, dtype=x.dtype)
        out = _AttentionOp.apply(x, self.qkv.weight.t(), bias, self.heads)
        return self.proj(out), None


def with_fused_attention(model: VisionTransformer) -> VisionTransformer:
    """A copy of `model` whose blocks run (and export) fused attention; the same weights.

    Blocks of another kind (export/class_token_tail.py's) are left as they are.
    """
    fused = copy.deepcopy(model).eval()
    for block in fused.blocks:
        if isinstance(block, Block) and isinstance(block.attn, Attention):
            # A drop-in: the same weights and call signature, Block never knows.
            block.attn = FusedAttention(block.attn)  # type: ignore[assignment]
    return fused
