"""`dbl watch` and the inputs beyond the project file and image folders: links, a local base model, the
lockfile and the outputs' folder changed by other hands."""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest

from runner.watch import targets_of
from runner.watch_changes import Changes, next_change
from tests import watch_fixtures
from tests.conftest import PETS, Proj, write_image
from tests.watch_fixtures import Watcher, save

watcher = watch_fixtures.watcher  # the fixture
pytestmark = pytest.mark.usefixtures("in_the_projects_folder")
in_the_projects_folder = watch_fixtures.in_the_projects_folder


def test_a_retargeted_link_to_the_project_file_or_an_images_folder_is_built(tmp_path, fake_steps):
    """`ln -sfn` swaps what the build reads, and shows only in the link's own folder."""
    proj = Proj(tmp_path, PETS.replace('images = "data/toy"', 'images = "photos/toy"'))
    for name in ("toy-2024", "toy-2025"):
        for i in range(2 if name == "toy-2024" else 3):
            write_image(tmp_path / "library" / name / f"{i:02d}.png", seed=i)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "toy").symlink_to(tmp_path / "library" / "toy-2024")
    (tmp_path / "current.toml").symlink_to(proj.path)
    w = Watcher(tmp_path / "current.toml")
    try:
        w.wait_idle(0)
        fake_steps.ran.clear()
        (tmp_path / "photos" / "new").symlink_to(tmp_path / "library" / "toy-2025")
        os.replace(tmp_path / "photos" / "new", tmp_path / "photos" / "toy")
        w.wait_idle(1)
        assert "changed: photos/toy" in w.messages, w.messages
        assert sorted(fake_steps.ran) == ["blend:mix", "render:mixed", "train:toy"]

        fake_steps.ran.clear()
        (tmp_path / "other.toml").write_text(
            proj.path.read_text().replace("sks dog in a park", "sks dog at sea")
        )
        (tmp_path / "new.toml").symlink_to(tmp_path / "other.toml")
        os.replace(tmp_path / "new.toml", tmp_path / "current.toml")
        w.wait_idle(2)
        assert "render:park" in fake_steps.ran, w.messages
        assert (tmp_path / "build" / "other" / "renders" / "park").is_dir()
    finally:
        assert w.close() == 0


def test_an_edit_of_a_photo_that_a_link_in_an_images_folder_leads_to_is_built(proj, fake_steps, watcher):
    """A training set linked from a photo library: the edit shows in the library's folder alone."""
    library = proj.root / "library"
    write_image(library / "toy-a.png", seed=7)
    (proj.root / "data" / "toy" / "02.png").symlink_to(library / "toy-a.png")
    w = watcher()
    fake_steps.ran.clear()
    idle = w.idle_count()
    write_image(library / "toy-a.png", seed=8)
    w.wait_idle(idle)
    assert "changed: library/toy-a.png" in w.messages, w.messages
    assert fake_steps.ran == ["train:toy"]  # the fake train step's output is that of the same names
    assert (os.path.realpath(library), False) in targets_of(proj.path, proj.load()).watches()


def test_a_local_base_model_is_watched_every_file_of_it(tmp_path, fake_steps):
    """Its files are its identity: a new fine-tune saved over it makes every step that uses it stale."""
    proj = Proj(tmp_path, PETS.replace('base_model = "tiny-sd"', 'base_model = "models/sd"'))
    (tmp_path / "models" / "sd").mkdir(parents=True)
    t = targets_of(proj.path, None)
    root = str(tmp_path.resolve())
    assert t.models == (f"{root}/models/sd",)
    assert {(f"{root}/models/sd", True), (f"{root}/models", False)} <= t.watches()
    assert t.relevant(f"{root}/models/sd/unet/diffusion_pytorch_model.safetensors")
    assert t.relevant(f"{root}/models/sd/.cache/huggingface/download/unet.lock")  # hidden files count too
    assert not t.relevant(f"{root}/models/other/model_index.json")

    # a single file that is not there yet: the watch says so, and wakes once it is saved
    proj.path.write_text(PETS.replace('base_model = "tiny-sd"', 'base_model = "models/sd.safetensors"'))
    w = Watcher(proj.path)
    try:
        w.wait_idle(0)
        assert "no such file or folder" in w.messages[0]
        (tmp_path / "models" / "sd.safetensors").write_bytes(b"not a checkpoint yet")
        w.wait_idle(1)
        assert "changed: models/sd.safetensors" in w.messages, w.messages
        assert "not a readable .safetensors file" in w.messages[-2]
        assert w.messages[-1] == "watching pets.toml, 2 input folders and the base model (Ctrl-C to stop)"
    finally:
        assert w.close() == 0


