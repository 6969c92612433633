"""`dbl watch`: the loop runs in a thread on a small project with fake steps; each test ends in seconds."""

from __future__ import annotations

import gc
import os
import shutil
import threading
import time
import weakref

import pytest

from runner.ui.plain import PlainReporter
from runner.watch import targets_of, watch
from runner.watch_changes import Changes
from tests import watch_fixtures
from tests.conftest import PETS, FakeBackend, Proj, use_backend, write_image
from tests.watch_fixtures import LIMIT_S, Watcher, save, wait_for

watcher = watch_fixtures.watcher  # the fixture
pytestmark = pytest.mark.usefixtures("in_the_projects_folder")
in_the_projects_folder = watch_fixtures.in_the_projects_folder


def test_watch_rebuilds_what_goes_stale_and_survives_a_broken_project(proj, fake_steps, watcher):
    w = watcher()
    assert sorted(fake_steps.ran) == sorted(
        ["prior:dog", "train:dog", "train:toy", "blend:mix", "render:park", "render:mixed", "render:base"]
    )
    assert "watching pets.toml and 2 input folders (Ctrl-C to stop)" in w.messages

    # one prompt: only that render runs
    fake_steps.ran.clear()
    idle = w.idle_count()
    save(proj.path, proj.path.read_text().replace("sks dog in a park", "sks dog in a forest"))
    w.wait_idle(idle)
    assert fake_steps.ran == ["render:park"]
    assert "changed: pets.toml" in w.messages

    # a broken project file is reported, and the watch goes on
    idle = w.idle_count()
    good = proj.path.read_text()
    save(proj.path, good.replace("rank = 4", "rnak = 4"))
    w.wait_idle(idle)
    assert any("pets.toml: 1 problem" in m and "did you mean 'rank'" in m for m in w.messages), w.messages
    assert fake_steps.ran == ["render:park"]

    # fixed again: nothing is stale, and the build says so in one line
    idle, lines = w.idle_count(), len(w.lines)
    save(proj.path, good)
    w.wait_idle(idle)
    assert [line[9:] for line in w.lines[lines:]] == ["all 7 steps are up to date"]

    # a new instance image: that subject's train step and what depends on it
    fake_steps.ran.clear()
    idle = w.idle_count()
    write_image(proj.root / "data" / "toy" / "02.png", seed=42)
    w.wait_idle(idle)
    assert sorted(fake_steps.ran) == ["blend:mix", "render:mixed", "train:toy"]

    assert w.close() == 0
    # The builds' own writes (outputs, .dbl/, the lockfile) never woke the watch.
    changed = {m for m in w.messages if m.startswith("changed: ")}
    assert changed == {"changed: pets.toml", "changed: data/toy/02.png"}


def test_a_lockfile_that_does_not_read_is_watched_until_it_is_fixed(proj, build, fake_steps, watcher):
    """The build says: move it aside and build. Doing so is the change that rebuilds, as no edit of the
    project file or the images is coming."""
    build(proj)
    good = proj.lock.read_text()
    proj.lock.write_text("<<<<<<< HEAD\n" + good)
    w = watcher()
    assert any("cannot read the lockfile" in m for m in w.messages), w.messages
    idle, lines = w.idle_count(), len(w.lines)
    proj.lock.rename(proj.root / "pets.lock.conflict")
    w.wait_idle(idle)
    assert "changed: pets.lock" in w.messages
    assert any("up to date" in line or "from cache" in line for line in w.lines[lines:]), w.lines[lines:]
    # the lockfile reads again: the build's own writes of it no longer wake the watch
    idle = w.idle_count()
    save(proj.path, proj.path.read_text().replace("sks dog in a park", "sks dog in a forest"))
    w.wait_idle(idle)
    time.sleep(0.5)
    assert w.idle_count() == idle + 1, w.messages


def test_a_change_during_a_build_is_handled_after_it(proj, fake_steps):
    entered, release = threading.Event(), threading.Event()

    def slow_park(run):
        def slow(ctx):
            if ctx.step_id == "render:park" and not release.is_set():
                entered.set()
                release.wait(LIMIT_S)
            return run(ctx)

        return slow

    use_backend(lambda project: FakeBackend(fake_steps, slow_park))  # undone by fake_steps
    w = Watcher(proj.path)
    try:
        wait_for(entered.is_set, "render:park to start")
        save(proj.path, proj.path.read_text().replace("sks dog on a beach", "sks dog on a boat"))
        time.sleep(0.3)  # let the event arrive while the build still runs
        assert w.idle_count() == 0
        release.set()
        wait_for(lambda: fake_steps.ran.count("render:park") == 2, "the queued change to rebuild render:park")
        w.wait_idle(1)
        assert fake_steps.ran.count("train:dog") == 1
    finally:
        assert w.close() == 0


