"""Draw the instance images of projects/shapes.toml: two subjects of the shapes world that tiny-shapes cannot draw.

    python projects/shapes/make_images.py

`ring/`: a yellow ring, five photos on different backgrounds; `cross/`: a red cross, four photos.
tiny-shapes was trained on circles, squares and triangles only (runner/shapes.py), so a render that
shows a ring or a cross learned it from these. The PNGs are committed; this script is how they were
made (deterministic: same bytes every run).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from runner import shapes  # noqa: E402

SUBJECTS = {
    "ring": ("ring", "yellow", ("red", "blue", "black", "green", "white")),
    "cross": ("cross", "red", ("white", "blue", "yellow", "black")),
}


def main() -> None:
    for name, (shape, colour, backgrounds) in SUBJECTS.items():
        folder = HERE / name
        folder.mkdir(exist_ok=True)
        for old in folder.glob("*.png"):
            old.unlink()
        rng = random.Random(name)
        for i, background in enumerate(backgrounds):
            scene = shapes.random_scene(rng, shape, colour, background, size="large")
            shapes.draw(scene).save(folder / f"{i:02d}.png", optimize=True)


if __name__ == "__main__":
    main()
