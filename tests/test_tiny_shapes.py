"""tiny-shapes: the committed weights, the tokenizer, and a base model that draws what it is asked."""

from __future__ import annotations

import json
import random

import pytest

from runner import fidelity, shapes
from runner.families import tiny_shapes

# The sha256 of runner/families/tiny_shapes.safetensors, as bench/train_tiny_shapes.py wrote it.
WEIGHTS_SHA256 = "672034bb0533f94fb40659ee95deda7e1583886b2f8cdb54bd1210118b76b9f0"


def test_the_committed_weights_are_the_trained_ones():
    assert tiny_shapes.WEIGHTS.stat().st_size <= 20 * 1024 * 1024
    assert tiny_shapes.weights_sha256() == WEIGHTS_SHA256
    meta = tiny_shapes._metadata(tiny_shapes.WEIGHTS)
    settings = json.loads(meta["settings"])
    assert meta["model"] == "tiny-shapes" and settings["seed"] == 0
    assert float(meta["vae_scaling_factor"]) > 0


def test_every_word_of_the_world_is_one_token_and_the_identifier_is_not():
    tokenizer = tiny_shapes.make_tokenizer()
    for word in tiny_shapes.WORDS:
        assert len(tokenizer(word).input_ids) == 3, word  # start, the word, end
    assert len(tokenizer("sks").input_ids) > 3
    assert len(tokenizer("a large red circle on a blue background").input_ids) <= tiny_shapes.MAX_TOKENS


def test_the_weights_are_part_of_the_base_model_identity(tmp_path, monkeypatch):
    from runner.families import sd1

    before = sd1.FAMILY.builtin_identity("tiny-shapes")
    copy = tmp_path / "w.safetensors"
    copy.write_bytes(tiny_shapes.WEIGHTS.read_bytes() + b" ")
    monkeypatch.setattr(tiny_shapes, "WEIGHTS", copy)
    after = sd1.FAMILY.builtin_identity("tiny-shapes")
    assert before["weights_sha256"] != after["weights_sha256"]
    assert sd1.FAMILY.builtin_folder_name("tiny-shapes") != "tiny-shapes-v1"
    assert sd1.FAMILY.builtin_identity("tiny-sd") == {"version": 1}  # tiny-sd keeps its identity


@pytest.fixture(scope="module")
def pipe():
    import torch
    from diffusers import StableDiffusionPipeline

    from runner.models import ensure_builtin

    pipe = StableDiffusionPipeline.from_pretrained(str(ensure_builtin("tiny-shapes")))
    pipe.set_progress_bar_config(disable=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield pipe
    torch.set_num_threads(threads)  # the session's other tests compute as they would without this one


@pytest.mark.torch
def test_it_draws_held_out_combinations(pipe):
    """A short check of what bench/shapes_eval.py measures in full: renders of combinations the model
    never saw show the asked background, colour and shape (tiny-sd, random weights,
    gets none of them here)."""
    import torch

    rng = random.Random(0)
    combos = rng.sample(shapes.combinations(heldout=True), 8)
    prompts = [
        f"a large {colour} {shape} on a {background} background" for shape, colour, background in combos
    ]
    images = pipe(
        prompts, num_inference_steps=20, guidance_scale=3.0, generator=torch.Generator().manual_seed(0)
    ).images
    result = fidelity.score(list(zip(prompts, images, strict=True)))
    hits = {
        key: sum(r["measured"][key] == r["expected"][key] for r in result["images"])
        for key in ("shape", "colour", "background")
    }
    assert hits["background"] >= 7 and hits["colour"] >= 7, hits  # measured: 8 and 8 of 8
    assert result["scores"]["prompt_fidelity"] >= 6 / 8, result["images"]  # measured: 7 of 8
