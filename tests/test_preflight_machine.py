"""What a build finds before any step runs about the machine: optimizers, packages, schedulers, devices."""

from __future__ import annotations

import pytest

from runner.events import FAILED, SKIPPED
from runner.project.problems import display
from tests.conftest import step_ends


def test_an_optimizer_this_machine_cannot_run_fails_the_train_steps_before_any_step_runs(
    proj, build, fake_steps
):
    # Was found when train:dog built its optimizer: after prior:dog had generated class images.
    proj.edit('base_model = "tiny-sd"', 'base_model = "tiny-sd"\ndevice = "cpu"')
    proj.edit("steps = 4", 'steps = 4\noptimizer = "adamw8bit"')
    result, rec = build(proj)
    assert result.exit_code == 1 and fake_steps.ran == []
    line = _line(proj, 'optimizer = "adamw8bit"')
    assert step_ends(rec)["train:dog"] == (
        FAILED,
        f'{display(proj.path)}: train.optimizer: "adamw8bit" needs a CUDA device (bitsandbytes) '
        f"(line {line}) - use the default adamw on this machine",
    )


def _line(proj, text: str) -> int:
    return proj.path.read_text().split("\n").index(text) + 1


def test_an_optimizer_a_subject_sets_is_named_at_its_own_key(proj, build, fake_steps):
    proj.edit('base_model = "tiny-sd"', 'base_model = "tiny-sd"\ndevice = "cpu"')
    proj.edit('prior = "dog"', 'prior = "dog"\n[subjects.dog.train]\nuse_8bit_adam = true')
    result, rec = build(proj, keep_going=True)
    assert result.exit_code == 1 and "train:toy" in fake_steps.ran  # [train]'s adamw runs here
    assert step_ends(rec)["train:dog"] == (
        FAILED,
        f"{display(proj.path)}: subjects.dog.train.use_8bit_adam: 8-bit AdamW needs a CUDA device "
        f"(bitsandbytes) (line {_line(proj, 'use_8bit_adam = true')}) - use the default adamw on this machine",
    )


def test_a_package_an_optimizer_needs_is_asked_for_before_any_step_runs(proj, build, fake_steps, monkeypatch):
    from runner.training import optimizers

    monkeypatch.setattr(optimizers, "_installed", lambda package: package != "prodigyopt")
    proj.edit("steps = 4", 'steps = 4\noptimizer = "prodigy"\nlearning_rate = 1.0')  # Prodigy's own rate
    result, rec = build(proj, keep_going=True)
    assert result.exit_code == 1 and fake_steps.ran == ["prior:dog", "render:base"]
    status, error = step_ends(rec)["train:toy"]
    line = _line(proj, 'optimizer = "prodigy"')
    assert error == (
        f'{display(proj.path)}: train.optimizer: "prodigy" needs the prodigyopt package (line {line}) '
        "- pip install 'dbl[prodigy]'"
    )


def test_steps_a_cluster_places_are_not_refused_for_what_this_machine_lacks(proj, build, fake_steps):
    from tests.conftest import FakeBackend

    class Cluster(FakeBackend):
        places_steps = True

        def default_jobs(self) -> int:
            return 1

    proj.edit('base_model = "tiny-sd"', 'base_model = "tiny-sd"\ndevice = "cpu"')
    proj.edit("steps = 4", 'steps = 4\noptimizer = "adamw8bit"')
    result, _ = build(proj, backend_factory=lambda project: Cluster(fake_steps))
    assert result.ok and "train:dog" in fake_steps.ran  # its workers may have CUDA and bitsandbytes


def test_a_scheduler_this_machine_cannot_make_fails_its_step_before_any_step_runs(
    proj, build, fake_steps, monkeypatch
):
    # A render's was found once every train step before it had run; a prior's once it had loaded the model.
    from runner import schedulers

    monkeypatch.setattr(schedulers, "_installed", lambda package: package != "scipy")
    proj.edit('prompts = ["a dog"]', 'prompts = ["a dog"]\nscheduler = "lms"')
    proj.edit("num_images = 2", 'num_images = 2\nscheduler = "lms"')
    result, rec = build(proj, keep_going=True)
    assert result.exit_code == 1
    assert fake_steps.ran == [
        "train:toy"
    ]  # the prior failed, and so did render:base; train:dog needs the prior
    ended, shown = step_ends(rec), display(proj.path)
    lms = "scheduler 'lms' needs scipy (line {line}) - pip install scipy, or pick another scheduler"
    assert ended["render:base"] == (FAILED, f"{shown}: renders.base.scheduler: {lms.format(line=42)}")
    assert ended["prior:dog"] == (FAILED, f"{shown}: priors.dog.scheduler: {lms.format(line=16)}")
    assert ended["train:dog"] == (SKIPPED, "upstream prior:dog failed")


@pytest.mark.torch  # imports diffusers
def test_a_hub_model_of_which_only_the_index_is_downloaded_is_not_asked_for_its_configs(
    tmp_path, monkeypatch
):
    # diffusers and transformers read a config folder that is not there from the hub: without a network,
    # the build would wait on its retries. The train step checks the targets once the model is there.
    import json

    import diffusers

    from runner import families
    from runner.exec import preflight
    from runner.models import BaseModel

    commit = "a" * 40
    repo = tmp_path / "hub" / "models--owner--sd"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    index = {"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"]}
    (repo / "snapshots" / commit / "model_index.json").write_text(json.dumps(index))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    asked = classmethod(lambda cls, *a, **k: pytest.fail(f"asked for the configs of {a}"))
    monkeypatch.setattr(diffusers.UNet2DConditionModel, "load_config", asked)
    assert preflight._skeletons(BaseModel("hub", "owner/sd"), families.get("sd1")) is None


def _no_cuda(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_device_cuda_on_a_machine_without_cuda_is_said_once_before_any_step_runs(
    proj, fake_steps, monkeypatch, capsys
):
    # Each step that ran failed on it, exit 1, after the build had begun, and none named the file or line.
    from runner.cli import main

    _no_cuda(monkeypatch)
    proj.edit('base_model = "tiny-sd"', 'base_model = "tiny-sd"\ndevice = "cuda"')
    assert main(["build", str(proj.path), "--no-progress", "--keep-going"]) == 2
    assert fake_steps.ran == []
    said = [line for line in capsys.readouterr().err.splitlines() if "CUDA" in line]
    assert said == [
        f'dbl: {proj.path}: project.device: device = "cuda", but this machine has no CUDA device (line 4) - '
        'set device = "cpu", or "auto" (the GPU where there is one, else the CPU), in [project]'
    ]


def test_device_cuda_is_not_refused_for_steps_a_cluster_places_or_that_load_no_model(
    proj, build, fake_steps, monkeypatch
):
    from tests.conftest import FakeBackend

    class Cluster(FakeBackend):
        places_steps = True

        def default_jobs(self) -> int:
            return 1

    _no_cuda(monkeypatch)
    proj.edit('base_model = "tiny-sd"', 'base_model = "tiny-sd"\ndevice = "cuda"')
    result, _ = build(proj, backend_factory=lambda project: Cluster(fake_steps))
    assert result.ok and "train:dog" in fake_steps.ran  # its nodes may have GPUs
    assert preflight_device(proj, ["eval"]) is None
    assert preflight_device(proj, ["train"]) is not None


def preflight_device(proj, kinds: list[str]):
    """What the build says of the project's device, where steps of these kinds run."""
    from types import SimpleNamespace

    from runner.exec.preflight import device_problem

    return device_problem(proj.load(), [SimpleNamespace(kind=kind) for kind in kinds])
