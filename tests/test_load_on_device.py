"""Weights read straight onto the device a step runs on (diffusers' `device_map`), not read into host
memory and copied. On a GPU that is "cuda"; here the CPU stands in for it, through the same code."""

from __future__ import annotations

import pytest

from runner import families
from runner.models import BaseModel, load_pipeline, loading


def test_only_a_gpu_named_as_diffusers_takes_it_is_loaded_onto_directly(monkeypatch):
    pytest.importorskip("diffusers")
    import torch
    from diffusers.pipelines import pipeline_utils

    # The devices diffusers' pipelines take on a CUDA machine:
    monkeypatch.setattr(pipeline_utils, "SUPPORTED_DEVICE_MAP", ["balanced", "cuda", "cpu"])
    assert loading.loads_straight_to("cuda") == "cuda"
    assert loading.loads_straight_to("cpu") is None  # weights are read there anyway
    assert loading.loads_straight_to("balanced") is None  # a strategy, not a device
    # An indexed device, which diffusers' pipelines refuse, is read onto "cuda" where that is the current
    # device (as a rank of a multi-GPU step sets it), torch putting "cuda" tensors there.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert loading.loads_straight_to("cuda:1") == "cuda"
    assert loading.loads_straight_to("cuda:0") is None  # read on the CPU and moved
    assert loading.loads_straight_to("cuda:x") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading.loads_straight_to("cuda:0") is None
    monkeypatch.setattr(pipeline_utils, "SUPPORTED_DEVICE_MAP", ["balanced", "mps", "cpu"])  # a Mac's
    assert loading.loads_straight_to("mps") is None  # its memory is the host's: nothing to gain
    monkeypatch.setattr(pipeline_utils, "SUPPORTED_DEVICE_MAP", ["balanced", "cpu"])  # a diffusers without it
    assert loading.loads_straight_to("cuda") is None


@pytest.mark.torch
@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_a_pipeline_loaded_onto_its_device_holds_the_same_weights_and_still_moves(model, monkeypatch):
    import torch

    base = BaseModel(kind="builtin", ref=model)
    ordinary = load_pipeline(base)
    family = families.of(ordinary)
    passed = []
    load_pretrained = type(family).load_pretrained

    def spy(self, folder, **kwargs):
        passed.append(kwargs.get("device_map"))
        return load_pretrained(self, folder, **kwargs)

    monkeypatch.setattr(type(family), "load_pretrained", spy)
    monkeypatch.setattr(loading, "loads_straight_to", lambda device: "cpu" if device == "cpu" else None)
    direct = load_pipeline(base, dtype=torch.float16)

    assert passed == ["cpu"]
    assert direct.hf_device_map == "cpu"  # diffusers placed the weights as it read them
    for name in ("unet", "vae", "text_encoder"):
        have, want = getattr(direct, name).state_dict(), getattr(ordinary, name).state_dict()
        assert have.keys() == want.keys()
        for key, value in want.items():
            assert have[key].device.type == "cpu"
            assert have[key].dtype == (value.dtype if not value.is_floating_point() else torch.float16), key
            assert have[key].equal(value.to(have[key].dtype)), key
    # A pipeline placed on one device by type is still moved as any other (renders and blends move it).
    assert direct.to(dtype=torch.float32).unet.dtype == torch.float32
