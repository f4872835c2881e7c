"""Hybrid ViTs (paper §3.1): a ResNetV2 stem and stages, then the transformer over its feature map.

"The patch embedding projection E is applied to patches extracted from a CNN feature map." The
graph keeps the ONNX contract: uint8 patches `(B, grid_h, grid_w, P*P*C)` in, where P is the
backbone's total stride (stem, stages and the projection's own stride together), so one input
patch is the receptive-field step of one token. In the graph the patches are put back into the
image, normalised, run through the CNN, and the feature map's cells (kxk cells when the
projection has a kernel k > 1, as timm's `vit_tiny_r_s16_p8_224`) become the tokens; position
embeddings are then resampled for the grid exactly as for the plain ViT.

The CNN is timm's ResNetV2 as its hybrids build it (weight-standardised convolutions with TF
"same" padding, GroupNorm, non-pre-activation bottlenecks), written here with static padding:
every side the graph sees is a multiple of P, so "same" padding is the same at every grid
(`kernel - stride` in total), and a graph with fixed pads serves every grid. timm computes it
from the input's size, which a traced graph would bake in. Weight standardisation is folded
into the convolutions' weights at export; the pixel normalisation is not folded into the first
convolution (its zero padding is in normalised units), it is one multiply-add per pixel.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from export.vit import VisionTransformer, ViTConfig


@dataclass(frozen=True)
class StageConfig:
    """One ResNetV2 stage: `blocks` bottlenecks, the first one strided and projecting."""

    blocks: int
    out_chs: int
    mid_chs: int
    stride: int


@dataclass(frozen=True)
class BackboneConfig:
    """The CNN in front of the transformer; `stride` is the P of the ONNX contract."""

    stem_chs: int = 64
    stem_kernel: int = 7
    stem_stride: int = 2
    stem_pool: bool = True  # a 3x3 max pool with stride 2 after the stem convolution
    stages: tuple[StageConfig, ...] = ()
    proj_kernel: int = 1  # the patch projection: kxk, stride k, over the feature map
    gn_groups: int = 32
    gn_eps: float = 1e-5
    std_eps: float = 1e-8  # weight standardisation's eps

    @property
    def feature_stride(self) -> int:
        """Pixels per feature-map cell."""
        return (
            self.stem_stride
            * (2 if self.stem_pool else 1)
            * math.prod(s.stride for s in self.stages)
        )

    @property
    def stride(self) -> int:
        """Pixels per token on each axis: the contract's patch size."""
        return self.feature_stride * self.proj_kernel

    @property
    def feature_chs(self) -> int:
        return self.stages[-1].out_chs if self.stages else self.stem_chs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BackboneConfig:
        stages = tuple(StageConfig(**s) for s in raw.get("stages", ()))
        return cls(**{**raw, "stages": stages})

    def describe(self) -> str:
        """A short name for model.json and the page, e.g. 'ResNetV2 stem+[2,2,2,2] s32'."""
        depths = ",".join(str(s.blocks) for s in self.stages)
        body = f"stem+[{depths}]" if self.stages else "stem"
        return (
            f"ResNetV2 {body}, 1x1 cells"
            if self.proj_kernel == 1
            else (f"ResNetV2 {body}, {self.proj_kernel}x{self.proj_kernel} cells")
        )


