"""The notebook API: load adapters by path, switch between them, blend them."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from runner import api
from tests.blend_fixtures import adapters  # noqa: F401

pytestmark = pytest.mark.torch


def _image(pipe, seed=0):
    import torch

    out = pipe(
        "a photo of sks dog",
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return out.images[0]


def test_two_adapters_switch_and_blend(adapters):  # noqa: F811
    pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"], "b": adapters["b"]}, device="cpu")
    assert api.loaded_adapters(pipe) == ["a", "b"]
    assert pipe.unet.active_adapters == ["b"]  # the last one loaded, as with diffusers

    api.set_adapter(pipe, "a")
    assert pipe.unet.active_adapters == ["a"] and pipe.text_encoder.active_adapters == ["a"]
    image_a = _image(pipe)
    only_a = api.load_pipeline("tiny-sd", {"a": adapters["a"]}, device="cpu")
    assert np.array_equal(image_a, _image(only_a))
    api.set_adapter(pipe, "b")
    assert np.abs(_image(pipe) - image_a).mean() > 1e-3

    errors = api.blend(pipe, {"a": 1.0, "b": 0.5}, "ab")
    assert set(errors) == {"unet", "text_encoder"} and max(errors.values()) < 1e-6
    assert pipe.unet.active_adapters == ["ab"]  # activated, unlike PEFT's add_weighted_adapter
    blended = _image(pipe)
    api.set_adapter(pipe, ["a", "b"], weights=[1.0, 0.5])  # the same sum, in the forward pass
    assert np.abs(_image(pipe) - blended).max() < 1e-4

    lossy = api.blend(pipe, {"a": 1.0, "b": 1.0}, "ab_low", method="svd", svd_rank=1, activate=False)
    assert min(lossy.values()) > 0.01
    assert pipe.unet.active_adapters == ["a", "b"]

    api.set_adapter(pipe, None)
    import torch

    base = api.load_pipeline("tiny-sd", device=torch.device("cpu"))  # a torch.device as well as a name
    assert np.array_equal(_image(pipe), _image(base))


def test_a_blend_is_of_the_adapters_as_trained_whatever_set_adapter_did(adapters):  # noqa: F811
    pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"], "b": adapters["b"]}, device="cpu")
    api.blend(pipe, {"a": 1.0, "b": 0.5}, "clean")
    clean = _image(pipe)
    api.set_adapter(pipe, ["a", "b"], weights=[1.0, 1.5], scale=0.5)
    weighted = _image(pipe)
    errors = api.blend(pipe, {"a": 1.0, "b": 0.5}, "after", activate=False)
    assert max(errors.values()) < 1e-6
    assert np.array_equal(_image(pipe), weighted)  # the activation's weights are back
    api.set_adapter(pipe, "after")
    assert np.abs(_image(pipe) - clean).max() < 1e-5

    api.set_adapter(pipe, "a", scale=0.0)
    api.blend(pipe, {"a": 1.0}, "a_only")
    only_a = api.load_pipeline("tiny-sd", {"a": adapters["a"]}, device="cpu")
    assert np.abs(_image(pipe) - _image(only_a)).max() < 1e-5


def test_names_are_checked(adapters):  # noqa: F811
    pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"], "b": adapters["b"]}, device="cpu")
    with pytest.raises(ValueError, match="no adapter named 'dog' is loaded; loaded: a, b"):
        api.set_adapter(pipe, "dog")
    with pytest.raises(ValueError, match="loaded: a, b"):
        api.blend(pipe, {"a": 1.0, "dog": 1.0}, "mix")
    api.blend(pipe, {"a": 1.0, "b": 1.0}, "mix")
    with pytest.raises(ValueError, match="already loaded"):
        api.blend(pipe, {"a": 1.0, "b": 2.0}, "mix")  # PEFT would silently keep the old one
    with pytest.raises(ValueError, match="already loaded"):
        api.load_adapter(pipe, adapters["b"], "a")
    api.load_adapter(pipe, adapters["c"], "c")
    with pytest.raises(ValueError, match="one rank"):
        api.blend(pipe, {"a": 1.0, "c": 1.0}, "bad", method="linear")
    with pytest.raises(ValueError, match="density"):
        api.blend(pipe, {"a": 1.0, "b": 1.0}, "bad", method="ties")
    assert "bad" not in api.loaded_adapters(pipe)


def test_an_adapter_without_text_encoder_leaves_it_alone(adapters):  # noqa: F811
    pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"], "c": adapters["c"]}, device="cpu")
    api.set_adapter(pipe, "c")
    assert all(layer.disable_adapters for layer in api._lora_layers(pipe.text_encoder))
    base = api.load_pipeline("tiny-sd", device="cpu")
    ids = base.tokenizer("a photo of sks dog", return_tensors="pt").input_ids
    assert np.array_equal(
        pipe.text_encoder(ids)[0].detach().numpy(), base.text_encoder(ids)[0].detach().numpy()
    )


def test_blends_on_an_fp16_pipeline_are_computed_in_fp32(adapters):  # noqa: F811
    import torch

    pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"], "b": adapters["b"]}, device="cpu", dtype="fp16")
    assert pipe.unet.dtype == torch.float16
    exact = api.blend(pipe, {"a": 1.0, "b": 1.0}, "ab")
    assert max(exact.values()) < 1e-6  # PEFT alone rounds a cat blend to fp16 here (about 3e-4)
    lossy = api.blend(pipe, {"a": 1.0, "b": 1.0}, "ab_svd", method="svd", svd_rank=2)
    assert 0.01 < min(lossy.values()) < 1
    dtypes = {p.dtype for n, p in pipe.unet.named_parameters() if ".lora_" in n}
    assert dtypes == {torch.float32}


def test_trained_biases_act_only_while_their_adapter_is_active(tmp_path, adapters):  # noqa: F811
    """PEFT keeps them in the base layers: they stayed with another adapter active, or with none."""
    import json
    import warnings

    import torch

    from runner.adapters import PEFT_WEIGHTS, read_safetensors, write_safetensors

    biased = tmp_path / "biased"
    shutil.copytree(adapters["c"], biased)
    config = biased / "unet" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "bias": "all"}))
    tensors, metadata = read_safetensors(biased / "unet" / PEFT_WEIGHTS)
    write_safetensors(
        biased / "unet" / PEFT_WEIGHTS, {**tensors, "base_model.model.conv_out.bias": torch.ones(4)}, metadata
    )
    pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"], "biased": biased}, device="cpu")
    conv_out = pipe.unet.base_model.model.conv_out
    base = api.load_pipeline("tiny-sd", device="cpu").unet.conv_out.bias.detach().clone()
    assert torch.equal(conv_out.bias, torch.ones(4))
    api.set_adapter(pipe, "a")
    assert torch.equal(conv_out.bias, base)
    api.set_adapter(pipe, ["biased", "a"])
    assert torch.equal(conv_out.bias, torch.ones(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not PEFT's: that the biases stay as trained
        api.set_adapter(pipe, None)
    assert torch.equal(conv_out.bias, base)
    api.set_adapter(pipe, "biased")
    api.unload_adapter(pipe, "biased")
    assert torch.equal(pipe.unet.base_model.model.conv_out.bias, base)


@pytest.mark.parametrize("name", ["training", "keys", "update"])
def test_a_name_torch_cannot_hold_raises_value_error(adapters, name):  # noqa: F811
    """torch's ModuleDict refuses its own attribute names: a KeyError ("attribute 'training' already
    exists") from deep inside PEFT."""
    pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"]}, device="cpu")
    with pytest.raises(
        ValueError, match=f"'{name}' cannot name an adapter: torch keeps adapters in a ModuleDict"
    ):
        api.load_adapter(pipe, adapters["b"], name)
    with pytest.raises(ValueError, match=f"'{name}' cannot name an adapter"):
        api.blend(pipe, {"a": 1.0}, name)
    assert api.loaded_adapters(pipe) == ["a"]
    api.load_adapter(pipe, adapters["b"], f"{name}_lora")  # the name it suggests


def test_numpy_and_torch_numbers_are_weights(adapters):  # noqa: F811
    """A float32 weight (np.float32(0.5), an array from np.linspace) was refused as "must be finite
    numbers; got np.float32(0.5)", and an array of weights as "not a list"."""
    import torch

    pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"], "b": adapters["b"]}, device="cpu")
    api.set_adapter(pipe, ["a", "b"], weights=[1.0, 0.5], scale=0.5)
    plain = _image(pipe)
    api.set_adapter(pipe, ["a", "b"], weights=np.array([1.0, 0.5], dtype=np.float32), scale=np.float32(0.5))
    assert np.array_equal(_image(pipe), plain)
    api.set_adapter(pipe, ["a", "b"], weights=[torch.tensor(1.0), np.int64(0)], scale=torch.tensor(0.5))
    assert not np.array_equal(_image(pipe), plain)
    errors = api.blend(pipe, {"a": np.float32(1.0), "b": np.float64(0.5)}, "ab", "svd", svd_rank=np.int64(2))
    assert set(errors) == {"unet", "text_encoder"}
    with pytest.raises(ValueError, match="weights must be finite numbers; got nan"):
        api.set_adapter(pipe, ["a", "b"], weights=np.array([np.nan, 1.0]))
