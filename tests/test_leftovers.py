"""What a process killed while writing a folder leaves (a run-cache entry, a checkpoint, a built-in model, outputs
committed to another file system) is removed at the next write of the same kind, or sooner where a build
passes by anyway (a train step's start, a built-in model's first load), when the process was of this host and
is gone; a live process's folder, and another host's, stay."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner import exchange as exchange_module
from runner import tempnames
from runner.errors import ModelError
from tests.conftest import PETS, Proj
from tests.fake_build import fake_build


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The pid of a process of this host that has ended."""
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def plant(folder: Path, name: str, dead_pid: int) -> dict[str, Path]:
    """A temp folder `.<name>.tmp-...` with a file in it, as a killed write leaves one: of a dead process of
    this host, of this live one, and of a process of another host (with the dead pid: it may live there)."""
    owners = {
        "dead": f"{tempnames.host()}-{dead_pid}",
        "live": f"{tempnames.host()}-{os.getpid()}",
        "other host": f"elsewhere-{dead_pid}",
    }
    planted = {}
    for who, owner in owners.items():
        path = folder / f".{name}.tmp-{os.urandom(3).hex()}-{owner}"
        path.mkdir(parents=True)
        (path / "half-written").write_bytes(b"\0" * 1000)
        planted[who] = path
    assert tempnames.left_by_dead_process(planted["dead"].name)
    assert not tempnames.left_by_dead_process(planted["live"].name)
    assert not tempnames.left_by_dead_process(planted["other host"].name)
    return planted


def left(planted: dict[str, Path]) -> set[str]:
    return {who for who, path in planted.items() if path.exists()}


def test_a_store_into_the_run_cache_removes_the_temp_folders_of_killed_stores(proj, build, dead_pid):
    cache = proj.root / ".dbl" / "cache"
    planted = plant(cache, "0" * 64, dead_pid)
    trash = cache / f".{'1' * 64}.trash-abcdef-{tempnames.host()}-{dead_pid}"
    trash.mkdir()
    result, _ = build(proj)
    assert result.ok
    assert left(planted) == {"live", "other host"} and not trash.exists()
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 7  # the entries themselves


def test_a_build_after_one_killed_while_storing_leaves_no_temp_folder_in_the_cache(tmp_path):
    p = Proj(tmp_path, PETS)
    killed = fake_build(p.path, crash="runner.store:fsync_tree:2")
    assert killed.returncode in (-9, 137), killed.stderr
    cache = tmp_path / ".dbl" / "cache"
    assert [q for q in cache.iterdir() if ".tmp-" in q.name]  # the kill really left one
    assert fake_build(p.path).returncode == 0
    assert [q.name for q in cache.iterdir() if q.name.startswith(".")] == []  # no `dbl gc` needed


def test_making_a_built_in_model_removes_those_killed_processes_were_making(tmp_path, monkeypatch, dead_pid):
    from runner import families
    from runner.models import ensure_builtin

    monkeypatch.setenv("DBL_HOME", str(tmp_path))
    family = families.for_builtin("tiny-sd")
    made = []

    def build_builtin(name, folder):
        made.append(name)
        folder.mkdir()
        (folder / "model_index.json").write_text("{}")

    monkeypatch.setattr(family, "build_builtin", build_builtin)
    planted = plant(tmp_path / "models", family.builtin_folder_name("tiny-sd"), dead_pid)
    folder = ensure_builtin("tiny-sd")
    assert made == ["tiny-sd"] and (folder / "model_index.json").is_file()
    assert left(planted) == {"live", "other host"}
    assert sorted(p.name for p in folder.parent.iterdir() if not p.name.startswith(".")) == [folder.name]


def test_a_built_in_model_that_fails_to_make_leaves_no_temp_folder(tmp_path, monkeypatch):
    from runner import families
    from runner.models import ensure_builtin

    monkeypatch.setenv("DBL_HOME", str(tmp_path))
    family = families.for_builtin("tiny-sd")
    failed = []

    def build_builtin(name, folder):
        folder.mkdir()
        (folder / "unet").mkdir()
        failed.append(folder)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(family, "build_builtin", build_builtin)
    with pytest.raises(ModelError) as raised:
        ensure_builtin("tiny-sd")
    assert str(raised.value) == (
        f"cannot write the built-in model tiny-sd to {tmp_path / 'models' / 'tiny-sd-v1'} (No space left on "
        f"device); set DBL_HOME to a folder you can write (DBL_HOME is {tmp_path})"
    )
    assert failed and list((tmp_path / "models").iterdir()) == []


