"""SDXL conditioning beside the recipe's inputs: the time ids name the crop the UNet sees, trained encoders
embed a prompt as diffusers does with the adapter loaded, latents are encoded in fp32, renders and priors
condition on the size they draw, and an EDM-scheduled model is refused."""

from __future__ import annotations

from types import SimpleNamespace

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
    write_picture,
)
from tests.steps_fixtures import make_prior, model_cache

pytestmark = pytest.mark.torch


class _PoolingVae:
    """Latents: the crop's first channel, 4x4 average-pooled; no sampling noise (std 0)."""

    config = SimpleNamespace(
        scaling_factor=1.0, shift_factor=None, block_out_channels=(8, 8, 8), latent_channels=4
    )

    def parameters(self):
        import torch

        return iter([torch.zeros(1)])

    def encode(self, pixels):
        import torch.nn.functional as F

        mean = F.avg_pool2d(pixels, 4)[:, :1].repeat(1, 4, 1, 1)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=mean * 0))


@pytest.mark.parametrize("center_crop", [True, False], ids=["center", "random"])
@pytest.mark.parametrize("buckets", [False, True], ids=["square", "buckets"])
def test_time_ids_name_the_crop_the_unet_sees(folders, center_crop, buckets):  # noqa: F811
    """Every example's time ids are the file's upright size, the target size, and the top-left corner,
    in the resized image as flipped, of exactly the pixels that were encoded."""
    import torch
    import torch.nn.functional as F
    from PIL import Image, ImageOps

    from runner.imagefiles import list_images
    from runner.project.schema import Subject, TrainSettings
    from runner.training.data import ExampleOrder, derive_seed, read_images
    from runner.training.latents import LatentCache

    dog, _ = folders
    settings = TrainSettings(
        resolution=RESOLUTION, steps=1, center_crop=center_crop, random_flip=True, buckets=buckets
    )
    subject = Subject(name="dog", images=str(dog), instance_prompt="sks dog", train=settings)
    images, _ = read_images(SimpleNamespace(subject=subject, prior=None, class_dir=None), lambda m: None)
    cache = LatentCache(_PoolingVae(), images, settings, "cpu", torch.float32)
    files = list_images(dog)
    order = ExampleOrder(SEED, len(files), 0)
    seen = set()
    for position in range(24):
        (group,) = cache.batch([position], order, SEED, 1000, None)
        (ids,) = group.conditions
        index = order(position)[0]
        image = ImageOps.exif_transpose(Image.open(files[index])).convert("RGB")
        target = recipe_bucket(image.size, RESOLUTION) if buckets else (RESOLUTION, RESOLUTION)
        assert ids[:2] == (image.height, image.width) and ids[4:] == target
        scale = max(target[1] / image.width, target[0] / image.height)
        size = (max(target[1], round(image.width * scale)), max(target[0], round(image.height * scale)))
        resized = torch.from_numpy(np.array(image.resize(size, Image.Resampling.BILINEAR))).permute(2, 0, 1)
        g = torch.Generator().manual_seed(derive_seed(SEED, "example", "instance", position))
        shape = (4, target[0] // 4, target[1] // 4)
        torch.randint(0, 1000, (1,), generator=g)  # the timestep, then the noise and the latent sample
        torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        flip = torch.rand(1, generator=g).item() < 0.5
        flipped = resized.flip(-1) if flip else resized
        top, left = ids[2:4]
        if center_crop:  # centred in the unflipped image, then mirrored with it
            centre = (round((size[1] - target[0]) / 2), round((size[0] - target[1]) / 2))
            assert (top, left) == (centre[0], size[0] - target[1] - centre[1] if flip else centre[1])
        crop = flipped[:, top : top + target[0], left : left + target[1]]
        assert tuple(crop.shape[1:]) == target
        pooled = F.avg_pool2d(crop.float()[None] / 127.5 - 1.0, 4)[0, 0]
        torch.testing.assert_close(group.latents[0, 0], pooled, atol=1e-5, rtol=0)
        seen.add((index, flip, left))
    # The draws covered every image, both flips, and (random crops) several crops of an image.
    assert {i for i, _, _ in seen} == set(range(len(files))) and {f for _, f, _ in seen} == {True, False}
    if not center_crop:
        assert len({left for i, _, left in seen if i == 0}) > 2


def test_trained_encoders_embed_the_prompt_as_the_adapter_loaded_in_diffusers_does(tmp_path, folders):  # noqa: F811
    """At step 2 the prompt embeddings and pooled embeddings come from both LoRA'd text encoders: the
    same as diffusers' pipeline gives with the step-1 adapter loaded by load_lora_weights (diffusers file
    and kohya file alike)."""
    import torch

    from runner.adapters import DIFFUSERS_WEIGHTS
    from runner.steps import KOHYA_STEM

    dog, classes = folders
    train = dict(steps=2, save_steps=[1], learning_rate=1e-2, train_text_encoder=True, batch_size=1)
    calls, _ = train_one_step(tmp_path, dog, classes, "tiny-sdxl", train)
    assert len(calls) == 2
    (_, _, hidden), kwargs, _ = calls[1]
    pooled = kwargs["added_cond_kwargs"]["text_embeds"]
    snapshot = tmp_path / "work" / "snapshots" / "1"
    base = sdxl_pipeline("tiny-sdxl")
    plain = recipe_prompts(base, [INSTANCE_PROMPT, CLASS_PROMPT])
    for weights in (DIFFUSERS_WEIGHTS, f"{KOHYA_STEM}.safetensors"):
        pipe = sdxl_pipeline("tiny-sdxl")
        pipe.load_lora_weights(str(snapshot), weight_name=weights, adapter_name="dog")
        embeds, pooled_embeds = recipe_prompts(pipe, [INSTANCE_PROMPT, CLASS_PROMPT])
        # Both encoders' LoRAs moved: each half of the embeddings, and the pooled ones, differ from the base.
        assert (embeds - plain[0])[..., :32].abs().max() > 1e-4, weights
        assert (embeds - plain[0])[..., 32:].abs().max() > 1e-4, weights
        assert (pooled_embeds - plain[1]).abs().max() > 1e-4, weights
        torch.testing.assert_close(hidden, embeds, atol=1e-5, rtol=1e-4, msg=weights)
        torch.testing.assert_close(pooled, pooled_embeds, atol=1e-5, rtol=1e-4, msg=weights)


def test_an_edm_scheduled_model_is_refused_rather_than_trained_on_a_default_schedule():
    """Playground v2.5 is an SDXL UNet with an EDM scheduler: its config has sigmas and no betas, so
    DDPMScheduler.from_config would make the default linear betas and train on them without a word."""
    from diffusers import EDMDPMSolverMultistepScheduler, EulerDiscreteScheduler

    from runner.errors import StepError
    from runner.training.loop import _noise_scheduler

    run = SimpleNamespace(pipe=SimpleNamespace(scheduler=EDMDPMSolverMultistepScheduler()))
    with pytest.raises(StepError, match="EDMDPMSolverMultistepScheduler, an EDM noise schedule"):
        _noise_scheduler(run)
    euler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    run = SimpleNamespace(pipe=SimpleNamespace(scheduler=euler))
    _noise_scheduler(run)
    assert run.noise.betas[-1].item() == pytest.approx(0.012)


def test_latents_are_encoded_in_fp32_whatever_the_vae_dtype(tmp_path):
    """SDXL's VAE overflows in fp16: its latents come from an fp32 pass over the weights, as the recipe
    keeps its VAE in fp32, and the (shared) VAE is left in the dtype it had."""
    import torch
    from diffusers import AutoencoderKL

    from runner import families
    from runner.project.schema import Subject, TrainSettings
    from runner.training.data import read_images
    from runner.training.latents import LatentCache

    assert families.get("sdxl").vae_fp32
    dog = tmp_path / "dog"
    dog.mkdir()
    write_picture(dog / "0.png", 36, 32, 0)
    settings = TrainSettings(resolution=32, steps=1, center_crop=True)
    subject = Subject(name="dog", images=str(dog), instance_prompt="sks dog", train=settings)

    def vae():  # a small one: bf16 convolutions are slow on a CPU
        torch.manual_seed(0)
        return AutoencoderKL(block_out_channels=(16,), norm_num_groups=8, latent_channels=4)

    low = vae().to(torch.bfloat16)
    full = vae()
    full.load_state_dict({k: v.float() for k, v in low.state_dict().items()})

    def moments(model, **kw):
        images, _ = read_images(SimpleNamespace(subject=subject, prior=None, class_dir=None), lambda m: None)
        pixels = images.instance[0].clone()
        cache = LatentCache(model, images, settings, "cpu", torch.bfloat16, **kw)
        return cache.moments[("instance", 0, False)], pixels

    (mean, std), pixels = moments(low, vae_fp32=True)
    assert next(low.parameters()).dtype == torch.bfloat16 and mean.dtype == torch.float32
    left = round((pixels.shape[2] - 32) / 2)
    crop = pixels[:, :, left : left + 32].float()[None] / 127.5 - 1.0
    with torch.no_grad():
        want = full.encode(crop).latent_dist
    torch.testing.assert_close(mean, want.mean[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, want.std[0], atol=1e-5, rtol=1e-5)
    (bf16, _), _ = moments(low, vae_fp32=False)  # control: the bf16 pass is measurably elsewhere
    assert (bf16 - want.mean[0]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["render", "prior"])
def test_renders_and_priors_condition_the_unet_on_the_size_they_draw(tmp_path, kind):
    """At inference the pipeline conditions on (height, width, 0, 0, height, width) of the size asked
    for: a wide render, and a prior at its own size, draw at that size and say it to the UNet."""
    import torch
    from PIL import Image

    from runner.steps import prior
    from tests.blend_fixtures import context, run_render

    cache = model_cache("tiny-sdxl")
    unet = cache.pipeline().unet
    seen = []
    hook = unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True
    )
    try:
        if kind == "render":
            out = run_render(tmp_path, "wide", "none", {}, cache, steps=1, seeds=[0], width=64, height=48)
        else:
            out = tmp_path / "prior"
            spec = make_prior(num_images=1, steps=1, width=48, height=64)
            prior.run(context("prior", spec, out, {}, cache))
    finally:
        hook.remove()
    (image,) = [p for p in out.glob("*.png") if p.name != "grid.png"]
    width, height = Image.open(image).size
    assert (width, height) == ((64, 48) if kind == "render" else (48, 64))
    # One call: the prompt's and the negative's rows (classifier-free guidance) alike.
    (time_ids,) = seen
    assert time_ids.tolist() == [[height, width, 0, 0, height, width]] * 2
    assert time_ids.dtype == torch.float32
