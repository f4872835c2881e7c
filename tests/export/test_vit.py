"""The reference ViT: patch embedding, position-embedding resampling, normalisation folding."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from export.vit import PatchEmbed, VisionTransformer, ViTConfig, patchify, resample_grid


def _cfg(**kw: object) -> ViTConfig:
    return ViTConfig.variant("test", patch_size=4, grid=(4, 4), num_classes=5, **kw)


def test_patchify_then_linear_equals_conv2d_with_the_same_weights() -> None:
    torch.manual_seed(0)
    P, C, D = 4, 3, 32
    images = torch.rand(2, 12, 20, C)  # (B, H, W, C), a non-square image
    linear = torch.nn.Linear(P * P * C, D)
    # A patch vector is (row, col, channel): the conv kernel is the same numbers as (D, C, P, P).
    conv_weight = linear.weight.reshape(D, P, P, C).permute(0, 3, 1, 2)
    via_conv = F.conv2d(images.permute(0, 3, 1, 2), conv_weight, linear.bias, stride=P)
    via_patches = linear(patchify(images, P))  # (B, gh, gw, D)
    torch.testing.assert_close(via_patches, via_conv.permute(0, 2, 3, 1), atol=1e-5, rtol=0)


def test_patchify_orders_pixels_row_col_channel() -> None:
    images = torch.arange(4 * 4 * 3).reshape(1, 4, 4, 3)  # value encodes (row, col, ch)
    patches = patchify(images, 2)
    assert patches.shape == (1, 2, 2, 12)
    # Patch (0, 1) covers rows 0-1, cols 2-3.
    expected = torch.stack([images[0, r, c] for r in (0, 1) for c in (2, 3)]).reshape(-1)
    assert torch.equal(patches[0, 0, 1], expected)


def test_position_resampling_is_the_identity_at_the_native_grid() -> None:
    torch.manual_seed(0)
    pos = torch.randn(1, 7, 9, 16)
    torch.testing.assert_close(resample_grid(pos, (7, 9), False), pos, atol=1e-5, rtol=0)


def test_position_resampling_reaches_any_grid_and_keeps_the_class_token() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(_cfg())
    pos = model.position_embeddings(3, 7)
    assert pos.shape == (1, 1 + 3 * 7, 32)
    assert torch.equal(pos[:, 0], model.pos_embed[:, 0])


def test_folding_normalisation_into_the_embedding_keeps_its_output() -> None:
    torch.manual_seed(0)
    embed = PatchEmbed(_cfg(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))
    patches = torch.randint(0, 256, (2, 3, 3, 48), dtype=torch.uint8)
    before = embed(patches)
    embed.fold_normalisation()
    torch.testing.assert_close(embed(patches), before, atol=1e-4, rtol=1e-5)


def test_normalisation_uses_the_configured_mean_and_std() -> None:
    embed = PatchEmbed(_cfg(mean=(0.2, 0.4, 0.6), std=(0.1, 0.2, 0.3)))
    pixel = torch.tensor([51.0, 102.0, 153.0])  # (0.2, 0.4, 0.6) * 255: normalises to zero
    x = pixel.repeat(16)
    assert torch.allclose(x * embed.scale + embed.shift, torch.zeros(48), atol=1e-6)


def test_the_model_accepts_grids_other_than_the_native_one() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(_cfg()).eval()
    torch.nn.init.normal_(model.head.weight)
    for grid in [(4, 4), (2, 3), (6, 5)]:
        patches = torch.randint(0, 256, (2, *grid, 48), dtype=torch.uint8)
        out = model.forward_features(patches, need_probs=True)
        assert out.logits.shape == (2, 5)
        tokens = 1 + grid[0] * grid[1]
        assert [a.shape for a in out.attentions] == [(2, 2, tokens, tokens)] * 2
