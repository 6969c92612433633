"""Reliability: a build killed at any point (SIGKILL at each crash point, or while it replaces outputs)
leaves the previous outputs and a valid lockfile, and the next build recovers exactly; two projects
sharing a cache build at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runner import lockfile
from runner.cli import main
from tests.conftest import PETS, ROOT, Proj, output_bytes
from tests.fake_build import fake_build


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The outputs of an uninterrupted build, to compare recovered builds with."""
    root = tmp_path_factory.mktemp("reference")
    p = Proj(root, PETS)
    assert fake_build(p.path).returncode == 0
    return output_bytes(root)


# (function that is killed on its N-th call, N): hashing, step outputs (copied out and hashed), the run-cache,
# committing outputs (between the two renames too), and writing the lockfile.
CRASH_POINTS = [
    ("runner.fingerprint:sha256_file", 1),
    ("runner.fingerprint:sha256_file", 5),
    ("runner.store:stage", 2),
    ("runner.store:copy_hashed", 9),
    ("runner.store:fsync_tree", 1),
    ("runner.store:fsync_tree", 4),
    ("runner.exchange:replace_dir", 1),
    ("runner.exchange:replace_dir", 3),
    ("os:rename", 2),
    ("os:rename", 5),
    ("os:fsync", 3),
    ("runner.lockfile:_fsync_dir", 1),
    ("runner.lockfile:_fsync_dir", 6),
    ("runner.lockfile:dumps", 4),
    ("os:replace", 1),  # the file-hash cache's write after planning, killed before its rename
]


SWEEP_TARGETS = ("os:rename", "os:replace", "os:fsync", "runner.exchange:replace_dir")


def calls_in_a_build(tmp_path, target: str) -> int:
    """How many times a full build calls `target` (every one of them is a crash point of the sweep)."""
    (tmp_path / "count").mkdir()
    p = Proj(tmp_path / "count", PETS)
    done = fake_build(p.path, crash=f"{target}:0")
    assert done.returncode == 0, done.stderr
    return int(done.stdout.rsplit("CALLS ", 1)[1])


def crash_then_recover(tmp_path, reference, target: str, n: int) -> None:
    tmp_path.mkdir(exist_ok=True)
    p = Proj(tmp_path, PETS)
    log = tmp_path / "ran.log"
    crashed = fake_build(p.path, crash=f"{target}:{n}", log=log)
    assert crashed.returncode in (-9, 137), f"{target}:{n} never killed the build\n{crashed.stderr}"
    recorded = lockfile.read(p.lock)  # the lockfile is valid after the kill
    before = set(log.read_text().split()) if log.exists() else set()
    log.write_text("")
    recovered = fake_build(p.path, log=log)
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    ran_again = log.read_text().split()
    assert not set(ran_again) & set(recorded), "completed work was redone"
    assert len(ran_again) == len(set(ran_again))
    assert output_bytes(tmp_path) == reference
    assert set(lockfile.read(p.lock)) == set(ALL_STEPS)
    # A step is run twice at most: once in the killed build, once to finish it.
    assert all(sid not in before or sid not in recorded for sid in ran_again)
    # What the kill left half-written is gone: the build removes its temp files, and the temp folders of
    # the run-cache when it stores an entry (a step the kill cut short while storing it runs again).
    assert temp_names(tmp_path) == []
    assert main(["gc", str(p.path)]) == 0
    assert temp_names(tmp_path) == []


def temp_names(root: Path) -> list[str]:
    """The temp files and folders under `root` that an atomic write or a commit of outputs makes."""
    found = []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            if any(mark in name for mark in (".tmp-", ".trash-", ".staged")):
                found.append(Path(folder, name).relative_to(root).as_posix())
    return sorted(found)


ALL_STEPS = ["prior:dog", "train:dog", "train:toy", "blend:mix", "render:park", "render:mixed", "render:base"]


