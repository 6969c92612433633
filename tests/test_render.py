"""The render step: the pixels of the guide's inference code, A1111 parameters, grid, batch-invariance, and the
images of the previous build kept after a change of prompts or seeds."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.blend_fixtures import adapters, models, run_blend, run_render  # noqa: F401

pytestmark = pytest.mark.torch

PROMPTS = ["a photo of sks dog", "sks dog in a bucket"]


def _pixels(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255


def _plain_pipeline():
    import torch
    from diffusers import StableDiffusionPipeline

    from runner.models import ensure_builtin

    pipe = StableDiffusionPipeline.from_pretrained(ensure_builtin("tiny-sd"), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _guide_image(pipe, prompt, seed, **kwargs):
    import torch

    return (
        np.asarray(pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images[0]).astype(
            np.float32
        )
        / 255
    )


def test_none_renders_the_plain_base_pipeline(tmp_path, models):  # noqa: F811
    out = run_render(
        tmp_path, "base", "none", {}, models, prompts=PROMPTS[:1], seeds=[3], steps=4, guidance_scale=6
    )
    want = _guide_image(_plain_pipeline(), PROMPTS[0], 3, num_inference_steps=4, guidance_scale=6)
    assert np.abs(_pixels(out / "0-3.png") - want).max() < 1e-3


def test_repeated_seeds_are_a_warning_as_the_file_loads(tmp_path, models):  # noqa: F811
    """Said with the file and line, before any step runs (it needs no model), and not again by the step."""
    from runner.project import load_project
    from runner.project.problems import display

    path = tmp_path / "p.toml"
    path.write_text(
        '[project]\nbase_model = "tiny-sd"\n\n[renders.twice]\nadapter = "none"\nprompts = ["a dog"]\n'
        "seeds = [2, 1, 2, 1, 0]\n"
    )
    with pytest.warns(UserWarning) as said:
        load_project(path)
    assert [str(w.message) for w in said] == [
        f"{display(path)}: renders.twice.seeds: repeats 1, 2: the same images are rendered again, into the "
        "same files (line 7) - list each seed once"
    ]
    said = []
    settings = dict(prompts=PROMPTS[:1], seeds=[2, 1, 2, 1, 0], steps=1)
    out = run_render(tmp_path, "twice", "none", {}, models, log=said.append, **settings)
    assert [line for line in said if line.startswith("warning:")] == []
    assert sorted(p.name for p in out.glob("0-*.png")) == ["0-0.png", "0-1.png", "0-2.png"]


def test_seed_minus_one_is_said_to_be_a_seed_not_a_random_one(tmp_path):
    """Other tools read -1 as "a random seed": here it is a seed, and the file's load says so (once)."""
    from runner.project import load_project
    from runner.project.problems import display

    path = tmp_path / "p.toml"
    text = '[project]\nbase_model = "tiny-sd"\n\n[renders.r]\nadapter = "none"\nprompts = ["a dog"]\n'
    path.write_text(text + "seeds = [-1, 4]\n")
    with pytest.warns(UserWarning) as said:
        load_project(path)
    assert [str(w.message) for w in said] == [
        f"{display(path)}: renders.r.seeds: -1 is a seed like any other here, not a random one: it renders "
        "the same image at every build (line 7) - give the seeds to render (a build is reproducible); add "
        "seeds to see more images"
    ]
    path.write_text(text + "seeds = [-2, 4]\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_project(path)  # another negative seed: nothing to say


def test_pixels_match_the_guide_inference_code(tmp_path, adapters, models):  # noqa: F811
    from peft import PeftModel

    settings = dict(
        prompts=PROMPTS[:1], seeds=[5], steps=4, guidance_scale=7, negative_prompt="blurry, low quality"
    )
    out = run_render(tmp_path, "dog", "a", {"train:a": adapters["a"]}, models, **settings)

    pipe = _plain_pipeline()
    pipe.unet = PeftModel.from_pretrained(pipe.unet, adapters["a"] / "unet", adapter_name="dog")
    pipe.text_encoder = PeftModel.from_pretrained(
        pipe.text_encoder, adapters["a"] / "text_encoder", adapter_name="dog"
    )
    want = _guide_image(
        pipe, PROMPTS[0], 5, num_inference_steps=4, guidance_scale=7, negative_prompt="blurry, low quality"
    )
    assert np.abs(_pixels(out / "0-5.png") - want).max() < 1e-3
    # The shared pipeline is left as it was found.
    assert type(models.pipeline().unet).__name__ == "UNet2DConditionModel"
    assert type(models.pipeline().text_encoder).__name__ == "CLIPTextModel"


def test_a_blend_renders_differently_from_its_parents(tmp_path, adapters, models):  # noqa: F811
    inputs = {"train:a": adapters["a"], "train:b": adapters["b"]}
    blend = run_blend(tmp_path, "ab", {"a": 1.0, "b": 1.0}, inputs, models)
    settings = dict(prompts=PROMPTS[:1], seeds=[0], steps=3)
    images = {
        name: _pixels(run_render(tmp_path, name, name, {key: folder}, models, **settings) / "0-0.png")
        for name, key, folder in [
            ("a", "train:a", adapters["a"]),
            ("b", "train:b", adapters["b"]),
            ("ab", "blend:ab", blend),
        ]
    }
    base = _pixels(run_render(tmp_path, "none", "none", {}, models, **settings) / "0-0.png")
    for parent in ("a", "b"):
        assert np.abs(images["ab"] - images[parent]).mean() > 1e-3
        assert np.abs(images[parent] - base).mean() > 1e-3


def test_lora_scale_zero_is_the_base_model(tmp_path, adapters, models):  # noqa: F811
    settings = dict(prompts=PROMPTS[:1], seeds=[0], steps=3)
    base = run_render(tmp_path, "none", "none", {}, models, **settings)
    off = run_render(tmp_path, "off", "a", {"train:a": adapters["a"]}, models, lora_scale=0.0, **settings)
    half = run_render(tmp_path, "half", "a", {"train:a": adapters["a"]}, models, lora_scale=0.5, **settings)
    full = run_render(tmp_path, "full", "a", {"train:a": adapters["a"]}, models, **settings)
    assert np.array_equal(_pixels(off / "0-0.png"), _pixels(base / "0-0.png"))
    assert not np.array_equal(_pixels(half / "0-0.png"), _pixels(full / "0-0.png"))


def test_png_parameters_grid_and_batch_invariance(tmp_path, adapters, models):  # noqa: F811
    from PIL import Image

    settings = dict(prompts=PROMPTS, seeds=[0, 7, 9], steps=3, guidance_scale=7, negative_prompt="blurry")
    one = run_render(
        tmp_path,
        "one",
        "a",
        {"train:a": adapters["a"]},
        models,
        batch_size=1,
        scheduler="euler_a",
        **settings,
    )
    two = run_render(
        tmp_path,
        "two",
        "a",
        {"train:a": adapters["a"]},
        models,
        batch_size=2,
        scheduler="euler_a",
        **settings,
    )

    names = sorted(p.name for p in one.iterdir())
    assert names == sorted([f"{i}-{s}.png" for i in range(2) for s in (0, 7, 9)] + ["grid.png"])
    for name in names:
        # Batched kernels round differently (about 1e-6 before quantization): at most one level of 255,
        # at a rare pixel.
        diff = np.abs(_pixels(one / name) - _pixels(two / name))
        assert diff.max() <= 1 / 255 + 1e-6, name
        assert (diff > 0).mean() < 0.01, name

    with Image.open(one / "1-7.png") as image:
        assert image.size == (64, 64)  # tiny-sd's native size
        assert image.text["parameters"] == (
            "sks dog in a bucket\n"
            "Negative prompt: blurry\n"
            "Steps: 3, Sampler: Euler a, CFG scale: 7, Seed: 7, Size: 64x64, Model: tiny-sd, Lora: a:1"
        )
    with Image.open(one / "grid.png") as grid:
        assert grid.size == (3 * 64, 2 * 64)
        assert np.array_equal(
            np.asarray(grid.crop((64, 64, 128, 128))), np.asarray(Image.open(one / "1-7.png"))
        )
    assert type(models.pipeline().scheduler).__name__ == "DDIMScheduler"  # the base model's own, put back


def test_same_settings_same_bytes_and_explicit_size(tmp_path, models):  # noqa: F811
    from PIL import Image

    settings = dict(prompts=PROMPTS[:1], seeds=[1], steps=2, width=96, height=48, scheduler="dpm++")
    first = run_render(tmp_path, "first", "none", {}, models, **settings)
    second = run_render(tmp_path, "second", "none", {}, models, **settings)
    assert (first / "0-1.png").read_bytes() == (second / "0-1.png").read_bytes()
    with Image.open(first / "0-1.png") as image:
        assert image.size == (96, 48)
        assert "Negative prompt" not in image.text["parameters"]
        assert image.text["parameters"].endswith(
            "Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 1, Size: 96x48, Model: tiny-sd"
        )


def test_progress_at_the_start_and_once_a_batch(tmp_path, models):  # noqa: F811
    """A batch's images are drawn together: said one by one, they gave the display the rate of one image
    per batch, then that of a burst."""
    from runner.project.schema import Render
    from runner.steps import render
    from tests.blend_fixtures import context

    seen = []
    spec = Render(name="p", adapter="none", prompts=PROMPTS, seeds=[0, 1], steps=1, batch_size=3)
    render.run(
        context("render", spec, tmp_path / "out", {}, models, progress=lambda d, t, **m: seen.append((d, t)))
    )
    assert seen == [(0, 4), (3, 4), (4, 4)]


def test_a_stop_request_interrupts_and_restores_the_pipeline(tmp_path, adapters, models):  # noqa: F811
    from runner.project.schema import Render
    from runner.steps import StepInterrupted, render
    from tests.blend_fixtures import context

    spec = Render(name="s", adapter="a", prompts=PROMPTS, seeds=[0], steps=1, scheduler="heun")
    ctx = context("render", spec, tmp_path / "out", {"train:a": adapters["a"]}, models)
    ctx.should_stop = lambda: bool(list(ctx.out.iterdir()))  # stop once the first image is written
    with pytest.raises(
        StepInterrupted, match=r"^render:s stopped after 1 of 2 images; the next build keeps them"
    ):
        render.run(ctx)
    pipe = models.pipeline()
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


def test_several_adapters_one_grid_column_each(tmp_path, adapters, models):  # noqa: F811
    """`adapters = [...]`: every prompt and seed with each adapter in turn, a subfolder per adapter,
    and a grid with a column per adapter (named above it) and a row per prompt and seed."""
    from PIL import Image

    from runner.project.schema import Render
    from runner.steps import render
    from tests.blend_fixtures import context

    settings = dict(prompts=PROMPTS[:1], seeds=[0, 4], steps=2)
    names = ["a", "b", "none"]
    spec = Render(name="cmp", adapters=names, **settings)
    out = tmp_path / "render-cmp"
    inputs = {"train:a": adapters["a"], "train:b": adapters["b"]}
    metrics = render.run(context("render", spec, out, inputs, models))
    assert metrics["images"] == 6

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted([f"{a}/0-{s}.png" for a in names for s in (0, 4)] + ["grid.png"])
    with Image.open(out / "a" / "0-4.png") as image:
        assert image.text["parameters"].endswith("Seed: 4, Size: 64x64, Model: tiny-sd, Lora: a:1")
    with Image.open(out / "none" / "0-4.png") as image:
        assert "Lora" not in image.text["parameters"]

    # Columns x rows of the image size, below a strip of column names.
    grid = Image.open(out / "grid.png").convert("RGB")
    top = grid.height - 2 * 64
    assert grid.width == 3 * 64 and 0 < top < 64
    for row, seed in enumerate((0, 4)):
        for column, name in enumerate(names):
            cell = grid.crop((column * 64, top + row * 64, (column + 1) * 64, top + (row + 1) * 64))
            assert np.array_equal(np.asarray(cell), np.asarray(Image.open(out / name / f"0-{seed}.png")))
    strip = np.asarray(grid.crop((0, 0, grid.width, top)))
    assert strip.max() == 255  # the names are written
    labels = [strip[:, c * 64 : (c + 1) * 64] for c in range(3)]
    assert not np.array_equal(labels[0], labels[1]) and not np.array_equal(labels[1], labels[2])
    pixels = {name: _pixels(out / name / "0-0.png") for name in names}
    for one, other in [("a", "b"), ("a", "none"), ("b", "none")]:
        assert np.abs(pixels[one] - pixels[other]).mean() > 1e-3, (one, other)

    # Each adapter was removed before the next: the base column, rendered last, is the plain base model's,
    # and the shared pipeline is left as it was found.
    base = run_render(tmp_path, "base", "none", {}, models, **settings)
    assert np.array_equal(pixels["none"], _pixels(base / "0-0.png"))
    pipe = models.pipeline()
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"


def test_grid_labels_are_scaled_for_large_images():
    from PIL import Image

    from runner.steps.render import make_grid

    cells = [Image.new("RGB", (512, 512), (40 * i, 0, 0)) for i in range(2)]
    grid = make_grid([cells], labels=["dog@200", "dog"])
    small = make_grid([[c.resize((64, 64)) for c in cells]], labels=["dog@200", "dog"])
    assert grid.width == 2 * 512 and grid.height - 512 == 2 * (small.height - 64)
    assert make_grid([cells], labels=["dog@200", "dog"]).tobytes() == grid.tobytes()


def test_a_name_wider_than_its_column_keeps_its_start_and_end():
    """Names were cut at the column's edge: dog_blend_strong and dog_blend_stronger both showed as
    "dog_blend_" over a 64 px column, two columns that looked the same."""
    from PIL import Image, ImageFont

    from runner.steps.render import _fitted, make_grid

    cells = [Image.new("RGB", (64, 64)) for _ in range(2)]
    grid = make_grid([cells], labels=["dog_blend_strong", "dog_blend_stronger"])
    top = grid.height - 64
    assert grid.crop((0, 0, 64, top)).tobytes() != grid.crop((64, 0, 128, top)).tobytes()
    font = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()
    assert _fitted("dog_blend_stronger", font, 60) == "dog_...ger"
    assert font.getlength(_fitted("dog_blend_stronger", font, 60)) <= 60
    assert _fitted("dog@200", font, 60) == "dog@200"  # a name that fits is drawn as before: the same bytes


@pytest.mark.parametrize("kind", ["render", "prior"])
def test_more_steps_than_ddim_takes_fail_naming_the_key_and_the_fix(tmp_path, models, kind):  # noqa: F811
    """tiny-sd's own scheduler, DDIM, takes at most its 1000 training timesteps: steps = 1001 failed as the
    first image started, with diffusers' ValueError and no key."""
    from runner.errors import StepError
    from runner.project.schema import Prior
    from runner.steps import prior
    from tests.blend_fixtures import context

    with pytest.raises(StepError) as info:
        if kind == "render":
            run_render(tmp_path, "long", "none", {}, models, steps=1001)
        else:
            spec = Prior(name="dog", class_prompt="a dog", num_images=1, steps=1001)
            prior.run(context("prior", spec, tmp_path / "prior", {}, models))
    key = "renders.long.steps" if kind == "render" else "priors.dog.steps"
    assert str(info.value) == (
        f"{key}: 1001 steps are more than DDIM takes: at most the 1000 timesteps the model was trained with "
        '- use at most 1000, or scheduler = "euler", which takes more'
    )


# --- after a change of prompts or seeds: the images of batches drawn before are kept ------------------------

SETTINGS = """prompts = {prompts}
seeds = {seeds}
steps = 2
width = 32
height = 32
batch_size = {size}
"""
# One render of one adapter, and one of `adapters` (its images in a folder per adapter).
EDITED = (
    '[project]\nbase_model = "tiny-sd"\n\n[renders.plain]\nadapter = "none"\n'
    + SETTINGS
    + '\n[renders.side]\nadapters = ["none"]\n'
    + SETTINGS
)


def _build_render(folder, **settings):
    """Build the project EDITED with `settings` in `folder` (made if new): the outputs, the lockfile's
    records less when they ran, and what the render steps logged."""
    from runner import executor, lockfile
    from runner.project import load_project
    from tests.conftest import Recorder
    from tests.folders import folder_bytes

    folder.mkdir(exist_ok=True)
    path = folder / "p.toml"
    path.write_text(EDITED.format(**{k: repr(v).replace("'", '"') for k, v in settings.items()}))
    rec = Recorder()
    result = executor.build(load_project(path), executor.BuildOptions(), rec)
    assert result.ok, rec.events
    records = lockfile.read(folder / "p.lock")
    for record in records.values():
        del record["built"], record["duration_s"]
    said = [e[2] for e in rec.events if e[0] == "log" and e[2].startswith(("reusing ", "kept ", "rendered "))]
    return folder_bytes(folder / "build" / "p"), records, said


@pytest.mark.parametrize("size", [1, 2])
def test_after_new_prompts_the_images_of_batches_drawn_before_are_kept_as_a_clean_build_draws_them(
    tmp_path, size
):
    """Prompts reordered, one replaced: with batches of one image, or of one prompt's two seeds, the four
    images of the two prompts kept are copied, the two of the new one drawn, and the outputs and records
    are a clean build's, byte for byte (grid and folders of `adapters` included)."""
    first = dict(prompts=["a dog", "a red cat", "a boat"], seeds=[0, 3], size=size)
    _build_render(tmp_path / "edited", **first)
    edited = dict(first, prompts=["a boat", "a dog", "a green bird"])
    files, records, said = _build_render(tmp_path / "edited", **edited)
    assert (
        said
        == [
            "kept 4 images of the previous build, drawn in the same batches",
            "rendered 2 images of 32x32 with DDIM",
        ]
        * 2
    )
    assert (files, records) == _build_render(tmp_path / "clean", **edited)[:2]
    assert len(files) == 2 * 7 and records["render:plain"]["metrics"]["batch_size"] == size


def test_images_are_kept_only_from_the_same_batches(tmp_path):
    """A seed added to batches of two moves every batch after the first prompt's: those are drawn again.
    A batch size changed (in no fingerprint) keeps nothing: it changes the rounding of every image."""
    first = dict(prompts=["a dog", "a boat"], seeds=[0, 3], size=2)
    _build_render(tmp_path / "edited", **first)
    more = dict(first, seeds=[0, 3, 5])  # batches (dog 0, dog 3) (dog 5, boat 0) (boat 3, boat 5)
    files, records, said = _build_render(tmp_path / "edited", **more)
    assert said[:2] == [
        "kept 2 images of the previous build, drawn in the same batches",
        "rendered 4 images of 32x32 with DDIM",
    ]
    assert (files, records) == _build_render(tmp_path / "clean", **more)[:2]
    other = dict(more, prompts=["a boat", "a dog"], size=1)
    files, records, said = _build_render(tmp_path / "edited", **other)
    assert said[:1] == ["rendered 6 images of 32x32 with DDIM"]
    assert (files, records) == _build_render(tmp_path / "clean-1", **other)[:2]


def test_what_a_render_keeps_from_the_previous_build():
    """Its images serve only renders whose every other input, and adapter name, is the same; a record
    without the batch size it was drawn at (a build by an earlier dbl) gives nothing."""
    from types import SimpleNamespace

    from runner.steps.render import _drawn_before, _reuses

    dog = {
        "version": 1,
        "adapter": {"_name": "dog", "output": "ab"},
        "prompts": ["a"],
        "seeds": [0],
        "steps": 2,
    }
    assert _reuses(dog, {**dog, "prompts": ["b", "a"], "seeds": [1]})
    assert not _reuses(dog, {**dog, "steps": 3})
    assert not _reuses(dog, {**dog, "adapter": {"_name": "pup", "output": "ab"}})  # its images say "dog"
    assert not _reuses({**dog, "lora_scale": 1.0}, {**dog, "lora_scale": 0.8})  # the adapter scaled otherwise
    base = {**dog, "adapter": "none", "lora_scale": 1.0}
    assert _reuses(base, {**base, "lora_scale": 0.8})  # no adapter: nothing is scaled
    inputs = {**dog, "prompts": ["a", "b"], "seeds": [0, 1, 2]}
    ctx = SimpleNamespace(earlier="out", spec=SimpleNamespace(batch_size=2))
    ctx.earlier_record = {"inputs": inputs, "metrics": {"batch_size": 2}}
    assert _drawn_before(ctx) == {
        (("a", 0), ("a", 1)): [(0, 0), (0, 1)],
        (("a", 2), ("b", 0)): [(0, 2), (1, 0)],
        (("b", 1), ("b", 2)): [(1, 1), (1, 2)],
    }
    ctx.earlier_record = {"inputs": inputs, "metrics": {}}
    assert _drawn_before(ctx) == {}


def test_prompts_reordered_draw_nothing_and_progress_starts_at_the_images_kept(tmp_path):
    """Batches of one image: every image is kept (no adapter loaded, nothing drawn), and the first progress
    event already counts them, so that the display's rate is that of the images drawn."""
    from runner import executor
    from runner.project import load_project
    from tests.conftest import Recorder

    first = dict(prompts=["a dog", "a boat"], seeds=[0, 3], size=1)
    _build_render(tmp_path / "edited", **first)
    swapped = dict(first, prompts=["a boat", "a dog"])
    files, records, said = _build_render(tmp_path / "edited", **swapped)
    assert said == ["kept 4 images of the previous build, drawn in the same batches"] * 2
    assert (files, records) == _build_render(tmp_path / "clean", **swapped)[:2]
    grown = dict(swapped, seeds=[0, 3, 5])
    path = tmp_path / "edited" / "p.toml"
    path.write_text(EDITED.format(**{k: repr(v).replace("'", '"') for k, v in grown.items()}))
    counts = []

    class Progress(Recorder):
        def step_progress(self, step):
            if step.id == "render:plain":
                counts.append((step.done, step.total))

    assert executor.build(load_project(path), executor.BuildOptions(), Progress()).ok
    assert counts[0] == (4, 6) and counts[-1] == (6, 6), counts


def test_an_image_gone_between_the_builds_check_and_the_render_is_drawn_with_its_batch(tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    from runner.steps import render

    first = dict(prompts=["a dog", "a boat"], seeds=[0, 3], size=2)
    _build_render(tmp_path / "edited", **first)
    copied, real = [], shutil.copyfile

    def copy_but_the_first(src, dst, **kwargs):  # of the previous build's images
        if "renders" in Path(src).parts and not copied.append(src) and len(copied) == 1:
            raise FileNotFoundError(2, "No such file or directory", str(src))
        return real(src, dst, **kwargs)

    monkeypatch.setattr(render.shutil, "copyfile", copy_but_the_first)
    edited = dict(first, prompts=["a boat", "a dog", "a bird"])
    files, records, said = _build_render(tmp_path / "edited", **edited)
    assert len(copied) > 1 and said[:2] == [
        "kept 2 images of the previous build, drawn in the same batches",
        "rendered 4 images of 32x32 with DDIM",
    ]
    monkeypatch.undo()
    assert (files, records) == _build_render(tmp_path / "clean", **edited)[:2]


# --- an interrupted render resumes --------------------------------------------------------------------------


def _stopped_after_its_first_batch(path, settings: dict) -> None:
    """The project EDITED with `settings` written at `path`, and a build of it stopped after render:plain's
    first batch of two images."""
    from runner import executor
    from runner.project import load_project
    from tests.conftest import Recorder

    path.write_text(EDITED.format(**{k: repr(v).replace("'", '"') for k, v in settings.items()}))
    stop = []

    class StopAfterABatch(Recorder):
        def step_progress(self, step):
            if step.id == "render:plain" and step.done == 2:
                stop.append(step.done)

    options = executor.BuildOptions(should_stop=lambda: bool(stop))
    assert not executor.build(load_project(path), options, StopAfterABatch()).ok and stop


def test_an_interrupted_render_resumes_from_the_batches_it_finished(tmp_path):
    """Stopped after its first batch, a build keeps the images it drew in the work folder; the next build
    draws only the other batches, and its outputs and record are those of an uninterrupted build."""
    settings = dict(prompts=["a dog", "a boat", "a bird"], seeds=[0, 3], size=2)
    folder = tmp_path / "stopped"
    folder.mkdir()
    _stopped_after_its_first_batch(folder / "p.toml", settings)
    work = list((folder / ".dbl").rglob("drawn"))
    assert [sorted(p.name for p in w.glob("*.png")) for w in work] == [["0-0.png", "0-3.png"]], work
    files, records, said = _build_render(folder, **settings)
    assert said[:2] == [
        "reusing 2 images drawn by an interrupted run",
        "rendered 4 images of 32x32 with DDIM",
    ]
    assert not list((folder / ".dbl").rglob("drawn"))  # the work folder goes with the commit
    assert (files, records) == _build_render(tmp_path / "clean", **settings)[:2]


def test_a_forced_render_after_an_interrupted_one_draws_every_image_again(tmp_path):
    """`--force` reruns a step from the start, to compare its bytes with what it made before: it kept the
    images an interrupted attempt had drawn (and a train step resumed from its checkpoints)."""
    from runner import executor
    from runner.project import load_project
    from tests.conftest import Recorder

    path = tmp_path / "p.toml"
    _stopped_after_its_first_batch(path, dict(prompts=["a dog", "a boat"], seeds=[0, 3], size=2))
    assert [p.name for p in tmp_path.joinpath(".dbl").rglob("drawn/*.png")] != []  # it drew a batch
    rec = Recorder()
    forced = executor.BuildOptions(force=("render:plain",), only=("render:plain",), dry_run=True)
    assert executor.build(load_project(path), forced, rec).ok
    assert [r for sid, _, r in rec.planned if sid == "render:plain"] == [["forced"]]
    rec = Recorder()
    assert executor.build(load_project(path), executor.BuildOptions(force=("render:plain",)), rec).ok
    said = [e[2] for e in rec.events if e[0] == "log" and e[1] == "render:plain"]
    assert not [line for line in said if line.startswith("reusing ")], said
    assert "rendered 4 images of 32x32 with DDIM" in said


def _small_render(**settings):
    """A render of two prompts with the base model, at 32x32 in 2 steps."""
    from runner.project.schema import Render

    return Render(
        name="p", adapter="none", prompts=["a dog", "a boat"], steps=2, width=32, height=32, **settings
    )


def _stopped_after_a_batch(tmp_path, cache, spec):
    """`spec` rendered whole, and a render of it stopped after its first batch, its output folder emptied as a
    new attempt finds it: (the whole render's context, the stopped one's, the images it said done, at the
    start and after each batch)."""
    import shutil

    from runner.steps import render
    from tests.blend_fixtures import context

    whole = context("render", spec, tmp_path / "whole" / "out", {}, cache)
    render.run(whole)
    done = []
    ctx = context(
        "render", spec, tmp_path / "resumed" / "out", {}, cache, progress=lambda d, t: done.append(d)
    )
    ctx.should_stop = lambda: len(done) == 2
    with pytest.raises(render.StepInterrupted):
        render.run(ctx)
    shutil.rmtree(ctx.out)
    ctx.out.mkdir()
    return whole, ctx, done


@pytest.mark.parametrize("change", ["none", "batch_size", "adapter name"])
def test_a_resumed_render_keeps_whole_batches_drawn_as_this_attempt_draws_them(tmp_path, models, change):  # noqa: F811
    """Of a batch a kill cut short, nothing is kept: its images are drawn again together. Images drawn at
    another batch size (their rounding differs) or under other adapter names (their parameters name them),
    neither in the fingerprint, are not kept either."""
    from runner.steps import render
    from tests.blend_fixtures import context
    from tests.folders import folder_bytes

    spec = _small_render(seeds=[0, 3], batch_size=2)
    whole, ctx, done = _stopped_after_a_batch(tmp_path, models, spec)
    assert done == [0, 2]
    (ctx.work / "drawn" / "1-0.png").write_bytes((whole.out / "1-0.png").read_bytes())  # half a batch
    if change == "batch_size":
        import dataclasses

        ctx.spec = spec = dataclasses.replace(spec, batch_size=1)
        whole = context("render", spec, tmp_path / "whole-1" / "out", {}, models)
        render.run(whole)
    if change == "adapter name":
        import json

        marker = ctx.work / "drawn" / render.DRAWN_WITH
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "adapters": ["other"]}))
    logs = []
    ctx.log, ctx.should_stop = logs.append, lambda: False
    done.clear()
    render.run(ctx)
    if change == "none":  # one batch drawn
        assert done == [2, 4] and logs[0] == "reusing 2 images drawn by an interrupted run"
    else:
        assert done[0] == 0 and not any("reusing" in line for line in logs), logs
    assert folder_bytes(ctx.out) == folder_bytes(whole.out)