def test_an_images_folder_replaced_by_another_is_watched_anew(proj, fake_steps, watcher):
    """As a script that makes the photos anew does: the new folder is built, and its changes are seen
    (the old watch follows the old folder)."""
    toy = proj.root / "data" / "toy"
    shutil.copytree(toy, proj.root / "toy-new")
    write_image(proj.root / "toy-new" / "05.png", seed=5)
    w = watcher()
    fake_steps.ran.clear()
    idle = w.idle_count()
    toy.rename(proj.root / "toy-old")
    (proj.root / "toy-new").rename(toy)
    w.wait_idle(idle)
    assert sorted(fake_steps.ran) == ["blend:mix", "render:mixed", "train:toy"]

    fake_steps.ran.clear()
    idle = w.idle_count()
    write_image(toy / "06.png", seed=6)
    w.wait_idle(idle)
    assert sorted(fake_steps.ran) == ["blend:mix", "render:mixed", "train:toy"]
    assert w.close() == 0


def test_a_change_outside_the_projects_folder_is_named_as_the_plan_names_it(
    tmp_path, fake_steps, monkeypatch
):
    """As a build's lines name files: relative to the current folder (here the one above the project's)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p").mkdir()
    proj = Proj(tmp_path / "p", PETS.replace('images = "data/toy"', 'images = "../photos/toy"'))
    for i in range(2):
        write_image(tmp_path / "photos" / "toy" / f"{i:02d}.png", seed=i)
    w = Watcher(proj.path)
    try:
        w.wait_idle(0)
        write_image(tmp_path / "photos" / "toy" / "02.png", seed=2)
        w.wait_idle(1)
        assert "changed: photos/toy/02.png" in w.messages, w.messages
        assert any("image photos/toy/02.png added" in line for line in w.lines), w.lines
    finally:
        assert w.close() == 0


def test_polling_observer_sees_an_edit(proj, fake_steps, watcher):
    w = watcher(polling=True)
    fake_steps.ran.clear()
    idle = w.idle_count()
    save(proj.path, proj.path.read_text().replace('prompts = ["a dog"]', 'prompts = ["a cat"]'))
    w.wait_idle(idle)
    assert fake_steps.ran == ["render:base"]
    assert w.close() == 0


def test_poll_interval_is_an_option_that_polls(proj, monkeypatch, capsys):
    from runner import watch as watch_module
    from runner.cli import main

    given = []
    monkeypatch.setattr(watch_module, "watch", lambda path, **kw: given.append(kw) or 0)
    assert main(["watch", str(proj.path), "--poll-interval", "0.5"]) == 0
    assert main(["watch", str(proj.path), "--polling"]) == 0
    assert [(kw["polling"], kw["poll_interval"]) for kw in given] == [(True, 0.5), (True, 2.0)]
    for bad in ("0", "-1", "nan", "inf"):
        assert main(["watch", str(proj.path), "--poll-interval", bad]) == 2
    assert "--poll-interval must be a number of seconds above 0" in capsys.readouterr().err
    assert len(given) == 2


def test_keep_loaded_is_an_option_in_minutes(proj, monkeypatch, capsys):
    from runner import watch as watch_module
    from runner.cli import main

    given = []
    monkeypatch.setattr(watch_module, "watch", lambda path, **kw: given.append(kw) or 0)
    for words in (["--keep-loaded", "0.5"], [], ["--keep-loaded", "0"], ["--keep-loaded", "inf"]):
        assert main(["watch", str(proj.path), *words]) == 0
    assert [kw["keep_loaded_s"] for kw in given] == [30, 600, 0, float("inf")]
    for bad in ("-1", "nan"):
        assert main(["watch", str(proj.path), "--keep-loaded", bad]) == 2
    assert "--keep-loaded must be a number of minutes, 0 or more" in capsys.readouterr().err
    assert len(given) == 4


@pytest.mark.torch
def test_an_inline_watch_lets_go_of_the_base_model_it_loaded_once_nothing_changes_for_a_while(
    tmp_path, monkeypatch
):
    """Its memory is freed (nothing else holds the model), and the next build loads it again."""
    from runner.exec.backends import LazyModels

    class Held(dict):
        """The base-model cache of this process, with a weak reference to each model loaded."""

        loaded: list[weakref.ref] = []

        def __setitem__(self, key, cache):
            self.loaded.append(weakref.ref(cache))
            super().__setitem__(key, cache)

    monkeypatch.setattr(LazyModels, "_shared", Held())
    path = tmp_path / "r.toml"
    path.write_text(
        '[project]\nbase_model = "tiny-sd"\n\n[renders.base]\nadapter = "none"\nprompts = ["a dog"]\n'
        "steps = 2\nwidth = 32\nheight = 32\n"
    )
    said = "no change for 0.3 s: let go of the loaded base model (the next build loads it again)"
    w = Watcher(path, keep_loaded_s=0.3)
    try:
        wait_for(lambda: said in w.messages, f"the model let go; the watch said {w.messages}")
        gc.collect()
        assert len(Held.loaded) == 1 and Held.loaded[0]() is None, "the model let go is still held"
        save(path, path.read_text().replace("a dog", "a cat"))
        wait_for(lambda: w.messages.count(said) == 2, f"a second build and let-go; it said {w.messages}")
    finally:
        assert w.close() == 0
    assert len(Held.loaded) == 2, "the second build did not load the model again"
    assert (tmp_path / "build" / "r" / "renders" / "base").is_dir()


def test_a_missing_images_folder_is_watched_through_its_parent(proj, fake_steps, watcher):
    text = proj.path.read_text()
    save(proj.path, text.replace('images = "data/toy"', 'images = "data/new/toy2"'))
    w = watcher()
    assert any("data/new/toy2 does not exist" in m for m in w.messages), w.messages
    assert fake_steps.ran == []

    # data/new does not exist either: its creation is the first change seen, and leads to the next
    idle = w.idle_count()
    write_image(proj.root / "data" / "new" / "toy2" / "00.png")
    write_image(proj.root / "data" / "new" / "toy2" / "01.png", seed=1)
    wait_for(lambda: "render:mixed" in fake_steps.ran, "the build once the folder exists")
    w.wait_idle(idle)
    assert w.close() == 0


def test_targets_are_the_inputs_never_the_outputs(proj):
    project = proj.load()
    t = targets_of(proj.path, project)
    root = str(proj.root.resolve())
    assert t.folders == (f"{root}/data/dog", f"{root}/data/toy")
    assert t.relevant(f"{root}/pets.toml")
    assert t.relevant(f"{root}/data/dog/05.png")
    assert t.relevant(f"{root}/pets.lock")  # a change by other hands; the builds' own are told by content
    assert not t.relevant(f"{root}/.dbl/state")
    assert not t.relevant(f"{root}/build/pets/renders/park/0-0.png")
    assert not t.relevant(f"{root}/data/dogs/00.png")
    # what no step reads: an editor's swap file beside a caption, a hidden folder
    assert not t.relevant(f"{root}/data/dog/.05.txt.swp")
    assert not t.relevant(f"{root}/data/dog/.thumbs/05.png")
    assert t.relevant(f"{root}/data/dog/05.txt")
    # an editor's backup, autosave and test file, written as a caption is saved
    assert not any(t.relevant(f"{root}/data/dog/{name}") for name in ("05.txt~", "#05.txt#", "4913"))
    assert t.relevant(f"{root}/data/dog/2024", directory=True)  # a folder of photos: mv 2023 2024
    assert t.relevant(f"{root}/data")  # mv data photos: both input folders are gone
    # data/ too, where the input folders' own removal or replacement shows
    assert t.watches() == {
        (root, False),
        (f"{root}/data", False),
        (f"{root}/data/dog", True),
        (f"{root}/data/toy", True),
    }

    # an invalid project: the folders its TOML names are still watched
    save(proj.path, proj.path.read_text().replace('images = "data/toy"', 'images = "new/toy"'))
    t = targets_of(proj.path, None)
    assert t.folders == (f"{root}/data/dog", f"{root}/new/toy")
    assert (root, False) in t.watches()  # new/ does not exist: its nearest parent is watched
    assert t.relevant(f"{root}/new")  # and its creation is a change
    assert not t.relevant(f"{root}/news")


def test_a_file_named_dbl_ends_the_watch_with_exit_2_and_the_fix(proj, fake_steps):
    """Each build of the watch crashed on "[Errno 17] File exists" and it watched on, for a change that
    could not come: .dbl is not watched."""
    (proj.root / ".dbl").write_text("")
    messages, stop = [], threading.Event()
    timer = threading.Timer(5, stop.set)  # the watch would wait for ever: stopped, it returns 0
    timer.start()
    code = watch(proj.path, reporter_factory=PlainReporter, stop_event=stop, echo=messages.append)
    timer.cancel()
    assert code == 2
    assert (
        messages
        == [
            ".dbl is a file, where dbl keeps its run-cache and build state in a folder: move "
            "or delete it, and dbl makes the folder again"  # named from the current folder, as `dbl build` names it
        ]
    )
    assert not fake_steps.ran


def test_a_folder_or_a_misspelt_project_file_ends_the_watch_with_exit_2(proj, fake_steps):
    messages = []
    for named in (proj.path.parent, proj.path.with_name("pest.toml")):
        stop = threading.Event()
        timer = threading.Timer(1, stop.set)  # the watch would wait for ever: stopped, it returns 0
        timer.start()
        code = watch(named, reporter_factory=PlainReporter, stop_event=stop, echo=messages.append)
        timer.cancel()
        assert code == 2
    assert "a folder, not a project file - name one of: pets.toml" in messages[0]
    assert "no such project file" in messages[1]
    assert not fake_steps.ran


def test_the_builds_own_lockfile_in_an_image_folder_does_not_wake_the_watch(tmp_path, fake_steps, recwarn):
    """Photos beside the project file (images = "."): each build writes the lockfile into the image folder,
    and its outputs and .dbl/ below it."""
    proj = Proj(
        tmp_path,
        '[project]\nbase_model = "tiny-sd"\n\n[subjects.toy]\nimages = "."\ninstance_prompt = "a toy"\n',
    )
    write_image(tmp_path / "00.png")
    w = Watcher(proj.path)
    try:
        w.wait_idle(0)
        assert fake_steps.ran == ["train:toy"]
        time.sleep(0.5)
        assert w.idle_count() == 1, w.messages
        # watchdog's inotify observer warns when a folder moved within a recursive watch keeps its watch
        # descriptor, as the build's work folders would: no watch covers the build's own folders
        assert not [str(x.message) for x in recwarn if "Callback with id" in str(x.message)]
        # a subfolder of photos made later is watched once it wakes the watch
        (tmp_path / "2024").mkdir()
        w.wait_idle(1)
        write_image(tmp_path / "2024" / "01.png", seed=1)
        w.wait_idle(2)
        assert fake_steps.ran == ["train:toy"] * 2 and "changed: 2024/01.png" in w.messages
    finally:
        assert w.close() == 0


def test_photos_beside_the_project_file_are_watched_apart_from_the_builds_folders(tmp_path):
    """One recursive watch of the project's folder would follow .dbl/ and the outputs as the build makes,
    moves and removes folders there."""
    proj = Proj(
        tmp_path,
        '[project]\nbase_model = "tiny-sd"\n\n[subjects.toy]\nimages = "."\ninstance_prompt = "a toy"\n',
    )
    for folder in ("2023", "build/pets/adapters", "build/old", ".dbl/tmp", ".git"):
        (tmp_path / folder).mkdir(parents=True)
    root = str(tmp_path.resolve())
    assert targets_of(proj.path, proj.load()).watches() == {
        (root, False),
        (os.path.dirname(root), False),
        (f"{root}/2023", True),
        (f"{root}/build", False),
        (f"{root}/build/pets", False),  # where a step's output folder removed shows
        (f"{root}/build/pets/adapters", False),
        (f"{root}/build/old", True),
        (f"{root}/data", True),
    }


class _ComparedPath(str):
    """A path that counts how often it is compared with another."""

    compared = 0
    __hash__ = str.__hash__

    def __eq__(self, other):
        _ComparedPath.compared += 1
        return str.__eq__(self, other)


def test_thousands_of_changes_at_once_are_gathered_each_once_in_order_without_comparing_them_all():
    """Unpacking a folder of 30,000 class images sends as many events, on the observer's thread: a list's
    membership test compared each new path with every one before it (6 s of CPU before the watch woke).
    Counted, not timed: the count does not depend on the machine."""
    changes = Changes()
    paths = [_ComparedPath(f"/p/data/dog/{i:05d}.png") for i in range(30_000)]
    again = [_ComparedPath(p) for p in paths[:10]]  # the same paths, said twice (other objects)
    _ComparedPath.compared = 0
    for path in paths + again:
        changes.add(path)
    assert _ComparedPath.compared <= 100, _ComparedPath.compared  # a hash collision now and then
    assert changes.wait(0, threading.Event()) == paths


def test_the_watch_names_its_project_file_from_the_current_folder(tmp_path, monkeypatch):
    """From another folder it said `watching pets.toml`, a file not there, beside `changed: p/dog/01.png`."""
    from runner.watch import _watched_text
    from runner.watch_targets import Targets

    targets = Targets(str(tmp_path / "p" / "pets.toml"), (str(tmp_path / "p" / "dog"),), ())
    monkeypatch.chdir(tmp_path)
    assert _watched_text(targets) == "p/pets.toml and 1 input folder"
    (tmp_path / "p").mkdir()
    monkeypatch.chdir(tmp_path / "p")
    assert _watched_text(targets) == "pets.toml and 1 input folder"