def same_pad(kernel: int, stride: int) -> tuple[int, int, int, int]:
    """F.pad's (left, right, top, bottom) of TF "same" padding for sides divisible by stride."""
    total = max(kernel - stride, 0)
    return (total // 2, total - total // 2, total // 2, total - total // 2)


def standardise(weight: Tensor, eps: float) -> Tensor:
    """Weight standardisation per output channel (timm's StdConv2d: biased variance)."""
    flat = weight.reshape(weight.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    var = flat.var(dim=1, unbiased=False, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + eps)).reshape_as(weight)


class StdConv2d(nn.Conv2d):
    """Conv2d, weight-standardised, with static "same" padding and no bias."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, eps: float) -> None:
        super().__init__(in_chs, out_chs, kernel, stride=stride, padding=0, bias=False)
        self.pad = same_pad(kernel, stride)
        self.eps = eps
        self.standardised = False

    def forward(self, x: Tensor) -> Tensor:
        if any(self.pad):
            x = F.pad(x, self.pad)
        w = self.weight if self.standardised else standardise(self.weight, self.eps)
        return F.conv2d(x, w, None, self.stride)

    @torch.no_grad()
    def fold(self) -> None:
        self.weight.copy_(standardise(self.weight, self.eps))
        self.standardised = True


class Bottleneck(nn.Module):
    """timm's non-pre-activation ResNetV2 bottleneck; the stride is on the 3x3 convolution."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        mid_chs: int,
        stride: int,
        project: bool,
        bb: BackboneConfig,
    ) -> None:
        super().__init__()

        def norm(chs: int) -> nn.GroupNorm:
            return nn.GroupNorm(bb.gn_groups, chs, eps=bb.gn_eps)

        self.downsample: nn.Sequential | None = None
        if project:
            self.downsample = nn.Sequential(
                StdConv2d(in_chs, out_chs, 1, stride, bb.std_eps), norm(out_chs)
            )
        self.conv1 = StdConv2d(in_chs, mid_chs, 1, 1, bb.std_eps)
        self.norm1 = norm(mid_chs)
        self.conv2 = StdConv2d(mid_chs, mid_chs, 3, stride, bb.std_eps)
        self.norm2 = norm(mid_chs)
        self.conv3 = StdConv2d(mid_chs, out_chs, 1, 1, bb.std_eps)
        self.norm3 = norm(out_chs)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.conv2(x)))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class Stem(nn.Module):
    def __init__(self, bb: BackboneConfig) -> None:
        super().__init__()
        self.conv = StdConv2d(3, bb.stem_chs, bb.stem_kernel, bb.stem_stride, bb.std_eps)
        self.norm = nn.GroupNorm(bb.gn_groups, bb.stem_chs, eps=bb.gn_eps)
        self.pool = bb.stem_pool

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm(self.conv(x)))
        if self.pool:
            # timm's MaxPool2dSame pads with -inf, so the padding never wins the max.
            x = F.max_pool2d(F.pad(x, same_pad(3, 2), value=-math.inf), 3, 2)
        return x


class HybridPatchEmbed(nn.Module):
    """uint8 (or float) patches (B, gh, gw, P*P*C) -> tokens (B, gh, gw, D) through the CNN."""

    scale: Tensor
    shift: Tensor

    def __init__(self, cfg: ViTConfig, bb: BackboneConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.stem = Stem(bb)
        stages: list[nn.Sequential] = []
        chs = bb.stem_chs
        for s in bb.stages:
            blocks = [
                Bottleneck(
                    chs if i == 0 else s.out_chs,
                    s.out_chs,
                    s.mid_chs,
                    s.stride if i == 0 else 1,
                    i == 0,
                    bb,
                )
                for i in range(s.blocks)
            ]
            stages.append(nn.Sequential(*blocks))
            chs = s.out_chs
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Conv2d(chs, cfg.embed_dim, bb.proj_kernel, stride=bb.proj_kernel)
        # x_norm = (x / 255 - mean) / std = x * scale + shift, per channel
        std = torch.tensor(cfg.std)
        self.register_buffer("scale", (1.0 / (255.0 * std)).reshape(1, 3, 1, 1))
        self.register_buffer("shift", (-torch.tensor(cfg.mean) / std).reshape(1, 3, 1, 1))
        self.folded = False

    def image(self, patches: Tensor) -> Tensor:
        """(B, gh, gw, P*P*C) patch vectors -> (B, C, gh*P, gw*P) float image."""
        B, gh, gw, _ = patches.shape
        P = self.patch_size
        x = patches.reshape(B, gh, gw, P, P, 3).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, P, gw, P)
        return x.reshape(B, 3, gh * P, gw * P)

    def features(self, pixels: Tensor) -> Tensor:
        """(B, C, H, W) pixels 0..255 -> the CNN's feature map (B, C_feat, H/s, W/s)."""
        x = pixels * self.scale + self.shift
        out: Tensor = self.stages(self.stem(x))
        return out

    def forward(self, patches: Tensor) -> Tensor:
        x = patches if patches.dtype == torch.float32 else patches.to(torch.float32)
        tokens: Tensor = self.proj(self.features(self.image(x)))  # (B, D, gh, gw)
        return tokens.permute(0, 2, 3, 1)  # (B, gh, gw, D)

    @torch.no_grad()
    def fold_normalisation(self) -> None:
        """At export: standardise the convolutions' weights once (the pixel normalisation stays)."""
        for m in self.modules():
            if isinstance(m, StdConv2d):
                m.fold()
        self.folded = True


