"""`dbl gc` never guesses: an unreadable lockfile stops it, and so does a build in progress."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from runner import lockfile
from runner.cli import main
from runner.lockfile import HEADER
from runner.store import BuildLock, RunCache
from tests.fake_build import fake_dbl, wait_for
from tests.lockfile_fixtures import CONFLICT, OTHER_TOOLS, git, snow_branch


def cache_entries(proj) -> list[str]:
    return RunCache(proj.root / ".dbl" / "cache").entries()


@pytest.fixture
def built_twice(proj, build):
    """A project built, edited and built again: one cache entry no lockfile refers to any more."""
    build(proj)
    proj.edit("sks dog on a beach", "sks dog in the snow")
    build(proj)
    return proj


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("which, text", [("pets.lock", None), ("other.lock", HEADER + "garbage = = =\n")])
def test_gc_refuses_with_an_unreadable_lockfile(built_twice, capsys, dry_run, which, text):
    proj = built_twice
    bad = proj.root / which
    bad.write_text(text if text is not None else CONFLICT + proj.lock.read_text())
    before = cache_entries(proj)
    assert len(before) == 8
    args = ["gc", str(proj.path)] + (["--dry-run"] if dry_run else [])
    assert main(args) == 2
    captured = capsys.readouterr()
    assert f"{bad}: cannot read the lockfile" in captured.err and "gc refused" in captured.err
    if text is None:  # git's markers: said as what they are, not as a TOML parse error
        assert (
            f"{bad}: cannot read the lockfile: unresolved merge conflict (line 1: `<<<<<<< HEAD`)"
            in captured.err
        )
    assert "move it out of" in captured.err and "Lockfiles in git" in captured.err
    assert not captured.out
    assert cache_entries(proj) == before
    bad.unlink() if which == "other.lock" else bad.write_text(bad.read_text().replace(CONFLICT, ""))
    assert main(args) == 0
    assert cache_entries(proj) == (before if dry_run else sorted(set(before) - {_dropped(before, proj)}))


@pytest.mark.parametrize("which", ["pets.lock", "other.lock"])
@pytest.mark.parametrize("damage", ["zeros", "cut off"])
def test_gc_refuses_when_a_projects_lockfile_is_damaged_past_telling_whose_it_is(
    built_twice, capsys, which, damage
):
    """Zeros a crash left, or a file cut off before dbl's header: not TOML and no header, which is how
    another tool's .lock reads; but it is the lockfile of a project file beside it, and gc must not drop
    what it referred to."""
    proj = built_twice
    bad = proj.root / which
    if which == "other.lock":
        (proj.root / "other.toml").write_text('[project]\nbase_model = "tiny-sd"\n')
    text = proj.lock.read_text()
    bad.write_bytes(b"\0" * 2000 if damage == "zeros" else text[text.index("[") :][:-40].encode()[:60])
    assert lockfile.foreign(bad)  # as another tool's reads
    before = cache_entries(proj)
    assert main(["gc", str(proj.path)]) == 2
    err = capsys.readouterr().err
    assert f"gc refused: {bad}: cannot read the lockfile" in err, err
    assert cache_entries(proj) == before


def test_gc_refuses_a_newer_dbls_lockfile_and_says_to_upgrade(built_twice, capsys):
    """A teammate's newer lockfile is no broken one: moving it aside would lose their records."""
    proj = built_twice
    proj.lock.write_text(proj.lock.read_text().replace("version = 1\n", "version = 2\n", 1))
    before = cache_entries(proj)
    assert main(["gc", str(proj.path)]) == 2
    err = capsys.readouterr().err
    assert "written by a newer dbl (lockfile version 2" in err and "upgrade dbl" in err
    assert "move it out" not in err and "merge conflict" not in err
    assert cache_entries(proj) == before


