"""An adapter folder whose adapter_config.json is broken (not JSON, not an object, without
base_model_name_or_path, unreadable): what the notebook API and a blend say of it. The base model a
config names serves messages and the blend's own configs; a broken config only loses that, and the
load that reads the config says what is wrong with it."""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import pytest

from runner import api
from runner.steps import StepError
from tests.blend_fixtures import adapters, models, run_blend  # noqa: F401

pytestmark = pytest.mark.torch

BROKEN = ("not JSON", "not UTF-8", "not an object", "no base model", "not a name", "unreadable")


def _broken_copy(source, folder, how, monkeypatch, components=("unet", "text_encoder")):
    """A copy of the adapter `source` whose configs of `components` are broken as `how` says; returns
    the folder and the reads of a config that were refused (for "unreadable")."""
    shutil.copytree(source, folder)
    refused = []
    for component in components:
        path = folder / component / "adapter_config.json"
        config = json.loads(path.read_text())
        if how == "not JSON":
            path.write_text("{not json")
        elif how == "not UTF-8":
            path.write_bytes(b"\xff\xfe{}")
        elif how == "not an object":
            path.write_text("[1, 2]")
        elif how == "no base model":
            del config["base_model_name_or_path"]
            path.write_text(json.dumps(config))
        elif how == "not a name":
            path.write_text(json.dumps(config | {"base_model_name_or_path": 5}))
    if how == "unreadable":  # as root, file modes do not keep a file from being read
        read_text = pathlib.Path.read_text
        unreadable = {folder / c / "adapter_config.json" for c in components}

        def refuse(self, *args, **kwargs):
            if self in unreadable:
                refused.append(self)
                raise PermissionError(13, "Permission denied", str(self))
            return read_text(self, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "read_text", refuse)
    return folder, refused


@pytest.mark.parametrize("how", BROKEN)
def test_the_base_model_a_broken_config_names_is_none(tmp_path, adapters, monkeypatch, how):  # noqa: F811
    from runner.adapters import trained_on

    assert trained_on(adapters["a"]) == "tiny-sd"
    folder, refused = _broken_copy(adapters["a"], tmp_path / "a", how, monkeypatch)
    assert trained_on(folder) is None
    assert trained_on(tmp_path / "nothing-here") is None
    assert bool(refused) == (how == "unreadable")
    # One broken config: another component's names the base model.
    other, _ = _broken_copy(adapters["a"], tmp_path / "one", how, monkeypatch, components=("text_encoder",))
    assert trained_on(other) == "tiny-sd"


@pytest.mark.parametrize("how", BROKEN)
def test_an_adapter_folder_with_a_broken_config_as_the_base_model(tmp_path, adapters, monkeypatch, how):  # noqa: F811
    folder, refused = _broken_copy(adapters["a"], tmp_path / "a", how, monkeypatch)
    with pytest.raises(ValueError) as error:
        api.load_pipeline(str(folder), device="cpu")
    assert str(error.value) == (
        f"{folder}: an adapter folder, not a base model; give a base model, and {folder} in adapters"
    )
    assert bool(refused) == (how == "unreadable")


@pytest.mark.parametrize("how", BROKEN)
def test_an_adapter_of_another_family_with_a_broken_config_says_so(tmp_path, adapters, monkeypatch, how):  # noqa: F811
    """A broken unet config said so, or raised PermissionError, instead of naming the component that a
    base model of this family has not."""
    pipe = api.load_pipeline("tiny-sd", device="cpu")
    xl, refused = _broken_copy(adapters["a"], tmp_path / "xl", how, monkeypatch)
    shutil.copytree(adapters["a"] / "text_encoder", xl / "text_encoder_2")
    with pytest.raises(ValueError) as error:
        api.load_adapter(pipe, xl, "xl")
    assert str(error.value) == (
        f"{xl}: has text_encoder_2, which a sd1 base model does not have; was the adapter trained on another "
        "model family?"
    )
    assert api.loaded_adapters(pipe) == []
    assert bool(refused) == (how == "unreadable")


def test_an_unreadable_adapter_config_is_named(tmp_path, adapters, monkeypatch):  # noqa: F811
    """It raised PermissionError from inside the loader, where a config that is not JSON is named."""
    pipe = api.load_pipeline("tiny-sd", device="cpu")
    folder, refused = _broken_copy(adapters["a"], tmp_path / "a", "unreadable", monkeypatch)
    with pytest.raises(
        ValueError,
        match=re.escape(f"{folder / 'unet' / 'adapter_config.json'}: not a readable adapter config (")
        + ".*Permission denied",
    ):
        api.load_adapter(pipe, folder, "a")
    assert refused and api.loaded_adapters(pipe) == []


def test_a_blend_names_the_base_model_its_parents_configs_name(tmp_path, adapters, models, monkeypatch):  # noqa: F811
    """The first parent whose configs name a base model gives the blend's; none: the project's."""
    a, _ = _broken_copy(adapters["a"], tmp_path / "a", "no base model", monkeypatch)
    b, _ = _broken_copy(adapters["b"], tmp_path / "b", "not a name", monkeypatch)
    c = tmp_path / "c"
    shutil.copytree(adapters["c"], c)
    config = c / "unet" / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"base_model_name_or_path": "someone/c"}))

    def named(out):
        return {
            json.loads((out / p / "adapter_config.json").read_text())["base_model_name_or_path"]
            for p in ("unet", "text_encoder")
        }

    inputs = {"train:a": a, "train:b": b, "train:c": c}
    assert named(run_blend(tmp_path / "1", "ab", {"a": 1.0, "b": 1.0}, inputs, models)) == {"tiny-sd"}
    assert named(run_blend(tmp_path / "2", "abc", {"a": 1.0, "b": 1.0, "c": 1.0}, inputs, models)) == {
        "someone/c"
    }


def test_a_blend_names_a_parents_unreadable_config(tmp_path, adapters, models, monkeypatch):  # noqa: F811
    a, refused = _broken_copy(adapters["a"], tmp_path / "a", "unreadable", monkeypatch)
    inputs = {"train:a": a, "train:b": adapters["b"]}
    with pytest.raises(StepError, match=re.escape(f"blends.mix: cannot load 'a' from {a}: {a / 'unet'}")):
        run_blend(tmp_path, "mix", {"a": 1.0, "b": 1.0}, inputs, models)
    assert refused
    # The shared pipeline is left as it was found.
    assert type(models.pipeline().unet).__name__ == "UNet2DConditionModel"
