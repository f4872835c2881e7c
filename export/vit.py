"""The reference Vision Transformer (Dosovitskiy et al. 2020, eqs. 1-4) over a dynamic patch grid.

It takes what the service sends, uint8 patch vectors `(B, grid_h, grid_w, P*P*C)` in
(row, col, channel) order, so the exported graph reads the grid from its input's shape and
resamples the learned position embeddings to it. Checkpoints from other libraries are mapped
into this module (export/import_timm.py, import_hf.py, import_torchvision.py) rather than
exported from the library's own code, whose exports bake in the native grid.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ViTConfig:
    patch_size: int = 16
    channels: int = 3
    grid: tuple[int, int] = (14, 14)
    embed_dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    # The MLP's hidden width when it is not int(embed_dim * mlp_ratio) (Hugging Face configs
    # give it as intermediate_size).
    mlp_dim: int | None = None
    num_classes: int = 1000
    qkv_bias: bool = True
    ln_eps: float = 1e-6
    # Per-channel normalisation in 0..1 pixel units; folded into the patch embedding at export.
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # How position embeddings are resampled to another grid, as the source library does it:
    # bicubic, align_corners as in the source (torchvision's offline tool: True); antialias as
    # timm's resampler (PIL's cubic kernel, widened when shrinking: see
    # `antialiased_bicubic_weights`).
    pos_interp_align_corners: bool = False
    pos_interp_antialias: bool = False
    # What the head sees: the class token ("token") or the mean of the patch tokens ("avg").
    pool: Literal["token", "avg"] = "token"
    # The final LayerNorm after pooling (timm's fc_norm) instead of before it. The same thing
    # for token pooling (LayerNorm is per token); for avg pooling it is not.
    fc_norm: bool = False

    def __post_init__(self) -> None:
        if self.pool not in ("token", "avg"):
            raise ValueError(f"pool must be 'token' or 'avg', not {self.pool!r}")
        if self.pos_interp_antialias and self.pos_interp_align_corners:
            raise ValueError("antialiased resampling is implemented for align_corners=False only")

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.channels

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_dim if self.mlp_dim is not None else int(self.embed_dim * self.mlp_ratio)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.heads

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def variant(cls, name: str, **overrides: object) -> ViTConfig:
        """The paper's sizes (Table 1) plus the common Ti/S and a tiny test size."""
        sizes: dict[str, dict[str, int]] = {
            "test": dict(embed_dim=32, depth=2, heads=2),
            "tiny": dict(embed_dim=192, depth=12, heads=3),
            "small": dict(embed_dim=384, depth=12, heads=6),
            "base": dict(embed_dim=768, depth=12, heads=12),
            "large": dict(embed_dim=1024, depth=24, heads=16),
            "huge": dict(embed_dim=1280, depth=32, heads=16),
        }
        if name not in sizes:
            raise ValueError(f"unknown ViT variant {name!r}; choose from {sorted(sizes)}")
        return cls(**{**sizes[name], **overrides})  # type: ignore[arg-type]


def _pil_cubic(x: Tensor) -> Tensor:
    """Keys' cubic kernel with a = -0.5 (PIL's, and torch's antialiased bicubic's)."""
    a = -0.5
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def antialiased_bicubic_weights(in_size: int, out_size: int) -> Tensor:
    """(out_size, in_size) weights of torch's `interpolate(bicubic, antialias=True)` on one axis.

    The algorithm of ATen's `_compute_indices_min_size_weights_aa` (align_corners=False): output
    i is centred at scale * (i + 0.5) in input coordinates, scale = in / out; when shrinking the
    kernel is widened by `scale`; each row is normalised to sum to 1 over the input's extent.
    Written as tensor arithmetic on the sizes, so a traced graph computes the weights for
    whatever grid it is fed (the TorchScript exporter cannot export `_upsample_bicubic2d_aa`).
    """
    out_idx = torch.arange(out_size, dtype=torch.float32)  # (out,)
    in_idx = torch.arange(in_size, dtype=torch.float32)  # (in,)
    scale = torch.full((), float(in_size)) / out_idx.shape[0]  # 0-d, float32 as ATen's
    invscale = torch.where(scale >= 1.0, 1.0 / scale, torch.ones_like(scale))
    center = scale * (out_idx + 0.5)  # (out,)
    w = _pil_cubic((in_idx[None, :] - center[:, None] + 0.5) * invscale)  # (out, in)
    return w / w.sum(dim=1, keepdim=True)


def resample_grid(
    pos: Tensor, size: tuple[int, int], align_corners: bool, antialias: bool = False
) -> Tensor:
    """Bicubically resample a (1, gh, gw, D) grid of position embeddings to `size`."""
    if antialias:
        _, gh, gw, D = pos.shape
        rows = antialiased_bicubic_weights(gh, size[0])  # (h, gh)
        cols = antialiased_bicubic_weights(gw, size[1])  # (w, gw)
        x = (rows @ pos.reshape(gh, gw * D)).reshape(-1, gw, D)  # (h, gw, D)
        x = cols @ x  # (h, w, D): (w, gw) @ (h, gw, D) broadcast over h
        return x.unsqueeze(0)  # (1, h, w, D)
    grid = pos.permute(0, 3, 1, 2)  # (1, D, gh, gw)
    grid = F.interpolate(grid, size=size, mode="bicubic", align_corners=align_corners)
    return grid.permute(0, 2, 3, 1)  # (1, h, w, D)