def test_a_lockfile_put_back_by_other_hands_is_built_for_and_the_builds_own_writes_are_not(
    proj, fake_steps, watcher
):
    """`git checkout HEAD -- pets.lock` while watching: its records no longer match the outputs."""
    w = watcher()
    committed = proj.lock.read_text()
    idle = w.idle_count()
    save(proj.path, proj.path.read_text().replace("sks dog in a park", "sks dog in a forest"))
    w.wait_idle(idle)
    time.sleep(0.5)  # the build wrote the lockfile after its step: that woke nothing
    assert w.idle_count() == idle + 1, w.messages

    idle, lines = w.idle_count(), len(w.lines)
    proj.lock.write_text(committed)
    w.wait_idle(idle)
    assert w.messages[-2] == "changed: pets.lock"
    assert any("render:park" in line and "restored from cache" in line for line in w.lines[lines:]), w.lines
    assert "sks dog in a forest" in proj.lock.read_text()
    time.sleep(0.5)
    assert w.idle_count() == idle + 1, w.messages
    assert w.close() == 0


def test_the_outputs_folder_removed_while_watching_is_built_again(proj, fake_steps, watcher):
    w = watcher()
    fake_steps.ran.clear()
    idle, lines = w.idle_count(), len(w.lines)
    shutil.rmtree(proj.root / "build")
    w.wait_idle(idle)
    # build, or on a loaded machine the folder under it whose watch said so first
    assert w.messages[-2].startswith("changed: build"), w.messages
    assert (proj.root / "build" / "pets" / "renders" / "park" / "0-0.png").is_file()
    assert any("7 from cache" in line for line in w.lines[lines:]), w.lines[lines:]
    assert fake_steps.ran == []
    time.sleep(0.5)  # the build made build/ anew: that woke nothing
    assert w.idle_count() == idle + 1, w.messages
    assert w.close() == 0


def test_word_of_the_outputs_folder_removed_that_comes_after_its_rebuild_wakes_nothing(
    proj, build, fake_steps
):
    """The watch of build/ itself can say it was removed after the build that the first word woke has
    made every output again (a loaded machine): that late word is no change."""
    build(proj)
    targets = targets_of(proj.path, proj.load())
    changes = Changes()
    changes.add(targets.out)  # build/, said late: every output is there
    changes.add(targets.project_file)
    assert next_change(changes, 0, threading.Event(), targets, None) == [targets.project_file]

    shutil.rmtree(proj.root / "build" / "pets" / "renders" / "park")
    changes.add(targets.out)  # said as it happens: an output under it is missing
    assert next_change(changes, 0, threading.Event(), targets, None) == [targets.out]


@pytest.mark.parametrize("polling", [False, True])
def test_one_steps_output_folder_removed_while_watching_is_built_again(proj, fake_steps, watcher, polling):
    w = watcher(polling)
    fake_steps.ran.clear()
    idle, lines = w.idle_count(), len(w.lines)
    shutil.rmtree(proj.root / "build" / "pets" / "renders" / "park")
    w.wait_idle(idle)
    assert w.messages[-2] == "changed: build/pets/renders/park"
    assert (proj.root / "build" / "pets" / "renders" / "park" / "0-0.png").is_file()
    assert any("render:park" in line and "restored from cache" in line for line in w.lines[lines:])
    assert fake_steps.ran == []
    idle = w.idle_count()
    shutil.rmtree(proj.root / "build" / "pets" / "renders")  # the folder above several steps' folders
    w.wait_idle(idle)
    assert w.messages[-2] == "changed: build/pets/renders"
    assert any("3 from cache" in line for line in w.lines), w.lines[lines:]
    time.sleep(1.0)  # the restores put the folders back: that woke nothing
    assert w.idle_count() == idle + 1, w.messages
    shutil.rmtree(proj.root / "build" / "pets" / "renders" / "base")  # in the renders/ the build made anew
    w.wait_idle(idle + 1)
    assert w.messages[-2] == "changed: build/pets/renders/base"
    assert w.close() == 0


def test_a_builds_own_commits_of_output_folders_do_not_wake_the_watch(proj, fake_steps, watcher):
    """A commit swaps a step's output folder with the new one: for an instant the old one is gone."""
    w = watcher()
    idle = w.idle_count()
    proj.edit("rank = 4", "rank = 8")  # train, blend and render steps run again, each committed anew
    w.wait_idle(idle)
    assert "train:dog" in fake_steps.ran and "render:park" in fake_steps.ran
    time.sleep(1.0)
    assert [m for m in w.messages if m.startswith("changed: ")] == ["changed: pets.toml"]
    assert w.idle_count() == idle + 1, w.messages
    assert w.close() == 0
