"""The per-image attention distance the service computes in-graph, against a numpy reference
computed from PyTorch's attention probabilities of the checkpoint the demo was exported from."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from PIL import Image

from app.core.settings import Settings
from app.models.spec import ModelSpec
from app.pipeline.preprocess import prepare
from export.checkpoints import load_checkpoint
from export.demo.shapes import generate
from tests.images import encode
from tests.support import DEMO_MODEL, need_folder, serve

pytestmark = pytest.mark.anyio

DEMO = "demo-shapes"
CHECKPOINT = Path(__file__).resolve().parents[2] / "export" / "demo" / "checkpoint.pt"
SEEDS = (99, 5, 1234)


def numpy_attention_distance(
    probs: list[NDArray[np.float64]], grid: tuple[int, int], patch: int
) -> NDArray[np.float64]:
    """Per block (nh, T, T) -> (depth, nh): sum_k a_qk d_qk / sum_k a_qk over patch keys,
    averaged over patch queries; d in pixels between patch centres. Written without the
    export's code, by loops over positions."""
    gh, gw = grid
    centres = np.array([(r, c) for r in range(gh) for c in range(gw)], np.float64) * patch
    dist = np.zeros((gh * gw, gh * gw))
    for i in range(gh * gw):
        for j in range(gh * gw):
            dist[i, j] = np.hypot(*(centres[i] - centres[j]))
    out = np.zeros((len(probs), probs[0].shape[0]))
    for d, block in enumerate(probs):
        for h, a in enumerate(block):
            patches = a[1:, 1:]
            out[d, h] = np.mean((patches * dist).sum(axis=1) / patches.sum(axis=1))
    return out


async def test_one_image_attention_distance_matches_pytorch() -> None:
    need_folder(DEMO_MODEL, "the demo model (trained by export/demo)")
    spec = ModelSpec.load(DEMO_MODEL / "model.json")
    model = load_checkpoint(CHECKPOINT).model
    settings = Settings(model_repo=DEMO_MODEL.parent, default_model=DEMO)
    async with serve(settings) as client:
        for seed in SEEDS:
            data = encode(Image.fromarray(generate(1, seed=seed).images[0]), "PNG")
            response = await client.post(
                f"/models/{DEMO}/introspection/attention-distance",
                files=[("image", ("shape.png", data, "image/png"))],
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["grid"] == [8, 8] and body["pixels_per_patch"] == 8
            got = np.asarray(body["mean_px"])
            # The patches the service made, through the checkpoint in PyTorch.
            patches = prepare(
                data,
                spec,
                "crop",
                name="x",
                max_pixels=settings.image_max_pixels,
                fit_max_tokens=128,
            ).patches
            with torch.no_grad():
                out = model.forward_features(torch.from_numpy(patches[None]), need_probs=True)
            probs = [a[0].double().numpy() for a in out.attentions]
            want = numpy_attention_distance(probs, (8, 8), 8)
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
            png = Image.open(io.BytesIO(base64.b64decode(body["png"])))
            assert png.format == "PNG"
