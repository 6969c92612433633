"""Bad input, crashes at every point of a build, concurrent builds, a full disk, untrusted files."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner import executor, lockfile
from runner.cli import main
from runner.events import FAILED
from runner.imagefiles import has_images, list_images
from runner.project import ProjectError, load_project
from tests.conftest import PETS, ROOT, Proj, write_image

# --- project files that are mutated at random ------------------------------------------------------

VALUES = st.one_of(
    st.integers(-3, 10**6).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(
        [
            '"tiny-sd"',
            '"cat"',
            "true",
            "[]",
            '["x"]',
            "[0, -1]",
            "{ dog = 1.0 }",
            '""',
            '"../../etc"',
            "{}",
            "nan",
        ]
    ),
    st.text(max_size=12).map(lambda s: '"' + s.replace("\\", "").replace('"', "") + '"'),
)
KEYS = st.sampled_from(
    [
        "rank",
        "alpha",
        "steps",
        "resolution",
        "prompts",
        "adapter",
        "adapters",
        "method",
        "density",
        "prior",
        "images",
        "seeds",
        "width",
        "base_model",
        "class_prompt",
        "num_images",
        "rnak",
        "instance_prompt",
        "svd_rank",
        "out",
    ]
)
TABLES = st.sampled_from(
    [
        "[project]",
        "[train]",
        "[lora]",
        "[priors.dog]",
        "[subjects.dog]",
        "[subjects.toy.lora]",
        "[blends.mix]",
        "[renders.park]",
        "[renders.new]",
        "[subjects.x y]",
        "[blends.mix.adapters]",
        "[[renders]]",
    ]
)


@st.composite
def mutated(draw):
    lines = textwrap.dedent(PETS).splitlines()
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(lines)))
        action = draw(st.sampled_from(["delete", "set", "table", "garbage"]))
        if action == "delete" and lines:
            del lines[min(at, len(lines) - 1)]
        elif action == "set":
            lines.insert(at, f"{draw(KEYS)} = {draw(VALUES)}")
        elif action == "table":
            lines.insert(at, draw(TABLES))
        else:
            lines.insert(at, draw(st.text(max_size=20)))
    return "\n".join(lines)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=mutated())
def test_mutated_project_files_give_clean_errors_or_plans(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("fuzz")
    for sub in ("dog", "toy"):
        write_image(folder / "data" / sub / "00.png")
    path = folder / "pets.toml"
    path.write_text(text)
    try:
        project = load_project(path)
    except ProjectError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.key or problem.line, str(problem)
        return
    _, planned = executor.Workspace(project).plan()
    assert planned or not (project.priors or project.subjects or project.renders)


# --- crashes --------------------------------------------------------------------------------------


def fake_build(project: Path, *extra, crash: str | None = None, log: Path | None = None):
    cmd = (
        [sys.executable, "-m", "tests.fake_build"]
        + (["--crash", crash] if crash else [])
        + ["--", "build", str(project), "--no-progress", *extra]
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), FAKE_STEPS_LOG=str(log or os.devnull))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def outputs(root: Path) -> dict[str, bytes]:
    out = root / "build"
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The outputs of an uninterrupted build, to compare recovered builds with."""
    root = tmp_path_factory.mktemp("reference")
    p = Proj(root, PETS)
    assert fake_build(p.path).returncode == 0
    return outputs(root)


