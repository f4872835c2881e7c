"""timm ViTs -> the reference model: the vit_* family with a class token, any size.

Built through timm itself (`timm.create_model`, so timm's own checkpoint filter reads the file)
and then mapped from the module, whose attributes say what the weights cannot: heads, pooling,
fc_norm, LayerNorm eps, and the block variants the reference model does not implement, which are
refused. Preprocessing and labels come from timm's data config for the model
(`resolve_data_config`: input size, crop_pct, crop_mode, interpolation, mean/std) and its
ImageNet class names. Other grids resample position embeddings as timm's
`resample_abs_pos_embed` does: bicubic with antialias (`export.vit.antialiased_bicubic_weights`).

The model is built with `dynamic_img_size=True` (unless `model_args` says otherwise), so that
timm's own forward, the export's reference, takes every grid: timm then resamples its position
embeddings for the input's grid itself (`VisionTransformer._pos_embed`), for a hybrid's
`HybridEmbed` feature map as for pixel patches, and the export compares its graph with timm at
all of its parity grids, not with our reimplementation of the resampling.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from app.models.spec import Preprocess
from export.checkpoints import (
    LoadedViT,
    SourceTensors,
    Triple,
    UnsupportedCheckpointError,
    assemble,
    block_keys,
    class_labels,
    conv_to_linear,
    interpolation_name,
    read_state_dict,
    square_grid,
)
from export.hybrid import assemble_hybrid, map_timm_hybrid_embed
from export.vit import ViTConfig

log = logging.getLogger(__name__)


def load_timm(
    name: str,
    pretrained: bool = False,
    weights: Path | None = None,
    model_args: dict[str, Any] | None = None,
) -> LoadedViT:
    """A timm ViT by name: timm's pretrained weights (`pretrained`), a weights file, or neither.

    With a weights file the model is built at the file's own sizes: its head's class count and
    (unless `model_args` says otherwise) its position embeddings' grid. `model_args` are
    timm.create_model keyword arguments (embed_dim, depth, num_heads, global_pool, ...).
    """
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    args = dict(model_args or {})
    # timm's forward at any grid (it resamples its own position embeddings): the gate's
    # reference at every parity grid. The weights and the mapping are the same either way.
    args.setdefault("dynamic_img_size", True)
    if weights is None:
        model = timm.create_model(name, pretrained=pretrained, **args)
        # The weights' full name, e.g. vit_base_patch16_224.augreg2_in21k_ft_in1k.
        pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
        tag = pretrained_cfg.get("tag")
        full = f"{pretrained_cfg.get('architecture', name)}.{tag}" if tag else name
        what = "timm pretrained" if pretrained else "random init"
        return from_timm_model(model, checkpoint=f"{full} ({what})")
    if pretrained:
        raise ValueError("pass either pretrained (timm downloads) or a weights file, not both")
    state = read_state_dict(weights)
    if "head.weight" in state:
        args.setdefault("num_classes", state["head.weight"].shape[0])
    model = timm.create_model(name, pretrained=False, **args)
    theirs, ours = state.get("pos_embed"), getattr(model, "pos_embed", None)
    if (
        "img_size" not in args
        and isinstance(theirs, Tensor)
        and isinstance(ours, Tensor)
        and theirs.shape != ours.shape
    ):
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        side = square_grid(theirs.shape[1] - prefix, str(weights))
        args["img_size"] = side * model.patch_embed.patch_size[0]
        log.info(
            "%s: position embeddings for a %dx%d grid; building at that size", weights, side, side
        )
        model = timm.create_model(name, pretrained=False, **args)
    model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    return from_timm_model(model, checkpoint=weights.name)


def _layer_norm_eps(modules: list[nn.Module], what: str) -> float:
    eps = set()
    for m in modules:
        if not isinstance(m, nn.LayerNorm) or m.weight is None or m.bias is None:
            raise UnsupportedCheckpointError(
                f"{what}: {type(m).__name__} is not an affine LayerNorm"
            )
        eps.add(m.eps)
    if len(eps) != 1:
        raise UnsupportedCheckpointError(f"{what}: LayerNorms with different eps {sorted(eps)}")
    return eps.pop()


def _check_timm_block(block: Any, i: int, what: str) -> None:
    """Refuse the block variants our Block cannot compute (they may have no weights to show)."""
    if type(block).__name__ != "Block":
        raise UnsupportedCheckpointError(
            f"{what}: block {i} is a {type(block).__name__}, not Block"
        )
    attn, mlp = block.attn, block.mlp
    identity = nn.Identity()
    # In order, each only asked once the ones before it hold (later ones assume earlier ones).
    checks: list[tuple[str, Callable[[], bool]]] = [
        ("attention of another kind", lambda: type(attn).__name__ == "Attention"),
        ("an MLP of another kind", lambda: type(mlp).__name__ == "Mlp"),
        (
            "layer scale (init_values)",
            lambda: isinstance(block.ls1, nn.Identity) and isinstance(block.ls2, nn.Identity),
        ),
        (
            "qk-norm",
            lambda: (
                isinstance(getattr(attn, "q_norm", identity), nn.Identity)
                and isinstance(getattr(attn, "k_norm", identity), nn.Identity)
            ),
        ),
        (
            "a norm inside attention (scale_attn_norm)",
            lambda: isinstance(getattr(attn, "norm", identity), nn.Identity),
        ),
        (
            "an attention scale other than head_dim**-0.5",
            lambda: math.isclose(attn.scale, attn.head_dim**-0.5),
        ),
        (
            "a norm inside the MLP (scale_mlp_norm)",
            lambda: isinstance(getattr(mlp, "norm", identity), nn.Identity),
        ),
        (
            "an activation other than exact GELU",
            lambda: isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none",
        ),
    ]
    for feature, ok in checks:
        if not ok():
            raise UnsupportedCheckpointError(f"{what}: block {i} has {feature}")


def from_timm_model(model: Any, checkpoint: str = "") -> LoadedViT:
    """Map a timm `VisionTransformer` module (any weights) into the reference model.

    Hybrids (a `HybridEmbed` over a ResNetV2, paper §3.1) map into export.hybrid.HybridViT.
    The model's forward is the reference at every grid if it was built with
    `dynamic_img_size=True`, else at its native grid only.
    """
    what = f"timm {getattr(model, 'default_cfg', {}).get('architecture', type(model).__name__)}"
    if type(model).__name__ != "VisionTransformer":
        raise UnsupportedCheckpointError(
            f"{what}: a {type(model).__name__}, not a VisionTransformer"
        )
    pe = model.patch_embed
    # A hybrid (§3.1): the CNN and its projection are mapped by export/hybrid.py; the checks
    # of a pixel patch embedding do not apply to it.
    hybrid = type(pe).__name__ == "HybridEmbed"
    checks: list[tuple[str, Callable[[], bool]]] = [
        ("no class token", lambda: bool(model.has_class_token)),
        ("register tokens", lambda: model.num_reg_tokens == 0),
        ("no learned position embeddings", lambda: isinstance(model.pos_embed, Tensor)),
        (
            f"global_pool {model.global_pool!r} (token or avg only)",
            lambda: model.global_pool in ("token", "avg") and model.attn_pool is None,
        ),
        ("pooling that includes the class token", lambda: not model.pool_include_prefix),
        (
            "a LayerNorm before the encoder (pre_norm)",
            lambda: isinstance(model.norm_pre, nn.Identity),
        ),
    ]
    if not hybrid:
        checks += _pixel_patch_embed_checks(pe)
    checks += [
        ("no classifier head (num_classes=0)", lambda: isinstance(model.head, nn.Linear)),
        (
            "no final norm (final_norm=False)",
            lambda: (
                not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity))
            ),
        ),
    ]
    for feature, ok in checks:
        if not ok():
            raise UnsupportedCheckpointError(f"{what}: {feature}")
    return _map_timm(model, what, checkpoint, hybrid)


def _pixel_patch_embed_checks(pe: Any) -> list[tuple[str, Callable[[], bool]]]:
    return [
        (
            "a patch embedding that is not Conv2d(P, stride P)",
            lambda: (
                isinstance(pe.proj, nn.Conv2d)
                and tuple(pe.proj.kernel_size) == tuple(pe.proj.stride) == tuple(pe.patch_size)
            ),
        ),
        ("a non-square patch", lambda: pe.patch_size[0] == pe.patch_size[1]),
        ("a patch embedding without bias", lambda: pe.proj.bias is not None),
        ("a norm in the patch embedding", lambda: isinstance(pe.norm, nn.Identity)),
        ("not 3 input channels", lambda: pe.proj.in_channels == 3),
    ]


def _map_timm(model: Any, what: str, checkpoint: str, hybrid: bool) -> LoadedViT:
    from timm.data import ImageNetInfo, infer_imagenet_subset, resolve_data_config

    pe = model.patch_embed
    backbone = map_timm_hybrid_embed(pe, what) if hybrid else None
    for i, block in enumerate(model.blocks):
        _check_timm_block(block, i, what)
    norm = model.fc_norm if isinstance(model.norm, nn.Identity) else model.norm
    eps = _layer_norm_eps([m for b in model.blocks for m in (b.norm1, b.norm2)] + [norm], what)

    data = resolve_data_config({}, model=model)
    mean, std = tuple(data["mean"]), tuple(data["std"])
    if len(mean) != 3 or len(std) != 3:
        raise UnsupportedCheckpointError(f"{what}: mean/std for {len(mean)} channels")
    first = model.blocks[0]
    P = pe.patch_size[0] if backbone is None else backbone.config.stride
    cfg = ViTConfig(
        patch_size=P,
        grid=(int(pe.grid_size[0]), int(pe.grid_size[1])),
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        heads=first.attn.num_heads,
        mlp_dim=first.mlp.fc1.out_features,
        num_classes=model.head.out_features,
        qkv_bias=first.attn.qkv.bias is not None,
        ln_eps=eps,
        pos_interp_antialias=True,  # timm's resample_abs_pos_embed: bicubic, antialias=True
        pool=model.global_pool,
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        mean=cast(Triple, mean),
        std=cast(Triple, std),
    )

    src = SourceTensors(model.state_dict(), what)
    mapped: dict[str, Tensor] = {"cls_token": src.take("cls_token")}
    if backbone is None:
        mapped["patch_embed.proj.weight"] = conv_to_linear(src.take("patch_embed.proj.weight"))
        mapped["patch_embed.proj.bias"] = src.take("patch_embed.proj.bias")
    else:
        # map_timm_hybrid_embed took each of the CNN's tensors once, by module: as many as
        # timm has, or one was left behind (an architecture feature it does not implement).
        cnn_keys = [k for k in src.left if k.startswith("patch_embed.")]
        if len(cnn_keys) != len(backbone.tensors):
            raise UnsupportedCheckpointError(
                f"{what}: {len(cnn_keys)} CNN tensors, {len(backbone.tensors)} of them mapped"
            )
        mapped.update(backbone.tensors)
        src.drop(*cnn_keys)
    pos = src.take("pos_embed")  # (1, [1 +] N, D)
    if model.no_embed_class:
        # deit-3 style: the class token gets no position embedding, i.e. a zero one.
        pos = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    mapped["pos_embed"] = pos
    for i in range(cfg.depth):
        ours, theirs = block_keys(i), f"blocks.{i}"
        for part, name in (
            ("norm1", "norm1"),
            ("qkv", "attn.qkv"),
            ("proj", "attn.proj"),
            ("norm2", "norm2"),
            ("fc1", "mlp.fc1"),
            ("fc2", "mlp.fc2"),
        ):
            mapped[f"{ours[part]}.weight"] = src.take(f"{theirs}.{name}.weight")
            bias = src.take_optional(f"{theirs}.{name}.bias")
            if bias is None and part != "qkv":
                raise UnsupportedCheckpointError(f"{what}: {theirs}.{name} has no bias")
            if bias is not None:
                mapped[f"{ours[part]}.bias"] = bias
    final = "norm" if src.has("norm.weight") else "fc_norm"
    mapped.update(src.take_layer("norm", final))
    mapped.update(src.take_layer("head", "head"))
    src.finish()
    ours_model = (
        assemble(cfg, mapped) if backbone is None else assemble_hybrid(cfg, backbone.config, mapped)
    )

    input_size = tuple(data["input_size"][1:])
    native = (cfg.grid[0] * P, cfg.grid[1] * P)
    if input_size != native:
        log.warning(
            "%s: timm's data config says input %s but the weights' native size is %s; "
            "serving at the native size with the config's crop fraction and interpolation",
            what,
            input_size,
            native,
        )
    crop_mode = data.get("crop_mode") or "center"
    if crop_mode not in ("center", "squash"):
        raise UnsupportedCheckpointError(f"{what}: crop_mode {crop_mode!r} (center or squash only)")
    preprocess = Preprocess(
        resize_mode="squash" if crop_mode == "squash" else "shorter_side",
        crop_pct=float(data["crop_pct"]),
        interpolation=interpolation_name(str(data["interpolation"])),
        mean=cast(Triple, mean),
        std=cast(Triple, std),
    )
    subset = infer_imagenet_subset(model)
    labels = (
        list(ImageNetInfo(subset).label_descriptions())
        if subset is not None
        else class_labels(cfg.num_classes)
    )

    timm_model = model.eval()

    def reference(pixels: Tensor) -> Tensor:
        out: Tensor = timm_model(pixels)
        return out

    cnn = "" if backbone is None else f"; hybrid: {backbone.config.describe()}"
    return LoadedViT(
        model=ours_model,
        labels=labels,
        preprocess=preprocess,
        source=f"{what}; position embeddings resampled as timm does (bicubic, antialiased){cnn}",
        framework="timm",
        checkpoint=checkpoint,
        reference=reference,
        # Without dynamic_img_size timm's forward fails at any grid but the native one (the
        # patch embedding asserts the size; a hybrid's unresampled position embeddings do not
        # add to another number of tokens).
        reference_any_grid=bool(getattr(model, "dynamic_img_size", False)),
    )