class HybridViT(VisionTransformer):
    """The reference ViT with a CNN patch embedding; `cfg.patch_size` is the backbone's stride."""

    def __init__(self, cfg: ViTConfig, backbone: BackboneConfig) -> None:
        if cfg.patch_size != backbone.stride:
            raise ValueError(
                f"patch_size {cfg.patch_size} is not the backbone's total stride {backbone.stride}"
            )
        super().__init__(cfg)
        self.backbone = backbone
        self.patch_embed = HybridPatchEmbed(cfg, backbone)  # type: ignore[assignment]
        for m in self.patch_embed.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def backbone_record(model: VisionTransformer) -> dict[str, Any] | None:
    """What model.json says of the model's CNN, or None for a plain ViT."""
    if not isinstance(model, HybridViT):
        return None
    bb = model.backbone
    return {
        "kind": "resnetv2",
        "description": bb.describe(),
        "stride": bb.stride,
        "feature_stride": bb.feature_stride,
        "feature_channels": bb.feature_chs,
        "config": bb.to_dict(),
    }


# ---------------------------------------------------------------------------------------------
# timm's hybrids: `HybridEmbed` over a ResNetV2 (or, with no stages, its stem as a Sequential)


@dataclass
class MappedBackbone:
    config: BackboneConfig
    tensors: dict[str, Tensor] = field(default_factory=dict)  # our keys (patch_embed.*)


