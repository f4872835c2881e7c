"""Decode + resize + patchify of the shared photos: Pillow (what the service runs) against the
well-kept alternatives, side by side, with their pixel difference from Pillow's result.

    pip install --target build/tools/jpeg simplejpeg "PyTurboJPEG<2"  # + apt libturbojpeg0
    CC="cc -mavx2" pip install --no-deps --target build/tools/simd pillow-simd  # a C build
    .venv/bin/python -m bench.jpeg_alternatives --extra build/tools/jpeg --simd build/tools/simd

None of them is a dependency of the project: each runs where its folder says, in its own process
(Pillow-SIMD replaces the `PIL` package, so it cannot share a process with Pillow), in
alternating rounds; a figure is the median over rounds of one thread's CPU per photo.
- `pillow`: `app.pipeline.preprocess.prepare` as the service runs it (`crop`, JPEG draft decoding);
- `pillow-simd`: the same code with Pillow-SIMD's `PIL`;
- `simplejpeg`, `turbojpeg`: their decoder at the same DCT scale as Pillow's draft (both dims
  at least twice the resize target), then Pillow's resize, crop and the same patchify (no EXIF
  orientation, no other formats: what a switch would still have to add).
Writes bench/results/jpeg_alternatives.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.harness import PHOTOS, RESULTS, write_results

ROOT = Path(__file__).resolve().parent.parent
MODELS = {  # name -> (patch size, native grid, interpolation): ViT-Ti/16's and the demo's
    "vit-ti16": (16, (14, 14), "bilinear"),
    "demo-shapes": (8, (8, 8), "bilinear"),
}


def _spec(name: str) -> object:
    from app.models.spec import Architecture, ModelSpec, Preprocess, Source, contract_tensors

    patch, grid, interpolation = MODELS[name]
    arch = Architecture(patch_size=patch, grid=grid, embed_dim=8, depth=1, heads=1, num_classes=2)
    inputs, outputs = contract_tensors(arch)
    return ModelSpec(
        name=name,
        architecture=arch,
        preprocess=Preprocess(interpolation=interpolation),  # type: ignore[arg-type]
        labels=["a", "b"],
        inputs=inputs,
        outputs=outputs,
        source=Source(framework="bench"),
    )


def worker(variant: str, model: str, out: Path) -> None:
    """One variant over every photo: prints ms of CPU per photo, saves the patches."""
    from PIL import Image

    from app.models.spec import ModelSpec
    from app.pipeline.preprocess import _RESAMPLE, crop_plan, patchify, prepare

    spec = _spec(model)
    assert isinstance(spec, ModelSpec)
    bodies = [p.read_bytes() for p in sorted(PHOTOS.iterdir())]
    resample = _RESAMPLE[spec.preprocess.interpolation]

    def finish(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
        plan = crop_plan(width, height, spec)
        img = Image.fromarray(pixels).resize(plan.size, resample)
        if plan.box is not None:
            img = img.crop(plan.box)
        return patchify(np.asarray(img, dtype=np.uint8), spec.architecture.patch_size)

    if variant in ("pillow", "pillow-simd"):

        def run(body: bytes) -> np.ndarray:
            prepared = prepare(
                body, spec, "crop", name="x", max_pixels=40_000_000, fit_max_tokens=10_000
            )
            return prepared.patches

    elif variant == "simplejpeg":
        import simplejpeg  # type: ignore[import-not-found]

        def run(body: bytes) -> np.ndarray:
            height, width, _, _ = simplejpeg.decode_jpeg_header(body)
            need = 2 * max(crop_plan(width, height, spec).size)
            pixels = simplejpeg.decode_jpeg(body, colorspace="RGB", min_height=need, min_width=need)
            return finish(pixels, width, height)

    else:
        from turbojpeg import TJPF_RGB, TurboJPEG  # type: ignore[import-not-found]

        turbo = TurboJPEG()

        def run(body: bytes) -> np.ndarray:
            width, height, _, _ = turbo.decode_header(body)
            need = 2 * max(crop_plan(width, height, spec).size)
            factor = (1, 1)
            for num, den in ((1, 8), (1, 4), (1, 2)):
                if min(width, height) * num // den >= need:
                    factor = (num, den)
                    break
            return finish(
                turbo.decode(body, pixel_format=TJPF_RGB, scaling_factor=factor), width, height
            )

    for body in bodies[:5]:  # warm-up
        run(body)
    cpu0 = time.thread_time()
    patches = [run(body) for body in bodies]
    ms = (time.thread_time() - cpu0) * 1e3 / len(bodies)
    np.save(out, np.stack(patches))
    print(json.dumps({"ms": ms}))


@dataclass
class Variant:
    name: str
    model: str
    ms_per_photo: float  # median over rounds, one thread's CPU
    rounds: list[float]
    vs_pillow: float  # pillow's ms / this one's
    pixel_diff_mean: float  # |this - pillow| over every patch value, in levels
    pixel_diff_max: int
    share_off_by_more_than_1: float


@dataclass
class Report:
    photos: str
    variants: list[Variant]
    note: str


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--extra", type=Path, nargs="+", help="folders with simplejpeg and turbojpeg installed"
    )
    p.add_argument("--simd", type=Path, help="folder with Pillow-SIMD installed")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--worker", nargs=3, metavar=("VARIANT", "MODEL", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS / "jpeg_alternatives.json")
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker[0], a.worker[1], Path(a.worker[2]))
        return
    paths: dict[str, list[str]] = {"pillow": []}
    if a.simd is not None:
        paths["pillow-simd"] = [str(a.simd.resolve())]
    if a.extra is not None:
        paths["simplejpeg"] = paths["turbojpeg"] = [str(e.resolve()) for e in a.extra]
    variants = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            times: dict[str, list[float]] = {v: [] for v in paths}
            names = list(paths)
            for r in range(a.rounds):
                for v in names[r % len(names) :] + names[: r % len(names)]:
                    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths[v], str(ROOT)])}
                    cmd = [sys.executable, "-m", "bench.jpeg_alternatives", "--worker", v, model]
                    done = subprocess.run(
                        [*cmd, f"{tmp}/{v}-{model}.npy"],
                        env=env,
                        cwd=ROOT,
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    times[v].append(json.loads(done.stdout.strip().splitlines()[-1])["ms"])
            base = np.load(f"{tmp}/pillow-{model}.npy").astype(np.int16)
            for v in names:
                diff = np.abs(np.load(f"{tmp}/{v}-{model}.npy").astype(np.int16) - base)
                ms = statistics.median(times[v])
                variants.append(
                    Variant(
                        v,
                        model,
                        round(ms, 3),
                        [round(t, 3) for t in times[v]],
                        round(statistics.median(times["pillow"]) / ms, 3),
                        round(float(diff.mean()), 4),
                        int(diff.max()),
                        round(float((diff > 1).mean()), 6),
                    )
                )
                print(
                    f"{model:>12} {v:>12}: {ms:6.3f} ms/photo ({variants[-1].vs_pillow:.2f}x), "
                    f"|diff| mean {diff.mean():.4f} max {diff.max()}",
                    flush=True,
                )
    write_results(
        a.out,
        Report(
            photos=f"{len(list(PHOTOS.iterdir()))} photos from {PHOTOS}",
            variants=variants,
            note="simplejpeg and turbojpeg: no EXIF orientation, JPEG only; pillow-simd: the "
            "service's own prepare()",
        ),
    )


if __name__ == "__main__":
    main()
