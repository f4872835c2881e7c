"""Decode + resize + patchify of one image on one thread (`app.pipeline.preprocess.prepare`).

    .venv/bin/python -m bench.preprocess
    .venv/bin/python -m bench.preprocess --repo build/bench_repo --model vit-ti16

A 500x375 photo and a 12-megapixel JPEG made from it, with JPEG draft mode on (the service's
default) and off: median ms overall and per stage. Writes bench/results/preprocess_<model>.json.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from app.models.spec import ModelSpec
from app.pipeline.preprocess import PreparedImage, prepare
from bench.harness import DEMO_MODEL, DEMO_REPO, RESULTS, find_model, load_images, write_results

TARGET_MS = {"typical": 3.0, "12mp": 30.0}  # the issue's, reported beside the figures


@dataclass
class Run:
    jpeg_draft: bool
    runs: int
    median_ms: float
    stages_median_ms: dict[str, float]


@dataclass
class Case:
    bytes: int
    target_ms: float
    runs: list[Run]


@dataclass
class PreprocessReport:
    model: str
    input_size: tuple[int, int]
    photo: str
    threads: int
    cases: dict[str, Case]


def typical_photo() -> tuple[bytes, str]:
    """The first 500x375 photo (or generated JPEG), and its name."""
    images = load_images()
    for body, name in zip(images.bodies, images.names, strict=True):
        with Image.open(io.BytesIO(body)) as img:
            if img.size == (500, 375):
                return body, name
    print("note: no 500x375 photo; using the first")
    return images.bodies[0], images.names[0]


def twelve_megapixels(photo: bytes) -> bytes:
    with Image.open(io.BytesIO(photo)) as img:
        big = img.convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def measure(data: bytes, spec: ModelSpec, draft: bool, seconds: float) -> Run:
    def once() -> PreparedImage:
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
    return Run(
        jpeg_draft=draft,
        runs=len(totals),
        median_ms=round(statistics.median(totals), 3),
        stages_median_ms={k: round(statistics.median(s[k] for s in stages), 3) for k in stages[0]},
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repo", type=Path, default=DEMO_REPO)
    p.add_argument("--model", default=DEMO_MODEL)
    p.add_argument("--seconds", type=float, default=3.0, help="per case")
    p.add_argument("--out", type=Path, help="default: bench/results/preprocess_<model>.json")
    a = p.parse_args(argv)
    spec = find_model(a.repo, a.model).spec
    photo, photo_name = typical_photo()
    cases: dict[str, Case] = {}
    for case, data in {"typical": photo, "12mp": twelve_megapixels(photo)}.items():
        runs = [measure(data, spec, draft, a.seconds) for draft in (True, False)]
        cases[case] = Case(len(data), TARGET_MS[case], runs)
        for run in runs:
            stages = ", ".join(f"{k} {v:.2f}" for k, v in run.stages_median_ms.items())
            print(
                f"{case:>7} draft={'on ' if run.jpeg_draft else 'off'}: "
                f"{run.median_ms:7.2f} ms median ({stages}; target {TARGET_MS[case]} ms)"
            )
    report = PreprocessReport(a.model, spec.architecture.input_size, photo_name, 1, cases)
    write_results(a.out or RESULTS / f"preprocess_{a.model}.json", report)


if __name__ == "__main__":
    main()
