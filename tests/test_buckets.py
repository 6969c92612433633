"""Aspect-ratio buckets: the sizes, and assignment as a pure function of image sizes."""

from __future__ import annotations

import random

import pytest

from runner.training.buckets import assign, bucket_sizes, cropped_fraction, describe, fill


def test_buckets_hold_about_resolution_squared_pixels_in_steps_of_64():
    sizes = bucket_sizes(512)
    assert (512, 512) in sizes and (448, 576) in sizes and (576, 448) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0 and min(w, h) >= 256 and max(w, h) <= 1024
        assert w * h <= 512 * 512
        assert w * h >= 512 * 512 * 0.75
    # A resolution that is not a multiple of 64 uses steps of 8.
    assert all(w % 8 == 0 and h % 8 == 0 for w, h in bucket_sizes(200))
    assert bucket_sizes(64, min_side=32, max_side=128, step=8) == bucket_sizes(64, 32, 128, 8)


def test_assignment_is_a_pure_function_of_the_size():
    sizes = bucket_sizes(512)
    images = [
        (random.Random(i).randint(100, 4000), random.Random(i + 1).randint(100, 4000)) for i in range(200)
    ]
    first = [assign(s, sizes) for s in images]
    shuffled = list(zip(images, first, strict=True))
    random.Random(3).shuffle(shuffled)
    assert all(assign(s, list(reversed(sizes))) == b for s, b in shuffled)
    assert assign((1000, 1000), sizes) == (512, 512)


@pytest.mark.parametrize("size", [(3024, 4032), (4032, 3024), (1080, 1920), (1920, 1080)])
def test_portrait_and_landscape_keep_their_content(size):
    bucket = assign(size, bucket_sizes(512))
    # The bucket has the image's orientation and nearly its aspect ratio; the crop removes a few percent.
    assert (bucket[0] > bucket[1]) == (size[0] > size[1])
    assert abs(bucket[0] / bucket[1] - size[0] / size[1]) / (size[0] / size[1]) < 0.12
    assert cropped_fraction(size, bucket) < 0.12
    resized, (top, left) = fill(size, bucket)
    assert resized[0] >= bucket[0] and resized[1] >= bucket[1]
    assert top >= 0 and left >= 0 and top + bucket[1] <= resized[1] and left + bucket[0] <= resized[0]


def test_the_log_line_counts_images_per_bucket():
    assert describe([(448, 576), (512, 512), (448, 576)]) == "buckets: 2 images 448x576, 1 image 512x512"