def test_with_a_seed_listed_twice_a_file_two_batches_draw_is_drawn_again(tmp_path, models):  # noqa: F811
    """Seed 0 twice in batches of three: the boat's image of seed 0 is drawn by the first batch, then again,
    alone, by the second, whose bytes stay. Its file does not say which batch drew it, so neither batch is
    kept: a render stopped after the first draws both again, as an uninterrupted one does."""
    from runner.steps import render
    from tests.folders import folder_bytes

    whole, ctx, done = _stopped_after_a_batch(tmp_path, models, _small_render(seeds=[0, 0], batch_size=3))
    ctx.should_stop = lambda: False
    done.clear()
    render.run(ctx)
    assert done == [0, 3, 4]
    assert folder_bytes(ctx.out) == folder_bytes(whole.out)


@pytest.mark.filterwarnings("ignore:.*repeats 0:UserWarning")  # said as the file loads
def test_a_file_the_previous_build_drew_twice_is_not_kept(tmp_path):
    """Seeds 0, 3, 0 in batches of two: the previous build drew the dog's seed 0 first with seed 3, then
    alone, which its file holds. With seeds 0, 3, the batch (0, 3) is drawn again, not kept from that file."""
    first = dict(prompts=["a dog"], seeds=[0, 3, 0], size=2)
    _build_render(tmp_path / "edited", **first)
    edited = dict(first, seeds=[0, 3])
    files, records, said = _build_render(tmp_path / "edited", **edited)
    assert said == ["rendered 2 images of 32x32 with DDIM"] * 2
    assert (files, records) == _build_render(tmp_path / "clean", **edited)[:2]


