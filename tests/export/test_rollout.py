"""The rollout graph: equal to a plain PyTorch reference on captured attentions, at any grid."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.onnx_export import export_rollout_graph
from export.rollout import HeadFusion, RolloutViT, discard_lowest
from export.vit import Block, VisionTransformer, ViTConfig


def _model() -> VisionTransformer:
    torch.manual_seed(0)
    cfg = ViTConfig.variant("test", patch_size=4, grid=(5, 5), num_classes=4, depth=3, heads=4)
    model = VisionTransformer(cfg).eval()
    # Sharper attention than at initialisation, so fusion and discarding change the answer.
    with torch.no_grad():
        for block in model.blocks:
            assert isinstance(block, Block)
            block.attn.qkv.weight.mul_(8)
    return model


def reference_rollout(
    attentions: list[torch.Tensor], fusion: HeadFusion, discard_ratio: float
) -> np.ndarray:
    """Abnar & Zuidema's rollout written out per image and per block, rows normalised."""
    batch = attentions[0].shape[0]
    maps = []
    for b in range(batch):
        joint = None
        for attn in attentions:
            heads = attn[b].double().numpy()  # (nh, T, T)
            fused = {
                HeadFusion.MEAN: heads.mean(0),
                HeadFusion.MAX: heads.max(0),
                HeadFusion.MIN: heads.min(0),
            }[fusion]
            T = fused.shape[0]
            flat = fused.reshape(-1).copy()
            k = int(np.floor(discard_ratio * T * T))
            if k > 0:
                lowest = np.argsort(flat, kind="stable")[:k]
                flat[lowest[lowest != 0]] = 0.0  # never the class token's attention to itself
            a = flat.reshape(T, T) + np.eye(T)
            a = a / a.sum(axis=1, keepdims=True)
            joint = a if joint is None else a @ joint
        assert joint is not None
        maps.append(joint[0, 1:])
    return np.stack(maps)


@pytest.fixture(scope="module")
def rollout_graph(tmp_path_factory: pytest.TempPathFactory) -> ort.InferenceSession:
    path = tmp_path_factory.mktemp("rollout") / "model.rollout.onnx"
    export_rollout_graph(_model().folded(), path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("grid", [(5, 5), (3, 4), (7, 6)])
@pytest.mark.parametrize("fusion", list(HeadFusion))
@pytest.mark.parametrize("discard_ratio", [0.0, 0.5])
def test_graph_rollout_equals_the_pytorch_reference(
    rollout_graph: ort.InferenceSession,
    grid: tuple[int, int],
    fusion: HeadFusion,
    discard_ratio: float,
) -> None:
    model = _model()
    gen = torch.Generator().manual_seed(1)
    patches = torch.randint(0, 256, (3, *grid, 48), dtype=torch.uint8, generator=gen)
    with torch.no_grad():
        captured = model.forward_features(patches, need_probs=True)
    expected = reference_rollout(captured.attentions, fusion, discard_ratio)
    logits, got = rollout_graph.run(
        ["logits", "rollout"],
        {
            "patches": patches.numpy(),
            "head_fusion": np.array(int(fusion), np.int64),
            "discard_ratio": np.array(discard_ratio, np.float32),
        },
    )
    assert got.shape == (3, *grid)
    np.testing.assert_allclose(got.reshape(3, -1), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits, captured.logits.numpy(), atol=1e-4, rtol=0)


def test_head_fusions_and_discarding_give_different_maps() -> None:
    model = _model()
    patches = torch.randint(0, 256, (1, 5, 5, 48), dtype=torch.uint8)
    wrapper = RolloutViT(model)
    maps = []
    for fusion, ratio in [(0, 0.0), (1, 0.0), (2, 0.0), (0, 0.8)]:
        with torch.no_grad():
            _, m = wrapper(patches, torch.tensor(fusion), torch.tensor(ratio))
        maps.append(m)
    for i in range(len(maps)):
        for j in range(i + 1, len(maps)):
            assert not torch.allclose(maps[i], maps[j], atol=1e-4)


def test_discarding_keeps_the_class_tokens_attention_to_itself() -> None:
    fused = torch.full((1, 3, 3), 0.5)
    fused[0, 0, 0] = 0.01  # the lowest entry of all
    out = discard_lowest(fused, torch.tensor(0.2))
    assert out[0, 0, 0] == pytest.approx(0.01)
    assert int((out == 0).sum()) == 0  # floor(0.2 * 9) = 1 entry, the protected one


def test_a_rollout_row_is_a_distribution_over_the_class_token_and_patches() -> None:
    model = _model()
    patches = torch.randint(0, 256, (2, 4, 6, 48), dtype=torch.uint8)
    with torch.no_grad():
        _, maps = RolloutViT(model)(patches, torch.tensor(0), torch.tensor(0.0))
    total = maps.sum(dim=(1, 2))
    assert ((total > 0) & (total < 1)).all()  # the rest stays with the class token itself
    assert (maps >= 0).all()