@pytest.mark.torch
def test_making_a_built_in_model_prints_nothing(tmp_path):
    """A fresh DBL_HOME's first build printed transformers' torchvision notices and a `Writing model shards`
    progress bar above its steps, from making the built-in model (in a process of its own: the notices
    are said once a process)."""
    code = "from runner.models import ensure_builtin\nprint(ensure_builtin('tiny-sd').name)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, DBL_HOME=str(tmp_path), PYTHONPATH=str(Path(__file__).resolve().parents[1])),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "models" / "tiny-sd-v1" / "model_index.json").is_file()  # it really made one
    assert (done.stdout, done.stderr) == ("tiny-sd-v1\n", "")


def test_a_dbl_home_that_cannot_be_made_is_named_with_its_fix(tmp_path, monkeypatch):
    from runner.models import ensure_builtin

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("DBL_HOME", str(tmp_path / "file" / "home"))
    with pytest.raises(
        ModelError, match=r"cannot write the built-in model tiny-sd to .*file/home/models/tiny-sd-v1"
    ):
        ensure_builtin("tiny-sd")
    monkeypatch.delenv("DBL_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "file"))
    with pytest.raises(ModelError, match=r"\(DBL_HOME is not set, so it is ~/.cache/dbl\)$"):
        ensure_builtin("tiny-sd")


@pytest.mark.torch
def test_a_checkpoint_save_removes_the_checkpoints_killed_runs_were_writing(tmp_path, dead_pid):
    from runner.steps import train
    from tests.steps_fixtures import draw_images, make_subject, train_context

    images = draw_images(tmp_path / "images" / "dog", 2, size=(64, 64))
    subject = make_subject(images, train=dict(steps=2, checkpoint_every=1, train_text_encoder=False))
    ctx = train_context(tmp_path / "run", subject)
    planted = plant(ctx.work, "checkpoint-1", dead_pid)
    train.run(ctx)
    assert left(planted) == {"live", "other host"}


@pytest.mark.torch
def test_a_train_step_that_saves_no_checkpoint_removes_those_killed_runs_were_writing(tmp_path, dead_pid):
    """Swept as the step starts (looking for a checkpoint to resume), not only at its next checkpoint."""
    from runner.steps import train
    from tests.steps_fixtures import draw_images, make_subject, train_context

    images = draw_images(tmp_path / "images" / "dog", 2, size=(64, 64))
    subject = make_subject(images, train=dict(steps=2, checkpoint_every=0, train_text_encoder=False))
    ctx = train_context(tmp_path / "run", subject)
    planted = plant(ctx.work, "checkpoint-1", dead_pid)
    train.run(ctx)
    assert not [p for p in ctx.work.iterdir() if p.name.startswith("checkpoint-")]  # it saved none
    assert left(planted) == {"live", "other host"}


def test_loading_a_built_in_model_removes_those_killed_processes_were_making(tmp_path, monkeypatch, dead_pid):
    """Not only making one: a model made once is loaded by every later build."""
    from runner import families
    from runner.models import builtin, ensure_builtin

    monkeypatch.setenv("DBL_HOME", str(tmp_path))
    monkeypatch.setattr(builtin, "_swept", set(), raising=False)  # as in a new process
    family = families.for_builtin("tiny-sd")
    folder = tmp_path / "models" / family.builtin_folder_name("tiny-sd")
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")  # made before
    monkeypatch.setattr(family, "build_builtin", lambda name, folder: pytest.fail("made again"))
    planted = plant(folder.parent, family.builtin_folder_name("tiny-sd"), dead_pid)
    assert ensure_builtin("tiny-sd") == folder
    assert left(planted) == {"live", "other host"}
    again = plant(folder.parent, "tiny-sd-v2", dead_pid)  # once a process: later loads scan nothing
    assert ensure_builtin("tiny-sd") == folder
    assert left(again) == {"dead", "live", "other host"}


@pytest.fixture
def on_scratch(tmp_path, monkeypatch):
    """A project whose `out` is on "another file system" than `.dbl/`: a rename between the two fails with
    EXDEV, as there. Returns the project and the renames that crossed."""
    disk = tmp_path / "scratch"
    p = Proj(tmp_path, PETS.replace('base_model = "tiny-sd"', 'base_model = "tiny-sd"\nout = "scratch/pets"'))
    real, crossed = os.rename, []

    def rename(src, dst, *a, **kw):
        if Path(src).is_relative_to(disk) != Path(dst).is_relative_to(disk):
            crossed.append((src, dst))
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
        return real(src, dst, *a, **kw)

    def exchange(a, b):
        if Path(a).is_relative_to(disk) != Path(b).is_relative_to(disk):
            crossed.append((a, b))
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(a), None, str(b))
        return real_exchange(a, b)

    monkeypatch.setattr(os, "rename", rename)
    real_exchange = exchange_module.exchange
    monkeypatch.setattr(exchange_module, "exchange", exchange)
    return p, crossed


