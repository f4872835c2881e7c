"""GPU decode against the CPU path: patch parity on the shared photos, and the decoder's img/s.

    python -m bench.gpu_decode                  # a machine with a GPU and the decoder's wheels
    .venv/bin/python -m bench.gpu_decode --cpu-smoke   # the same code, the Pillow stand-in

On the 100 shared photos (../shared/testdata/photos; generated JPEGs where absent), at the
ViT-B/16 grid (16 px patches, 14x14, 224 px, timm's crop 0.9, bicubic):
1. routing: which photos the device path takes and why not the others (app/pipeline/routing.py);
2. parity: each routed photo's patches from the device decoder against the CPU path's (Pillow,
   with its reduced-scale JPEG decoding, as served): the mean absolute difference and the
   99th percentile over all patch values, and the largest (targets: mean <= 1.5 levels,
   p99 <= 8). The device patches are copied to the host here, for the comparison only;
3. the decoder's own img/s, batches of 32 of the routed photos, decode + resize + crop +
   patchify, with the hardware JPEG decoder first and without it (CUDA cores only).

Not measured here: the demo model's held-out accuracy on JPEG q95 (the issue's optional check:
it needs the export step's data set, which the lent GPU machine does not carry).

`measure()` is the function the GPU check can call (bench/gpu_check.py); `--cpu-smoke` runs
every step with the host stand-in (app/runtime/hostdecode.py), so the code paths run on a CPU;
its figures say nothing about a GPU. Results: bench/results/gpu_decode.json (--out).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.core.settings import Settings
from app.engine import ServedVersion
from app.models.spec import (
    GRAPH_FILENAME,
    SPEC_FILENAME,
    Architecture,
    ModelSpec,
    Preprocess,
    Source,
    contract_tensors,
)
from app.pipeline.preprocess import prepare
from app.pipeline.routing import DecodeRouter
from app.pipeline.workers import Upload
from app.runtime.devicedecode import DecodedBatch, DeviceDecoder, EncodedImage
from app.runtime.hostdecode import HostDecoder
from bench.harness import RESULTS, Images, load_images, write_results

MEAN_TARGET = 1.5
P99_TARGET = 8.0
ACCURACY_POINTS = 0.5
BATCH = 32
DEMO = Path(__file__).resolve().parent.parent / "model_repo" / "demo-shapes"


def vit_b16_spec() -> ModelSpec:
    """ViT-B/16's input contract (no graph needed: only its preprocessing is measured)."""
    arch = Architecture(
        patch_size=16, grid=(14, 14), embed_dim=768, depth=12, heads=12, num_classes=1000
    )
    inputs, outputs = contract_tensors(arch)
    return ModelSpec(
        name="vit-b16",
        architecture=arch,
        preprocess=Preprocess(resize_mode="shorter_side", crop_pct=0.9, interpolation="bicubic"),
        labels=[f"class-{i}" for i in range(1000)],
        inputs=inputs,
        outputs=outputs,
        source=Source(framework="bench"),
    )


@dataclass
class Parity:
    images: int = 0
    mean_abs: float = 0.0
    p99_abs: float = 0.0
    max_abs: int = 0
    within_targets: bool = False
    refused: dict[str, str] = field(default_factory=dict)  # photo -> the decoder's reason


@dataclass
class Throughput:
    decoder: str
    hardware: bool
    images: int
    seconds: float
    images_per_s: float


@dataclass
class Accuracy:
    """The demo model on its held-out images written as JPEG q95, both decode paths, the same
    session (version 1, fp32, on the CPU): what the decoders' differences do to the answers."""

    images: int
    cpu_path: float  # top-1 accuracy, %
    device_path: float  # refused images through the CPU path, as the service does
    refused: int
    points_apart: float
    within_target: bool  # within ACCURACY_POINTS


@dataclass
class Report:
    mode: str  # "gpu" or "cpu-smoke"
    source: str
    grid: tuple[int, int]
    routed: dict[str, int]  # "path/reason" -> photos
    parity: Parity
    throughput: list[Throughput]
    targets: dict[str, float]
    not_run: list[str]
    accuracy: Accuracy | None = None


