"""The sdxl family on tiny-sdxl: detection, training, the outputs in every layout, blends, the API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.steps import KOHYA_STEM
from tests.steps_fixtures import draw_images, make_prior, make_subject, model_cache, run_train, train_context

pytestmark = pytest.mark.torch

BASE = "tiny-sdxl"
PROMPT = "a photo of sks dog"
# The recipe's text-encoder targets (q_proj, v_proj): the kohya file must load in diffusers with them.
TE_TARGETS = dict(
    text_encoder_2_rank=3,
    text_encoder_2_alpha=3,
)


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
        outs[label] = (ctx.out, run_train(ctx))
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

    from runner.adapters import DIFFUSERS_WEIGHTS
    from runner.models import load_pipeline
    from runner.pipeline_adapters import load_adapter_into, set_active, unload_adapters

    dog = trained["a"][0]
    base = model_cache(BASE).base
    assert {p.name for p in dog.iterdir() if p.is_dir()} == {"unet", "text_encoder", "text_encoder_2"}
    pipe = load_pipeline(base)
    plain = _outputs(pipe)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        setattr(pipe, name, PeftModel.from_pretrained(getattr(pipe, name), dog / name, adapter_name="dog"))
    peft_out = _outputs(pipe)
    for a, b in zip(plain, peft_out, strict=True):
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
        assert {k.split(".")[0] for k in f.keys()}  # noqa: SIM118 - safe_open == {"unet", "text_encoder", "text_encoder_2"}

    for weight_name in (DIFFUSERS_WEIGHTS, kohya):
        pipe = load_pipeline(base)
        pipe.load_lora_weights(str(dog), weight_name=weight_name, adapter_name="dog")
        got = _outputs(pipe)
        for g, want in zip(got, peft_out, strict=True):
            torch.testing.assert_close(g, want, rtol=0, atol=1e-4, msg=weight_name)
        unload_adapters(pipe)

    pipe = load_pipeline(base)
    load_adapter_into(pipe, dog, "dog")
    set_active(pipe, "dog")
    for g, want in zip(_outputs(pipe), peft_out, strict=True):
        torch.testing.assert_close(g, want, rtol=0, atol=1e-4)


def test_the_second_text_encoder_has_its_own_rank_and_alpha(trained):
    dog = trained["a"][0]
    first = json.loads((dog / "text_encoder" / "adapter_config.json").read_text())
    second = json.loads((dog / "text_encoder_2" / "adapter_config.json").read_text())
    assert (first["r"], second["r"], second["lora_alpha"]) == (2, 3, 3)
    # Left out: the first encoder's targets.
    assert sorted(second["target_modules"]) == ["q_proj", "v_proj"]


def _denoising_loss(pipe, files, resolution=64):
    """Instance loss on fixed noise and timesteps (the same numbers before and after training)."""
    import torch
    import torch.nn.functional as F

    from runner.images import prepare

    pixels = torch.stack([prepare(f, resolution) for f in files])
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
        n = len(files)
        embeds, pooled = embeds.expand(n, -1, -1), pooled.expand(n, -1)
        time_ids = torch.tensor(
            [[resolution, resolution, 0, 0, resolution, resolution]] * n, dtype=torch.float32
        )
        cond = {"text_embeds": pooled, "time_ids": time_ids}
        losses = []
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(latents.shape, generator=g)
            timesteps = torch.full((n,), t)
            noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
            pred = pipe.unet(noisy, timesteps, embeds, added_cond_kwargs=cond).sample
            losses.append(F.mse_loss(pred, noise).item())
    return sum(losses) / len(losses)


def test_training_lowers_the_instance_loss(tmp_path, images):
    from runner.imagefiles import list_images
    from runner.models import load_pipeline
    from runner.pipeline_adapters import load_adapter_into, set_active

    instance, _ = images
    files = list_images(instance)[:2]
    subset = tmp_path / "two"
    subset.mkdir()
    for f in files:
        (subset / f.name).write_bytes(f.read_bytes())
    lora = dict(rank=8, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    subject = make_subject(
        subset, train=dict(steps=10, learning_rate=5e-2, train_text_encoder=False), lora=lora
    )
    ctx = train_context(tmp_path, subject, base_model=BASE)
    metrics = run_train(ctx)
    assert not (ctx.out / "text_encoder").exists() and not (ctx.out / "text_encoder_2").exists()
    pipe = load_pipeline(model_cache(BASE).base)
    before = _denoising_loss(pipe, files)
    load_adapter_into(pipe, ctx.out, "dog")
    set_active(pipe, "dog")
    after = _denoising_loss(pipe, files)
    assert after < 0.98 * before, (before, after, metrics)
    assert metrics["loss_last"] < metrics["loss_first"]


def test_cat_blend_is_the_weighted_sum_of_deltas_on_all_three_components(tmp_path, trained):
    from runner.adapters import lora_delta
    from tests.blend_fixtures import run_blend

    a, b = trained["a"][0], trained["b"][0]
    out = run_blend(tmp_path, "mix", {"a": 1.0, "b": -0.7}, {"train:a": a, "train:b": b}, model_cache(BASE))
    for component in ("unet", "text_encoder", "text_encoder_2"):
        got = lora_delta(out, component)
        want = {}
        for folder, weight in ((a, 1.0), (b, -0.7)):
            for module, delta in lora_delta(folder, component).items():
                want[module] = want.get(module, 0) + weight * delta
        assert set(got) == set(want) and got
        assert max(float((got[m] - want[m]).abs().max()) for m in got) < 1e-5
        assert max(float(w.abs().max()) for w in want.values()) > 1e-4
    info = json.loads((out / "dbl.json").read_text())
    assert info["rank"] == {"unet": 8, "text_encoder": 4, "text_encoder_2": 6}


def test_render_matches_the_diffusers_sdxl_pipeline_with_the_adapter(tmp_path, trained):
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    from runner.models import ensure_builtin
    from tests.blend_fixtures import run_render

    dog = trained["a"][0]
    settings = dict(prompts=[PROMPT], seeds=[5], steps=3, guidance_scale=7, negative_prompt="blurry")
    out = run_render(tmp_path, "dog", "a", {"train:a": dog}, model_cache(BASE), **settings)
    assert (out / "grid.png").is_file()
    image = Image.open(out / "0-5.png")
    assert "Steps: 3" in image.info.get("parameters", "")
    got = np.asarray(image.convert("RGB")).astype(np.float32) / 255

    pipe = StableDiffusionXLPipeline.from_pretrained(ensure_builtin(BASE), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(dog), weight_name="pytorch_lora_weights.safetensors", adapter_name="dog")
    want = pipe(
        PROMPT,
        negative_prompt="blurry",
        num_inference_steps=3,
        guidance_scale=7,
        generator=torch.Generator().manual_seed(5),
    ).images[0]
    want = np.asarray(want).astype(np.float32) / 255
    assert np.abs(got - want).max() < 1e-3


def test_the_api_loads_tiny_sdxl_with_an_adapter(trained):
    import torch

    from runner import api

    dog = trained["a"][0]
    pipe = api.load_pipeline(BASE, {"dog": dog}, device="cpu")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert api.loaded_adapters(pipe) == ["dog"]
    image = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_second_text_encoder_settings_on_an_sd1_model_are_a_project_file_error(tmp_path):
    from runner.project import ProjectError, load_project

    draw_images(tmp_path / "dog", 1)
    path = tmp_path / "p.toml"
    path.write_text(
        '[project]\nbase_model = "tiny-sd"\n\n[lora]\nrank = 4\ntext_encoder_2_rank = 8\n\n'
        '[subjects.dog]\nimages = "dog"\ninstance_prompt = "sks dog"\n'
    )
    with pytest.raises(ProjectError) as err:
        load_project(path)
    text = str(err.value)
    assert "text_encoder_2_rank configures the text_encoder_2 of sdxl models" in text
    assert ":6" in text or "line 6" in text, text
    assert "remove text_encoder_2_rank" in text
    path.write_text(path.read_text().replace('"tiny-sd"', '"tiny-sdxl"'))
    assert load_project(path).lora.text_encoder_2_rank == 8


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_blends_that_need_equal_ranks_compare_the_second_text_encoder_too(tmp_path, method):
    """Subjects that differ only in text_encoder_2_rank: a project-file error for linear-like methods
    (cat and svd take any ranks)."""
    from runner.project import ProjectError, load_project

    draw_images(tmp_path / "dog", 1)
    density = "\ndensity = 0.5" if method == "ties" else ""
    text = (
        '[project]\nbase_model = "tiny-sdxl"\n\n[lora]\ntext_encoder_2_rank = 4\n\n'
        '[subjects.dog]\nimages = "dog"\ninstance_prompt = "sks dog"\n\n'
        '[subjects.toy]\nimages = "dog"\ninstance_prompt = "sks toy"\n[subjects.toy.lora]\ntext_encoder_2_rank = 8\n\n'
        f'[blends.mix]\nadapters = {{ dog = 1.0, toy = 1.0 }}\nmethod = "{method}"{density}\n'
    )
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ProjectError) as err:
        load_project(path)
    assert [str(p) for p in err.value.problems] == [
        f"blends.mix.method: method '{method}' needs equal text_encoder_2 ranks, got dog = 4, toy = 8 (line 19) - "
        'give the subjects the same lora.text_encoder_2_rank, or use method = "cat" (exact) or "svd"'
    ]
    for fine in ('"cat"', '"svd"'):
        path.write_text(text.replace(f'"{method}"{density}', fine))
        assert load_project(path).blends["mix"].method == fine.strip('"')
    path.write_text(text.replace("text_encoder_2_rank = 8", "text_encoder_2_rank = 4"))
    assert load_project(path).blends["mix"].method == method


def test_the_second_text_encoder_follows_the_first_in_the_equal_rank_check(tmp_path):
    """Left out, text_encoder_2_rank is text_encoder_rank: one problem, named after the key to change."""
    from runner.project import ProjectError, load_project

    draw_images(tmp_path / "dog", 1)
    path = tmp_path / "p.toml"
    path.write_text(
        '[project]\nbase_model = "tiny-sdxl"\n\n'
        '[subjects.dog]\nimages = "dog"\ninstance_prompt = "sks dog"\n[subjects.dog.lora]\ntext_encoder_rank = 4\n\n'
        '[subjects.toy]\nimages = "dog"\ninstance_prompt = "sks toy"\n\n'
        '[blends.mix]\nadapters = { dog = 1.0, toy = 1.0 }\nmethod = "linear"\n'
    )
    with pytest.raises(ProjectError) as err:
        load_project(path)
    assert [str(p) for p in err.value.problems] == [
        "blends.mix.method: method 'linear' needs equal text_encoder ranks, got dog = 4, toy = 16 (line 16) - "
        'give the subjects the same lora.text_encoder_rank, or use method = "cat" (exact) or "svd"'
    ]


# Slow (about 40 s): killing and resuming a real build is covered on tiny-sd by tests/test_build_real.py.
@pytest.mark.slow
def test_a_killed_sdxl_build_resumes_to_the_same_adapter(tmp_path):
    """A real `dbl build` on tiny-sdxl, SIGKILLed during training, resumes to the bytes of a whole run."""
    import signal

    from runner import lockfile
    from tests.real_builds import PROJECT, adapter_bytes, dbl, project, stop_during_training

    text = PROJECT.replace('"tiny-sd"', '"tiny-sdxl"').replace(
        "text_encoder_alpha = 4", "text_encoder_alpha = 4\ntext_encoder_2_rank = 2"
    )
    folders = {label: project(tmp_path / label, text).parent for label in ("whole", "killed")}
    done = dbl("build", "p.toml", "--no-progress", cwd=folders["whole"])
    assert done.returncode == 0, done.stdout + done.stderr
    reference = adapter_bytes(folders["whole"])
    assert {"unet/adapter_model.safetensors", "text_encoder_2/adapter_model.safetensors"} <= set(reference)

    folder = folders["killed"]
    proc, seen = stop_during_training("p.toml", folder, "step 12/")  # past checkpoint-10
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert "train:dog" not in lockfile.read(folder / "p.lock")
    again = dbl("build", "p.toml", "--no-progress", "-v", cwd=folder)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming from checkpoint-" in again.stdout
    assert adapter_bytes(folder) == reference


def test_class_images_are_generated_with_the_sdxl_pipeline(tmp_path):
    from PIL import Image

    from runner.steps import prior
    from tests.blend_fixtures import context

    spec = make_prior(num_images=2, steps=2)
    out = tmp_path / "prior"
    prior.run(context("prior", spec, out, {}, model_cache(BASE)))
    files = sorted(out.glob("*.png"))
    assert len(files) == 2 and Image.open(files[0]).size == (64, 64)


@pytest.mark.parametrize("method, extra", [("svd", {}), ("linear", {}), ("ties", {"density": 0.5})])
def test_every_blend_method_covers_the_three_components(tmp_path, trained, method, extra):
    from tests.blend_fixtures import run_blend

    a, b = trained["a"][0], trained["b"][0]
    out = run_blend(
        tmp_path,
        "mix",
        {"a": 1.0, "b": 0.5},
        {"train:a": a, "train:b": b},
        model_cache(BASE),
        method=method,
        **extra,
    )
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"unet", "text_encoder", "text_encoder_2"}
    info = json.loads((out / "dbl.json").read_text())
    assert set(info["relative_error"]) == {"unet", "text_encoder", "text_encoder_2"}


def test_a_single_file_sdxl_checkpoint_loads_as_the_same_model(tmp_path):
    import torch
    from diffusers import StableDiffusionXLPipeline

    from runner import families
    from runner.models import BaseModel, ensure_builtin, load_pipeline
    from tests.single_file import save_single_file

    folder = ensure_builtin(BASE)
    pipe = load_pipeline(model_cache(BASE).base)
    path = tmp_path / "tiny-sdxl.safetensors"
    save_single_file(pipe, path)
    base = BaseModel.parse(str(path), tmp_path)
    assert families.detect(base).name == "sdxl"
    # tiny-sdxl's two text encoders have the same width, which diffusers' single-file loader uses to tell
    # them apart (768 and 1280 in SDXL): convert the second one with its OpenCLIP converter directly.
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors.torch import load_file
    from transformers import CLIPTextModelWithProjection

    te2 = CLIPTextModelWithProjection(pipe.text_encoder_2.config)
    state = convert_open_clip_checkpoint(te2, load_file(str(path)), prefix="conditioner.embedders.1.model.")
    te2.load_state_dict(state, strict=True)
    single = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(folder), text_encoder_2=te2.eval(), torch_dtype=torch.float32
    )
    for a, b in zip(_outputs(pipe), _outputs(single), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pipe.vae(x).sample, single.vae(x).sample, rtol=0, atol=1e-5)


@pytest.mark.parametrize("train_text_encoder", [False, True], ids=["frozen-encoders", "encoder-loras"])
def test_captions_train_on_sdxl(tmp_path, images, train_text_encoder):
    """Per-image prompts on a family whose prompt embeddings are a pair (hidden states, pooled)."""
    import dataclasses
    import shutil

    instance = tmp_path / "dog"
    shutil.copytree(images[0], instance)
    (instance / "01.txt").write_text("a photo of [trigger] on a red sofa")
    subject = make_subject(
        instance, train=dict(steps=2, caption_dropout=0.5, train_text_encoder=train_text_encoder)
    )
    subject = dataclasses.replace(subject, caption_extension=".txt", trigger="sks dog")
    ctx = train_context(tmp_path, subject, base_model=BASE)
    metrics = run_train(ctx)
    assert metrics["steps"] == 2
    assert (ctx.out / "unet" / "adapter_model.safetensors").is_file()


@pytest.mark.filterwarnings("ignore:.*has no effect")
def test_only_a_text_projection_lora_is_fingerprinted_for_its_kohya_name(tmp_path):
    """The kohya name of a LoRA on text_encoder_2's text_projection was fixed: those train steps, and no
    others, have an input that says so, and a plan from a lockfile without it says why in words."""
    from runner import executor
    from runner.project import load_project
    from runner.reasons import explain

    draw_images(tmp_path / "dog", 1)
    path = tmp_path / "p.toml"
    path.write_text(
        '[project]\nbase_model = "tiny-sdxl"\n\n'
        '[subjects.dog]\nimages = "dog"\ninstance_prompt = "sks dog"\n'
        '[subjects.dog.lora]\ntext_encoder_2_target_modules = ["q_proj", "text_projection"]\n\n'
        '[subjects.toy]\nimages = "dog"\ninstance_prompt = "sks toy"\n'
        '[subjects.toy.lora]\ntext_encoder_target_modules = ["q_proj", "v_proj", "fc1"]\n\n'
        '[subjects.cat]\nimages = "dog"\ninstance_prompt = "sks cat"\n'
        '[subjects.cat.lora]\ntext_encoder_target_modules = ["q_proj", "text_projection"]\n'
        "[subjects.cat.train]\ntrain_text_encoder = false\n"
    )
    _, planned = executor.Workspace(load_project(path)).plan()
    inputs = {p.id: p.inputs for p in planned}
    # cat's text encoders do not train; toy's text_encoder_2 follows text_encoder_ (no text_projection)
    assert [sid for sid, i in inputs.items() if "kohya_names" in i] == ["train:dog"]
    old = {k: v for k, v in inputs["train:dog"].items() if k != "kohya_names"}
    assert explain(old, inputs["train:dog"]) == [
        "the kohya file names the LoRA on text_projection as its loaders read it"
    ]
    # Added with the setting that needs it: the setting says why.
    before = {**old, "lora": {**old["lora"], "text_encoder_2_target_modules": ["q_proj"]}}
    assert explain(before, inputs["train:dog"]) == [
        "lora.text_encoder_2_target_modules 1 -> 2 items (added 'text_projection')"
    ]


def test_an_sdxl_model_at_the_default_resolution_is_warned_of(tmp_path):
    """SDXL trained at 1024 px; a project that leaves resolution out trains at [train]'s default, 512: a
    warning at base_model, gone once resolution is set ([train], or every subject's own)."""
    import shutil
    import warnings

    from runner.models.builtin import ensure_builtin
    from runner.project import load_project

    shutil.copytree(ensure_builtin(BASE), tmp_path / "xl")
    draw_images(tmp_path / "dog", 1)
    path = tmp_path / "p.toml"
    text = '[project]\nbase_model = "xl"\n\n[subjects.dog]\nimages = "dog"\ninstance_prompt = "sks dog"\n'
    for written, warned in (
        ("", True),
        ("[train]\nresolution = 1024\n", False),
        ("[subjects.dog.train]\nresolution = 768\n", False),
    ):
        path.write_text(text + written)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_project(path)
        said = [str(w.message) for w in caught if "trained at 1024 px" in str(w.message)]
        assert said == (
            [
                f"{path}: project.base_model: is an sdxl model, trained at 1024 px, and [train] resolution is "
                "512 px by default (line 2) - set resolution = 1024 in [train] (or the size the model was "
                "fine-tuned at)"
            ]
            if warned
            else []
        ), written
    path.write_text(text.replace('"xl"', f'"{BASE}"'))  # a built-in: small, and left alone
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_project(path)
    assert not [w for w in caught if "trained at 1024 px" in str(w.message)]
