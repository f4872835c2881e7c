"""What a served ViT has learned (paper §4.5, Fig. 7), per model version, on ONNX Runtime alone.

The export step computes what needs the weights and many images once, into `introspection.json`
beside the graphs (export/introspection.py): the filters' principal components and the mean
attention distance over held-out images. What depends on the request is computed here, by
the version's rollout graph, whose extra outputs hold it: `position_embeddings` for any grid
(the service feeds a grid of zero patches: the output does not depend on them) and
`attention_distance` for one uploaded image. Its own CPU session, made on first use and kept
per version, runs beside the batcher (introspection is occasional, and a separate session keeps
the request path and its batches as they are); one run at a time.

The three panels are also drawn as PNGs (numpy and Pillow), cached per version and grid.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from app.core.colormap import COLORMAP
from app.core.errors import InvalidParameterError
from app.models.repository import ModelVersion, UnknownModelError, sha256_of
from app.models.spec import INTROSPECTION_FILENAME, ModelSpec

GRID_PATTERN = re.compile(r"([0-9]{1,4})x([0-9]{1,4})")
# A resampled grid may hold this many times the native grid's patches: the graph runs the
# whole model on it (attention is quadratic in the patches) and the PNG has N x N cells.
MAX_GRID_FACTOR = 4
CACHED_ANSWERS = 32


class IntrospectionUnavailableError(UnknownModelError):
    """The version was exported without introspection (a 404 that says how to get it)."""


def parse_grid(text: str | None, spec: ModelSpec) -> tuple[int, int] | None:
    """`?grid=HxW` -> (H, W), or None when absent; InvalidParameterError (422) says why not."""
    if text is None:
        return None
    found = GRID_PATTERN.fullmatch(text.strip())
    if found is None:
        raise InvalidParameterError(f"grid must be HxW in patches, e.g. 12x16, not {text[:40]!r}")
    h, w = int(found.group(1)), int(found.group(2))
    if h < 1 or w < 1:
        raise InvalidParameterError(f"grid {h}x{w}: both sides must be at least 1 patch")
    limit = MAX_GRID_FACTOR * spec.architecture.native_tokens
    if h * w > limit:
        gh, gw = spec.architecture.grid
        raise InvalidParameterError(
            f"grid {h}x{w} has {h * w} patches; at most {limit} ({MAX_GRID_FACTOR}x the "
            f"native {gh}x{gw})"
        )
    return h, w


def cosine_similarity(pos: NDArray[np.floating]) -> NDArray[np.float64]:
    """(gh, gw, D) position embeddings -> (N, N) cosine similarity, N = gh * gw."""
    flat = pos.reshape(-1, pos.shape[-1]).astype(np.float64)
    unit = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T
    # Exactly symmetric, whatever the matmul's summation order did.
    return np.asarray((sim + sim.T) / 2.0, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Drawing


def _png(pixels: NDArray[np.uint8]) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _colour(values: NDArray[np.floating], low: float, high: float) -> NDArray[np.uint8]:
    """Values -> RGB through the heatmaps' colour map, `low`..`high` spanning it."""
    t = np.clip((np.asarray(values, np.float64) - low) / max(high - low, 1e-12), 0.0, 1.0)
    lut: NDArray[np.uint8] = COLORMAP[np.round(t * (len(COLORMAP) - 1)).astype(np.int64)]
    return lut


def _tiles(tiles: list[NDArray[np.uint8]], cols: int, gap: int) -> NDArray[np.uint8]:
    """Equal (h, w, 3) tiles in rows of `cols` on a white sheet with `gap` pixels between."""
    h, w, _ = tiles[0].shape
    rows = math.ceil(len(tiles) / cols)
    sheet = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = gap + r * (h + gap), gap + c * (w + gap)
        sheet[y : y + h, x : x + w] = tile
    return sheet


def _upscale(tile: NDArray[np.uint8], at_least: int) -> NDArray[np.uint8]:
    k = max(1, math.ceil(at_least / max(tile.shape[0], tile.shape[1])))
    return np.repeat(np.repeat(tile, k, axis=0), k, axis=1)