def host_patches(batch: DecodedBatch) -> np.ndarray:
    """The batch's patches in host memory (a copy from the device, for comparing)."""
    if batch.host is not None:
        return batch.host
    return np.asarray(batch.device.numpy())


def route_all(
    images: Images, spec: ModelSpec
) -> tuple[list[EncodedImage], list[int], Counter[str]]:
    settings = Settings()
    router = DecodeRouter(settings)
    served = ServedVersion(spec.name, 1, spec, False, 2 * spec.architecture.native_tokens, True)
    encoded, which, routed = [], [], Counter[str]()
    for i, (body, name) in enumerate(zip(images.bodies, images.names, strict=True)):
        route = router.route(Upload(body, f"'{name}'", "image/jpeg"), served, "crop", rollout=False)
        routed[f"{route.path}/{route.reason}"] += 1
        if route.encoded is not None:
            encoded.append(route.encoded)
            which.append(i)
    return encoded, which, routed


def parity(
    decoder: DeviceDecoder,
    images: Images,
    spec: ModelSpec,
    encoded: list[EncodedImage],
    which: list[int],
) -> Parity:
    result = Parity()
    diffs = []
    for start in range(0, len(encoded), BATCH):
        chunk = encoded[start : start + BATCH]
        batch = decoder.decode(chunk)
        for i, reason in batch.refused.items():
            result.refused[chunk[i].name] = reason
        if not batch.accepted:
            continue
        device = host_patches(batch)
        for row, i in enumerate(batch.accepted):
            body = images.bodies[which[start + i]]
            cpu = prepare(
                body,
                spec,
                "crop",
                name=chunk[i].name,
                max_pixels=Settings().image_max_pixels,
                fit_max_tokens=2 * spec.architecture.native_tokens,
            )
            diffs.append(np.abs(device[row].astype(np.int16) - cpu.patches.astype(np.int16)))
    if diffs:
        every = np.concatenate([d.ravel() for d in diffs])
        result.images = len(diffs)
        result.mean_abs = round(float(every.mean()), 3)
        result.p99_abs = float(np.percentile(every, 99))
        result.max_abs = int(every.max())
        result.within_targets = result.mean_abs <= MEAN_TARGET and result.p99_abs <= P99_TARGET
    return result


def throughput(
    decoder: DeviceDecoder, hardware: bool, encoded: list[EncodedImage], seconds: float
) -> Throughput:
    batches = [encoded[i : i + BATCH] for i in range(0, len(encoded), BATCH)]
    decoder.decode(batches[0])  # warm: first-use allocations and kernel loads
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for batch in batches:
            outcome = decoder.decode(batch)
            if outcome.device is not None:
                outcome.device.numpy()[:0]  # touch nothing but the shape: synchronised already
            done += len(outcome.accepted)
    elapsed = time.perf_counter() - started
    return Throughput(decoder.name, hardware, done, round(elapsed, 3), round(done / elapsed, 1))


