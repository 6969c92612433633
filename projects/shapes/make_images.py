"""Draw the instance images of projects/demo.toml: two subjects of the shapes world that tiny-shapes cannot draw.

    python projects/shapes/make_images.py

`ring/`: a yellow ring, five photos on different backgrounds; `cross/`: a red cross, four photos. Each
photo has a caption beside it (`00.txt`: "a yellow sks shape on a red background"), in the words
tiny-shapes was trained on, with the subject's identifier before the class word.
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

SUBJECTS = {  # name: shape, colour, identifier, the photos' backgrounds
    "ring": ("ring", "yellow", "sks", ("red", "blue", "black", "green", "white")),
    "cross": ("cross", "red", "zwx", ("white", "blue", "yellow", "black")),
}


def main() -> None:
    for name, (shape, colour, identifier, backgrounds) in SUBJECTS.items():
        folder = HERE / name
        folder.mkdir(exist_ok=True)
        for old in (*folder.glob("*.png"), *folder.glob("*.txt")):
            old.unlink()
        rng = random.Random(name)
        for i, background in enumerate(backgrounds):
            scene = shapes.random_scene(rng, shape, colour, background, size="large")
            shapes.draw(scene).save(folder / f"{i:02d}.png", optimize=True)
            caption = f"a {colour} {identifier} {shapes.CLASS_WORD} on a {background} background\n"
            (folder / f"{i:02d}.txt").write_text(caption)


if __name__ == "__main__":
    main()
