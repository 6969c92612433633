"""The tiny SDXL training set, one train step with the UNet's inputs recorded, and diffusers' own SDXL pipeline
and prompt encoding, for the SDXL input tests.

Import by name (`from tests.sdxl_fixtures import folders, train_one_step`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.steps_fixtures import make_prior, make_subject, model_cache, train_context

SEED = 5


RESOLUTION = 64


INSTANCE_PROMPT = "a photo of sks dog"


CLASS_PROMPT = "a photo of dog"


def write_picture(path: Path, width: int, height: int, seed: int, orientation: int | None = None) -> None:
    """Smooth random colours, so that a crop one pixel off gives other latents."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([(xx * rng.uniform(1, 3) + yy * rng.uniform(0, 2) + rng.uniform(0, 80)) % 256] * 3, -1)
    pixels[..., 1] = (pixels[..., 1] * 0.7 + 40) % 256
    image = Image.fromarray(pixels.astype(np.uint8))
    if orientation is None:
        image.save(path)
    else:  # stored sideways, upright once the EXIF orientation is applied
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(path, exif=exif, quality=95)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-inputs")
    dog, classes = root / "dog", root / "class"
    dog.mkdir()
    classes.mkdir()
    write_picture(dog / "0.png", 97, 70, 0)  # landscape, an odd overhang: crop rounding shows
    write_picture(dog / "1.jpg", 90, 70, 1, orientation=6)  # 70x90 upright (portrait)
    write_picture(dog / "2.png", 64, 64, 2)
    # Sizes of their own (the recipe gives the instance's), and buckets no instance image has.
    write_picture(classes / "0.png", 112, 48, 3)
    write_picture(classes / "1.png", 48, 112, 4)
    for name, caption in (("0", "sks dog on grass"), ("1", "sks dog, close up"), ("2", "a photo of sks dog")):
        (dog / f"{name}.txt").write_text(caption)
    return dog, classes


def train_one_step(tmp_path, dog, classes, base, train, prior=True, captions=False):
    """Run one train step; returns (the UNet's calls as (args, kwargs, output), dbl.json)."""
    import dataclasses

    import torch

    cache = model_cache(base)
    calls = []

    def before(module, args, kwargs):
        calls.append([tuple(a.detach().clone() for a in args), detached(kwargs)])

    def after(module, args, kwargs, output):
        calls[-1].append(output.sample.detach().clone())

    unet = cache.pipeline(torch.float32).unet
    hooks = [
        unet.register_forward_pre_hook(before, with_kwargs=True),
        unet.register_forward_hook(after, with_kwargs=True),
    ]
    subject = make_subject(dog, prior="dog" if prior else None, train={"steps": 1, **train})
    if captions:
        subject = dataclasses.replace(subject, caption_extension=".txt")
    ctx = train_context(
        tmp_path,
        subject,
        prior=make_prior(num_images=2, class_prompt=CLASS_PROMPT) if prior else None,
        class_dir=classes if prior else None,
        base_model=base,
        seed=SEED,
    )
    try:
        from runner.steps import train as train_step

        train_step.run(ctx)
    finally:
        for hook in hooks:
            hook.remove()
    return calls, json.loads((ctx.out / "dbl.json").read_text())


def detached(value):
    if isinstance(value, dict):
        return {k: detached(v) for k, v in value.items()}
    return value.detach().clone() if hasattr(value, "detach") else value


def sdxl_pipeline(base):
    from diffusers import StableDiffusionXLPipeline

    from runner.models import ensure_builtin

    folder = ensure_builtin(base) if base == "tiny-sdxl" else base
    return StableDiffusionXLPipeline.from_pretrained(str(folder))


def recipe_bucket(size, resolution):
    from runner.training.buckets import assign, bucket_sizes

    width, height = assign(size, bucket_sizes(resolution))
    return height, width


def recipe_prompts(pipe, prompts):
    """diffusers' own SDXL prompt encoding: (embeddings, pooled embeddings) of each prompt."""
    import torch

    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    return embeds, pooled
