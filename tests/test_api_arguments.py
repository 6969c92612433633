"""The notebook API's arguments: a bad one raises ValueError that says what to give; devices and base models
as the API takes them."""

from __future__ import annotations

import re

import pytest

from runner import api
from tests.blend_fixtures import adapters  # noqa: F401

pytestmark = pytest.mark.torch


def test_bad_arguments_raise_value_errors_that_say_what_to_give(tmp_path, adapters):  # noqa: F811
    pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"], "b": adapters["b"]}, device="cpu")
    nan, inf = float("nan"), float("inf")
    calls = [
        (lambda: api.load_adapter(pipe, adapters["a"], "dog.v2"), "cannot name an adapter"),
        (lambda: api.load_adapter(pipe, adapters["a"], ""), "cannot name an adapter"),
        (lambda: api.blend(pipe, {"a": 1.0, "b": 1.0}, None), "cannot name an adapter"),
        (lambda: api.blend(pipe, {"a": 1.0, "b": 1.0}, 3), "cannot name an adapter"),
        (lambda: api.blend(pipe, {"a": nan}, "n"), "blend weights must be finite numbers; got nan"),
        (lambda: api.blend(pipe, ["a", "b"], "n"), "weights maps adapter names to weights"),
        (lambda: api.blend(pipe, {"a": 1.0, "b": 1.0}, "n", method="svd", svd_rank=0), "svd_rank must be"),
        (
            lambda: api.blend(pipe, {"a": 1.0, "b": 1.0}, "n", method="svd", svd_clamp=5),
            "svd_clamp is a quantile, from 0 to 1",
        ),
        (
            lambda: api.blend(pipe, {"a": 1.0, "b": 1.0}, "n", "ties", density=0.5, majority_sign_method="x"),
            "majority_sign_method 'x' is not one of total, frequency",
        ),
        (
            lambda: api.blend(pipe, {"a": 1.0, "b": 1.0}, "n", density=0.5),
            "density does not apply to method 'cat'; methods that use it: ties, ",
        ),
        (
            lambda: api.blend(pipe, {"a": 1.0, "b": 1.0}, "n", "linear", svd_rank=2),
            "svd_rank applies to svd methods only, not 'linear'; svd methods: svd, ties_svd, ",
        ),
        (
            lambda: api.blend(pipe, {"a": 1.0, "b": 1.0}, "n", svd_clamp=0.9),
            "svd_clamp applies to svd methods only, not 'cat'",
        ),
        (lambda: api.set_adapter(pipe, 5), "name the adapters with a string or a list of strings"),
        (lambda: api.set_adapter(pipe, ["a", "a"]), "'a' named twice"),
        (lambda: api.set_adapter(pipe, "a", weights=0.5), "weights must be a list of numbers"),
        (lambda: api.set_adapter(pipe, "a", weights=[inf]), "weights must be finite numbers; got inf"),
        (lambda: api.set_adapter(pipe, "a", scale=nan), "scale must be a finite number; got nan"),
        (lambda: api.unload_adapter(pipe, "ghost"), "no adapter named 'ghost' is loaded; loaded: a, b"),
        (lambda: api.unload_adapter(pipe, None), "no adapter named None is loaded"),
        (lambda: api.load_adapter(pipe, tmp_path / "nope.toml:dog", "x"), "no such project file"),
        (lambda: api.load_pipeline("tiny-sd", device="tpu"), "unknown device 'tpu'"),
        (
            lambda: api.load_pipeline(f"{tmp_path}/models/sd15"),
            f"no such file or folder: {tmp_path}/models/sd15",
        ),
        (lambda: api.load_pipeline("./no-such-model", device="cpu"), "no such file or folder: "),
        (lambda: api.load_pipeline("tiny-sd", ["a"], device="cpu"), "adapters maps names to adapter paths"),
        (lambda: api.load_pipeline("tiny-sd", device="cpu", dtype="half"), "unknown dtype 'half'; use fp32"),
        (lambda: api.load_pipeline("tiny-sd", device="cpu", dtype=5), "unknown dtype 5; use fp32"),
    ]
    for call, message in calls:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()
    assert api.loaded_adapters(pipe) == ["a", "b"]
    assert set(pipe.unet.peft_config) == {"a", "b"}


def test_counts_in_messages_agree_with_their_nouns(adapters):  # noqa: F811
    """`set_adapter(pipe, "a", weights=[1, 2])` said "1 adapters but 2 weights"."""
    pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"], "b": adapters["b"]}, device="cpu")
    calls = [
        (lambda: api.set_adapter(pipe, "a", weights=[1.0, 2.0]), "1 adapter but 2 weights"),
        (lambda: api.set_adapter(pipe, ["a", "b"], weights=[1.0]), "2 adapters but 1 weight"),
        (lambda: api.set_adapter(pipe, ["x", "y"]), "no adapters named 'x', 'y' are loaded; loaded: a, b"),
        (lambda: api.set_adapter(pipe, "a", scale=float("nan")), "scale must be a finite number; got nan"),
    ]
    for call, message in calls:
        with pytest.raises(ValueError) as raised:
            call()
        assert str(raised.value) == message


