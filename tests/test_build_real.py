"""Real steps on tiny-sd through the `dbl` command: projects/flow.toml end to end, a training that is
killed (SIGKILL) or interrupted (Ctrl-C) and resumes to the very bytes of an uninterrupted run, and a
render killed midway that keeps the batches it drew and ends with the same bytes."""

from __future__ import annotations

import json
import shutil
import signal

import pytest

from runner import lockfile
from tests.conftest import ROOT, write_image
from tests.real_builds import adapter_bytes, build_here, dbl, project, stop_during_training

pytestmark = pytest.mark.torch


def _planned(path) -> dict[str, list[str]]:
    """The reasons `dbl plan` gives for each stale step of the project file at `path`."""
    from runner import executor
    from runner.project import load_project

    _, planned = executor.Workspace(load_project(path)).plan()
    return {p.id: list(p.reasons) for p in planned if p.stale}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    build_here(project(folder))
    return adapter_bytes(folder)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_or_interrupted_training_resumes_to_the_same_adapter(tmp_path, reference, sig):
    proc, seen = stop_during_training(project(tmp_path), tmp_path, "step 12/20", sig)  # past checkpoint-10
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), "".join(seen)
    assert "train:dog" not in lockfile.read(tmp_path / "p.lock")
    work = tmp_path / ".dbl" / "tmp" / "p" / "train-dog"
    checkpoints = sorted(p.name for p in work.glob("checkpoint-*"))
    assert checkpoints and checkpoints[-1] in (
        "checkpoint-10",
        "checkpoint-12",
        "checkpoint-13",
        "checkpoint-15",
    )
    said = _planned(tmp_path / "p.toml")["train:dog"]
    assert said == [
        "never built",
        f"resumes from its checkpoint at step {int(checkpoints[-1].split('-')[1])}",
    ]
    logs = build_here(tmp_path / "p.toml")
    assert any("resuming from checkpoint-" in line for line in logs), logs
    assert adapter_bytes(tmp_path) == reference
    assert not work.exists(), "the work folder goes once the step is committed"


def test_the_flow_builds_then_does_nothing(tmp_path):
    shutil.copytree(ROOT / "projects", tmp_path / "projects")
    first = dbl("build", "projects/flow.toml", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    out = tmp_path / "projects" / "build" / "flow"
    assert (out / "adapters" / "dog" / "dog.safetensors").is_file()
    assert (out / "blends" / "toy_dog" / "unet" / "adapter_model.safetensors").is_file()
    assert len(list((out / "renders" / "dog").glob("*.png"))) == 5  # 2 prompts x 2 seeds + grid
    assert (tmp_path / "projects" / "flow.lock").is_file()
    second = dbl("build", "projects/flow.toml", cwd=tmp_path)
    assert second.returncode == 0 and second.stdout.strip().endswith("all 6 steps are up to date")
    assert len(second.stdout.strip().splitlines()) == 1


def test_a_local_base_model_gives_the_same_bytes_wherever_the_project_lies(tmp_path):
    """Outputs record a local base model as the project file writes it, not as an absolute path: the
    same project checked out in two folders builds the same bytes (and so the same lockfile)."""
    from runner.models import ensure_builtin

    built = []
    for folder in (tmp_path / "a", tmp_path / "b" / "deeper"):
        folder.mkdir(parents=True)
        shutil.copytree(ensure_builtin("tiny-sd"), folder / "model")
        for i in range(2):
            write_image(folder / "dog" / f"{i}.png", seed=i, size=64)
        (folder / "p.toml").write_text(
            '[project]\nbase_model = "./model"\n\n[train]\nresolution = 64\nsteps = 1\ntrain_text_encoder = false\n\n'
            '[subjects.dog]\nimages = "dog"\ninstance_prompt = "a photo of sks dog"\n'
        )
        build_here(folder / "p.toml")
        built.append(adapter_bytes(folder))
    assert json.loads(built[0]["unet/adapter_config.json"])["base_model_name_or_path"] == "./model"
    assert json.loads(built[0]["dbl.json"])["base_model"] == "./model"
    assert built[0] == built[1]


RENDER = """
[project]
base_model = "tiny-sd"

[renders.r]
adapter = "none"
prompts = ["a dog", "a boat", "a bird", "a cat", "a car", "a tree"]
seeds = [0, 1]
steps = 8
width = 32
height = 32
batch_size = 2
"""


def test_a_killed_render_keeps_the_batches_it_drew_and_ends_with_the_uninterrupted_bytes(tmp_path):
    from tests.folders import folder_bytes

    clean = tmp_path / "clean"
    build_here(project(clean, RENDER))
    proc, seen = stop_during_training(
        project(tmp_path / "killed", RENDER), tmp_path / "killed", "images 4/12"
    )
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert "render:r" not in lockfile.read(tmp_path / "killed" / "p.lock")
    drawn = sorted(p.name for p in (tmp_path / "killed").glob(".dbl/tmp/p/render-r/drawn/*.png"))
    assert len(drawn) >= 4 and drawn[:4] == ["0-0.png", "0-1.png", "1-0.png", "1-1.png"], drawn
    kept = len(drawn) // 2 * 2  # whole batches: one cut short by the kill is drawn again
    said = _planned(tmp_path / "killed" / "p.toml")["render:r"]
    assert said == ["never built", f"keeps {kept} of 12 images an interrupted run drew"]
    logs = build_here(tmp_path / "killed" / "p.toml")
    assert f"render:r reusing {kept} images drawn by an interrupted run" in logs, logs
    renders = "build/p/renders/r"
    assert folder_bytes(tmp_path / "killed" / renders) == folder_bytes(clean / renders)