@pytest.mark.parametrize("target, n", CRASH_POINTS, ids=[f"{t}:{n}" for t, n in CRASH_POINTS])
def test_sigkill_at_crash_points_recovers_exactly(tmp_path, reference, target, n):
    crash_then_recover(tmp_path, reference, target, n)


@pytest.mark.slow
@pytest.mark.parametrize("target", SWEEP_TARGETS)
def test_sigkill_sweep(tmp_path, reference, target):
    """A kill at every call of `target` in a build, each one a real kill, each recovering exactly."""
    count = calls_in_a_build(tmp_path, target)
    assert count >= 5, f"{target} is called {count} times only"
    for n in range(1, count + 1):
        crash_then_recover(tmp_path / str(n), reference, target, n)


def recorded_outputs_problems(root: Path) -> list[str]:
    """The outputs the lockfile records that are not on disk as recorded."""
    from runner.fingerprint import sha256_file

    problems = []
    for sid, record in lockfile.read(root / "pets.lock").items():
        for rel, item in record["outputs"].items():
            if not (root / rel).is_file() or sha256_file(root / rel) != item["sha256"]:
                problems.append(f"{sid}: {rel}")
    return problems


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A built project, to rebuild with a change in copies of it."""
    root = tmp_path_factory.mktemp("built")
    assert fake_build(Proj(root, PETS).path).returncode == 0
    return root


def kill_a_rebuild(tmp_path, built, target: str, n: int) -> subprocess.CompletedProcess:
    """Rebuild a copy of `built` with render:base changed, killed on the n-th call of `target`."""
    root = tmp_path / "p"
    shutil.copytree(built, root)
    project = root / "pets.toml"
    project.write_text(project.read_text().replace('"a dog"', '"a cat"'))  # render:base reruns
    return fake_build(project, crash=f"{target}:{n}")


# Where a rebuild of one render replaces its outputs: os.rename stores them in the run-cache (twice), then
# swaps them in (twice more where the system cannot exchange two folders in one step); the old outputs
# are removed (shutil.rmtree) and the new ones hashed for the next plan (the rebuild's last reads).
REPLACE_POINTS = [("os:rename", n) for n in (1, 2, 3, 4)] + [
    ("shutil:rmtree", 5),
    ("runner.fingerprint:sha256_file", 19),
]


@pytest.mark.parametrize("target, n", REPLACE_POINTS, ids=[f"{t}:{n}" for t, n in REPLACE_POINTS])
def test_a_build_killed_while_replacing_outputs_leaves_those_the_lockfile_records(tmp_path, built, target, n):
    """Killed while it replaces a render's outputs, the build leaves the outputs the lockfile records in
    place: never the old folder moved aside and the new one not yet in, nor the new one in place while
    the lockfile still names the old (`dbl check` would call it edited)."""
    done = kill_a_rebuild(tmp_path, built, target, n)
    if n == 1:
        assert done.returncode in (-9, 137), f"{target} was never called\n{done.stderr}"
    if done.returncode == 0:
        return  # the rebuild calls it fewer times now
    assert done.returncode in (-9, 137), done.stderr
    assert recorded_outputs_problems(tmp_path / "p") == [], f"killed at {target} call {n}"


@pytest.mark.slow
@pytest.mark.parametrize("target", ["os:rename", "shutil:rmtree", "runner.fingerprint:sha256_file"])
def test_a_build_killed_anywhere_while_replacing_outputs_leaves_those_the_lockfile_records(
    tmp_path, built, target
):
    counted = kill_a_rebuild(tmp_path / "count", built, target, 0)
    calls = int(counted.stdout.rsplit("CALLS ", 1)[1])
    for n in range(1, calls + 1):
        done = kill_a_rebuild(tmp_path / str(n), built, target, n)
        assert done.returncode in (-9, 137), done.stderr
        assert recorded_outputs_problems(tmp_path / str(n) / "p") == [], f"killed at {target} call {n}"


def test_the_next_build_removes_the_old_outputs_a_build_killed_after_recording_the_new_ones_left(
    tmp_path, built
):
    """Killed after the lockfile names a render's new outputs, before it removed the old ones it had put
    aside in .dbl/tmp/: the step is up to date, and the next build removes them (a whole render or adapter
    each) rather than leave them to `dbl gc`."""
    done = kill_a_rebuild(tmp_path, built, "shutil:rmtree", 5)
    assert done.returncode in (-9, 137), done.stderr
    root = tmp_path / "p"
    left = [q for q in temp_names(root) if q.startswith(".dbl/tmp/pets/.")]
    # the old outputs: where the two folders were exchanged (Linux), or put aside by a rename
    assert left in ([".dbl/tmp/pets/.staged-render-base"], [".dbl/tmp/pets/.trash-render-base"]), left
    again = fake_build(root / "pets.toml")
    assert again.returncode == 0 and "all 7 steps are up to date" in again.stdout, again.stdout
    assert temp_names(root) == []
    assert recorded_outputs_problems(root) == []


def test_the_next_build_removes_the_temp_lockfile_a_killed_build_left_beside_the_project(tmp_path):
    """Killed after writing the lockfile's temp file, before renaming it: the temp file, beside the
    project file where `git add -A` would commit it, is gone after the next build."""
    p = Proj(tmp_path, PETS)
    # os.replace: the file-hash cache after planning, then the lockfile after the first step
    killed = fake_build(p.path, crash="os:replace:2")
    assert killed.returncode in (-9, 137), killed.stderr
    left = list(tmp_path.glob(".pets.lock.tmp-*"))
    assert left, sorted(q.name for q in tmp_path.iterdir())  # it was killed with the temp file written
    assert fake_build(p.path).returncode == 0
    assert not left[0].exists()
    assert sorted(q.name for q in tmp_path.iterdir() if q.name.startswith(".")) == [".dbl"]


@pytest.mark.parametrize("can_exchange", [True, False], ids=["exchange", "two-renames"])
def test_replacing_outputs_leaves_the_new_ones_and_nothing_else(tmp_path, monkeypatch, can_exchange):
    from runner import exchange

    swapped, really_exchange = [], exchange.exchange

    def exchanging(a, b):
        swapped.append(can_exchange)
        return can_exchange and really_exchange(a, b)

    monkeypatch.setattr(exchange, "exchange", exchanging)
    staged, target, trash = tmp_path / ".staged-x", tmp_path / "out" / "x", tmp_path / ".trash-x"
    for folder, text in ((staged, "new"), (target, "old")):
        folder.mkdir(parents=True)
        (folder / f"{text}.txt").write_text(text)
    old = exchange.replace_dir(staged, target, trash)
    assert swapped == [can_exchange]
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in old.iterdir()] == ["old.txt"]  # removed by the caller, once recorded
    shutil.rmtree(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp left


def test_two_projects_sharing_a_cache_build_at_once(tmp_path, reference):
    p = Proj(tmp_path, PETS)
    twin = tmp_path / "twin.toml"
    twin.write_text(
        p.path.read_text()
        .replace("[project]", '[project]\nout = "build/pets"\nname = "twin"', 1)
        .replace("build/pets", "build/twin")
    )
    cmd = lambda path: subprocess.Popen(  # noqa: E731
        [sys.executable, "-m", "tests.fake_build", "--", "build", str(path), "--no-progress"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first, second = cmd(p.path), cmd(twin)
    for proc in (first, second):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (out + err).decode()
    from runner.store import RunCache

    cache = RunCache(tmp_path / ".dbl" / "cache")
    assert cache.entries() and all(cache.verify(fp) for fp in cache.entries())
    pets = {k: v for k, v in output_bytes(tmp_path).items() if k.startswith("pets/")}
    assert pets == reference
    assert {k.split("/", 1)[1] for k in output_bytes(tmp_path) if k.startswith("twin/")} == {
        k.split("/", 1)[1] for k in reference
    }