def test_gc_passes_over_other_tools_lockfiles(built_twice, capsys):
    proj = built_twice
    for name, text in OTHER_TOOLS.items():
        (proj.root / name).write_text(text)
    (proj.root / "pip.lock").mkdir()  # a lock some tools take by making a folder
    before = cache_entries(proj)
    assert main(["gc", str(proj.path)]) == 0, capsys.readouterr().err
    assert cache_entries(proj) == sorted(set(before) - {_dropped(before, proj)})
    assert all((proj.root / name).read_text() == text for name, text in OTHER_TOOLS.items())


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_gc_keeps_what_the_lockfile_of_every_local_branch_refers_to(proj, build, capsys):
    """Hours of training on a branch: gc on another one must not drop them, or checking the branch
    out again retrains instead of restoring."""
    env = snow_branch(proj, build)
    git(proj.root, "checkout", "-q", "main", env=env)
    before = cache_entries(proj)
    assert main(["gc", str(proj.path)]) == 0
    assert cache_entries(proj) == before  # the render of the snow branch is kept for it
    git(proj.root, "branch", "-qD", "snow", env=env)
    assert main(["gc", str(proj.path)]) == 0
    assert cache_entries(proj) == sorted(set(before) - {_dropped(before, proj)})
    capsys.readouterr()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_gc_refuses_when_git_cannot_read_the_branches_it_keeps_for(proj, build, capsys):
    """A repository git will not read (owned by another user, as in a container; made by a newer git)
    hides the other branches' lockfiles: gc must not take that for no repository and drop their entries."""
    env = snow_branch(proj, build)
    git(proj.root, "checkout", "-q", "main", env=env)
    git(proj.root, "config", "core.repositoryformatversion", "1", env=env)
    git(proj.root, "config", "extensions.fromanewergit", "true", env=env)
    with pytest.raises(subprocess.CalledProcessError):
        git(proj.root, "branch", env=env)  # git really refuses the repository now
    before = cache_entries(proj)
    for dry_run in ([], ["--dry-run"]):
        assert main(["gc", str(proj.path), *dry_run]) == 2
        err = capsys.readouterr().err
        assert "gc refused: git cannot read the branches of" in err, err
        assert "fromanewergit" in err  # git's own words, which name the fix
    assert cache_entries(proj) == before  # the render of the snow branch is kept for it


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.parametrize("missing", ["snow^{tree}", "snow:pets.lock"])
def test_gc_refuses_when_git_cannot_read_a_branch_s_lockfile(proj, build, capsys, missing):
    """A branch whose tree or lockfile git cannot read (a damaged repository, a partial clone offline)
    was passed over in silence, and gc dropped the entries that branch's lockfile needs."""
    env = snow_branch(proj, build)
    git(proj.root, "checkout", "-q", "main", env=env)
    gone = subprocess.run(
        ["git", "rev-parse", missing], cwd=proj.root, capture_output=True, text=True, check=True, env=env
    ).stdout.strip()
    (proj.root / ".git" / "objects" / gone[:2] / gone[2:]).unlink()  # loose: the repository is not packed
    with pytest.raises(subprocess.CalledProcessError):
        git(proj.root, "cat-file", "-e", gone, env=env)  # git really cannot read it now
    before = cache_entries(proj)
    for dry_run in ([], ["--dry-run"]):
        assert main(["gc", str(proj.path), *dry_run]) == 2
        err = capsys.readouterr().err
        assert "gc refused: git cannot read" in err and "branch snow" in err, err
    assert cache_entries(proj) == before  # the render of the snow branch is kept for it


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_gc_takes_a_stray_git_folder_that_git_does_not_call_a_repository_for_none(built_twice, capsys):
    (built_twice.root / ".git").mkdir()  # empty: left over, not a repository to git
    assert main(["gc", str(built_twice.path)]) == 0
    assert capsys.readouterr().out.startswith("dropped 1 cache entry")


def _dropped(before, proj) -> str:

    kept = {r["fingerprint"] for r in lockfile.read(proj.lock).values()}
    (gone,) = set(before) - kept
    return gone


def test_gc_waits_for_no_build_it_would_race(proj, capsys):
    first = fake_dbl("build", proj.path, "--no-progress", slow="train:toy", wait=False)
    try:
        wait_for(first, "SLOW STEP RUNNING")  # the build holds the lock and has stored some entries
        before = cache_entries(proj)
        assert before
        assert main(["gc", str(proj.path)]) == 3
        err = capsys.readouterr().err
        assert f"another build of this project is running (pid {first.pid} on" in err
        assert cache_entries(proj) == before
    finally:
        first.kill()
        first.wait()


def test_gc_holds_the_locks_of_projects_sharing_the_cache(proj, build, capsys):
    build(proj)
    twin = proj.root / "twin.toml"
    twin.write_text(proj.path.read_text())
    from runner.project import load_project

    with BuildLock(load_project(twin)):
        assert main(["gc", str(proj.path)]) == 3
    err = capsys.readouterr().err
    # said of that project's build: it said "another build of this project", which no build of it was
    assert f"dbl: a build of twin.toml is running (pid {os.getpid()} on" in err, err
    assert "which shares .dbl/ with this project" in err and "this project is running" not in err
    assert main(["gc", str(proj.path)]) == 0


def test_gc_reads_the_lockfiles_once_it_holds_the_locks(proj, build, monkeypatch):
    """A build that ends while gc waits for the locks has stored its entries and named them in its
    lockfile: gc keeps them, and drops what the lockfile it replaced referred to."""
    import contextlib

    from runner import gc, lockfile

    build(proj)
    old = proj.lock.read_text()
    proj.edit("sks dog on a beach", "sks dog in the snow")
    build(proj)
    new = proj.lock.read_text()
    proj.lock.with_name("new.lock.txt").write_text(new)
    proj.lock.write_text(old)  # what the lockfile said when gc started
    locks = gc._all_build_locks

    @contextlib.contextmanager
    def a_build_ends_first(project):
        proj.lock.write_text(new)
        with locks(project):
            yield

    (proj.root / "old.lock.txt").write_text(old)
    replaced = lockfile.referenced_fingerprints(proj.root / "old.lock.txt")
    kept = lockfile.referenced_fingerprints(proj.lock.with_name("new.lock.txt"))
    monkeypatch.setattr(gc, "_all_build_locks", a_build_ends_first)
    done = gc.collect(proj.load())
    assert done.dropped == 1 and replaced - kept  # the edit replaced one entry
    assert set(cache_entries(proj)) == kept  # what only the old lockfile named is gone


