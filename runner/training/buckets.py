"""Aspect-ratio buckets: sizes of about resolution² pixels, and which one each image goes to.

Pure functions of the numbers they are given (no torch, no files), so the assignment of an image to a
bucket depends on its size only, never on the order images are read in.
"""

from __future__ import annotations

import math
from collections import Counter


def default_step(resolution: int) -> int:
    """64 px; 8 px for a resolution below 256 or not a multiple of 64 (64 px steps would leave a
    small resolution with the square bucket alone)."""
    return 64 if resolution % 64 == 0 and resolution >= 256 else 8


def bounds(
    resolution: int, min_side: int | None = None, max_side: int | None = None, step: int | None = None
) -> tuple[int, int, int]:
    """(shortest side, longest side, step) of the buckets, defaults filled in and sides on the step."""
    step = step or default_step(resolution)
    low = _round_up(min_side or resolution // 2, step)
    high = max_side or resolution * 2
    return low, high - high % step, step


def bucket_sizes(
    resolution: int, min_side: int | None = None, max_side: int | None = None, step: int | None = None
) -> list[tuple[int, int]]:
    """(width, height) of every bucket: sides multiples of `step` within [min_side, max_side], and for
    each width the tallest height whose area stays within resolution². Sorted by aspect ratio."""
    min_side, max_side, step = bounds(resolution, min_side, max_side, step)
    area = resolution * resolution
    found = set()
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            found.add((width, height))
            found.add((height, width))
    return sorted(found, key=lambda s: (s[0] / s[1], s[0]))


def assign(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log ratio); the larger one on a tie."""
    width, height = size
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1], b))


def fill(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """How an image of `size` fills `bucket`: its resized (width, height), each side at least the
    bucket's, and the (top, left) offsets of the centred crop."""
    width, height = size
    scale = max(bucket[0] / width, bucket[1] / height)
    resized = (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
    return resized, ((resized[1] - bucket[1]) // 2, (resized[0] - bucket[0]) // 2)


# More of an image than this cropped away to fit its bucket is said: between neighbouring buckets the crop
# is a few percent, so it takes an aspect ratio beyond the widest or tallest bucket.
MAX_CROP = 0.25
# The same for the square crop without buckets, where every photo loses its sides: a 4:3 photo a quarter, a
# 3:2 one a third, as in every DreamBooth recipe. Past a half (wider than 2:1) it is a panorama or a strip.
MAX_SQUARE_CROP = 0.5


def cropped_fraction(size: tuple[int, int], bucket: tuple[int, int]) -> float:
    """The fraction of the image that the centred crop into `bucket` removes."""
    resized, _ = fill(size, bucket)
    return 1 - (bucket[0] * bucket[1]) / (resized[0] * resized[1])


def describe(assigned: list[tuple[int, int]]) -> str:
    """'buckets: 2 images 448x576, 1 image 512x512' (the log line)."""
    counts = Counter(assigned)
    parts = [
        f"{n} image{'s' if n != 1 else ''} {w}x{h}"
        for (w, h), n in sorted(counts.items(), key=lambda item: (item[0][0] / item[0][1], item[0]))
    ]
    return "buckets: " + ", ".join(parts)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step
