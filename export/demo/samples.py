"""Write a few demo images to try the service with (needs only numpy and Pillow).

python -m export.demo.samples --out samples --count 10
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from export.demo.shapes import CLASSES, generate


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("samples"))
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--seed", type=int, default=99)
    p.add_argument("--size", type=int, default=256, help="side in pixels (drawn at 64, upscaled)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    batch = generate(a.count, seed=a.seed)
    for i, (image, label) in enumerate(zip(batch.images, batch.labels, strict=True)):
        path = a.out / f"{i:02d}-{CLASSES[label]}.png"
        Image.fromarray(image).resize((a.size, a.size), Image.Resampling.BICUBIC).save(path)
        print(path)


if __name__ == "__main__":
    main()