# --- with `adapters`: the columns of the adapters rendered with before are kept --------------------------------


def test_which_adapters_a_render_of_several_keeps_images_of():
    """An adapter's images depend on it alone (its name and outputs), not on the grid's other columns."""
    from runner.steps.render import _reuses, _same_adapters

    def side(*columns, **changes):
        listed = [{"_name": name, "output": output} for name, output in columns]
        return {"version": 1, "adapters": listed, "prompts": ["a"], "seeds": [0], "steps": 2, **changes}

    before = side(("dog", "h1"), ("none", "none"))
    assert _same_adapters(before, side(("cat", "h2"), ("none", "none"), ("dog", "h1"))) == {"dog", "none"}
    assert _same_adapters(before, side(("dog", "h3"), ("none", "none"))) == {"none"}  # dog retrained
    assert _same_adapters(before, side(("rex", "h1"))) == set()  # renamed: its images say "dog"
    assert _reuses(before, side(("dog", "h3"), ("none", "none"), prompts=["b"]))
    assert not _reuses(before, side(("rex", "h1")))
    assert not _reuses(before, side(("dog", "h1"), ("none", "none"), steps=3))
    assert not _reuses(before, {"version": 1, "adapter": "none", "prompts": ["a"], "seeds": [0], "steps": 2})
    # Another lora_scale: the base model's column alone is kept, the adapters' are drawn again.
    scaled = side(("dog", "h1"), ("none", "none"), lora_scale=0.5)
    assert _same_adapters({**before, "lora_scale": 1.0}, scaled) == {"none"}
    assert _reuses({**before, "lora_scale": 1.0}, scaled)
    assert not _reuses(side(("dog", "h1"), lora_scale=1.0), side(("dog", "h1"), lora_scale=0.5))


