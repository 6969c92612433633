"""A step that fails on a key of the project file, on what only the model tells (its scheduler, its VAE,
the adapters' modules), names the file and the key's line as the file's own problems do."""

from __future__ import annotations

import pytest

from runner.project.lines import LineIndex
from runner.project.problems import Source
from tests.blend_fixtures import adapters, context, models  # noqa: F401

pytestmark = pytest.mark.torch

RENDER = (
    '[project]\nbase_model = "tiny-sd"\n\n'
    '[renders.long]\nadapter = "none"\nprompts = ["a dog"]\nsteps = 1001\nwidth = 72\nheight = 64\n'
)
DDIM = (
    "1001 steps are more than DDIM takes: at most the 1000 timesteps the model was trained with (line {line})"
    ' - use at most 1000, or scheduler = "euler", which takes more'
)


def _render(tmp_path, models, **settings):  # noqa: F811
    from runner.project.schema import Render
    from runner.steps import render

    spec = Render(name="long", adapter="none", prompts=["a dog"], **settings)
    ctx = context("render", spec, tmp_path / "render", {}, models, source=Source("p.toml", LineIndex(RENDER)))
    render.run(ctx)


def test_more_steps_than_the_scheduler_takes_name_the_line_of_steps(tmp_path, models):  # noqa: F811
    from runner.errors import StepError

    with pytest.raises(StepError) as info:
        _render(tmp_path, models, steps=1001)
    assert str(info.value) == "p.toml: renders.long.steps: " + DDIM.format(line=7)


def test_a_prior_s_steps_name_their_line(tmp_path, models):  # noqa: F811
    from runner.errors import StepError
    from runner.project.schema import Prior
    from runner.steps import prior

    text = '[project]\nbase_model = "tiny-sd"\n\n[priors.dog]\nclass_prompt = "a dog"\nnum_images = 1\nsteps = 1001\n'
    spec = Prior(name="dog", class_prompt="a dog", num_images=1, steps=1001)
    with pytest.raises(StepError) as info:
        prior.run(
            context("prior", spec, tmp_path / "prior", {}, models, source=Source("p.toml", LineIndex(text)))
        )
    assert str(info.value) == "p.toml: priors.dog.steps: " + DDIM.format(line=7)


def test_a_size_the_vae_cannot_draw_names_the_line_of_the_side(tmp_path, models, monkeypatch):  # noqa: F811
    """A VAE that scales by 16 (a model of five VAE blocks) draws no side of 72 px: the width's line."""
    from runner.errors import StepError

    monkeypatch.setattr(models.pipeline(), "vae_scale_factor", 16)
    with pytest.raises(StepError) as info:
        _render(tmp_path, models, steps=2, width=72, height=64)
    assert str(info.value) == (
        "p.toml: renders.long: width and height must be multiples of 16 for this base model (got 72x64) "
        "(line 8) - use width = 64 and height = 64, say"
    )


def test_an_svd_rank_the_adapters_modules_cannot_take_names_its_line(tmp_path, models, adapters):  # noqa: F811
    """The sizes of the model's modules are the model's: an svd_rank past them fails in the step."""
    from runner.errors import StepError
    from tests.blend_fixtures import run_blend

    text = (
        '[project]\nbase_model = "tiny-sd"\n\n[blends.mix]\nadapters = { a = 1.0, b = 1.0 }\n'
        'method = "svd"\nsvd_rank = 1000\n'
    )
    with pytest.raises(StepError) as info:
        run_blend(
            tmp_path,
            "mix",
            {"a": 1.0, "b": 1.0},
            {"train:a": adapters["a"], "train:b": adapters["b"]},
            models,
            source=Source("p.toml", LineIndex(text)),
            method="svd",
            svd_rank=1000,
        )
    said = str(info.value)  # the line of svd_rank, not of the blend's table
    assert said.startswith("p.toml: blends.mix: svd_rank 1000 exceeds the size 32 of unet module "), said
    assert said.endswith(" (line 7) - use svd_rank = 32 or less"), said


def test_a_prior_s_size_the_vae_cannot_draw_fails_before_its_first_image(tmp_path, models, monkeypatch):  # noqa: F811
    """diffusers draws such a side rounded down to the VAE's scale, without a word: 64 px, not 72."""
    from runner.errors import StepError
    from runner.project.schema import Prior
    from runner.steps import prior

    monkeypatch.setattr(models.pipeline(), "vae_scale_factor", 16)
    text = (
        '[project]\nbase_model = "tiny-sd"\n\n[priors.dog]\nclass_prompt = "a dog"\nnum_images = 1\nsteps = 2\n'
        "width = 64\nheight = 72\n"
    )
    spec = Prior(name="dog", class_prompt="a dog", num_images=1, steps=2, width=64, height=72)
    with pytest.raises(StepError) as info:
        prior.run(
            context("prior", spec, tmp_path / "prior", {}, models, source=Source("p.toml", LineIndex(text)))
        )
    assert str(info.value) == (
        "p.toml: priors.dog: width and height must be multiples of 16 for this base model (got 64x72) "
        "(line 9) - use width = 64 and height = 64, say"
    )
    assert not list((tmp_path / "prior").rglob("*.png"))


def test_a_default_svd_rank_the_adapters_modules_cannot_take_says_what_to_set(tmp_path, models):  # noqa: F811
    """Left out, svd_rank is the largest parent rank: a rank wider than a module (the full-rank warning's
    case) fails the blend, and the fix is to set the key, which the blend's table does not hold yet."""
    from runner.errors import StepError
    from tests.blend_fixtures import make_adapter, run_blend

    wide = {
        n: make_adapter(tmp_path / n, seed=s, rank=40, text_encoder=False) for n, s in (("a", 1), ("b", 2))
    }
    text = (
        '[project]\nbase_model = "tiny-sd"\n\n[blends.mix]\nadapters = { a = 1.0, b = 1.0 }\nmethod = "svd"\n'
    )
    with pytest.raises(StepError) as info:
        run_blend(
            tmp_path,
            "mix",
            {"a": 1.0, "b": 1.0},
            {"train:a": wide["a"], "train:b": wide["b"]},
            models,
            source=Source("p.toml", LineIndex(text)),
            method="svd",
        )
    said = str(info.value)  # the line of the blend's table: no svd_rank is written
    assert said.startswith(
        "p.toml: blends.mix: svd_rank 40 (the default: the largest parent rank) exceeds the size 32 of unet "
        "module "
    ), said
    assert said.endswith(" (line 4) - set svd_rank = 32 or less in [blends.mix]"), said
