"""Preprocessing micro-benchmark: decode + resize + patchify of one image on one thread.

    .venv/bin/python -m bench.preprocess
    .venv/bin/python -m bench.preprocess --repo build/bench_repo --model vit-ti16

Two JPEGs: a typical 500x375 photo from ../shared/testdata/photos (a generated one when the
folder is absent) and a 12-megapixel JPEG made from it (upscaled to 4000x3000, quality 90).
Each goes through `app.pipeline.imaging.prepare` (the service's code, `crop` policy) with JPEG
draft mode on (the service's default) and off; median ms overall and per stage. Written to
bench/results/preprocess_<model>.json. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.models.spec import SPEC_FILENAME, ModelSpec
from app.pipeline.imaging import prepare
from bench.machine import machine_info

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT.parent / "shared" / "testdata" / "photos"
TARGET_MS = {"typical": 3.0, "12mp": 30.0}


def typical_photo() -> tuple[bytes, str]:
    """The first 500x375 photo, or a generated one."""
    if PHOTOS.is_dir():
        for f in sorted(PHOTOS.glob("*.*")):
            with Image.open(f) as img:
                if img.size == (500, 375):
                    return f.read_bytes(), f.name
    print(f"note: no 500x375 photo in {PHOTOS}; using a generated JPEG")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue(), "generated 500x375"


def twelve_megapixels(photo: bytes) -> bytes:
    with Image.open(io.BytesIO(photo)) as img:
        big = img.convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def measure(data: bytes, spec: ModelSpec, draft: bool, seconds: float) -> dict[str, Any]:
    def once() -> Any:
        return prepare(
            data,
            spec,
            "crop",
            name="bench",
            max_pixels=40_000_000,
            fit_max_tokens=2 * spec.architecture.native_tokens,
            jpeg_draft=draft,
        )

    for _ in range(3):
        once()
    totals: list[float] = []
    stages: list[dict[str, float]] = []
    stop_at = time.perf_counter() + seconds
    while (time.perf_counter() < stop_at or len(totals) < 5) and len(totals) < 10_000:
        t0 = time.perf_counter()
        prepared = once()
        totals.append((time.perf_counter() - t0) * 1e3)
        stages.append(asdict(prepared.stages_ms))
    return {
        "jpeg_draft": draft,
        "runs": len(totals),
        "median_ms": round(statistics.median(totals), 3),
        "stages_median_ms": {
            k: round(statistics.median(s[k] for s in stages), 3) for k in stages[0]
        },
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repo", type=Path, default=ROOT / "model_repo")
    p.add_argument("--model", default="demo-shapes")
    p.add_argument("--seconds", type=float, default=3.0, help="per case")
    p.add_argument("--out", type=Path, help="default: bench/results/preprocess_<model>.json")
    a = p.parse_args(argv)
    out = a.out or ROOT / "bench" / "results" / f"preprocess_{a.model}.json"
    spec = ModelSpec.load(a.repo / a.model / SPEC_FILENAME)
    photo, photo_name = typical_photo()
    cases = {"typical": photo, "12mp": twelve_megapixels(photo)}
    results: dict[str, Any] = {}
    for case, data in cases.items():
        results[case] = {
            "bytes": len(data),
            "target_ms": TARGET_MS[case],
            "runs": [measure(data, spec, draft, a.seconds) for draft in (True, False)],
        }
        for run in results[case]["runs"]:
            stages = ", ".join(f"{k} {v:.2f}" for k, v in run["stages_median_ms"].items())
            print(
                f"{case:>7} draft={'on ' if run['jpeg_draft'] else 'off'}: "
                f"{run['median_ms']:7.2f} ms median ({stages}; target {TARGET_MS[case]} ms)"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": a.model,
                "input_size": list(spec.architecture.input_size),
                "photo": photo_name,
                "threads": 1,
                "machine": machine_info(),
                "cases": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
