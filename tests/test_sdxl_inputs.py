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
what the UNet received in a one-step `train` on tiny-sdxl.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.steps_fixtures import make_prior, make_subject, model_cache, train_context

pytestmark = pytest.mark.torch

SEED = 5
RESOLUTION = 64
INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of dog"


def _picture(path: Path, width: int, height: int, seed: int, orientation: int | None = None) -> None:
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
    _picture(dog / "0.png", 97, 70, 0)  # landscape, an odd overhang: crop rounding shows
    _picture(dog / "1.jpg", 90, 70, 1, orientation=6)  # 70x90 upright (portrait)
    _picture(dog / "2.png", 64, 64, 2)
    # Sizes of their own (the recipe gives the instance's), and buckets no instance image has.
    _picture(classes / "0.png", 112, 48, 3)
    _picture(classes / "1.png", 48, 112, 4)
    for name, caption in (("0", "sks dog on grass"), ("1", "sks dog, close up"), ("2", "a photo of sks dog")):
        (dog / f"{name}.txt").write_text(caption)
    return dog, classes


def _v_base(tmp_path_factory) -> Path:
    """tiny-sdxl with a v-prediction scheduler, as a local folder."""
    from runner.models import ensure_builtin

    folder = tmp_path_factory.mktemp("tiny-sdxl-v") / "model"
    shutil.copytree(ensure_builtin("tiny-sdxl"), folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "v_prediction"}))
    return folder


def _train_one_step(tmp_path, dog, classes, base, train, prior=True, captions=False):
    """Run one train step; returns (the UNet's calls as (args, kwargs, output), dbl.json)."""
    import dataclasses

    import torch

    cache = model_cache(base)
    calls = []

    def before(module, args, kwargs):
        calls.append([tuple(a.detach().clone() for a in args), _detached(kwargs)])

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


def _detached(value):
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value.detach().clone() if hasattr(value, "detach") else value


# --- the independent computation ----------------------------------------------------------------------


def _pipeline(base):
    from diffusers import StableDiffusionXLPipeline

    from runner.models import ensure_builtin

    folder = ensure_builtin(base) if base == "tiny-sdxl" else base
    return StableDiffusionXLPipeline.from_pretrained(str(folder))


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


def _bucket(size, resolution):
    from runner.training.buckets import assign, bucket_sizes

    width, height = assign(size, bucket_sizes(resolution))
    return height, width


def _example(pipe, path, kind, position, train):
    """One example as the recipe makes it: (latents, noise, timestep, time ids, flipped)."""
    import torch
    from PIL import Image, ImageOps

    from runner.training.data import derive_seed

    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    original = (image.height, image.width)
    if train.get("buckets"):
        target = _bucket(image.size, RESOLUTION)
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


def _prompts(pipe, prompts):
    """diffusers' own SDXL prompt encoding: (embeddings, pooled embeddings) of each prompt."""
    import torch

    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    return embeds, pooled


def _expected(pipe, dog, classes, train, prior=True, captions=False):
    """The examples of step 0, [instance..., class...], each (latents, noise, t, time ids, flip, prompt)."""
    from runner.imagefiles import list_images
    from runner.training.data import BucketOrder, ExampleOrder

    instance, klass = list_images(dog), list_images(classes)[:2] if prior else []
    batch = train.get("batch_size", 1)
    if train.get("buckets"):
        from PIL import Image, ImageOps

        def buckets(files):
            return [_bucket(ImageOps.exif_transpose(Image.open(f)).size, RESOLUTION) for f in files]

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
        embeds, pooled = _prompts(pipe, [e[5] for e in span])
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
def test_one_sdxl_step_feeds_the_unet_what_the_recipe_computes(tmp_path, folders, case):
    dog, classes = folders
    train = CASES[case]
    calls, info = _train_one_step(tmp_path, dog, classes, "tiny-sdxl", train)
    pipe = _pipeline("tiny-sdxl")
    examples = _expected(pipe, dog, classes, train)
    _check_step(pipe, calls, info, examples, train)
    if case == "random-crop-flip":  # the draws of this seed cover what the case is about
        assert {e[4] for e in examples} == {True, False}
        assert len({e[3][3] for e in examples}) > 1
    else:  # the class half has a bucket of its own: two UNet calls
        assert len(calls) == 2


def test_v_prediction_captions_and_min_snr_on_sdxl(tmp_path_factory, tmp_path, folders):
    dog, classes = folders
    base = _v_base(tmp_path_factory)
    train = dict(batch_size=2, center_crop=False, random_flip=True, train_text_encoder=True, snr_gamma=5.0)
    calls, info = _train_one_step(tmp_path, dog, classes, str(base), train, prior=False, captions=True)
    assert info["prediction_type"] == "v_prediction"
    pipe = _pipeline(str(base))
    examples = _expected(pipe, dog, classes, train, prior=False, captions=True)
    assert len({e[5] for e in examples}) == 2  # two captions: one prompt per example
    _check_step(pipe, calls, info, examples, train)


# --- the time ids alone, fast: a stand-in VAE whose latents are the crop's pixels, pooled -------------


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
def test_time_ids_name_the_crop_the_unet_sees(folders, center_crop, buckets):
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
        target = _bucket(image.size, RESOLUTION) if buckets else (RESOLUTION, RESOLUTION)
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


def test_trained_encoders_embed_the_prompt_as_the_adapter_loaded_in_diffusers_does(tmp_path, folders):
    """At step 2 the prompt embeddings and pooled embeddings come from both LoRA'd text encoders: the
    same as diffusers' pipeline gives with the step-1 adapter loaded by load_lora_weights (diffusers file
    and kohya file alike)."""
    import torch

    from runner.adapters import DIFFUSERS_WEIGHTS
    from runner.steps import KOHYA_STEM

    dog, classes = folders
    train = dict(steps=2, save_steps=[1], learning_rate=1e-2, train_text_encoder=True, batch_size=1)
    calls, _ = _train_one_step(tmp_path, dog, classes, "tiny-sdxl", train)
    assert len(calls) == 2
    (_, _, hidden), kwargs, _ = calls[1]
    pooled = kwargs["added_cond_kwargs"]["text_embeds"]
    snapshot = tmp_path / "work" / "snapshots" / "1"
    base = _pipeline("tiny-sdxl")
    plain = _prompts(base, [INSTANCE_PROMPT, CLASS_PROMPT])
    for weights in (DIFFUSERS_WEIGHTS, f"{KOHYA_STEM}.safetensors"):
        pipe = _pipeline("tiny-sdxl")
        pipe.load_lora_weights(str(snapshot), weight_name=weights, adapter_name="dog")
        embeds, pooled_embeds = _prompts(pipe, [INSTANCE_PROMPT, CLASS_PROMPT])
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
    _picture(dog / "0.png", 36, 32, 0)
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