@pytest.mark.parametrize("size", [1, 2])
def test_several_adapters_keep_the_columns_rendered_before(tmp_path, adapters, models, size):  # noqa: F811
    """[a, none] then [b, none, a], `a` the same: the images of `a` and of the base model are kept, those of
    `b` drawn, and the outputs are those of a clean render; with `a` retrained, its images are drawn again."""
    import dataclasses

    from runner.steps import render
    from tests.blend_fixtures import context
    from tests.folders import folder_bytes

    inputs = {"train:a": adapters["a"], "train:b": adapters["b"]}

    def fingerprint_inputs(spec, outputs):
        listed = [{"_name": name, "output": outputs.get(name, "none")} for name in spec.adapters]
        return {"version": 1, "adapters": listed, "prompts": spec.prompts, "seeds": spec.seeds}

    first = _small_render(seeds=[0, 3], batch_size=size)
    first = dataclasses.replace(first, adapter=None, adapters=["a", "none"])
    before = context("render", first, tmp_path / "before" / "out", inputs, models)
    render.run(before)
    record = {"inputs": fingerprint_inputs(first, {"a": "ha"}), "metrics": {"batch_size": size}}
    spec = dataclasses.replace(first, adapters=["b", "none", "a"])
    clean = context("render", spec, tmp_path / "clean" / "out", inputs, models)
    render.run(clean)
    for a_output, kept in (("ha", 8), ("ha2", 4)):  # `a` as it was, then retrained
        logs = []
        ctx = context("render", spec, tmp_path / f"after-{a_output}" / "out", inputs, models, log=logs.append)
        ctx.earlier, ctx.earlier_record = before.out, record
        ctx.fingerprint_inputs = fingerprint_inputs(spec, {"a": a_output, "b": "hb"})
        render.run(ctx)
        assert logs[:2] == [
            f"kept {kept} images of the previous build, drawn in the same batches",
            f"rendered {12 - kept} images of 32x32 with DDIM",
        ]
        if a_output == "ha":
            assert folder_bytes(ctx.out) == folder_bytes(clean.out)


