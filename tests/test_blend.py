"""The blend step: exact cat blends, lossy methods report their error, DARE repeats with its seed."""

from __future__ import annotations

import json

import pytest

from runner.steps import KOHYA_STEM, StepError
from tests.blend_fixtures import adapters, models, run_blend  # noqa: F401

pytestmark = pytest.mark.torch


def _deltas(folder, component):
    from runner.adapters import lora_delta

    return lora_delta(folder, component)


def _max_error(blend, parents, component):
    """max |delta_blend - sum(w * delta_parent)| over modules, and the largest entry of the sum."""
    got = _deltas(blend, component)
    want = {}
    for folder, weight in parents:
        if not (folder / component).is_dir():
            continue
        for module, delta in _deltas(folder, component).items():
            want[module] = want.get(module, 0) + weight * delta
    assert set(got) == set(want)
    err = max(float((got[m] - want[m]).abs().max()) for m in got)
    return err, max(float(w.abs().max()) for w in want.values())


def _info(folder):
    return json.loads((folder / "dbl.json").read_text())


def test_cat_blend_is_the_weighted_sum_of_deltas(tmp_path, adapters, models):  # noqa: F811
    inputs = {"train:a": adapters["a"], "train:b": adapters["b"]}
    out = run_blend(tmp_path, "mix", {"a": 1.0, "b": -0.7}, inputs, models)
    for component in ("unet", "text_encoder"):
        err, scale = _max_error(out, [(adapters["a"], 1.0), (adapters["b"], -0.7)], component)
        assert scale > 0.01  # the parents do change the weights
        assert err < 1e-5
    info = _info(out)
    assert info["weights"] == [1.0, -0.7]
    assert info["method"] == "cat"
    assert info["rank"] == {"unet": 8, "text_encoder": 8}
    assert all(e < 1e-6 for e in info["relative_error"].values())
    # The shared pipeline is left as it was found.
    assert type(models.pipeline().unet).__name__ == "UNet2DConditionModel"
    assert type(models.pipeline().text_encoder).__name__ == "CLIPTextModel"


def test_blend_loads_without_its_parents_in_every_layout(tmp_path, adapters, models):  # noqa: F811
    from runner.adapters import DIFFUSERS_WEIGHTS
    from runner.pipeline_adapters import load_adapter_into
    from tests.blend_fixtures import fresh_pipeline

    out = run_blend(
        tmp_path, "mix", {"a": 1.0, "b": 0.5}, {"train:a": adapters["a"], "train:b": adapters["b"]}, models
    )
    assert (out / DIFFUSERS_WEIGHTS).is_file() and (out / f"{KOHYA_STEM}.safetensors").is_file()
    pipe = fresh_pipeline()
    load_adapter_into(pipe, out, "mix")  # raises if a tensor found no module
    assert "mix" in pipe.unet.peft_config and "mix" in pipe.text_encoder.peft_config


def test_text_encoder_blends_the_parents_that_have_one(tmp_path, adapters, models):  # noqa: F811
    inputs = {"train:a": adapters["a"], "train:c": adapters["c"]}
    out = run_blend(tmp_path, "ac", {"a": 0.5, "c": 2.0}, inputs, models)
    parents = [(adapters["a"], 0.5), (adapters["c"], 2.0)]
    assert _max_error(out, parents, "unet")[0] < 1e-5
    assert _max_error(out, parents, "text_encoder")[0] < 1e-5  # c has none: a's, at a's weight
    assert _info(out)["rank"] == {"unet": 10, "text_encoder": 4}


def test_svd_below_the_summed_rank_reports_its_error(tmp_path, adapters, models):  # noqa: F811
    inputs = {"train:a": adapters["a"], "train:b": adapters["b"]}
    out = run_blend(tmp_path, "low", {"a": 1.0, "b": 1.0}, inputs, models, method="svd", svd_rank=2)
    info = _info(out)
    assert info["rank"] == {"unet": 2, "text_encoder": 2}
    assert info["svd_rank"] == 2
    for component in ("unet", "text_encoder"):
        assert 0.01 < info["relative_error"][component] < 1
    # Full rank: svd is exact too.
    full = run_blend(tmp_path, "full", {"a": 1.0, "b": 1.0}, inputs, models, method="svd", svd_rank=8)
    assert all(e < 1e-5 for e in _info(full)["relative_error"].values())


def test_an_svd_blend_says_when_a_lone_parent_keeps_its_rank(tmp_path, adapters, models):  # noqa: F811
    """Only `a` has a text-encoder LoRA: PEFT copies it whole, so svd_rank cannot shrink it. Said as the
    project file's warnings are: its file, and the line of svd_rank."""
    from runner.project.lines import LineIndex
    from runner.project.problems import Source

    text = '[blends.ac]\nadapters = { a = 1.0, c = 1.0 }\nmethod = "svd"\n\nsvd_rank = 2\n'
    inputs = {"train:a": adapters["a"], "train:c": adapters["c"]}
    said = []
    source = Source("p.toml", LineIndex(text))
    out = run_blend(
        tmp_path,
        "ac",
        {"a": 1.0, "c": 1.0},
        inputs,
        models,
        log=said.append,
        source=source,
        method="svd",
        svd_rank=2,
    )
    assert _info(out)["rank"] == {"unet": 2, "text_encoder": 4}
    assert [line for line in said if line.startswith("warning:")] == [
        "warning: p.toml: blends.ac: only a has a text_encoder LoRA, which PEFT copies as it is: it keeps "
        "rank 4, not svd_rank = 2 (line 5)"
    ]
    said.clear()  # a lone parent within svd_rank: nothing to say
    run_blend(
        tmp_path, "wide", {"a": 1.0, "c": 1.0}, inputs, models, log=said.append, method="svd", svd_rank=6
    )
    assert not [line for line in said if line.startswith("warning:")]