@pytest.mark.parametrize("dry_run", [True, False])
def test_gc_drops_the_checkpoints_of_steps_no_longer_in_the_project(proj, build, capsys, dry_run):
    """A train step killed there kept its checkpoints to resume; once its subject is gone (removed, or
    renamed), nothing resumes them, and they are the largest thing in .dbl/ besides the cache."""
    build(proj)
    tmp = proj.root / ".dbl" / "tmp"
    gone, kept, other = tmp / "pets" / "train-rex", tmp / "pets" / "train-dog", tmp / "twin" / "train-rex"
    for folder in (gone, kept, other):
        (folder / "checkpoint-200").mkdir(parents=True)
        (folder / "checkpoint-200" / "lora.safetensors").write_bytes(b"x" * 300_000)
    (kept / "fingerprint").write_text(lockfile.read(proj.lock)["train:dog"]["fingerprint"])  # resumable
    assert main(["gc", str(proj.path)] + (["--dry-run"] if dry_run else [])) == 0
    out = capsys.readouterr().out
    verb, free = ("would drop", "would free") if dry_run else ("dropped", "freed")
    assert f"{verb} train-rex: the work folder of a step no longer in the project, 0.3 MB\n" in out
    assert out.endswith(f"{free} 0.3 MB in all\n")  # the largest thing in .dbl/ counts in what gc frees
    assert gone.is_dir() == dry_run and kept.is_dir() and other.is_dir()


@pytest.mark.parametrize("dry_run", [True, False])
def test_gc_drops_the_copies_of_outputs_a_build_killed_while_committing_left(proj, build, capsys, dry_run):
    """A build killed between copying a step's outputs out of the run-cache and swapping them in leaves a
    whole adapter or render beside the work folders; if that step never commits again (removed, renamed,
    or back to what the lockfile records), nothing but gc would drop it."""
    from runner.store import commit_folders

    build(proj)
    project = proj.load()
    staged, _ = commit_folders(project, "train", "rex")
    _, trash = commit_folders(project, "render", "park")
    for folder in (staged, trash):
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "adapter_model.safetensors").write_bytes(b"x" * 100)
    assert main(["gc", str(proj.path)] + (["--dry-run"] if dry_run else [])) == 0
    out = capsys.readouterr().out
    verb = "would drop" if dry_run else "dropped"
    assert f"{verb} 2 folder(s) left by builds that were killed while writing the cache or committing" in out
    assert staged.is_dir() == dry_run and trash.is_dir() == dry_run


@pytest.mark.parametrize("dry_run", [True, False])
def test_gc_drops_the_checkpoints_of_inputs_a_step_no_longer_has(proj, build, fake_steps, capsys, dry_run):
    """A train step that failed (or was killed) with other settings kept its checkpoints; once the project is
    back to what the lockfile records, the step is fresh and never reruns there, and no build resumes them.
    One a build of the project as it is would resume (a --force rerun that failed) is kept."""
    build(proj)
    tmp = proj.root / ".dbl" / "tmp" / "pets"
    proj.edit("a photo of sks dog", "a photo of sks dog, sitting")
    fake_steps.fail = {"train:dog"}
    build(proj)
    proj.edit("a photo of sks dog, sitting", "a photo of sks dog")
    fake_steps.fail = {"train:toy"}
    build(proj, force={"train:toy"})
    assert (tmp / "train-dog" / "fingerprint").is_file() and (tmp / "train-toy" / "fingerprint").is_file()
    assert main(["gc", str(proj.path)] + (["--dry-run"] if dry_run else [])) == 0
    out = capsys.readouterr().out
    verb = "would drop" if dry_run else "dropped"
    assert f"{verb} train-dog: a work folder made for inputs its step no longer has" in out
    assert "train-toy" not in out
    assert (tmp / "train-dog").is_dir() == dry_run and (tmp / "train-toy").is_dir()


def test_gc_keeps_the_checkpoints_of_a_build_with_num_processes(proj, build, fake_steps, capsys):
    """--num-processes is in a train step's fingerprint: the checkpoints of a build given it are resumed by
    the next build given it, and say how many processes wrote them."""
    build(proj)
    fake_steps.fail = {"train:dog"}
    build(proj, force={"train:dog"}, num_processes=2)
    work = proj.root / ".dbl" / "tmp" / "pets" / "train-dog"
    (work / "checkpoint-200").mkdir()
    (work / "checkpoint-200" / "state.json").write_text('{"num_processes": 2}')
    assert main(["gc", str(proj.path)]) == 0
    assert "train-dog" not in capsys.readouterr().out and work.is_dir()