def test_a_numbered_cuda_device_is_checked_and_computes_in_fp16(monkeypatch):
    import torch

    from runner import models

    with pytest.raises(
        ValueError, match=re.escape("unknown device 'cuda:x'; use auto, cuda, mps, cpu or cuda:N")
    ):
        api.load_pipeline("tiny-sd", device="cuda:x")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=re.escape("device = 'cuda:0' but no CUDA device is available")):
        api.load_pipeline("tiny-sd", device="cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=re.escape("device = 'cuda:2' but there are 2 CUDA devices")):
        api.load_pipeline("tiny-sd", device="cuda:2")
    assert models.resolve_device("cuda:1") == "cuda:1"
    assert api._dtype(None, "cuda:1") == api._dtype(None, "cuda") == torch.float16
    # a torch.device is taken as its name (it failed with an AttributeError)
    with pytest.raises(ValueError, match=re.escape("device = 'cuda:2' but there are 2 CUDA devices")):
        api.load_pipeline("tiny-sd", device=torch.device("cuda", 2))
    with pytest.raises(ValueError, match=re.escape("unknown device 'xpu'; use auto, cuda, mps, cpu")):
        api.load_pipeline("tiny-sd", device=torch.device("xpu"))


def test_a_project_file_as_the_base_model_says_which_base_model_to_give(tmp_path, monkeypatch):
    """diffusers tried it as a single-file checkpoint: "cannot load base model p.toml (diffusers reads a
    single file's component configs from the hub ...)"."""
    (tmp_path / "p.toml").write_text('[project]\nbase_model = "tiny-sd"\n')
    (tmp_path / "bad.toml").write_text("[project\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "p.toml: a project file, not a base model; give its [project] base_model, 'tiny-sd', "
        ),
    ):
        api.load_pipeline("p.toml", device="cpu")
    with pytest.raises(ValueError, match="bad.toml: a project file, not a base model; give the base model"):
        api.load_pipeline("bad.toml", device="cpu")


def test_a_base_model_or_adapter_path_of_another_type_raises_value_error(tmp_path, monkeypatch):
    """A Path that does not exist failed with AttributeError ('PosixPath' object has no attribute
    'endswith'); None, a TypeError from deep in pathlib."""
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ValueError, match=re.escape(f"no such file or folder: {tmp_path / 'models' / 'sd15'}")
    ):
        api.load_pipeline(Path("models/sd15"), device="cpu")  # owner/name as text, but a Path is local
    with pytest.raises(ValueError, match="base is a hub id, a built-in model name or a path; got None"):
        api.load_pipeline(None, device="cpu")
    with pytest.raises(ValueError, match="an adapter path is a folder or <project file>:<name>; got None"):
        api.resolve_adapter_path(None)


def test_what_is_not_a_pipeline_raises_value_error(adapters):  # noqa: F811
    """`pipe = api.load_adapter(pipe, ...)` makes pipe None; the next call failed with "AttributeError:
    'NoneType' object has no attribute 'unet'", and so did a module given for the pipeline."""
    pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"]}, device="cpu")
    in_place = "pipe is None, not a pipeline: load_adapter, set_adapter and unload_adapter change"
    for call in (
        lambda p: api.load_adapter(p, adapters["b"], "b"),
        lambda p: api.set_adapter(p, "a"),
        lambda p: api.blend(p, {"a": 1.0}, "a2"),
        lambda p: api.unload_adapter(p, "a"),
        api.loaded_adapters,
    ):
        with pytest.raises(ValueError, match=in_place):
            call(None)
    with pytest.raises(ValueError, match="must be a diffusers pipeline, .*; got a PeftModel"):
        api.set_adapter(pipe.unet, "a")
    assert api.loaded_adapters(pipe) == ["a"]
    errors = api.blend(pipe, {"a": 1.0}, "a3")  # `pipe = api.blend(...)` makes pipe the blend's errors
    with pytest.raises(ValueError, match=r"got a dict: blend returns the blend's errors, not the pipeline"):
        api.set_adapter(errors, "a")


def test_an_adapter_folder_as_the_base_model_says_which_base_model_to_give(adapters):  # noqa: F811
    """It said "cannot load base model ...: Error no file named model_index.json found"."""
    for given in (adapters["a"], adapters["a"] / "unet"):
        with pytest.raises(
            ValueError,
            match=re.escape(
                f"{given}: an adapter folder, not a base model; give the base model it was trained on "
                f"(tiny-sd), and {adapters['a']} in adapters"
            ),
        ):
            api.load_pipeline(str(given), device="cpu")


def test_base_model_config_of_a_base_that_is_not_a_single_file_is_said_to_be_ignored():
    # Was dropped without a word; the project file's key of that name is an error there.
    with pytest.warns(UserWarning) as warned:
        pipe = api.load_pipeline("tiny-sd", device="cpu", base_model_config="configs/sd15")
    assert [str(w.message) for w in warned] == [
        "base_model_config applies to a single-file base only; 'tiny-sd' is a built-in model, which has its "
        "own configs: base_model_config is ignored"
    ]
    assert warned[0].filename == __file__  # the caller's line
    assert type(pipe).__name__ == "StableDiffusionPipeline"
