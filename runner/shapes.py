"""The shapes world: procedurally drawn, captioned pictures of flat shapes, and how to measure them.

`tiny-shapes`, a built-in base model, is trained on this world (bench/train_tiny_shapes.py), so its
renders can be checked by measurement instead of by eye: every picture is one shape of one colour on
a plain background, and `measure` reads back the background, the shape's colour and its kind.

    picture = draw(Scene("circle", "red", "blue", "large", (32, 32)))    # a 64 x 64 PIL image
    measure(picture)          # Measured(shape='circle', colour='red', background='blue', ...)
    caption(scene)            # "a large red circle on a blue background"

Only numpy and Pillow here: the planner imports this module to check project files.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # pixels, the side of every picture
SUPERSAMPLE = 4  # drawn at 4x and reduced, for smooth edges

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLOURS = tuple(PALETTE)
# The shapes the base model learns. RARE_SHAPES are drawn only for subjects: the base model never saw
# them, so a LoRA that makes it draw one has learned something.
SHAPES = ("circle", "square", "triangle")
RARE_SHAPES = ("ring", "cross")
SIZES = {"small": (7.0, 10.0), "large": (14.0, 19.0)}  # radius ranges, pixels
CLASS_WORD = "shape"  # the class noun: "a red shape" is any of SHAPES


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str
    centre: tuple[float, float]
    radius: float = 0.0  # 0: the middle of the size's range

    @property
    def r(self) -> float:
        low, high = SIZES[self.size]
        return self.radius or (low + high) / 2


def held_out(shape: str, colour: str, background: str) -> bool:
    """Combinations kept out of the base model's training set, to test that it composes words it knows
    into pictures it never saw. About one in seven, spread over every shape, colour and background."""
    return (SHAPES.index(shape) * 5 + COLOURS.index(colour) * 3 + COLOURS.index(background)) % 7 == 0


def combinations(heldout: bool | None = None) -> list[tuple[str, str, str]]:
    """(shape, colour, background) with colour != background; `heldout` picks one side of the split."""
    out = []
    for shape in SHAPES:
        for colour in COLOURS:
            for background in COLOURS:
                if colour == background:
                    continue
                if heldout is None or held_out(shape, colour, background) == heldout:
                    out.append((shape, colour, background))
    return out


def random_scene(
    rng: random.Random, shape: str, colour: str, background: str, size: str | None = None
) -> Scene:
    size = size or rng.choice(tuple(SIZES))
    low, high = SIZES[size]
    radius = rng.uniform(low, high)
    margin = radius + 3
    centre = (rng.uniform(margin, SIZE - margin), rng.uniform(margin, SIZE - margin))
    return Scene(shape, colour, background, size, centre, radius)


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """The scene's caption; with `rng`, one of its shorter forms now and then (size, background or the
    shape's kind left out), so that the model also learns what each word means alone."""
    size, shape, background = f"{scene.size} ", scene.shape, f" on a {scene.background} background"
    if rng is not None:
        roll = rng.random()
        if roll < 0.15:
            size = ""
        elif roll < 0.25:
            background = ""
        elif roll < 0.35 and scene.shape in SHAPES:
            shape = CLASS_WORD
    return f"a {size}{scene.colour} {shape}{background}"


def draw(scene: Scene) -> Image.Image:
    """The scene as a 64 x 64 RGB picture."""
    s = SUPERSAMPLE
    image = Image.new("RGB", (SIZE * s, SIZE * s), PALETTE[scene.background])
    pen = ImageDraw.Draw(image)
    fill = PALETTE[scene.colour]
    cx, cy, r = scene.centre[0] * s, scene.centre[1] * s, scene.r * s
    if scene.shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        h = r * 0.85
        pen.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif scene.shape == "triangle":
        pen.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.7), (cx - r * 0.95, cy + r * 0.7)], fill=fill)
    elif scene.shape == "ring":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        inner = r * 0.5
        pen.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=PALETTE[scene.background])
    elif scene.shape == "cross":
        w = r * 0.33
        pen.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        pen.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; known: {', '.join(SHAPES + RARE_SHAPES)}")
    return image.resize((SIZE, SIZE), Image.Resampling.BOX)


