"""Which AdamW implementation a train step gets: fused where every trainable parameter is on CUDA."""

from __future__ import annotations

import pytest

from runner.training.optimizers import adamw_implementation


def test_all_parameters_on_cuda_get_the_fused_kernel():
    assert adamw_implementation(["cuda", "cuda", "cuda"]) == {"fused": True}


@pytest.mark.parametrize("devices", [["cpu"], ["cpu", "cpu"], ["cuda", "cpu"], ["mps"], []])
def test_anything_else_gets_the_plain_loop(devices):
    assert adamw_implementation(devices) == {"foreach": False}


@pytest.mark.torch
def test_a_cpu_train_step_builds_the_plain_loop():
    import torch

    from runner.project.schema import TrainSettings
    from runner.training.optimizers import make_optimizer

    class Component:
        name, learning_rate = "unet", None

    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = make_optimizer({"unet": {"w": param}}, [Component()], TrainSettings(), "cpu")
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["foreach"] is False and not optimizer.defaults["fused"]
