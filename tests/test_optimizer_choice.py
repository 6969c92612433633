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


def test_adamw8bit_on_cuda_without_bitsandbytes_names_the_key_that_asks_for_it(proj, build, monkeypatch):
    from runner.exec import preflight
    from runner.project.problems import display
    from runner.training import optimizers

    monkeypatch.setattr(optimizers, "_installed", lambda package: package != "bitsandbytes")
    proj.edit('prior = "dog"', 'prior = "dog"\n[subjects.dog.train]\noptimizer = "adamw8bit"')
    project = proj.load()
    monkeypatch.setattr("runner.models.resolve_device", lambda device: "cuda")  # a machine with CUDA
    to_run = [s for s in _steps(project) if s.id in ("train:dog", "train:toy")]
    line = proj.path.read_text().split("\n").index('optimizer = "adamw8bit"') + 1
    assert preflight.machine_errors(project, to_run) == {
        "train:dog": f'{display(proj.path)}: subjects.dog.train.optimizer: "adamw8bit" needs bitsandbytes '
        f"(line {line}) - pip install bitsandbytes"
    }


def _steps(project):
    from runner.planner import graph

    return graph(project)
