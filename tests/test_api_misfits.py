"""The notebook API and an adapter that does not fit the pipeline, or is damaged: it fails loudly, names the file
and the base model the adapter was trained on, and leaves the pipeline as it was."""

from __future__ import annotations

import re
import shutil

import pytest

from runner import api
from tests.blend_fixtures import adapters  # noqa: F401

pytestmark = pytest.mark.torch


def test_a_mismatched_adapter_raises(tmp_path, adapters):  # noqa: F811
    from runner.adapters import PEFT_WEIGHTS, read_safetensors, write_safetensors

    bad = tmp_path / "bad"
    shutil.copytree(adapters["a"], bad)
    path = bad / "unet" / PEFT_WEIGHTS
    tensors, metadata = read_safetensors(path)
    tensors = {k.replace("down_blocks.1", "down_blocks.7"): v for k, v in tensors.items()}
    write_safetensors(path, tensors, metadata)

    pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"]}, device="cpu")
    with pytest.raises(ValueError, match="match no module"):
        api.load_adapter(pipe, bad, "bad")
    assert api.loaded_adapters(pipe) == ["a"]
    with pytest.raises(ValueError, match="a folder of adapters, not one; name one of them: bad"):
        api.load_adapter(pipe, tmp_path, "nothing")
    kohya = adapters["a"] / "a.safetensors"
    with pytest.raises(
        ValueError, match=re.escape(f"a single file; load the adapter folder that holds it, {adapters['a']}")
    ):
        api.load_adapter(pipe, kohya, "kohya")
    shutil.copy(kohya, tmp_path / "lora.safetensors")
    with pytest.raises(ValueError, match="a single file; the API loads adapter folders"):
        api.load_adapter(pipe, tmp_path / "lora.safetensors", "kohya")
    (tmp_path / "p.toml").write_text("")
    with pytest.raises(ValueError, match="a project file; name one of its adapters, .*p.toml:<subject"):
        api.load_adapter(pipe, tmp_path / "p.toml", "p")


def test_an_sd1_adapter_on_an_sdxl_pipeline_says_which_base_model_it_was_trained_on(adapters):  # noqa: F811
    """It said only "does not fit the unet (size mismatch for ...)"."""
    pipe = api.load_pipeline("tiny-sdxl", device="cpu")
    with pytest.raises(
        ValueError, match="trained on a different base model\\? Its adapter_config.json names tiny-sd$"
    ):
        api.load_adapter(pipe, adapters["c"], "sd1")
    assert api.loaded_adapters(pipe) == []


@pytest.mark.parametrize("where", ["fresh pipeline", "beside another adapter"])
@pytest.mark.parametrize("config", ["target modules of another model", "a JSON list"])
def test_a_config_that_does_not_fit_names_its_file(tmp_path, adapters, where, config):  # noqa: F811
    """PEFT's own ValueError ("Target modules {...} not found in the base model") named no file, and a
    config that is no JSON object failed with an AttributeError."""
    import json

    bad = tmp_path / "bad"
    shutil.copytree(adapters["a"], bad)
    path = bad / "text_encoder" / "adapter_config.json"
    if config.startswith("target"):
        path.write_text(json.dumps(json.loads(path.read_text()) | {"target_modules": ["to_q", "to_k"]}))
        expected = re.escape(f"{bad / 'text_encoder'}: does not fit the text_encoder (Target modules")
    else:
        path.write_text("[]")
        expected = re.escape(f"{path}: not a LoRA config")
    before = {"a": adapters["a"]} if where.startswith("beside") else {}
    pipe = api.load_pipeline("tiny-sd", before, device="cpu")
    with pytest.raises(ValueError, match=expected):
        api.load_adapter(pipe, bad, "bad")
    assert api.loaded_adapters(pipe) == list(before)


def _lora_layer_count(module) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in module.modules())


@pytest.mark.parametrize("where", ["fresh pipeline", "beside another adapter"])
@pytest.mark.parametrize("damage", ["truncated text encoder weights", "unet weights of another shape"])
def test_a_load_that_fails_leaves_the_pipeline_as_it_was(tmp_path, adapters, where, damage):  # noqa: F811
    import torch

    from runner.adapters import PEFT_WEIGHTS, read_safetensors, write_safetensors

    bad = tmp_path / "bad"
    shutil.copytree(adapters["a"], bad)
    if damage.startswith("truncated"):
        path = bad / "text_encoder" / PEFT_WEIGHTS
        path.write_bytes(path.read_bytes()[:100])
        expected = re.escape(f"{path}: not a readable safetensors file")
    else:
        path = bad / "unet" / PEFT_WEIGHTS
        tensors, metadata = read_safetensors(path)
        tensors = {k: torch.cat([v, v]) if "lora_A" in k else v for k, v in tensors.items()}
        write_safetensors(path, tensors, metadata)
        expected = re.escape(f"{bad / 'unet'}: does not fit the unet (") + ".*size mismatch"
    before = {"a": adapters["a"]} if where.startswith("beside") else {}
    pipe = api.load_pipeline("tiny-sd", before, device="cpu")
    layers = (_lora_layer_count(pipe.unet), _lora_layer_count(pipe.text_encoder))
    with pytest.raises(ValueError, match=expected):
        api.load_adapter(pipe, bad, "bad")
    assert api.loaded_adapters(pipe) == list(before)
    assert (_lora_layer_count(pipe.unet), _lora_layer_count(pipe.text_encoder)) == layers
    if not before:  # the plain modules, with no LoRA layer left inside them
        assert type(pipe.unet).__name__ == "UNet2DConditionModel" and layers == (0, 0)
        assert type(pipe.text_encoder).__name__ == "CLIPTextModel"


def test_a_path_that_is_no_adapter_says_what_is_there(tmp_path, adapters):  # noqa: F811
    """A typo (adapters/dgo) said "not an adapter folder" as if the folder were there."""
    shutil.copytree(adapters["a"], tmp_path / "adapters" / "dog")
    with pytest.raises(
        ValueError, match="dgo: no such file or folder; give an adapter folder .*; adapters beside it: dog$"
    ):
        api.resolve_adapter_path(tmp_path / "adapters" / "dgo")
    (tmp_path / "civitai").mkdir()
    shutil.copy(adapters["a"] / "a.safetensors", tmp_path / "civitai" / "dog.safetensors")
    with pytest.raises(
        ValueError, match=r"holds single files \(dog.safetensors\), .* diffusers' load_lora_weights"
    ):
        api.resolve_adapter_path(tmp_path / "civitai")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: not an adapter folder"):
        api.resolve_adapter_path(tmp_path / "empty")


def test_an_adapter_of_another_family_names_the_base_model_it_was_trained_on(tmp_path, adapters):  # noqa: F811
    """An SDXL adapter (text_encoder_2/) on an SD 1.x pipeline named neither; the README promises both."""
    import json

    xl = tmp_path / "xl"
    shutil.copytree(adapters["a"], xl)
    shutil.copytree(xl / "text_encoder", xl / "text_encoder_2")
    config = xl / "unet" / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"base_model_name_or_path": "tiny-sdxl"}))
    pipe = api.load_pipeline("tiny-sd", device="cpu")
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{xl}: has text_encoder_2, which a sd1 base model does not have; was the adapter trained on another "
            "model family? Its adapter_config.json names tiny-sdxl"
        ),
    ):
        api.load_adapter(pipe, xl, "xl")
    assert api.loaded_adapters(pipe) == []