def filters_png(components: NDArray[np.floating], shape: list[int]) -> str:
    """Fig. 7 left: each component as an RGB patch (a hybrid's as a tile of channel weights)."""
    tiles = []
    for comp in components:
        if len(shape) == 3 and shape[2] == 3:  # (P, P, C): pixel filters, min-max per component
            lo, hi = float(comp.min()), float(comp.max())
            rgb = ((comp - lo) / max(hi - lo, 1e-12) * 255.0).reshape(shape)
            tile = np.round(rgb).astype(np.uint8)
        else:  # a vector over feature channels: a square of cells, coloured -m..m
            side = math.ceil(math.sqrt(comp.size))
            padded = np.zeros(side * side)
            padded[: comp.size] = comp
            m = float(np.abs(comp).max())
            tile = _colour(padded.reshape(side, side), -m, m)
        tiles.append(_upscale(tile, 32))
    return _png(_tiles(tiles, cols=7, gap=2))


def similarity_png(sim: NDArray[np.floating], grid: tuple[int, int]) -> str:
    """Fig. 7 centre: tile (i, j) shows patch (i, j)'s similarity with every patch, -1..1."""
    gh, gw = grid
    tiles = [_upscale(_colour(row.reshape(gh, gw), -1.0, 1.0), 16) for row in sim]
    return _png(_tiles(tiles, cols=gw, gap=1))