def demo_accuracy(decoder: DeviceDecoder, images: int = 1000) -> Accuracy:
    """The demo model's held-out set (export/demo: seed 4242) as JPEG q95 through both paths."""
    import io

    import onnxruntime as ort
    from PIL import Image

    from export.demo.evaluate import EVAL_SEED
    from export.demo.shapes import generate

    spec = ModelSpec.load(DEMO / SPEC_FILENAME)
    session = ort.InferenceSession(
        str(DEMO / "1" / GRAPH_FILENAME), providers=["CPUExecutionProvider"]
    )
    data = generate(images, seed=EVAL_SEED)
    bodies = []
    for pixels in data.images:
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG", quality=95)
        bodies.append(out.getvalue())
    settings = Settings()
    fit = 2 * spec.architecture.native_tokens

    def cpu_patches(body: bytes) -> np.ndarray:
        prepared = prepare(
            body,
            spec,
            "crop",
            name="'held-out'",
            max_pixels=settings.image_max_pixels,
            fit_max_tokens=fit,
        )
        return prepared.patches

    def top1(patches: np.ndarray) -> int:
        (logits,) = session.run(None, {spec.inputs[0].name: patches[None]})[:1]
        return int(np.argmax(logits[0]))

    cpu = [top1(cpu_patches(body)) for body in bodies]
    held = Images(
        bodies, [f"held-out-{i}.jpg" for i in range(images)], "the demo's held-out set, JPEG q95"
    )
    encoded, which, _ = route_all(held, spec)
    device = list(cpu)  # what the device path does not take goes the CPU path
    refused = images - len(encoded)
    for start in range(0, len(encoded), BATCH):
        chunk = encoded[start : start + BATCH]
        batch = decoder.decode(chunk)
        refused += len(batch.refused)
        if batch.accepted:
            patches = host_patches(batch)
            for row, i in enumerate(batch.accepted):
                device[which[start + i]] = top1(patches[row])
    labels = data.labels.tolist()
    cpu_acc = 100.0 * sum(p == y for p, y in zip(cpu, labels, strict=True)) / images
    dev_acc = 100.0 * sum(p == y for p, y in zip(device, labels, strict=True)) / images
    apart = round(abs(cpu_acc - dev_acc), 2)
    return Accuracy(
        images, round(cpu_acc, 2), round(dev_acc, 2), refused, apart, apart <= ACCURACY_POINTS
    )


def decoders(cpu_smoke: bool) -> list[tuple[DeviceDecoder, bool]]:
    if cpu_smoke:
        return [(HostDecoder(), False)]
    from app.runtime.nvdecode import NvDecoder

    return [(NvDecoder(hardware=True), True), (NvDecoder(hardware=False), False)]


def measure(cpu_smoke: bool = False, seconds: float = 5.0, limit: int = 100) -> Report:
    """Routing, parity and throughput on the photos; what the GPU check calls."""
    spec = vit_b16_spec()
    images = load_images(limit)
    encoded, which, routed = route_all(images, spec)
    found = decoders(cpu_smoke)
    first = found[0][0]
    result = parity(first, images, spec, encoded, which)
    speeds = [throughput(d, hw, encoded, seconds) for d, hw in found] if encoded else []
    accuracy = demo_accuracy(first, 100 if cpu_smoke else 1000)
    not_run = ["every GPU figure: this is the Pillow stand-in on the CPU"] if cpu_smoke else []
    return Report(
        mode="cpu-smoke" if cpu_smoke else "gpu",
        source=images.source,
        grid=spec.architecture.grid,
        routed=dict(sorted(routed.items())),
        parity=result,
        throughput=speeds,
        targets={
            "mean_abs": MEAN_TARGET,
            "p99_abs": P99_TARGET,
            "accuracy_points": ACCURACY_POINTS,
        },
        not_run=not_run,
        accuracy=accuracy,
    )


def summary(report: Report) -> str:
    """One line: the parity against its targets and each decoder's img/s."""
    p = report.parity
    speeds = ", ".join(f"{t.decoder} {t.images_per_s} img/s" for t in report.throughput)
    verdict = "met" if p.within_targets else "NOT met"
    a = report.accuracy
    accuracy = (
        ""
        if a is None
        else f"; demo accuracy on JPEG q95: CPU path {a.cpu_path}%, device path {a.device_path}% "
        f"({a.points_apart} points apart, target {ACCURACY_POINTS})"
    )
    return (
        f"device decode ({report.mode}) parity over {p.images} photos: mean {p.mean_abs}, "
        f"p99 {p.p99_abs} (targets {MEAN_TARGET}, {P99_TARGET}: {verdict}); {speeds}{accuracy}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="the Pillow stand-in, on a CPU")
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput run")
    parser.add_argument("--limit", type=int, default=100, help="photos")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_decode.json")
    args = parser.parse_args(argv)
    report = measure(args.cpu_smoke, args.seconds, args.limit)
    notes: dict[str, Any] = {"mode": report.mode}
    write_results(args.out, report, notes)
    print(f"routed: {report.routed}")
    print(summary(report))


if __name__ == "__main__":
    main()
