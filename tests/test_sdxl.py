"""The sdxl family on tiny-sdxl: detection, training, the outputs in every layout, blends, the API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.steps import KOHYA_STEM
from tests.steps_fixtures import draw_images, make_prior, make_subject, model_cache, train_context

pytestmark = pytest.mark.torch

BASE = "tiny-sdxl"
PROMPT = "a photo of sks dog"
# Text-encoder LoRA on out_proj too: diffusers only recognises kohya text-encoder files that have it.
TE_TARGETS = dict(
    text_encoder_target_modules=["q_proj", "v_proj", "out_proj"],
    text_encoder_2_rank=3,
    text_encoder_2_alpha=3,
)


def _run(ctx):
    from runner.steps import train

    return train.run(ctx)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return draw_images(root / "dog", 3, size=(80, 64)), draw_images(root / "class", 2, size=(64, 64), seed=7)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, images):
    """Two short runs on tiny-sdxl with a prior, random crops and LoRAs on all three components."""
    instance, classes = images
    prior = make_prior(num_images=2)
    outs = {}
    for label, seed in (("a", 0), ("b", 1)):
        subject = make_subject(
            instance,
            prior="dog",
            train=dict(steps=2, batch_size=2, center_crop=False, random_flip=True),
            lora=TE_TARGETS,
        )
        tmp = tmp_path_factory.mktemp(f"sdxl-{label}")
        ctx = train_context(tmp, subject, prior=prior, class_dir=classes, base_model=BASE, seed=seed)
        outs[label] = (ctx.out, _run(ctx))
    return outs


def _outputs(pipe):
    """The UNet's output on fixed latents for PROMPT, through both text encoders (diffusers' own encoding)."""
    import torch

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 32, 32, generator=g), torch.tensor([500])
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
        time_ids = torch.tensor([[80.0, 64.0, 0.0, 8.0, 64.0, 64.0]])
        out = pipe.unet(x, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    return out, embeds, pooled


def test_tiny_sdxl_is_detected_from_its_files_not_its_name(tmp_path):
    from runner import families
    from runner.models import BaseModel, model_folder

    base = model_cache(BASE).base
    assert families.detect(base).name == "sdxl"
    folder = BaseModel.parse(str(model_folder(base)), tmp_path)
    assert folder.kind == "folder" and families.detect(folder).name == "sdxl"
    index = json.loads((Path(model_folder(base)) / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    sdxl = families.get("sdxl")
    assert sdxl.matches_file({"conditioner.embedders.1.model.ln_final.weight", "model.diffusion_model.x"})
    assert not families.get("sd1").matches_file({"conditioner.embedders.1.model.ln_final.weight"})


def test_outputs_load_the_way_users_load_them(trained):
    """PEFT folders, the diffusers file and the kohya file (via load_lora_weights), dbl's loader: one model."""
    import torch
    from peft import PeftModel

    from runner.adapters import DIFFUSERS_WEIGHTS, load_adapter_into, set_active, unload_adapters
    from runner.models import load_pipeline

    dog = trained["a"][0]
    base = model_cache(BASE).base
    assert {p.name for p in dog.iterdir() if p.is_dir()} == {"unet", "text_encoder", "text_encoder_2"}
    pipe = load_pipeline(base)
    plain = _outputs(pipe)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        setattr(pipe, name, PeftModel.from_pretrained(getattr(pipe, name), dog / name, adapter_name="dog"))
    peft_out = _outputs(pipe)
    for a, b in zip(plain, peft_out):
        assert not torch.allclose(a, b, atol=1e-6)  # every component's LoRA changes something

    kohya = f"{KOHYA_STEM}.safetensors"
    from safetensors import safe_open

    with safe_open(str(dog / kohya), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    prefixes = {k.split("_", 2)[1] for k in keys}
    assert prefixes == {"unet", "te1", "te2"}
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    with safe_open(str(dog / DIFFUSERS_WEIGHTS), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"unet", "text_encoder", "text_encoder_2"}

    for weight_name in (DIFFUSERS_WEIGHTS, kohya):
        pipe = load_pipeline(base)
        pipe.load_lora_weights(str(dog), weight_name=weight_name, adapter_name="dog")
        got = _outputs(pipe)
        for g, want in zip(got, peft_out):
            torch.testing.assert_close(g, want, rtol=0, atol=1e-4, msg=weight_name)
        unload_adapters(pipe)

    pipe = load_pipeline(base)
    load_adapter_into(pipe, dog, "dog")
    set_active(pipe, "dog")
    for g, want in zip(_outputs(pipe), peft_out):
        torch.testing.assert_close(g, want, rtol=0, atol=1e-4)


def test_the_second_text_encoder_has_its_own_rank_and_alpha(trained):
    dog = trained["a"][0]
    first = json.loads((dog / "text_encoder" / "adapter_config.json").read_text())
    second = json.loads((dog / "text_encoder_2" / "adapter_config.json").read_text())
    assert (first["r"], second["r"], second["lora_alpha"]) == (2, 3, 3)
    # Left out: the first encoder's targets.
    assert sorted(second["target_modules"]) == ["out_proj", "q_proj", "v_proj"]
