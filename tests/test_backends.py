"""Executor backends: the same build gives the same bytes wherever its steps run."""

from __future__ import annotations

import shutil

import pytest

from runner import lockfile
from tests.conftest import ROOT, Recorder
from tests.folders import folder_bytes

pytestmark = pytest.mark.torch


def build_flow(folder, backend: str):
    from runner import executor
    from runner.project import load_project

    shutil.copytree(ROOT / "projects", folder)
    path = folder / "flow.toml"
    rec = Recorder()
    result = executor.build(load_project(path), executor.BuildOptions(backend=backend), rec)
    assert result.ok, rec.events
    assert sorted(e[1] for e in rec.events if e[0] == "start") == sorted(
        ["prior:dog", "train:dog", "train:toy", "blend:toy_dog", "render:dog", "render:toy_dog"]
    )
    out = folder / "build" / "flow"
    files = folder_bytes(out)
    records = lockfile.read(path.with_suffix(".lock"))
    for record in records.values():  # when and how long it ran differ from build to build
        del record["built"], record["duration_s"]
    return files, records


# Slow (two builds of projects/flow.toml, one in worker processes): tests/test_parallel_real.py's -j 3 build, whose steps
# run in worker processes too, checks the same bytes in the default run.
@pytest.mark.slow
def test_the_process_backend_builds_the_same_bytes_as_inline(tmp_path):
    inline_files, inline_lock = build_flow(tmp_path / "inline", "inline")
    process_files, process_lock = build_flow(tmp_path / "process", "process")
    assert len(inline_files) == 33
    assert process_files == inline_files
    assert process_lock == inline_lock


def test_an_unknown_backend_is_a_usage_error(proj, fake_steps):
    from runner import executor
    from runner.errors import UsageError

    with pytest.raises(UsageError, match="no executor backend 'gpu-farm'; backends: inline, process, ray"):
        executor.build(proj.load(), executor.BuildOptions(backend="gpu-farm"), Recorder())


def test_a_local_base_model_saved_anew_between_builds_of_one_process_is_loaded_anew(tmp_path, monkeypatch):
    """dbl watch, or a script's builds: a new fine-tune saved into the same folder has a new identity, so
    its steps run again, and they must run with its weights, not with those loaded before."""
    from types import SimpleNamespace

    from runner import models
    from runner.exec.backends import LazyModels

    loads = []

    class Cache:
        def __init__(self, base, device, mixed_precision):
            loads.append(base)
            self.load = len(loads)

    monkeypatch.setattr(models, "ModelCache", Cache)
    monkeypatch.setattr(LazyModels, "_shared", {})
    folder = tmp_path / "models" / "sd"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "weights.safetensors").write_bytes(b"first")
    settings = SimpleNamespace(
        base_model="models/sd", revision=None, allow_pickle=False, base_model_config=None, device="cpu",
        mixed_precision="no",
    )  # fmt: skip
    project = SimpleNamespace(settings=settings, dir=tmp_path)
    assert [LazyModels(project).load for _ in range(2)] == [1, 1]  # one build after another: kept
    (folder / "unet" / "weights.safetensors").write_bytes(b"other")
    assert LazyModels(project).load == 2
