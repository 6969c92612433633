"""The shapes world and its fidelity scores: drawing, measuring, what a prompt asks for, the scores."""

from __future__ import annotations

import random

import pytest

from runner import fidelity, shapes


def test_every_drawn_scene_measures_as_what_was_drawn():
    rng = random.Random(0)
    misses = []
    for shape in shapes.SHAPES + ("ring",):
        for _ in range(60):
            colour, background = rng.sample(shapes.COLOURS, 2)
            scene = shapes.random_scene(rng, shape, colour, background)
            got = shapes.measure(shapes.draw(scene))
            if not got.matches(shape=shape, colour=colour, background=background):
                misses.append((scene, got))
    assert not misses, misses[:3]


def test_crosses_measure_as_crosses_most_of_the_time():
    rng = random.Random(1)
    scenes = [shapes.random_scene(rng, "cross", *rng.sample(shapes.COLOURS, 2)) for _ in range(100)]
    hits = sum(shapes.measure(shapes.draw(s)).shape == "cross" for s in scenes)
    assert hits >= 90


def test_a_plain_picture_shows_no_shape_and_noise_no_colour():
    import numpy as np
    from PIL import Image

    plain = shapes.measure(Image.new("RGB", (64, 64), shapes.PALETTE["blue"]))
    assert plain == shapes.Measured(background="blue", colour="", shape="", area=0.0)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert shapes.measure(Image.fromarray(noise)).shape == ""


def test_held_out_combinations_cover_every_word_and_are_never_in_the_training_split():
    held = shapes.combinations(heldout=True)
    kept = shapes.combinations(heldout=False)
    assert set(held).isdisjoint(kept) and len(held) + len(kept) == len(shapes.combinations())
    assert 0.1 < len(held) / len(shapes.combinations()) < 0.2
    for i, words in enumerate((shapes.SHAPES, shapes.COLOURS, shapes.COLOURS)):
        assert {combo[i] for combo in held} == set(words)
        assert {combo[i] for combo in kept} == set(words)


def test_captions_name_what_is_drawn():
    scene = shapes.Scene("triangle", "red", "white", "large", (32, 32))
    assert shapes.caption(scene) == "a large red triangle on a white background"
    rng = random.Random(0)
    forms = {shapes.caption(scene, rng) for _ in range(200)}
    assert "a red triangle on a white background" in forms
    assert "a large red shape on a white background" in forms
    assert "a large red triangle" in forms


@pytest.mark.parametrize(
    "prompt, want",
    [
        ("a large red circle on a blue background", dict(shape="circle", colour="red", background="blue")),
        ("A photo of a sks shape on a green background", dict(background="green", subject=True)),
        ("a white sks shape", dict(colour="white", subject=True)),
        ("a shape on a black background", dict(background="black", class_only=True)),
        ("a yellow square", dict(shape="square", colour="yellow")),
        ("sks", dict(subject=True)),
    ],
)
def test_what_a_prompt_asks_for(prompt, want):
    assert fidelity.expected(prompt) == fidelity.Expected(**want)


def _picture(shape, colour, background):
    return shapes.draw(shapes.Scene(shape, colour, background, "large", (32, 32)))


def test_scores_count_hits_among_the_images_each_score_is_about():
    ring = {"shape": "ring", "colour": "yellow"}
    items = [
        ("a red circle on a blue background", _picture("circle", "red", "blue")),  # prompt: hit
        ("a red circle on a blue background", _picture("circle", "red", "green")),  # prompt: miss
        ("a sks shape on a blue background", _picture("ring", "yellow", "blue")),  # subject hit, prompt hit
        ("a sks shape on a black background", _picture("circle", "yellow", "black")),  # subject miss
        ("a red sks shape", _picture("ring", "red", "white")),  # subject hit: the prompt's colour
        ("a shape on a white background", _picture("ring", "yellow", "white")),  # drift
        ("a shape on a white background", _picture("square", "green", "white")),  # no drift
    ]
    result = fidelity.score(items, ring)
    assert result["scores"] == {
        "prompt_fidelity": round(5 / 6, 4),
        "subject_fidelity": round(2 / 3, 4),
        "class_drift": 0.5,
    }
    assert result["counts"] == {"prompt_fidelity": 6, "subject_fidelity": 3, "class_drift": 2}
    assert [r.get("subject_fidelity") for r in result["images"]] == [
        None,
        None,
        True,
        False,
        True,
        None,
        None,
    ]


def test_without_a_subject_only_prompt_fidelity_is_scored():
    result = fidelity.score([("a sks shape on a red background", _picture("ring", "white", "red"))])
    assert result["scores"] == {"prompt_fidelity": 1.0}


def test_subject_traits_are_what_most_photos_show():
    photos = [_picture("ring", "yellow", bg) for bg in ("red", "blue", "black")] + [
        _picture("circle", "red", "white")
    ]
    assert fidelity.subject_traits(photos) == {"shape": "ring", "colour": "yellow"}
