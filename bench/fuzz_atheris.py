"""Coverage-guided fuzzing of the decode path (`prepare` of app.pipeline.preprocess); not in CI.

    .venv/bin/python -m pip install -e ".[fuzz]"
    .venv/bin/python -m bench.fuzz_atheris -max_total_time=600 build/fuzz_corpus

Arguments are libFuzzer's; the corpus (default build/fuzz_corpus) is seeded with small images in
every format. Anything `prepare` raises beyond imaging's typed errors stops the run, the input
saved as build/fuzz_crashes/crash-<sha1>.
"""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import atheris
import numpy as np

with atheris.instrument_imports():
    from PIL import Image

    from app.models.spec import Architecture, ModelSpec, Preprocess, Source, contract_tensors
    from app.pipeline.preprocess import ImageError, ResizePolicy, configure_pillow, prepare

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = ROOT / "build" / "fuzz_corpus"
CRASHES = ROOT / "build" / "fuzz_crashes"
# As the fuzz tests: a small pixel limit keeps each run fast; the property holds for any limit.
MAX_PIXELS = 1_000_000


def tiny_spec() -> ModelSpec:
    arch = Architecture(patch_size=8, grid=(8, 8), embed_dim=32, depth=2, heads=2, num_classes=2)
    inputs, outputs = contract_tensors(arch)
    return ModelSpec(
        name="fuzz",
        architecture=arch,
        preprocess=Preprocess(crop_pct=0.875, interpolation="bicubic"),
        labels=["a", "b"],
        inputs=inputs,
        outputs=outputs,
        source=Source(framework="fuzz"),
    )


SPEC = tiny_spec()


def seed(corpus: Path) -> None:
    """A few small valid files per format, so the fuzzer starts past the signatures."""
    if any(corpus.iterdir()):
        return
    rng = np.random.default_rng(0)
    pixels = Image.fromarray(rng.integers(0, 256, (12, 17, 3), dtype=np.uint8))
    for fmt, mode in [
        ("PNG", "RGBA"),
        ("PNG", "P"),
        ("JPEG", "RGB"),
        ("JPEG", "CMYK"),
        ("WEBP", "RGB"),
        ("GIF", "P"),
        ("BMP", "RGB"),
        ("TIFF", "I;16"),
        ("TIFF", "F"),
    ]:
        buf = io.BytesIO()
        pixels.convert(mode).save(buf, fmt)
        (corpus / f"seed-{fmt.lower()}-{mode.replace(';', '')}").write_bytes(buf.getvalue())


def test_one_input(data: bytes) -> None:
    # The last byte picks the policy, so the fuzzer can reach both with the same image.
    policy: ResizePolicy = "fit" if data[-1:] == b"\x01" else "crop"
    try:
        prepared = prepare(
            data, SPEC, policy, name="fuzz", max_pixels=MAX_PIXELS, fit_max_tokens=128
        )
    except ImageError:
        return
    gh, gw = prepared.grid
    if prepared.patches.shape != (gh, gw, 8 * 8 * 3) or prepared.patches.dtype != np.uint8:
        raise AssertionError(
            f"patches {prepared.patches.shape} {prepared.patches.dtype} for {gh}x{gw}"
        )


def main() -> None:
    args = sys.argv[1:]
    if not any(not a.startswith("-") for a in args):
        DEFAULT_CORPUS.mkdir(parents=True, exist_ok=True)
        args.append(str(DEFAULT_CORPUS))
    if not any(a.startswith("-artifact_prefix=") for a in args):
        CRASHES.mkdir(parents=True, exist_ok=True)
        args.append(f"-artifact_prefix={CRASHES}/")
    for folder in (a for a in args if not a.startswith("-")):
        Path(folder).mkdir(parents=True, exist_ok=True)
        seed(Path(folder))
    # As the service sets it up (app.main): Pillow's own guard at the same limit. Pillow's
    # warnings (corrupt EXIF, the guard's own between one and two times the limit) stay
    # warnings there, as here, where they would only bury libFuzzer's output.
    configure_pillow(MAX_PIXELS)
    warnings.simplefilter("ignore")
    atheris.Setup([sys.argv[0], *args], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