def test_another_lora_scale_keeps_the_base_models_column_and_draws_the_adapters(tmp_path, adapters, models):  # noqa: F811
    """[a, none] rendered at lora_scale 1, then at 0.5: the base model's images are kept (no adapter scales
    them), `a`'s drawn again; the outputs are those of a clean render at 0.5."""
    import dataclasses

    from runner.steps import render
    from tests.blend_fixtures import context
    from tests.folders import folder_bytes

    inputs = {"train:a": adapters["a"]}

    def fingerprint_inputs(spec):
        listed = [{"_name": name, "output": "ha" if name == "a" else "none"} for name in spec.adapters]
        return {
            "version": 1,
            "adapters": listed,
            "prompts": spec.prompts,
            "seeds": spec.seeds,
            "lora_scale": spec.lora_scale,
        }

    first = dataclasses.replace(_small_render(seeds=[0, 3]), adapter=None, adapters=["a", "none"])
    before = context("render", first, tmp_path / "before" / "out", inputs, models)
    render.run(before)
    spec = dataclasses.replace(first, lora_scale=0.5)
    clean = context("render", spec, tmp_path / "clean" / "out", inputs, models)
    render.run(clean)
    logs = []
    ctx = context("render", spec, tmp_path / "after" / "out", inputs, models, log=logs.append)
    ctx.earlier = before.out
    ctx.earlier_record = {"inputs": fingerprint_inputs(first), "metrics": {"batch_size": first.batch_size}}
    ctx.fingerprint_inputs = fingerprint_inputs(spec)
    render.run(ctx)
    assert logs[:2] == [
        "kept 4 images of the previous build, drawn in the same batches",
        "rendered 4 images of 32x32 with DDIM",
    ]
    assert folder_bytes(ctx.out) == folder_bytes(clean.out)
    assert folder_bytes(ctx.out)["a/0-0.png"] != folder_bytes(before.out)["a/0-0.png"]  # `a` was scaled anew


