"""Draw the instance images of projects/flow.toml: a small cartoon dog and a striped toy, a few poses each.

    python projects/flow/make_images.py

The PNGs are committed; this script is how they were made (deterministic: same bytes every run).
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = 96


def dog(pose: int) -> Image.Image:
    rng = random.Random(pose)
    img = Image.new(
        "RGB", (SIZE, SIZE), (rng.randint(150, 210), rng.randint(190, 230), rng.randint(120, 170))
    )
    d = ImageDraw.Draw(img)
    x, y = 20 + rng.randint(-6, 6), 40 + rng.randint(-6, 6)
    brown, dark = (139, 90, 43), (70, 45, 20)
    d.ellipse([x, y, x + 50, y + 28], fill=brown)  # body
    d.ellipse([x + 38, y - 16, x + 62, y + 8], fill=brown)  # head
    d.ellipse([x + 36, y - 14, x + 44, y + 2], fill=dark)  # ear
    d.ellipse([x + 54, y - 8, x + 58, y - 4], fill=(0, 0, 0))  # eye
    for leg in (4, 14, 32, 42):
        d.rectangle([x + leg, y + 22, x + leg + 5, y + 38], fill=dark)
    d.line([x, y + 8, x - 10, y - 4 + rng.randint(-4, 4)], fill=dark, width=4)  # tail
    return img


def toy(pose: int) -> Image.Image:
    rng = random.Random(100 + pose)
    img = Image.new("RGB", (SIZE, SIZE), (235, 230, 220))
    d = ImageDraw.Draw(img)
    cx, cy, r = 48 + rng.randint(-8, 8), 50 + rng.randint(-8, 8), 26 + rng.randint(-4, 4)
    colors = [(220, 60, 60), (250, 200, 40), (60, 120, 220)]
    for i in range(6):
        d.pieslice(
            [cx - r, cy - r, cx + r, cy + r], i * 60 + pose * 15, (i + 1) * 60 + pose * 15, fill=colors[i % 3]
        )
    d.ellipse([cx - 6, cy - 6, cx + 6, cy + 6], fill=(255, 255, 255))
    return img


def main() -> None:
    for name, draw in (("dog", dog), ("toy", toy)):
        folder = HERE / name
        folder.mkdir(exist_ok=True)
        for pose in range(4):
            draw(pose).save(folder / f"{pose:02d}.png", optimize=True)


if __name__ == "__main__":
    main()