def test_a_linear_blend_far_from_the_weighted_sum_is_warned_of(tmp_path, adapters, models):  # noqa: F811
    """linear adds the A and the B matrices apart, so unrelated parents give mostly cross terms: the blend
    changes the weights in other ways than the weighted sum would. The relative error was said in the
    verbose log only; above 0.5 it is a warning at the blend's method. cat, exact, never warns."""
    from runner.project.lines import LineIndex
    from runner.project.problems import Source

    text = '[blends.m]\nadapters = { a = 1.0, b = 1.0 }\nmethod = "linear"\n'
    inputs = {"train:a": adapters["a"], "train:b": adapters["b"]}
    said = []
    source = Source("p.toml", LineIndex(text))
    out = run_blend(
        tmp_path, "m", {"a": 1.0, "b": 1.0}, inputs, models, log=said.append, source=source, method="linear"
    )
    errors = _info(out)["relative_error"]
    far = {c: e for c, e in errors.items() if e > 0.5}
    assert far, errors  # these parents are unrelated: the cross terms dominate
    assert (
        [line for line in said if line.startswith("warning:")]
        == [
            "warning: p.toml: blends.m: the linear blend is far from the weighted sum of its parents' changes "
            "(relative error "
            + ", ".join(
                f"{e:.2f} on the {c}" for c, e in sorted(far.items(), key=lambda ce: ce[0] != "unet")
            )  # the unet first
            + ") (line 3) - method = "
            '"cat" is exact'
        ]
    )
    said.clear()
    run_blend(
        tmp_path, "c", {"a": 1.0, "b": 1.0}, inputs, models, log=said.append, source=source, method="cat"
    )
    assert not [line for line in said if line.startswith("warning:")]


@pytest.mark.parametrize(
    "method, density",
    [
        ("linear", None),
        ("ties", 0.5),
        ("dare_linear", 0.5),
        ("dare_ties", 0.5),
        ("magnitude_prune", 0.5),
        ("ties_svd", 0.5),
    ],
)
def test_equal_rank_methods_run_and_record_their_error(tmp_path, adapters, models, method, density):  # noqa: F811
    inputs = {"train:a": adapters["a"], "train:b": adapters["b"]}
    out = run_blend(tmp_path, "m", {"a": 1.0, "b": 0.5}, inputs, models, method=method, density=density)
    info = _info(out)
    assert info["method"] == method and info["density"] == density
    assert info["rank"]["unet"] == 4
    assert all(e > 1e-4 for e in info["relative_error"].values())  # none of these is the exact sum


def test_dare_repeats_with_the_project_seed(tmp_path, adapters, models):  # noqa: F811
    inputs = {"train:a": adapters["a"], "train:b": adapters["b"]}

    def weights(name, seed):
        out = run_blend(
            tmp_path, name, {"a": 1.0, "b": 0.5}, inputs, models, seed=seed, method="dare_ties", density=0.5
        )
        return (out / "unet" / "adapter_model.safetensors").read_bytes()

    assert weights("s0", 0) == weights("s0again", 0)
    assert weights("s0", 0) != weights("s1", 1)


def test_equal_rank_methods_refuse_unequal_ranks(tmp_path, adapters, models):  # noqa: F811
    inputs = {"train:a": adapters["a"], "train:c": adapters["c"]}
    with pytest.raises(StepError, match="one rank"):
        run_blend(tmp_path, "bad", {"a": 1.0, "c": 1.0}, inputs, models, method="ties", density=0.5)
    assert type(models.pipeline().unet).__name__ == "UNet2DConditionModel"


def test_blend_of_a_blend(tmp_path, adapters, models):  # noqa: F811
    ab = run_blend(
        tmp_path, "ab", {"a": 1.0, "b": 0.5}, {"train:a": adapters["a"], "train:b": adapters["b"]}, models
    )
    out = run_blend(
        tmp_path, "abc", {"ab": 2.0, "c": -1.0}, {"blend:ab": ab, "train:c": adapters["c"]}, models
    )
    parents = [(adapters["a"], 2.0), (adapters["b"], 1.0), (adapters["c"], -1.0)]
    assert _max_error(out, parents, "unet")[0] < 1e-5
    assert _max_error(out, parents, "text_encoder")[0] < 1e-5
    assert _info(out)["rank"] == {"unet": 14, "text_encoder": 8}


def test_blend_bytes_do_not_depend_on_names(tmp_path, adapters, models):  # noqa: F811
    inputs = {"train:a": adapters["a"], "train:b": adapters["b"]}
    one = run_blend(tmp_path, "x", {"a": 1.0, "b": 0.5}, inputs, models)
    two = run_blend(tmp_path, "y", {"a": 1.0, "b": 0.5}, inputs, models)
    for sub in (
        "unet/adapter_model.safetensors",
        "text_encoder/adapter_model.safetensors",
        "pytorch_lora_weights.safetensors",
    ):
        assert (one / sub).read_bytes() == (two / sub).read_bytes()