SIDE = """
[renders.side]
adapters = {adapters}
prompts = ["a dog", "a boat"]
seeds = [0]
steps = 2
width = 32
height = 32
"""


def test_a_build_that_adds_an_adapter_to_a_grid_draws_only_its_column(tmp_path):
    """Through `dbl build`: `adapters = ["none"]`, then `["dog", "none"]`: the base model's images are kept,
    the dog's drawn, and the render's outputs and record are those of a clean build."""
    from runner import executor, lockfile
    from runner.project import load_project
    from tests.conftest import Recorder
    from tests.folders import folder_bytes
    from tests.real_builds import subjects_trained_in_a_step

    def build(folder, columns):
        folder.mkdir(exist_ok=True)
        (folder / "p.toml").write_text(
            subjects_trained_in_a_step(folder, "dog") + SIDE.format(adapters=columns)
        )
        rec = Recorder()
        assert executor.build(load_project(folder / "p.toml"), executor.BuildOptions(), rec).ok, rec.events
        record = lockfile.read(folder / "p.lock")["render:side"]
        del record["built"], record["duration_s"]
        said = [e[2] for e in rec.events if e[0] == "log" and e[1] == "render:side"]
        return folder_bytes(folder / "build" / "p" / "renders" / "side"), record, said

    build(tmp_path / "edited", '["none"]')
    files, record, said = build(tmp_path / "edited", '["dog", "none"]')
    assert [line for line in said if line.startswith(("kept", "rendered"))] == [
        "kept 2 images of the previous build, drawn in the same batches",
        "rendered 2 images of 32x32 with DDIM",
    ]
    assert (files, record) == build(tmp_path / "clean", '["dog", "none"]')[:2]
