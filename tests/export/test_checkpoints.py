"""Importing timm, Hugging Face and torchvision ViTs: the exported graph computes what they do.

Each model is built randomly initialised by its own library at a small size, saved the way
that library saves, imported through `export.checkpoints` or the CLI, exported (which itself
checks ONNX Runtime against our PyTorch model), and then the graph's logits are compared with
the library's own forward: at the native grid and, where the library can run at other sizes
(timm `dynamic_img_size`, Hugging Face `interpolate_pos_encoding`), at smaller, larger and
non-square grids. Nothing is downloaded. Tests skip when their library is not installed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from app.models.spec import SPEC_FILENAME, ModelSpec, Source
from export.__main__ import main
from export.checkpoints import (
    LoadedViT,
    UnsupportedCheckpointError,
    crop_fraction,
    load_checkpoint,
    save_checkpoint,
    source_parity,
)
from export.import_hf import load_hf
from export.import_timm import from_timm_model, load_timm
from export.import_torchvision import load_torchvision
from export.onnx_export import export_to_repository, parity_grids
from export.vit import VisionTransformer, ViTConfig
from tests.export.sources import (
    graph_vs_library,
    hf_vit,
    save_state_dict,
    scramble,
    timm_vit,
    tv_vit,
)

ATOL = 1e-4
SMALL: dict[str, Any] = dict(embed_dim=64, depth=2, num_heads=2)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # The machine is small and shared: OpenMP workers spinning beside other jobs cost more
    # than they give on models this size.
    torch.set_num_threads(1)


def _export(loaded: LoadedViT, repo: Path, name: str = "imported") -> ModelSpec:
    result = export_to_repository(
        loaded.model,
        repo,
        name,
        loaded.labels,
        loaded.preprocess,
        Source(framework=loaded.framework, checkpoint=loaded.checkpoint, notes=loaded.source),
    )
    assert result.parity.passed and result.rollout_parity.passed
    return ModelSpec.load(result.spec_path)


def _graph(repo: Path, name: str = "imported", version: int = 1) -> Path:
    return repo / name / str(version) / "model.onnx"


def _grids(native: tuple[int, int]) -> list[tuple[int, int]]:
    return [*parity_grids(native), (1, 1)]


# ---------------------------------------------------------------------------------------------
# timm

TIMM_VARIANTS: dict[str, dict[str, Any]] = {
    "patch8-token": dict(patch_size=8, img_size=32),
    "patch16-avg-fc_norm": dict(patch_size=16, img_size=64, global_pool="avg"),
    "patch8-avg-no-fc_norm": dict(patch_size=8, img_size=40, global_pool="avg", fc_norm=False),
    "patch14-token-fc_norm": dict(patch_size=14, img_size=56, fc_norm=True),
    "patch32-no-qkv-bias": dict(patch_size=32, img_size=96, qkv_bias=False),
    "patch8-no-embed-class": dict(patch_size=8, img_size=32, no_embed_class=True),
    "patch16-wide-mlp": dict(patch_size=16, img_size=48, mlp_ratio=2.5, depth=3),
}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("variant", sorted(TIMM_VARIANTS))
def test_timm_weights_file_exports_to_a_graph_matching_timm_at_every_grid(
    variant: str, suffix: str, tmp_path: Path
) -> None:
    pytest.importorskip("timm")
    kwargs = {**SMALL, "num_classes": 10, **TIMM_VARIANTS[variant]}
    # timm runs other sizes only with dynamic_img_size; the weights are the same either way.
    library = timm_vit(seed=1, dynamic_img_size=True, **kwargs)
    weights = save_state_dict(library, tmp_path / f"weights{suffix}")
    model_args = {k: v for k, v in kwargs.items() if k not in ("num_classes", "img_size")}
    loaded = load_timm("vit_tiny_patch16_224", weights=weights, model_args=model_args)

    cfg = loaded.model.cfg
    assert cfg.grid == (kwargs["img_size"] // kwargs["patch_size"],) * 2
    assert cfg.pos_interp_antialias and cfg.ln_eps == 1e-6
    assert cfg.pool == kwargs.get("global_pool", "token")
    _export(loaded, tmp_path / "repo")
    diffs = graph_vs_library(
        _graph(tmp_path / "repo"), library, cfg.patch_size, cfg.mean, cfg.std, _grids(cfg.grid)
    )
    print(f"timm {variant} {suffix}: graph vs timm max |logit diff| per grid {diffs}")
    assert max(diffs.values()) <= ATOL, diffs


def test_timm_preprocessing_and_labels_come_from_its_pretrained_config(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    # The default vit_base_patch16_224 weights (augreg2): bicubic, crop 0.9, mean = std = 0.5.
    library = timm_vit(seed=2, name="vit_base_patch16_224", **SMALL)
    weights = save_state_dict(library, tmp_path / "w.safetensors")
    loaded = load_timm("vit_base_patch16_224", weights=weights, model_args=SMALL)
    assert loaded.preprocess.model_dump() == {
        "resize_mode": "shorter_side",
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
    }
    assert len(loaded.labels) == 1000 and loaded.labels[0].startswith("tench")
    assert loaded.framework == "timm" and loaded.checkpoint == "w.safetensors"


def test_timm_training_checkpoint_with_args_and_module_prefix_loads(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    import argparse

    kwargs = {**SMALL, "patch_size": 8, "img_size": 32, "num_classes": 5}
    library = timm_vit(seed=3, **kwargs)
    path = tmp_path / "checkpoint-9.pth.tar"
    torch.save(
        {
            "epoch": 9,
            "arch": "vit_tiny_patch16_224",
            "state_dict": {f"module.{k}": v for k, v in library.state_dict().items()},
            "args": argparse.Namespace(lr=0.1),
        },
        path,
    )
    loaded = load_timm("vit_tiny_patch16_224", weights=path, model_args=dict(SMALL, patch_size=8))
    assert loaded.model.cfg.grid == (4, 4) and loaded.model.cfg.num_classes == 5
    diff = source_parity(loaded)
    assert diff is not None and diff <= ATOL


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        (dict(init_values=1e-5), "layer scale"),
        (dict(reg_tokens=4), "register tokens"),
        (dict(class_token=False, global_pool="avg"), "no class token"),
        (dict(qk_norm=True), "qk-norm"),
        (dict(pre_norm=True), "pre_norm"),
        (dict(global_pool="map"), "global_pool 'map'"),
        (dict(act_layer="gelu_tanh"), "exact GELU"),
    ],
)
def test_timm_features_the_reference_model_lacks_are_refused_with_the_reason(
    kwargs: dict[str, Any], reason: str
) -> None:
    pytest.importorskip("timm")
    model = timm_vit(seed=0, patch_size=8, img_size=32, num_classes=3, **SMALL, **kwargs)
    with pytest.raises(UnsupportedCheckpointError, match=reason):
        from_timm_model(model)


def test_cli_imports_a_timm_weights_file(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    kwargs = {**SMALL, "patch_size": 8, "img_size": 32, "num_classes": 10}
    library = timm_vit(seed=4, **kwargs)
    weights = save_state_dict(library, tmp_path / "w.pth")
    args = json.dumps({**SMALL, "patch_size": 8})
    repo = tmp_path / "repo"
    argv = ["--timm", "vit_tiny_patch16_224", "--weights", str(weights), "--timm-args", args]
    rc = main([*argv, "--name", "tiny-timm", "--repo", str(repo)])
    assert rc == 0
    spec = ModelSpec.load(repo / "tiny-timm" / SPEC_FILENAME)
    assert spec.source.framework == "timm" and spec.source.checkpoint == "w.pth"
    assert spec.architecture.grid == (4, 4) and spec.preprocess.interpolation == "bicubic"


def test_cli_refuses_an_unsupported_timm_model_and_writes_nothing(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    kwargs = {**SMALL, "patch_size": 8, "img_size": 32, "num_classes": 10, "init_values": 0.1}
    weights = save_state_dict(timm_vit(seed=5, **kwargs), tmp_path / "w.pth")
    args = json.dumps({**SMALL, "patch_size": 8, "init_values": 0.1})
    repo = tmp_path / "repo"
    argv = ["--timm", "vit_tiny_patch16_224", "--weights", str(weights), "--timm-args", args]
    rc = main([*argv, "--name", "nope", "--repo", str(repo)])
    assert rc == 1 and not repo.exists()


def test_cli_writes_nothing_when_the_graph_disagrees_with_the_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("timm")
    import dataclasses
    import logging

    import export.__main__ as cli

    kwargs = {**SMALL, "patch_size": 8, "img_size": 32, "num_classes": 10}
    weights = save_state_dict(timm_vit(seed=6, **kwargs), tmp_path / "w.pth")

    def off_by_half(args: Any) -> LoadedViT:
        # timm's forward shifted by 0.5: the graph still matches PyTorch, only the gate
        # against the library can see it.
        loaded = load_timm(args.timm, args.pretrained, args.weights, args.timm_args)
        timm_forward = loaded.reference
        assert timm_forward is not None and loaded.reference_any_grid

        def shifted(pixels: torch.Tensor) -> torch.Tensor:
            return timm_forward(pixels) + 0.5

        return dataclasses.replace(loaded, reference=shifted)

    monkeypatch.setattr(cli, "load", off_by_half)
    argv = ["--timm", "vit_tiny_patch16_224", "--weights", str(weights)]
    argv += ["--timm-args", json.dumps({**SMALL, "patch_size": 8})]
    repo = tmp_path / "repo"
    with caplog.at_level(logging.ERROR):
        assert main([*argv, "--name", "off", "--repo", str(repo), "--optimize", "none"]) == 1
    assert not repo.exists()
    pattern = (
        r"ONNX Runtime logits differ from timm's own forward at grid (4x4|2x2|6x6|2x7): "
        r"max \|diff\| 5\.00e-01 > 1e-04 \(per grid: 4x4: 5\.00e-01, 2x2: 5\.00e-01, "
        r"6x6: 5\.00e-01, 2x7: 5\.00e-01\); nothing written"
    )
    assert re.fullmatch(pattern, caplog.records[-1].getMessage())


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers

HF_VARIANTS: dict[str, dict[str, Any]] = {
    "patch8": dict(patch_size=8, image_size=32),
    "patch16-no-qkv-bias": dict(patch_size=16, image_size=64, qkv_bias=False),
    "patch14-odd-mlp": dict(patch_size=14, image_size=42, intermediate_size=100),
    "patch32-eps1e-6": dict(patch_size=32, image_size=96, layer_norm_eps=1e-6),
}
HF_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


def _hf_forward(model: Any) -> Any:
    def forward(pixels: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = model(pixel_values=pixels, interpolate_pos_encoding=True).logits
        return out

    return forward


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_hf_directory_exports_to_a_graph_matching_transformers_at_every_grid(
    variant: str, tmp_path: Path
) -> None:
    pytest.importorskip("transformers")
    config = {**HF_SMALL, "num_labels": 6, **HF_VARIANTS[variant]}
    library = hf_vit(seed=1, **config)
    library.save_pretrained(tmp_path / "hf")
    loaded = load_hf(tmp_path / "hf")

    cfg = loaded.model.cfg
    assert not cfg.pos_interp_antialias and not cfg.pos_interp_align_corners
    assert cfg.ln_eps == config.get("layer_norm_eps", 1e-12)
    _export(loaded, tmp_path / "repo")
    diffs = graph_vs_library(
        _graph(tmp_path / "repo"),
        _hf_forward(library),
        cfg.patch_size,
        cfg.mean,
        cfg.std,
        _grids(cfg.grid),
    )
    print(f"Hugging Face {variant}: graph vs transformers max |logit diff| per grid {diffs}")
    assert max(diffs.values()) <= ATOL, diffs


def test_hf_labels_and_processor_config_become_the_model_json(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import ViTImageProcessor

    labels = {0: "cat", 1: "dog", 2: "eel"}
    library = hf_vit(seed=2, **HF_SMALL, patch_size=8, image_size=32, id2label=labels)
    library.save_pretrained(tmp_path / "hf")
    ViTImageProcessor(
        size={"height": 32, "width": 32},
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(tmp_path / "hf")
    loaded = load_hf(tmp_path / "hf")
    assert loaded.labels == ["cat", "dog", "eel"]
    assert loaded.preprocess.model_dump() == {
        "resize_mode": "squash",
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
    }
    assert loaded.model.cfg.mean == (0.485, 0.456, 0.406)
    diff = source_parity(loaded)
    assert diff is not None and diff <= ATOL


def test_hf_resize_then_centre_crop_processor_is_a_squash_with_a_crop_fraction(
    tmp_path: Path,
) -> None:
    pytest.importorskip("transformers")
    library = hf_vit(seed=2, **HF_SMALL, patch_size=8, image_size=32)
    library.save_pretrained(tmp_path / "hf")
    # As facebook/deit-*-224 ship: resize to 256x256, centre-crop 224 (here 36 -> 32).
    (tmp_path / "hf" / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "DeiTImageProcessor",
                "size": {"height": 36, "width": 36},
                "do_center_crop": True,
                "crop_size": {"height": 32, "width": 32},
                "resample": 3,
            }
        )
    )
    pre = load_hf(tmp_path / "hf").preprocess
    assert (pre.resize_mode, pre.interpolation) == ("squash", "bicubic")
    assert int(32 / pre.crop_pct) == 36


def test_hf_without_a_processor_config_uses_vit_image_processor_defaults(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    hf_vit(seed=3, **HF_SMALL, patch_size=8, image_size=32).save_pretrained(tmp_path / "hf")
    pre = load_hf(tmp_path / "hf").preprocess
    assert (pre.resize_mode, pre.interpolation, pre.mean) == ("squash", "bilinear", (0.5,) * 3)


def test_hf_activation_other_than_gelu_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    model = hf_vit(seed=3, **HF_SMALL, patch_size=8, image_size=32, hidden_act="gelu_new")
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(UnsupportedCheckpointError, match="gelu_new"):
        load_hf(tmp_path / "hf")


def test_cli_imports_a_hf_directory(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    labels = {i: f"label {i}" for i in range(4)}
    hf_vit(seed=4, **HF_SMALL, patch_size=8, image_size=32, id2label=labels).save_pretrained(
        tmp_path / "hf"
    )
    repo = tmp_path / "repo"
    assert main(["--hf", str(tmp_path / "hf"), "--name", "tiny-hf", "--repo", str(repo)]) == 0
    spec = ModelSpec.load(repo / "tiny-hf" / SPEC_FILENAME)
    assert spec.labels == [f"label {i}" for i in range(4)]
    assert spec.source.framework == "huggingface"
    assert spec.preprocess.resize_mode == "squash"


# ---------------------------------------------------------------------------------------------
# torchvision

TV_SMALL = dict(num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128)


@pytest.mark.parametrize(("patch", "image"), [(8, 32), (16, 64), (14, 56), (32, 64)])
def test_torchvision_state_dict_exports_to_a_graph_matching_torchvision(
    patch: int, image: int, tmp_path: Path
) -> None:
    pytest.importorskip("torchvision")
    library = tv_vit(seed=1, image_size=image, patch_size=patch, num_classes=7, **TV_SMALL)
    weights = save_state_dict(library, tmp_path / "vit.pth")
    loaded = load_torchvision("vit_b_16", weights, num_heads=2)

    cfg = loaded.model.cfg
    assert cfg.grid == (image // patch,) * 2 and cfg.pos_interp_align_corners
    _export(loaded, tmp_path / "repo")
    # torchvision runs only at its native size.
    diffs = graph_vs_library(
        _graph(tmp_path / "repo"), library, cfg.patch_size, cfg.mean, cfg.std, [cfg.grid]
    )
    print(f"torchvision patch {patch} at {image} px: graph vs torchvision {diffs}")
    assert max(diffs.values()) <= ATOL, diffs


def test_torchvision_resampling_at_other_grids_is_its_interpolate_embeddings(
    tmp_path: Path,
) -> None:
    """torchvision cannot run at another size; its offline tool resizes the weights instead."""
    pytest.importorskip("torchvision")
    from torchvision.models.vision_transformer import interpolate_embeddings

    library = tv_vit(seed=2, image_size=32, patch_size=8, num_classes=7, **TV_SMALL)
    loaded = load_torchvision("vit_b_16", save_state_dict(library, tmp_path / "w.pth"), 2)
    _export(loaded, tmp_path / "repo")
    cfg = loaded.model.cfg
    for grid in (2, 6, 9):
        resized = tv_vit(seed=0, image_size=8 * grid, patch_size=8, num_classes=7, **TV_SMALL)
        state = interpolate_embeddings(8 * grid, 8, library.state_dict())
        resized.load_state_dict(state)
        diffs = graph_vs_library(
            _graph(tmp_path / "repo"), resized, 8, cfg.mean, cfg.std, [(grid, grid)]
        )
        assert max(diffs.values()) <= ATOL, (grid, diffs)


def test_torchvision_preprocessing_is_the_weights_preset_for_the_native_size(
    tmp_path: Path,
) -> None:
    pytest.importorskip("torchvision")
    library = tv_vit(seed=3, image_size=224, patch_size=16, num_classes=1000, **TV_SMALL)
    weights = save_state_dict(library, tmp_path / "w.pth")
    v1 = load_torchvision("vit_b_16", weights, num_heads=2)
    # IMAGENET1K_V1: resize 256, centre crop 224, bilinear, ImageNet mean/std and class names.
    assert v1.preprocess.model_dump() == {
        "resize_mode": "shorter_side",
        "crop_pct": 224 / 256,
        "interpolation": "bilinear",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
    }
    assert v1.labels[0] == "tench" and len(v1.labels) == 1000
    swag = load_torchvision("vit_b_16", weights, 2, weights_name="IMAGENET1K_SWAG_LINEAR_V1")
    assert (swag.preprocess.crop_pct, swag.preprocess.interpolation) == (1.0, "bicubic")


def test_torchvision_sizes_must_match_the_named_architecture(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    library = tv_vit(seed=4, image_size=32, patch_size=8, num_classes=7, **TV_SMALL)
    weights = save_state_dict(library, tmp_path / "w.pth")
    with pytest.raises(UnsupportedCheckpointError, match="not vit_l_16's"):
        load_torchvision("vit_l_16", weights)


def test_cli_imports_a_torchvision_state_dict(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    library = tv_vit(seed=5, image_size=32, patch_size=8, num_classes=7, **TV_SMALL)
    weights = save_state_dict(library, tmp_path / "w.pth")
    repo = tmp_path / "repo"
    argv = ["--torchvision", "vit_b_16", "--weights", str(weights), "--heads", "2"]
    assert main([*argv, "--name", "tiny-tv", "--repo", str(repo)]) == 0
    spec = ModelSpec.load(repo / "tiny-tv" / SPEC_FILENAME)
    assert spec.source.framework == "torchvision" and spec.architecture.grid == (4, 4)


# ---------------------------------------------------------------------------------------------
# Shared pieces and our own format


def test_crop_fraction_round_trips_through_the_services_floor() -> None:
    for crop in range(16, 600, 7):
        for resize in range(crop, crop + 80, 3):
            assert int(crop / crop_fraction(crop, resize)) == resize, (crop, resize)


def test_own_checkpoint_keeps_the_new_config_fields(tmp_path: Path) -> None:
    cfg = ViTConfig.variant(
        "test", patch_size=8, grid=(4, 4), num_classes=3, pool="avg", fc_norm=True, mlp_dim=40
    )
    model = VisionTransformer(cfg).eval()
    scramble(model, seed=0)
    save_checkpoint(tmp_path / "c.pt", model, ["a", "b", "c"], "test")
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded.model.cfg == cfg
    patches = torch.randint(0, 256, (2, 4, 4, 192), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(loaded.model(patches), model(patches))


def test_own_checkpoint_written_before_the_new_fields_still_loads(tmp_path: Path) -> None:
    model = VisionTransformer(ViTConfig.variant("test", patch_size=8, grid=(4, 4), num_classes=3))
    save_checkpoint(tmp_path / "c.pt", model, ["a", "b", "c"], "test")
    data = torch.load(tmp_path / "c.pt", weights_only=True)
    for key in ("mlp_dim", "pos_interp_antialias", "pool", "fc_norm"):
        del data["config"][key]
    torch.save(data, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").model.cfg == model.cfg


# ---------------------------------------------------------------------------------------------
# One full ViT-B/16 per library, through the CLI

B16_GRIDS = parity_grids((14, 14))  # 14x14, 9x9, 21x21, 12x17


def _cli_export(argv: list[str], repo: Path) -> ModelSpec:
    assert main([*argv, "--name", "b16", "--repo", str(repo)]) == 0
    return ModelSpec.load(repo / "b16" / SPEC_FILENAME)


@pytest.mark.slow
def test_full_vit_b16_from_timm_matches_timm_through_the_cli(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    library = timm_vit(seed=21, name="vit_base_patch16_224", dynamic_img_size=True)
    weights = save_state_dict(library, tmp_path / "vit_b16.safetensors")
    spec = _cli_export(["--timm", "vit_base_patch16_224", "--weights", str(weights)], tmp_path)
    assert spec.architecture.embed_dim == 768 and spec.architecture.depth == 12
    pre = spec.preprocess
    diffs = graph_vs_library(_graph(tmp_path, "b16"), library, 16, pre.mean, pre.std, B16_GRIDS)
    print(f"timm ViT-B/16: graph vs timm max |logit diff| per grid {diffs}")
    assert max(diffs.values()) <= ATOL, diffs


@pytest.mark.slow
def test_full_vit_b16_from_hf_matches_transformers_through_the_cli(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import ViTImageProcessor

    library = hf_vit(seed=22, num_labels=1000)
    library.save_pretrained(tmp_path / "hf")
    ViTImageProcessor().save_pretrained(tmp_path / "hf")
    spec = _cli_export(["--hf", str(tmp_path / "hf")], tmp_path)
    assert spec.architecture.embed_dim == 768 and spec.architecture.depth == 12
    pre = spec.preprocess
    diffs = graph_vs_library(
        _graph(tmp_path, "b16"), _hf_forward(library), 16, pre.mean, pre.std, B16_GRIDS
    )
    print(f"Hugging Face ViT-B/16: graph vs transformers max |logit diff| per grid {diffs}")
    assert max(diffs.values()) <= ATOL, diffs


@pytest.mark.slow
def test_full_vit_b16_from_torchvision_matches_torchvision_through_the_cli(
    tmp_path: Path,
) -> None:
    pytest.importorskip("torchvision")
    from torchvision.models import vit_b_16

    library = vit_b_16(weights=None).eval()
    scramble(library, seed=23)
    weights = save_state_dict(library, tmp_path / "vit_b_16.pth")
    spec = _cli_export(["--torchvision", "vit_b_16", "--weights", str(weights)], tmp_path)
    assert spec.labels[0] == "tench" and spec.preprocess.crop_pct == 224 / 256
    pre = spec.preprocess
    diffs = graph_vs_library(_graph(tmp_path, "b16"), library, 16, pre.mean, pre.std, [(14, 14)])
    print(f"torchvision ViT-B/16: graph vs torchvision max |logit diff| {diffs}")
    assert max(diffs.values()) <= ATOL, diffs