def distance_png(mean_px: NDArray[np.floating], top_px: float) -> str:
    """Fig. 7 right: one dot per head at each depth; y: mean attention distance in pixels."""
    depth, heads = mean_px.shape
    width, height, left, bottom, top = 80 + 40 * depth, 260, 56, 34, 14
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    plot_h = height - bottom - top
    x0, x1 = left, width - 12
    draw.line([(x0, top), (x0, height - bottom), (x1, height - bottom)], fill=(0, 0, 0))
    top_px = max(top_px, float(mean_px.max()), 1e-6)
    for frac in (0.0, 0.5, 1.0):
        y = height - bottom - frac * plot_h
        draw.line([(x0 - 4, y), (x0, y)], fill=(0, 0, 0))
        draw.text((4, y - 6), f"{frac * top_px:.0f}px", fill=(0, 0, 0))
    step = (x1 - x0) / (depth + 1)
    colours = _colour(np.linspace(0.15, 0.85, max(heads, 1)), 0.0, 1.0)
    for d in range(depth):
        x = x0 + step * (d + 1)
        draw.text((x - 3, height - bottom + 6), str(d + 1), fill=(0, 0, 0))
        for h in range(heads):
            y = height - bottom - float(mean_px[d, h]) / top_px * plot_h
            c = tuple(int(v) for v in colours[h])
            draw.ellipse([(x - 4, y - 4), (x + 4, y + 4)], fill=c, outline=(0, 0, 0))
    draw.text((x0 + 4, height - 14), "network depth (block)", fill=(0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# Per version: the record, the session, the answers


class Introspection:
    """Introspection of the served versions; thread-safe (routes call it from worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, Any]] = {}  # fingerprint -> introspection.json
        self._sessions: dict[str, ort.InferenceSession] = {}  # fingerprint -> rollout graph
        self._answers: OrderedDict[tuple[str, tuple[int, int] | None], dict[str, Any]] = (
            OrderedDict()
        )

    @staticmethod
    def _check(mv: ModelVersion) -> tuple[str, Any]:
        files = mv.spec.versions.get(mv.version)
        if files is None or files.introspection is None or mv.rollout_path is None:
            raise IntrospectionUnavailableError(
                f"model '{mv.name}' version {mv.version} was exported without introspection; "
                "re-export it (python -m export ..., or python -m export.introspection for a "
                "checkpoint's earlier versions)"
            )
        return files.introspection, mv.rollout_path

    def record(self, mv: ModelVersion) -> dict[str, Any]:
        """introspection.json of the version, read once, its sha256 checked against model.json."""
        sha, _ = self._check(mv)
        with self._lock:
            found = self._records.get(mv.fingerprint)
            if found is None:
                path = mv.graph_path.parent / INTROSPECTION_FILENAME
                if not path.is_file() or sha256_of(path) != sha:
                    raise IntrospectionUnavailableError(
                        f"{path} is missing or differs from model.json's sha256; re-export it"
                    )
                found = json.loads(path.read_text())
                self._records[mv.fingerprint] = found
            return found

    def _session(self, mv: ModelVersion) -> ort.InferenceSession:
        _, rollout_path = self._check(mv)
        found = self._sessions.get(mv.fingerprint)
        if found is None:
            options = ort.SessionOptions()
            # Occasional requests: two threads leave the cores to the serving sessions.
            options.intra_op_num_threads = 2
            found = ort.InferenceSession(
                str(rollout_path), options, providers=["CPUExecutionProvider"]
            )
            self._sessions[mv.fingerprint] = found
        return found

    def _run(self, mv: ModelVersion, patches: NDArray[np.uint8], output: str) -> NDArray[Any]:
        feeds = {
            "patches": patches,
            "head_fusion": np.array(0, np.int64),
            "discard_ratio": np.array(0.0, np.float32),
        }
        with self._lock:
            (out,) = self._session(mv).run([output], feeds)
        return np.asarray(out)

    def position_embeddings(self, mv: ModelVersion, grid: tuple[int, int]) -> NDArray[Any]:
        """(gh, gw, D): what the served graph adds to the patch tokens at `grid`."""
        gh, gw = grid
        zeros = np.zeros((1, gh, gw, mv.spec.architecture.patch_dim), np.uint8)
        return self._run(mv, zeros, "position_embeddings")

    def attention_distance(self, mv: ModelVersion, patches: NDArray[np.uint8]) -> NDArray[Any]:
        """(depth, heads) mean attention distance in pixels for one image's patches."""
        found: NDArray[Any] = self._run(mv, patches[None], "attention_distance")[0]
        return found

    def similarity(self, mv: ModelVersion, grid: tuple[int, int]) -> dict[str, Any]:
        sim = cosine_similarity(self.position_embeddings(mv, grid))
        return {
            "grid": list(grid),
            "similarity": np.round(sim, 5).tolist(),
            "png": similarity_png(sim, grid),
        }

    def describe(self, mv: ModelVersion, grid: tuple[int, int] | None) -> dict[str, Any]:
        """GET /models/{name}/introspection's answer (cached per version and grid)."""
        key = (mv.fingerprint, grid)
        with self._lock:
            cached = self._answers.get(key)
            if cached is not None:
                self._answers.move_to_end(key)
                return cached
        record = self.record(mv)
        arch = mv.spec.architecture
        filters = record["filters"]
        comps = np.asarray(filters["components"], np.float64)
        distance = record.get("attention_distance")
        if distance is not None:
            mean_px = np.asarray(distance["mean_px"], np.float64)
            distance = {**distance, "png": distance_png(mean_px, self.top_px(mv))}
        answer: dict[str, Any] = {
            "model": mv.name,
            "version": mv.version,
            "patch_size": arch.patch_size,
            "native_grid": list(arch.grid),
            "backbone": None if arch.backbone is None else arch.backbone.description,
            "filters": {**filters, "png": filters_png(comps, filters["shape"])},
            "position_similarity": {
                "native": self.similarity(mv, arch.grid),
                "resampled": None if grid is None else self.similarity(mv, grid),
            },
            "attention_distance": distance,
        }
        with self._lock:
            self._answers[key] = answer
            while len(self._answers) > CACHED_ANSWERS:
                self._answers.popitem(last=False)
        return answer

    @staticmethod
    def top_px(mv: ModelVersion) -> float:
        """The plots' y range: the native image's diagonal, the farthest a patch can look."""
        h, w = mv.spec.architecture.input_size
        return math.hypot(h, w) * 0.75

    def for_image(
        self, mv: ModelVersion, patches: NDArray[np.uint8], image_size: tuple[int, int]
    ) -> dict[str, Any]:
        """POST /models/{name}/introspection/attention-distance's answer for one image."""
        mean_px = self.attention_distance(mv, patches).astype(np.float64)
        grid = (int(patches.shape[0]), int(patches.shape[1]))
        return {
            "model": mv.name,
            "version": mv.version,
            "image_size": list(image_size),
            "grid": list(grid),
            "pixels_per_patch": mv.spec.architecture.patch_size,
            "mean_px": np.round(mean_px, 4).tolist(),
            "png": distance_png(mean_px, self.top_px(mv)),
        }
