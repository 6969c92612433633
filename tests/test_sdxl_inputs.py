"""What one SDXL training step feeds the UNet, against an independent computation of the recipe.

diffusers' SDXL DreamBooth-LoRA script gives the UNet, for every example:
the latents of its crop, VAE-encoded in fp32 and scaled, noised at a uniform timestep; both text
encoders' penultimate hidden states, concatenated (ViT-L first), laid out [instance..., class...]; the
second encoder's pooled, projected output; and the time ids (file height, file width, crop top, crop
left, target height, target width), the crop being the one taken from the resized (and, when flipped,
mirrored) image. The loss is the MSE to the scheduler's target, instance and class halves apart.

Here those numbers are computed from the files with Pillow and diffusers' own pipeline and scheduler
formulas, on the random draws dbl documents (runner.training.data: each example's timestep, noise,
latent sample, flip, crop and noise offset from a generator seeded by its position), and compared with
what the UNet received in a one-step `train` on tiny-sdxl."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.sdxl_fixtures import (  # noqa: F401 (a fixture)
    CLASS_PROMPT,
    INSTANCE_PROMPT,
    RESOLUTION,
    SEED,
    folders,
    recipe_bucket,
    recipe_prompts,
    sdxl_pipeline,
    train_one_step,
)

pytestmark = pytest.mark.torch


def _v_base(tmp_path_factory) -> Path:
    """tiny-sdxl with a v-prediction scheduler, as a local folder."""
    from runner.models import ensure_builtin

    folder = tmp_path_factory.mktemp("tiny-sdxl-v") / "model"
    shutil.copytree(ensure_builtin("tiny-sdxl"), folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "v_prediction"}))
    return folder


def _alphas_cumprod(config):
    import torch

    assert config["beta_schedule"] == "scaled_linear"
    betas = (
        torch.linspace(
            config["beta_start"] ** 0.5,
            config["beta_end"] ** 0.5,
            config["num_train_timesteps"],
            dtype=torch.float32,
        )
        ** 2
    )
    return torch.cumprod(1.0 - betas, dim=0)


def _example(pipe, path, kind, position, train):
    """One example as the recipe makes it: (latents, noise, timestep, time ids, flipped)."""
    import torch
    from PIL import Image, ImageOps

    from runner.training.data import derive_seed

    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    original = (image.height, image.width)
    if train.get("buckets"):
        target = recipe_bucket(image.size, RESOLUTION)
    else:
        target = (RESOLUTION, RESOLUTION)
    scale = max(target[1] / image.width, target[0] / image.height)
    size = (max(target[1], round(image.width * scale)), max(target[0], round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    height, width = pixels.shape[1:]

    factor = pipe.vae_scale_factor
    shape = (pipe.vae.config.latent_channels, target[0] // factor, target[1] // factor)
    g = torch.Generator().manual_seed(derive_seed(SEED, "example", kind, position))
    timestep = int(torch.randint(0, 1000, (1,), generator=g))
    noise = torch.randn(shape, generator=g)
    eps = torch.randn(shape, generator=g)
    flip = bool(train.get("random_flip")) and torch.rand(1, generator=g).item() < 0.5
    if train.get("center_crop", True):
        top, left = round((height - target[0]) / 2), round((width - target[1]) / 2)
    else:
        top = int(torch.randint(0, height - target[0] + 1, (1,), generator=g)) if height > target[0] else 0
        left = int(torch.randint(0, width - target[1] + 1, (1,), generator=g)) if width > target[1] else 0
    if train.get("noise_offset"):
        noise = noise + train["noise_offset"] * torch.randn((shape[0], 1, 1), generator=g)
    # The recipe flips the resized image, then crops it: the crop's left edge is counted in the flipped
    # image (dbl draws it in the unflipped one; the same pixels).
    if flip:
        pixels, left = pixels.flip(-1), width - left - target[1]
    crop = pixels[:, top : top + target[0], left : left + target[1]]
    with torch.no_grad():
        vae = pipe.vae.to(torch.float32)
        dist = vae.encode((crop.float() / 127.5 - 1.0)[None]).latent_dist
    assert not getattr(vae.config, "shift_factor", None)
    latents = (dist.mean + dist.std * eps) * vae.config.scaling_factor
    return latents[0], noise, timestep, (*original, top, left, *target), flip


def _expected(pipe, dog, classes, train, prior=True, captions=False):
    """The examples of step 0, [instance..., class...], each (latents, noise, t, time ids, flip, prompt)."""
    from runner.imagefiles import list_images
    from runner.training.data import BucketOrder, ExampleOrder

    instance, klass = list_images(dog), list_images(classes)[:2] if prior else []
    batch = train.get("batch_size", 1)
    if train.get("buckets"):
        from PIL import Image, ImageOps

        def buckets(files):
            return [recipe_bucket(ImageOps.exif_transpose(Image.open(f)).size, RESOLUTION) for f in files]

        order = BucketOrder(SEED, buckets(instance), buckets(klass), batch)
    else:
        order = ExampleOrder(SEED, len(instance), len(klass))
    examples = []
    for position in range(batch):
        index = order(position)[0]
        prompt = instance[index].with_suffix(".txt").read_text() if captions else INSTANCE_PROMPT
        examples.append((*_example(pipe, instance[index], "instance", position, train), prompt))
    if prior:
        for position in range(batch):
            index = order(position)[1]
            examples.append((*_example(pipe, klass[index], "class", position, train), CLASS_PROMPT))
    return examples


def _check_step(pipe, calls, info, examples, train):
    import torch

    config = pipe.scheduler.config
    alphas = _alphas_cumprod(config)
    # One UNet call for the batch, or two when the class half has another bucket than the instance half.
    shapes = [tuple(e[0].shape) for e in examples]
    half = len(examples) // 2 if len(set(shapes)) > 1 else len(examples)
    spans = [examples[:half], examples[half:]] if half < len(examples) else [examples]
    assert len(calls) == len(spans)
    squared = []
    for (args, kwargs, output), span in zip(calls, spans, strict=True):
        sample, timesteps, hidden = args[:3]
        added = kwargs["added_cond_kwargs"]
        latents = torch.stack([e[0] for e in span])
        noise = torch.stack([e[1] for e in span])
        t = torch.tensor([e[2] for e in span])
        a = alphas[t].view(-1, 1, 1, 1)
        assert timesteps.tolist() == t.tolist()
        torch.testing.assert_close(sample, a.sqrt() * latents + (1 - a).sqrt() * noise, atol=2e-5, rtol=1e-4)
        embeds, pooled = recipe_prompts(pipe, [e[5] for e in span])
        torch.testing.assert_close(hidden, embeds, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(added["text_embeds"], pooled, atol=1e-5, rtol=1e-5)
        assert added["time_ids"].tolist() == [list(map(float, e[3])) for e in span]
        if config["prediction_type"] == "v_prediction":
            target = a.sqrt() * noise - (1 - a).sqrt() * latents
        else:
            target = noise
        per_example = ((output.float() - target) ** 2).mean(dim=(1, 2, 3))
        if train.get("snr_gamma"):
            snr = alphas[t] / (1 - alphas[t])
            clipped = torch.clamp(snr, max=train["snr_gamma"])
            per_example = per_example * (
                clipped / (snr + 1) if config["prediction_type"] == "v_prediction" else clipped / snr
            )
        squared += per_example.tolist()
    n = len(examples) // 2 if "prior_loss" in info["log"] else len(examples)
    assert info["log"]["instance_loss"] == pytest.approx([np.mean(squared[:n])], rel=2e-5)
    if "prior_loss" in info["log"]:
        assert info["log"]["prior_loss"] == pytest.approx([np.mean(squared[n:])], rel=2e-5)


CASES = {
    # Random crops and flips, both text encoders training, a batch of two with a prior.
    "random-crop-flip": dict(batch_size=2, center_crop=False, random_flip=True, train_text_encoder=True),
    # Centred crops into buckets (the class half of another bucket), frozen encoders, min-SNR, offset noise.
    "buckets-center-snr-offset": dict(
        batch_size=1,
        buckets=True,
        center_crop=True,
        random_flip=True,
        train_text_encoder=False,
        snr_gamma=5.0,
        noise_offset=0.1,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_sdxl_step_feeds_the_unet_what_the_recipe_computes(tmp_path, folders, case):  # noqa: F811
    dog, classes = folders
    train = CASES[case]
    calls, info = train_one_step(tmp_path, dog, classes, "tiny-sdxl", train)
    pipe = sdxl_pipeline("tiny-sdxl")
    examples = _expected(pipe, dog, classes, train)
    _check_step(pipe, calls, info, examples, train)
    if case == "random-crop-flip":  # the draws of this seed cover what the case is about
        assert {e[4] for e in examples} == {True, False}
        assert len({e[3][3] for e in examples}) > 1
    else:  # the class half has a bucket of its own: two UNet calls
        assert len(calls) == 2


def test_v_prediction_captions_and_min_snr_on_sdxl(tmp_path_factory, tmp_path, folders):  # noqa: F811
    dog, classes = folders
    base = _v_base(tmp_path_factory)
    train = dict(batch_size=2, center_crop=False, random_flip=True, train_text_encoder=True, snr_gamma=5.0)
    calls, info = train_one_step(tmp_path, dog, classes, str(base), train, prior=False, captions=True)
    assert info["prediction_type"] == "v_prediction"
    pipe = sdxl_pipeline(str(base))
    examples = _expected(pipe, dog, classes, train, prior=False, captions=True)
    assert len({e[5] for e in examples}) == 2  # two captions: one prompt per example
    _check_step(pipe, calls, info, examples, train)