def killed_committing_park(p: Proj, build, monkeypatch, dead_pid) -> list[Path]:
    """Build the project with render:park's new outputs stopped as a kill would stop them: moved beside the old
    ones, not yet swapped in, by a process that has ended. Returns what it left there."""
    from runner import exchange

    real_swap = exchange._swap

    def killed(staged, target, trash):
        if target.name == "park" and staged.parent == target.parent:
            raise SystemExit("killed")  # nothing after this runs, as after a SIGKILL
        return real_swap(staged, target, trash)

    with monkeypatch.context() as m:
        m.setattr(exchange, "_swap", killed)
        m.setattr(tempnames, "suffix", lambda: f"abcdef-{tempnames.host()}-{dead_pid}")
        p.edit("sks dog on a beach", "sks dog on the moon")
        with contextlib.suppress(SystemExit):  # however the build takes it, it ends there
            assert not build(p)[0].ok
    renders = p.root / "scratch" / "pets" / "renders"
    left_there = [q for q in renders.iterdir() if q.name.startswith(".")]
    assert left_there and all(q.name.startswith(".park.") for q in left_there)  # the kill really left them
    assert (renders / "park" / "1-0.png").is_file()  # the old outputs are in place
    p.edit("sks dog on the moon", "sks dog on a beach")  # park is as its lockfile records it again
    return left_there


def test_outputs_on_another_file_system_a_killed_commit_leaves_goes_at_the_next_commit_beside(
    on_scratch, build, monkeypatch, dead_pid
):
    p, crossed = on_scratch
    assert build(p)[0].ok and crossed  # the outputs really went to "another file system"
    killed_committing_park(p, build, monkeypatch, dead_pid)
    p.edit('prompts = ["a sks dog toy"]', 'prompts = ["a sks dog toy", "a toy"]')  # another render, not park
    result, rec = build(p)
    assert result.ok and [sid for sid, status in rec.final if status == "done"] == ["render:mixed"]
    renders = p.root / "scratch" / "pets" / "renders"
    assert sorted(q.name for q in renders.iterdir()) == ["base", "mixed", "park"]


def test_outputs_on_another_file_system_gc_drops_what_a_killed_commit_left(
    on_scratch, build, monkeypatch, dead_pid, capsys
):
    from runner.cli import main

    p, _ = on_scratch
    assert build(p)[0].ok
    left_there = killed_committing_park(p, build, monkeypatch, dead_pid)
    assert main(["gc", "--dry-run", str(p.path)]) == 0
    assert f"would drop {len(left_there)} folder(s) left by builds" in capsys.readouterr().out
    assert all(q.exists() for q in left_there)
    assert main(["gc", str(p.path)]) == 0
    renders = p.root / "scratch" / "pets" / "renders"
    assert sorted(q.name for q in renders.iterdir()) == ["base", "mixed", "park"]


def test_outputs_on_another_file_system_an_earlier_versions_names_go_at_the_next_commit(
    tmp_path, monkeypatch
):
    """An earlier version named what it left beside the outputs `.<name>.staged` and `.<name>.trash`, with no
    pid: the next commit of that step still removes them, as that version did."""
    real = os.rename

    def rename(src, dst, *a, **kw):
        if Path(src).parent != Path(dst).parent and "out" in (Path(src).parent.name, Path(dst).parent.name):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(exchange_module, "exchange", lambda a, b: False)
    staged, target = tmp_path / ".staged-x", tmp_path / "out" / "x"
    for folder in (staged, target, target.parent / ".x.staged", target.parent / ".x.trash"):
        folder.mkdir(parents=True)
        (folder / "f.txt").write_text(folder.name)
    old = exchange_module.replace_dir(staged, target, tmp_path / ".trash-x")
    assert old.parent == target.parent and old.name.startswith(".x.trash-")  # put aside beside it
    assert (target / "f.txt").read_text() == ".staged-x" and (old / "f.txt").read_text() == "x"
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([old.name, "x"])


def test_gc_drops_the_stop_and_begun_files_a_killed_build_left(proj, build, capsys):
    """A build killed (SIGKILL) while steps ran leaves their `.stop-*` (a Ctrl-C's request) and `.begun-*`
    (a Ray worker's note) files beside the work folders; each step's next run removes its own, and gc
    those of steps that never run again. Other files there stay."""
    from runner.cli import main
    from runner.store import work_root

    assert build(proj)[0].ok
    root = work_root(proj.load())
    root.mkdir(parents=True, exist_ok=True)
    left_there = [root / ".stop-train-dog", root / ".begun-render-park"]
    for path in left_there:
        path.write_text("")
    (root / ".stopwatch").write_text("not dbl's")
    assert main(["gc", "--dry-run", str(proj.path)]) == 0
    assert (
        "would drop 2 stop or begun file(s) of steps, left by builds that were killed"
        in capsys.readouterr().out
    )
    assert all(p.exists() for p in left_there)
    assert main(["gc", str(proj.path)]) == 0
    assert "dropped 2 stop or begun file(s)" in capsys.readouterr().out
    assert not any(p.exists() for p in left_there) and (root / ".stopwatch").exists()