def _conv_facts(conv: Any, what: str) -> tuple[int, int, float]:
    """(kernel, stride, eps) of a timm StdConv2dSame / StdConv2d, refusing what we cannot do."""
    from export.checkpoints import UnsupportedCheckpointError

    name = type(conv).__name__
    if name not in ("StdConv2dSame", "StdConv2d"):
        raise UnsupportedCheckpointError(f"{what}: a {name}, not a weight-standardised conv")
    k, s = conv.kernel_size[0], conv.stride[0]
    if conv.kernel_size[0] != conv.kernel_size[1] or conv.stride[0] != conv.stride[1]:
        raise UnsupportedCheckpointError(f"{what}: a non-square convolution")
    if conv.bias is not None or conv.groups != 1 or conv.dilation != (1, 1):
        raise UnsupportedCheckpointError(f"{what}: bias, groups or dilation in a convolution")
    # A static padding equal to "same" (stride 1, odd kernel) or timm's dynamic "same".
    dynamic = bool(getattr(conv, "same_pad", False))
    if not dynamic and tuple(conv.padding) != ((k - 1) // 2, (k - 1) // 2):
        raise UnsupportedCheckpointError(f"{what}: padding {conv.padding} is not 'same'")
    if not dynamic and s != 1:
        raise UnsupportedCheckpointError(f"{what}: a strided convolution with static padding")
    return k, s, float(conv.eps)


def _norm_facts(norm: Any, act: bool, what: str) -> tuple[int, float]:
    from export.checkpoints import UnsupportedCheckpointError

    if type(norm).__name__ != "GroupNormAct" or not norm.affine:
        raise UnsupportedCheckpointError(f"{what}: a {type(norm).__name__}, not GroupNormAct")
    want = nn.ReLU if act else nn.Identity
    if not isinstance(norm.act, want) or not isinstance(norm.drop, nn.Identity):
        raise UnsupportedCheckpointError(f"{what}: an activation other than ReLU in a norm")
    return int(norm.num_groups), float(norm.eps)


def map_timm_hybrid_embed(pe: Any, what: str) -> MappedBackbone:
    """timm `HybridEmbed` -> our backbone config and its tensors under `patch_embed.*`."""
    from export.checkpoints import UnsupportedCheckpointError

    bb = pe.backbone
    if type(bb).__name__ == "ResNetV2":
        stem, stages = bb.stem, list(bb.stages)
        if not (isinstance(bb.norm, nn.Identity) and type(bb.head).__name__ == "ClassifierHead"):
            raise UnsupportedCheckpointError(f"{what}: a pre-activation ResNetV2 (final norm)")
        if not isinstance(bb.head.fc, nn.Identity):
            raise UnsupportedCheckpointError(f"{what}: a backbone with a classifier")
    elif isinstance(bb, nn.Sequential) and hasattr(bb, "conv"):
        stem, stages = bb, []
    else:
        raise UnsupportedCheckpointError(f"{what}: a {type(bb).__name__} backbone (ResNetV2 only)")
    children = dict(stem.named_children())
    if set(children) - {"conv", "norm", "pool"}:
        raise UnsupportedCheckpointError(f"{what}: a stem other than timm's 'same' stem")
    k, s, std_eps = _conv_facts(stem.conv, f"{what} stem")
    groups, gn_eps = _norm_facts(stem.norm, True, f"{what} stem")
    pool = "pool" in children
    if pool:
        p = stem.pool
        if type(p).__name__ != "MaxPool2dSame" or p.kernel_size != (3, 3) or p.stride != (2, 2):
            raise UnsupportedCheckpointError(f"{what}: a stem pool other than 3x3/2 'same' max")
    ours: dict[str, Tensor] = {
        "patch_embed.stem.conv.weight": stem.conv.weight,
        "patch_embed.stem.norm.weight": stem.norm.weight,
        "patch_embed.stem.norm.bias": stem.norm.bias,
    }
    stage_cfgs: list[StageConfig] = []
    for i, stage in enumerate(stages):
        blocks = list(stage.blocks)
        first = blocks[0]
        if type(first).__name__ != "Bottleneck" or first.downsample is None:
            raise UnsupportedCheckpointError(f"{what}: stage {i} is not timm's Bottleneck stage")
        stride = first.conv2.stride[0]
        stage_cfgs.append(
            StageConfig(
                blocks=len(blocks),
                out_chs=first.conv3.out_channels,
                mid_chs=first.conv1.out_channels,
                stride=stride,
            )
        )
        for j, block in enumerate(blocks):
            where = f"{what} stage {i} block {j}"
            if type(block).__name__ != "Bottleneck" or not isinstance(block.drop_path, nn.Identity):
                raise UnsupportedCheckpointError(f"{where}: not a plain Bottleneck")
            if (block.downsample is not None) != (j == 0):
                raise UnsupportedCheckpointError(f"{where}: a projection where none is expected")
            if not isinstance(block.act3, nn.ReLU) or block.conv2.groups != 1:
                raise UnsupportedCheckpointError(f"{where}: grouped or non-ReLU bottleneck")
            parts = [("conv1", "norm1", True), ("conv2", "norm2", True), ("conv3", "norm3", False)]
            for conv_name, norm_name, act in parts:
                kk, ss, eps = _conv_facts(getattr(block, conv_name), where)
                g, ge = _norm_facts(getattr(block, norm_name), act, where)
                if (eps, g, ge) != (std_eps, groups, gn_eps):
                    raise UnsupportedCheckpointError(f"{where}: mixed eps or group counts")
                want = (
                    1 if conv_name != "conv2" else 3,
                    stride if conv_name == "conv2" and j == 0 else 1,
                )
                if (kk, ss) != want:
                    raise UnsupportedCheckpointError(f"{where}: {conv_name} is {kk}x{kk}/{ss}")
            mine = f"patch_embed.stages.{i}.{j}."
            block_state = block.state_dict()
            for name, t in block_state.items():
                key = name
                if name.startswith("downsample."):
                    if type(block.downsample).__name__ != "DownsampleConv":
                        raise UnsupportedCheckpointError(f"{where}: an avg-pool projection")
                    _conv_facts(block.downsample.conv, where)
                    _norm_facts(block.downsample.norm, False, where)
                    key = name.replace("downsample.conv.", "downsample.0.").replace(
                        "downsample.norm.", "downsample.1."
                    )
                ours[mine + key] = t
    proj = pe.proj
    if not isinstance(proj, nn.Conv2d) or proj.bias is None:
        raise UnsupportedCheckpointError(f"{what}: a patch projection that is not Conv2d + bias")
    pk = proj.kernel_size[0]
    if tuple(proj.kernel_size) != (pk, pk) or tuple(proj.stride) != (pk, pk):
        raise UnsupportedCheckpointError(f"{what}: a projection with kernel != stride")
    ours["patch_embed.proj.weight"] = proj.weight
    ours["patch_embed.proj.bias"] = proj.bias
    config = BackboneConfig(
        stem_chs=stem.conv.out_channels,
        stem_kernel=k,
        stem_stride=s,
        stem_pool=pool,
        stages=tuple(stage_cfgs),
        proj_kernel=pk,
        gn_groups=groups,
        gn_eps=gn_eps,
        std_eps=std_eps,
    )
    tensors = {key: t.detach().to(torch.float32).clone() for key, t in ours.items()}
    return MappedBackbone(config, tensors)


def assemble_hybrid(
    cfg: ViTConfig, backbone: BackboneConfig, mapped: dict[str, Tensor]
) -> HybridViT:
    """A hybrid reference model with `mapped` (its own key names) loaded; buffers its own."""
    model = HybridViT(cfg, backbone)
    buffers = {name: buf for name, buf in model.named_buffers()}
    model.load_state_dict({**buffers, **mapped}, strict=True)
    return model.eval()