class PatchEmbed(nn.Module):
    """Linear embedding of uint8 patch vectors, with mean/std normalisation in front of it.

    `fold_normalisation` moves the normalisation into the linear weights, so the exported graph
    does one cast and one matmul per patch and the service does no per-pixel float work.
    """

    scale: Tensor
    shift: Tensor

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.patch_dim, cfg.embed_dim)
        mean = torch.tensor(cfg.mean).repeat(cfg.patch_size * cfg.patch_size)  # (P*P*C,)
        std = torch.tensor(cfg.std).repeat(cfg.patch_size * cfg.patch_size)
        # x_norm = (x / 255 - mean) / std = x * scale + shift
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -mean / std)
        self.folded = False

    def forward(self, patches: Tensor) -> Tensor:
        """uint8 patches, or patches already cast to float32 (`VisionTransformer` casts first)."""
        x = patches if patches.dtype == torch.float32 else patches.to(torch.float32)
        if not self.folded:
            x = x * self.scale + self.shift
        out: Tensor = self.proj(x)
        return out

    @torch.no_grad()
    def fold_normalisation(self) -> None:
        w = self.proj.weight  # (D, P*P*C)
        self.proj.bias.add_(w @ self.shift)
        w.mul_(self.scale[None, :])
        self.scale.fill_(1.0)
        self.shift.zero_()
        self.folded = True


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: Tensor, need_probs: bool = False) -> tuple[Tensor, Tensor | None]:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, nh, T, hd)
        attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)  # (B, nh, T, T)
        probs = attn.softmax(dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(B, T, D)
        return self.proj(out), (probs if need_probs else None)


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        hidden = cfg.mlp_hidden
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc2(F.gelu(self.fc1(x)))
        return out


class Block(nn.Module):
    """Pre-LN encoder block: z' = MSA(LN(z)) + z; z = MLP(LN(z')) + z'."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, need_probs: bool = False) -> tuple[Tensor, Tensor | None]:
        a, probs = self.attn(self.norm1(x), need_probs)
        x = x + a
        x = x + self.mlp(self.norm2(x))
        return x, probs


@dataclass
class ViTOutput:
    logits: Tensor  # (B, num_classes)
    attentions: list[Tensor] = field(default_factory=list)  # per block (B, nh, T, T)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        gh, gw = cfg.grid
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + gh * gw, cfg.embed_dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.head.weight)

    def position_embeddings(self, grid_h: int, grid_w: int) -> Tensor:
        """(1, 1 + grid_h*grid_w, D): the class token's embedding as is, the grid's resampled."""
        gh, gw = self.cfg.grid
        cls_pos = self.pos_embed[:, :1]
        grid = self.pos_embed[:, 1:].reshape(1, gh, gw, -1)
        exporting = torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()
        if not exporting and (grid_h, grid_w) == (gh, gw):
            return self.pos_embed
        # Traced for export: always resample, so the graph serves every grid (at the native
        # grid bicubic resampling with align_corners=False is the identity).
        grid = resample_grid(
            grid,
            (grid_h, grid_w),
            self.cfg.pos_interp_align_corners,
            self.cfg.pos_interp_antialias,
        )
        return torch.cat([cls_pos, grid.reshape(1, grid_h * grid_w, -1)], dim=1)

    def forward_features(self, patches: Tensor, need_probs: bool = False) -> ViTOutput:
        # Cast first and read the grid from the cast tensor: in the graph, `patches` then feeds
        # one Cast and nothing else. TensorRT takes uint8 only as a network input or output, so
        # a Shape node reading the uint8 input directly keeps it from parsing the graph. (The
        # rollout graph casts before calling this: no second Cast then.)
        pixels = patches if patches.dtype == torch.float32 else patches.to(torch.float32)
        B, grid_h, grid_w, _ = pixels.shape
        x = self.patch_embed(pixels).reshape(B, grid_h * grid_w, -1)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1+N, D)
        x = x + self.position_embeddings(grid_h, grid_w)
        attentions: list[Tensor] = []
        for block in self.blocks:
            x, probs = block(x, need_probs)
            if probs is not None:
                attentions.append(probs)
        y = self.pool(x)  # (B, D)
        return ViTOutput(logits=self.head(y), attentions=attentions)

    def pool(self, x: Tensor) -> Tensor:
        """(B, 1+N, D) encoder output -> (B, D), final LayerNorm included."""
        y: Tensor
        if self.cfg.pool == "token":
            y = self.norm(x[:, 0])  # the same as norm-then-pick: LayerNorm is per token
        elif self.cfg.fc_norm:
            y = self.norm(x[:, 1:].mean(dim=1))
        else:
            y = self.norm(x[:, 1:]).mean(dim=1)
        return y

    def forward(self, patches: Tensor) -> Tensor:
        return self.forward_features(patches).logits

    def folded(self) -> VisionTransformer:
        """A copy with normalisation folded into the patch embedding, ready to export."""
        model = copy.deepcopy(self).eval()
        model.patch_embed.fold_normalisation()
        return model


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, H, W, C) images -> (B, H/P, W/P, P*P*C) patch vectors in (row, col, channel) order."""
    B, H, W, C = images.shape
    P = patch_size
    x = images.reshape(B, H // P, P, W // P, P, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H // P, W // P, P * P * C)


def unpatchify(patches: Tensor, patch_size: int) -> Tensor:
    """`patchify`'s inverse: (B, gh, gw, P*P*C) patch vectors -> (B, gh*P, gw*P, C) images."""
    B, gh, gw, _ = patches.shape
    P = patch_size
    x = patches.reshape(B, gh, gw, P, P, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, gh * P, gw * P, -1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