# --- measuring a picture ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """What a picture shows, read off its pixels ("" where it cannot be told)."""

    background: str
    colour: str
    shape: str
    area: float  # the shape's share of the picture

    def matches(self, **expected: str) -> bool:
        return all(getattr(self, key) == value for key, value in expected.items() if value)


def nearest_colour(rgb) -> tuple[str, float]:
    names = list(PALETTE)
    table = np.array([PALETTE[n] for n in names], dtype=np.float32)
    distance = np.linalg.norm(table - np.asarray(rgb, dtype=np.float32), axis=1)
    best = int(distance.argmin())
    return names[best], float(distance[best])


COLOUR_TOLERANCE = 90.0  # RGB distance beyond which a colour is no palette colour


def measure(image: Image.Image) -> Measured:
    """Read the background colour (the picture's border), the shape's colour (the pixels far from the
    background) and the shape's kind (from the mask's fill of its bounding box, its holes and its
    outline), by the nearest palette colour and simple geometry."""
    pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE)), dtype=np.float32)
    border = np.concatenate(
        [
            pixels[:2].reshape(-1, 3),
            pixels[-2:].reshape(-1, 3),
            pixels[:, :2].reshape(-1, 3),
            pixels[:, -2:].reshape(-1, 3),
        ]
    )
    bg_rgb = np.median(border, axis=0)
    if (np.linalg.norm(border - bg_rgb, axis=1) < 60).mean() < 0.7:
        return Measured("", "", "", 0.0)  # no plain background: noise, or a scene of another world
    background, bg_distance = nearest_colour(bg_rgb)
    if bg_distance > COLOUR_TOLERANCE:
        background = ""
    mask = np.linalg.norm(pixels - bg_rgb, axis=2) > 80.0
    mask = _largest_component(mask)
    area = float(mask.mean())
    if mask.sum() < 12:
        return Measured(background, "", "", area)
    shape_rgb = np.median(pixels[mask], axis=0)
    if (np.linalg.norm(pixels[mask] - shape_rgb, axis=1) < 80).mean() < 0.7:
        return Measured(background, "", "", area)  # not one colour: not a shape of this world
    colour, distance = nearest_colour(shape_rgb)
    if distance > COLOUR_TOLERANCE:
        colour = ""
    return Measured(background, colour, _kind(mask), area)


def _neighbours(mask: np.ndarray) -> np.ndarray:
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def _fill_from(seed: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    region = seed & allowed
    while True:
        grown = _neighbours(region) & allowed
        if (grown == region).all():
            return region
        region = grown


def _largest_component(mask: np.ndarray) -> np.ndarray:
    remaining, best = mask.copy(), np.zeros_like(mask)
    while remaining.any():
        seed = np.zeros_like(mask)
        y, x = np.argwhere(remaining)[0]
        seed[y, x] = True
        part = _fill_from(seed, remaining)
        if part.sum() > best.sum():
            best = part
        remaining &= ~part
    return best


def _kind(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = mask[top:bottom, left:right]
    outside = np.zeros_like(box)
    outside[0], outside[-1], outside[:, 0], outside[:, -1] = ~box[0], ~box[-1], ~box[:, 0], ~box[:, -1]
    reached = _fill_from(outside, ~box)
    holes = (~box & ~reached).sum()
    fill = box.mean()
    if holes >= 0.06 * box.size:
        return "ring"
    h, w = box.shape
    if min(h, w) / max(h, w) < 0.6:
        return ""  # a bar or a smear, not one of the shapes
    # Rows' widths: a triangle widens from top to bottom; a cross is widest in its middle third.
    widths = box.sum(axis=1) / w
    third = max(1, h // 3)
    top_w, mid_w, low_w = widths[:third].mean(), widths[third : -third or None].mean(), widths[-third:].mean()
    if fill > 0.9:
        return "square"
    if top_w < 0.45 and low_w > 0.65 and fill < 0.68:
        return "triangle"
    if mid_w > 0.85 and top_w < 0.5 and low_w < 0.5 and fill < 0.7:
        return "cross"
    if 0.7 <= fill <= 0.88:
        return "circle"
    return ""
