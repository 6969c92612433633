"""The hashes of a local base model's files, kept per user: another project on the same model folder (a
second project, a fresh clone, a CI checkout) reads none of its files again, and still reads a file that
changed."""

from __future__ import annotations

import os
import shutil
import warnings

import pytest

from runner.executor import Workspace
from runner.fingerprint import FileHasher
from runner.project import load_project


def _model(tmp_path):
    """A small diffusers folder of the SD 1.x family (the files dbl reads to detect it)."""
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights" * 1000)
    (folder / "unet" / "config.json").write_text("{}")
    return folder


def _plan(tmp_path, name: str, model) -> Workspace:
    root = tmp_path / name
    root.mkdir()
    path = root / "p.toml"
    path.write_text(
        f'[project]\nbase_model = "{model}"\ndevice = "cpu"\n[renders.r]\nadapter = "none"\nprompts = ["a cat"]\n'
    )
    ws = Workspace(load_project(path))
    ws.plan()
    ws.hasher.save()
    return ws


def test_a_second_project_on_the_same_model_folder_reads_none_of_its_files(tmp_path, monkeypatch):
    monkeypatch.setenv("DBL_HOME", str(tmp_path / "home"))
    model = _model(tmp_path)
    first = _plan(tmp_path, "a", model)
    assert first.hasher.reads == 3
    second = _plan(tmp_path, "b", model)
    assert second.hasher.reads == 0
    assert second.facts.base_model() == first.facts.base_model()


def test_a_model_file_changed_since_is_read_again(tmp_path, monkeypatch):
    monkeypatch.setenv("DBL_HOME", str(tmp_path / "home"))
    model = _model(tmp_path)
    first = _plan(tmp_path, "a", model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    st = os.stat(weights)
    weights.write_bytes(b"WEIGHTS" * 1000)  # same size, and the old mtime set back: only ctime moved
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = _plan(tmp_path, "b", model)
    assert second.hasher.reads == 1
    assert second.facts.base_model() != first.facts.base_model()
    third = _plan(tmp_path, "c", model)  # what the second read is kept for the next
    assert third.hasher.reads == 0 and third.facts.base_model() == second.facts.base_model()


def test_rereading_trusts_no_shared_hash(tmp_path, monkeypatch):
    # `dbl check` re-reads the model; what it reads is kept for the next project.
    from runner.fingerprint import base_model_identity
    from runner.models import BaseModel

    monkeypatch.setenv("DBL_HOME", str(tmp_path / "home"))
    model = _model(tmp_path)
    _plan(tmp_path, "a", model)
    hasher = FileHasher(tmp_path / "state", reread=True)
    base_model_identity(BaseModel.parse(str(model), tmp_path), hasher)
    assert hasher.reads == 3


def test_a_home_that_cannot_be_written_costs_no_warning(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.write_text("a file where the folder would be")
    monkeypatch.setenv("DBL_HOME", str(home))
    model = _model(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = _plan(tmp_path, "a", model)
    assert first.hasher.reads == 3
    shutil.rmtree(tmp_path / "a" / ".dbl")
    assert _plan(tmp_path, "b", model).hasher.reads == 3  # nothing kept, nothing broken


def test_a_model_folders_files_are_hashed_at_once_and_as_one_by_one(tmp_path, monkeypatch):
    """A first build read a model folder's files one after another: SD 1.5's UNet, text encoder and VAE
    took their sum, not about the largest alone. Each read here waits until another is under way, so
    reading them one by one would break the barrier rather than pass."""
    import threading

    from runner import fingerprint

    folder = _model(tmp_path)
    (folder / "vae").mkdir()
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"vae" * 1000)
    one_by_one = FileHasher().tree(folder)

    monkeypatch.setattr(fingerprint, "HASH_THREADS", 2)
    both = threading.Barrier(2, timeout=10)
    read = fingerprint.sha256_file
    waited = []

    def sha256_file(path):
        if path.suffix == ".safetensors":
            waited.append(both.wait())  # raises BrokenBarrierError where the other read never starts
        return read(path)

    monkeypatch.setattr(fingerprint, "sha256_file", sha256_file)
    hasher = FileHasher()
    assert hasher.tree(folder) == one_by_one
    assert sorted(waited) == [0, 1] and hasher.reads == 4  # both weights read together, every file once
    assert hasher.tree(folder) == one_by_one and hasher.reads == 4  # then known: nothing read again


def test_a_file_that_cannot_be_read_ahead_is_said_as_before(tmp_path):
    from runner.errors import ImageError

    folder = _model(tmp_path)
    (folder / "text_encoder").mkdir()
    (folder / "text_encoder" / "model.safetensors").symlink_to(folder / "gone.safetensors")
    with pytest.raises(ImageError) as said:
        FileHasher().tree(folder, "a file of the model")
    assert str(said.value) == (
        f"{folder / 'text_encoder' / 'model.safetensors'}: a symbolic link to {folder / 'gone.safetensors'}, "
        "which does not exist; fix the link or remove it"
    )