# (function that is killed on its N-th call, N): hashing, step outputs, the run-cache, committing
# outputs (between the two renames too), and writing the lockfile.
CRASH_POINTS = [
    ("runner.fingerprint:sha256_file", 1),
    ("runner.fingerprint:sha256_file", 9),
    ("runner.store:file_manifest", 2),
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
    assert outputs(tmp_path) == reference
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


# --- concurrency ----------------------------------------------------------------------------------


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
    pets = {k: v for k, v in outputs(tmp_path).items() if k.startswith("pets/")}
    assert pets == reference
    assert {k.split("/", 1)[1] for k in outputs(tmp_path) if k.startswith("twin/")} == {
        k.split("/", 1)[1] for k in reference
    }


# --- a full disk ----------------------------------------------------------------------------------


def test_disk_full_while_committing_keeps_earlier_outputs(proj, build, monkeypatch):
    build(proj)
    before_lock = proj.lock.read_text()
    before = outputs(proj.root)
    proj.edit("sks dog on a beach", "sks dog on the moon")
    real = shutil.copyfile
    calls = {"n": 0}

    def full(src, dst, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(shutil, "copyfile", full)
    result, rec = build(proj)
    assert result.exit_code == 1
    failures = [e for e in rec.events if e[0] == "end" and e[2] == FAILED]
    assert failures and "No space left on device" in failures[0][3]
    assert outputs(proj.root) == before and proj.lock.read_text() == before_lock
    monkeypatch.setattr(shutil, "copyfile", real)
    result, _ = build(proj)
    assert result.ok


def test_disk_full_while_copying_outputs_out_is_one_os_error_and_leaves_no_half_copy(
    proj, build, monkeypatch
):
    build(proj)
    before_lock, before = proj.lock.read_text(), outputs(proj.root)
    proj.edit("sks dog on a beach", "sks dog on the moon")
    real, failed = shutil.copyfile, []

    def full(src, dst, *a, **kw):
        if failed or Path(dst).name == "0-1.png":  # full from the second image on, as a disk fills up
            failed.append(dst)
            raise OSError(errno.ENOSPC, "No space left on device", str(src), None, str(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(shutil, "copyfile", full)
    result, rec = build(proj)
    assert failed and result.exit_code == 1  # the copy really failed
    (failure,) = [e[3] for e in rec.events if e[0] == "end" and e[2] == FAILED]
    assert failure.startswith("[Errno 28] No space left on device") and failure.count("No space") == 1
    assert outputs(proj.root) == before and proj.lock.read_text() == before_lock
    assert not list((proj.root / ".dbl" / "tmp" / "pets").glob(".staged-*"))


def test_outputs_on_another_file_system_are_replaced_by_the_next_build(tmp_path, build, monkeypatch):
    """`out` on another disk than `.dbl/` (a scratch disk, a symlinked build folder): a rename between the
    two fails with EXDEV, here as there."""
    disk = tmp_path / "scratch"
    p = Proj(tmp_path, PETS.replace('base_model = "tiny-sd"', 'base_model = "tiny-sd"\nout = "scratch/pets"'))
    real, crossed = os.rename, []

    def rename(src, dst, *a, **kw):
        if Path(src).is_relative_to(disk) != Path(dst).is_relative_to(disk):
            crossed.append((src, dst))
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "rename", rename)
    result, _ = build(p)
    assert result.ok and crossed  # the outputs really went to "another file system"
    p.edit("sks dog on a beach", "sks dog on the moon")
    result, rec = build(p)
    assert result.ok, rec.events
    assert [e[2] for e in rec.events if e[0] == "end" and e[1] == "render:park"] == ["done"]
    park = disk / "pets" / "renders" / "park"
    assert "sks dog on the moon" in (park / "1-0.png").read_text()
    assert sorted(q.name for q in park.parent.iterdir()) == ["base", "mixed", "park"]  # no temp left
    assert main(["check", str(p.path)]) == 0


def test_disk_full_while_storing_in_the_run_cache_frees_the_half_written_entry(proj, build, monkeypatch):
    from runner import store

    build(proj)
    before_lock, before = proj.lock.read_text(), outputs(proj.root)
    proj.edit("sks dog on a beach", "sks dog on the moon")
    failed = []

    def full(folder):
        failed.append(folder)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "fsync_tree", full)
    result, rec = build(proj)
    assert failed and result.exit_code == 1  # storing the entry really failed
    failures = [e for e in rec.events if e[0] == "end" and e[2] == FAILED]
    assert failures and "No space left on device" in failures[0][3]
    assert outputs(proj.root) == before and proj.lock.read_text() == before_lock
    assert [p.name for p in (proj.root / ".dbl" / "cache").iterdir() if p.name.startswith(".")] == []


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/self/fd")
def test_a_run_cache_entry_is_flushed_file_by_file_several_at_once(tmp_path, monkeypatch):
    """Each fsync waits for a journal commit: one file after the other, storing a render of hundreds of
    images took seconds. Every file is flushed, each while another flush waits too; an error is raised."""
    import threading

    from runner import store

    files = [tmp_path / f"{i:04d}.png" for i in range(5)] + [tmp_path / "grid" / "grid.png"]
    for path in files:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"image")
    real, met = os.fsync, threading.Barrier(2, timeout=1)
    flushed, together = [], []

    def fsync(fd):
        flushed.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        try:
            met.wait()  # passes only when a second flush is under way
            together.append(True)
        except threading.BrokenBarrierError:
            together.append(False)
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store.fsync_tree(tmp_path)
    assert sorted(flushed) == sorted(files)
    assert together == [True] * len(files)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        store.fsync_tree(tmp_path)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/self/fd")
def test_disk_full_while_writing_the_lockfile_leaves_no_temp_file_beside_it(proj, build, monkeypatch):
    build(proj)
    before_lock = proj.lock.read_text()
    proj.edit("sks dog on a beach", "sks dog on the moon")
    real, failed = os.fsync, []

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".pets.lock.tmp-"):
            failed.append(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    result, rec = build(proj)
    assert failed and result.exit_code == 1  # the lockfile's write really failed
    failures = [e for e in rec.events if e[0] == "end" and e[2] == FAILED]
    assert failures and "No space left on device" in failures[0][3]
    assert proj.lock.read_text() == before_lock
    assert sorted(p.name for p in proj.root.iterdir() if p.name.startswith(".pets.lock")) == []
    monkeypatch.setattr(os, "fsync", real)
    result, _ = build(proj)
    assert (
        result.ok and lockfile.read(proj.lock)["render:park"]["inputs"]["prompts"][1] == "sks dog on the moon"
    )


# --- untrusted and odd files ----------------------------------------------------------------------


def test_pickle_base_model_is_refused_unless_allowed(tmp_path, capsys):
    from runner.models import BaseModel, ModelError, load_pipeline

    (tmp_path / "model.ckpt").write_bytes(b"not really a pickle")
    base = BaseModel.parse("model.ckpt", tmp_path)
    with pytest.raises(ModelError, match="pickle checkpoints can run arbitrary code"):
        load_pipeline(base)
    proj = Proj(tmp_path, PETS.replace('base_model = "tiny-sd"', 'base_model = "model.ckpt"'))
    assert main(["plan", str(proj.path)]) == 2
    assert "pickle checkpoint" in capsys.readouterr().err
    proj.edit('base_model = "model.ckpt"', 'base_model = "model.ckpt"\nallow_pickle = true')
    assert main(["plan", str(proj.path)]) == 0


def test_unicode_and_space_paths(tmp_path, build, fake_steps):
    root = tmp_path / "mein Projekt ü"
    root.mkdir()
    text = PETS.replace('"data/dog"', '"fotos del perro/ñandú"')
    p = Proj(root, text)
    write_image(root / "fotos del perro" / "ñandú" / "foto 1 ✓.png")
    result, _ = build(p)
    assert result.ok
    record = lockfile.read(p.lock)["train:dog"]["inputs"]["images"]
    assert record["_folder"] == "fotos del perro/ñandú" and list(record["files"]) == ["foto 1 ✓.png"]


def test_symlink_loop_does_not_hang(tmp_path):
    folder = tmp_path / "imgs"
    write_image(folder / "a.png")
    os.symlink(folder, folder / "loop")
    os.symlink(folder / "missing.png", folder / "dangling.png")
    assert [p.name for p in list_images(folder)] == ["a.png", "dangling.png"]


def test_hidden_and_non_image_files_are_skipped(tmp_path):
    folder = tmp_path / "imgs"
    write_image(folder / "a.png")
    (folder / ".DS_Store").write_bytes(b"\0")
    (folder / "notes.txt").write_text("captions")
    write_image(folder / ".git" / "b.png")
    assert [p.name for p in list_images(folder)] == ["a.png"]


def test_images_are_sorted_by_relative_path_and_found_in_subfolders(tmp_path):
    names = [
        "b.png",
        "a.PNG",
        "a/b.jpg",
        "a-b.jpg",
        "a.b/c.png",
        "A/x.png",
        "u/v/w.jpeg",
        "ü.png",
        "x/.y.png",
    ]
    for name in names:
        write_image(tmp_path / "imgs" / name)
    found = [p.relative_to(tmp_path / "imgs").as_posix() for p in list_images(tmp_path / "imgs")]
    assert found == sorted(n for n in names if "/." not in n)
    assert has_images(tmp_path / "imgs" / "u") and not has_images(tmp_path / "imgs" / "x")


def test_one_walk_finds_the_images_and_what_a_step_does_not_read(tmp_path, monkeypatch):
    from runner import imagefiles

    folder = tmp_path / "imgs"
    for name in ["b.png", "a/b.jpg", "a/c.heic", "a-b.jfif", "a.png", ".x/y.heic", "z.txt"]:
        write_image(folder / name)
    os.symlink(tmp_path, folder / "more")
    walks, walk = [], os.walk
    monkeypatch.setattr(os, "walk", lambda *a, **k: walks.append(a) or walk(*a, **k))
    found = imagefiles.scan(folder)
    assert len(walks) == 1
    assert found.images == list_images(folder)
    assert found.skipped == ["a/c.heic", "a-b.jfif"] and found.linked == ["more"]  # in path order


def test_a_plan_lists_the_images_of_a_subject_with_captions_once(proj, monkeypatch):
    proj.edit('"a toy in the style of <1>"', '"a toy in the style of <1>"\ncaption_extension = ".txt"')
    (proj.root / "data" / "toy" / "01.txt").write_text("a toy on a shelf")
    toy, walks, walk = proj.root / "data" / "toy", [], os.walk
    monkeypatch.setattr(os, "walk", lambda folder, **k: walks.append(Path(folder)) or walk(folder, **k))
    assert main(["plan", str(proj.path)]) == 0
    assert walks.count(toy) == 2  # one to find an image when the project loads, one for images and captions


def test_half_precision_ignored_on_a_cpu_is_said_once_not_once_per_step(monkeypatch):
    # Every step that loads the base model resolves the dtype; loading a pipeline restores a warnings
    # filter, after which Python's own once-per-place says the warning again.
    import warnings

    from runner import models

    monkeypatch.setattr(models.loading, "_IGNORED_SAID", set())  # said before, in this process
    shown = []
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = lambda message, *args, **kwargs: shown.append(str(message))
        for _ in range(3):
            models.resolve_dtype("fp16", "cpu")
            with warnings.catch_warnings():  # as loading a pipeline does
                pass
    assert shown == ["mixed_precision = 'fp16' is ignored on the CPU; computing in fp32"]


def test_an_image_that_is_a_symlink_loop_is_named_as_one(tmp_path):
    # a.png -> b.png -> a.png: was "a symbolic link to b.png, which does not exist", though b.png is there.
    from runner.errors import ImageError
    from runner.fingerprint import FileHasher

    folder = tmp_path / "imgs"
    write_image(folder / "00.png")
    os.symlink("b.png", folder / "a.png")
    os.symlink("a.png", folder / "b.png")
    with pytest.raises(ImageError) as info:
        FileHasher().manifest(folder)
    assert (  # b.png is one as well, named in the same error
        f"{folder / 'a.png'}: a symbolic link to b.png, which leads back to it; fix the link or remove it"
        in str(info.value).split("\n  ")
    )


def test_every_unreadable_image_is_named_in_one_error_past_a_few_how_many_more(tmp_path):
    # Was the first alone, found as the build planned: one broken link a build.
    from runner.errors import ImageError
    from runner.fingerprint import FileHasher

    folder = tmp_path / "imgs"
    write_image(folder / "00.png")
    for name in "abcdefg":
        os.symlink(f"{name}{name}.png", folder / f"{name}.png")
        os.symlink(f"{name}.png", folder / f"{name}{name}.png")
    with pytest.raises(ImageError) as info:
        FileHasher().manifest(folder)
    lines = str(info.value).split("\n  ")
    assert lines[0] == "14 images cannot be read; fix or remove each:"
    assert lines[1:] == [
        f"{folder / name}: a symbolic link to {target}, which leads back to it; fix the link or remove it"
        for name, target in [
            ("a.png", "aa.png"),
            ("aa.png", "a.png"),
            ("b.png", "bb.png"),
            ("bb.png", "b.png"),
            ("c.png", "cc.png"),
        ]
    ] + ["and 9 more"]
