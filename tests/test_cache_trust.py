"""What the run-cache restores is what its fingerprint's inputs produce: inputs edited while a build runs
never enter the cache, and --force replaces what it held."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner import lockfile
from runner.store import RunCache
from tests.cache_trust_fixtures import ALL, build_with
from tests.conftest import PETS, FakeBackend, FakeSteps, Proj, Recorder, write_image


def reading_train(run):
    """The fake train step, also recording the bytes of every image it read (as a real one trains on)."""

    def train(ctx):
        result = run(ctx)
        if ctx.kind == "train":
            seen = {
                p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(Path(ctx.spec.images).iterdir())
            }
            (ctx.out / "seen.json").write_text(json.dumps(seen, sort_keys=True))
        return result

    return train


def during(step_id: str, action, after_read: bool = False):
    """A wrapper that does `action` while `step_id` runs: before it reads its inputs, or after."""

    def wrap(run):
        inner = reading_train(run)

        def step(ctx):
            if ctx.step_id == step_id and not after_read:
                action()
            result = inner(ctx)
            if ctx.step_id == step_id and after_read:
                action()
            return result

        return step

    return wrap


def entries(root: Path) -> dict[str, dict[str, bytes]]:
    cache = RunCache(root / ".dbl" / "cache")
    return {
        fp: {
            p.relative_to(cache.entry(fp) / "files").as_posix(): p.read_bytes()
            for p in (cache.entry(fp) / "files").rglob("*")
            if p.is_file()
        }
        for fp in cache.entries()
    }


def test_an_image_replaced_while_its_step_runs_never_enters_the_cache(tmp_path):
    p = Proj(tmp_path, PETS)
    photo = tmp_path / "data" / "toy" / "00.png"
    swapped = []

    def swap():
        write_image(photo, seed=99)
        swapped.append(True)

    result, rec, ran = build_with(p, during("train:toy", swap))
    assert swapped and "train:toy" in ran  # the photo really changed while train:toy ran
    ends = {e[1]: e for e in rec.events if e[0] == "end"}
    assert ends["train:toy"][2] == "failed"
    assert "data/toy/00.png changed while the step ran" in ends["train:toy"][3]
    assert "train:toy" not in lockfile.read(p.lock)
    seen = [json.loads(files["seen.json"]) for files in entries(tmp_path).values() if "seen.json" in files]
    assert len(seen) == 1  # train:dog only: nothing trained on the swapped photo was kept

    # The next build trains on the photo as it is now, and keys it on that photo.
    result, rec, ran = build_with(p, reading_train)
    assert result.ok and "train:toy" in ran
    record = lockfile.read(p.lock)["train:toy"]
    kept = json.loads((tmp_path / "build/pets/adapters/toy/seen.json").read_text())
    assert (
        kept["00.png"]
        == record["inputs"]["images"]["files"]["00.png"]
        == hashlib.sha256(photo.read_bytes()).hexdigest()
    )


@pytest.mark.parametrize("how", ["was added", "was removed"])
def test_an_image_added_or_removed_while_its_step_runs_is_said_so(tmp_path, how):
    p = Proj(tmp_path, PETS)
    photo = tmp_path / "data" / "toy" / ("new.png" if how == "was added" else "00.png")

    def add_or_remove():
        if how == "was added":
            write_image(photo, seed=98)
        else:
            photo.unlink()

    result, rec, ran = build_with(p, during("train:toy", add_or_remove))
    assert "train:toy" in ran and photo.exists() == (how == "was added")  # it really happened meanwhile
    ends = {e[1]: e for e in rec.events if e[0] == "end"}
    assert ends["train:toy"][2] == "failed"
    assert f"data/toy/{photo.name} {how} while the step ran" in ends["train:toy"][3]
    assert "train:toy" not in lockfile.read(p.lock)


@pytest.mark.parametrize("name", [".DS_Store", ".00.png.swp", ".thumbs/00.png"])
def test_a_hidden_file_written_beside_the_images_while_their_step_runs_fails_nothing(tmp_path, name):
    """No step reads hidden files (the image list skips them): a Finder's .DS_Store or an editor's swap
    file written meanwhile keeps what the step made."""
    p = Proj(tmp_path, PETS)
    hidden = tmp_path / "data" / "toy" / name

    def write_hidden():
        hidden.parent.mkdir(exist_ok=True)
        hidden.write_bytes(b"not read by any step")

    result, rec, ran = build_with(p, during("train:toy", write_hidden, after_read=True))
    assert "train:toy" in ran and hidden.is_file()  # written while train:toy ran
    assert result.ok, rec.events
    assert "train:toy" in lockfile.read(p.lock)
    result, rec, ran = build_with(p)
    assert result.ok and ran == []


def test_an_edit_reverted_while_the_step_runs_is_noticed_too(tmp_path):
    """The step read the edited bytes; the file is back as it was, with its size and mtime: only the
    change time tells."""
    p = Proj(tmp_path, PETS)
    build_with(p, reading_train)
    photo = tmp_path / "data" / "dog" / "01.png"
    original, stat = photo.read_bytes(), photo.stat()
    p.edit('prompts = ["a dog"]', 'prompts = ["a dog", "a cat"]')  # render:base only; then edit dog
    write_image(photo, seed=77)
    seen_during = {}

    def revert():
        seen_during["bytes"] = photo.read_bytes()
        photo.write_bytes(original)
        import os

        os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    result, rec, ran = build_with(p, during("train:dog", revert, after_read=True))
    assert seen_during["bytes"] != original  # the step really ran on the edited photo
    ends = {e[1]: e for e in rec.events if e[0] == "end"}
    assert (
        ends["train:dog"][2] == "failed"
        and "data/dog/01.png changed while the step ran" in ends["train:dog"][3]
    )
    assert (
        json.loads((tmp_path / "build/pets/adapters/dog/seen.json").read_text())["01.png"]
        == hashlib.sha256(original).hexdigest()
    )


@pytest.mark.parametrize(
    "ending, jobs", [("done", 1), ("interrupted", 1), ("failed", 1), ("interrupted", 2), ("failed", 2)]
)
def test_checkpoints_made_from_an_image_edited_meanwhile_are_not_resumed(tmp_path, ending, jobs, monkeypatch):
    """A train step that read a photo edited while it ran (put back as it was since) trained on other files
    than its fingerprint's: the next build, of the photo as it is, starts over instead of resuming from the
    checkpoints that step left, however it ended. (Run from the project's folder: the photo is named from
    there.)"""
    from runner.errors import StepError, StepInterrupted
    from runner.store import work_folder

    monkeypatch.chdir(tmp_path)
    p = Proj(tmp_path, PETS)
    photo = tmp_path / "data" / "toy" / "00.png"
    original = photo.read_bytes()

    def wrap(run):
        def step(ctx):
            if ctx.step_id != "train:toy":
                return run(ctx)
            write_image(photo, seed=99)  # edited before the step reads it ...
            result = run(ctx)
            (ctx.work / "checkpoint-2").mkdir()  # ... trains on it and checkpoints
            photo.write_bytes(original)  # ... and put back
            if ending == "interrupted":
                raise StepInterrupted("train:toy stopped after step 2 of 4; it resumes from there")
            if ending == "failed":
                raise StepError("train:toy: the loss became nan at step 3")
            return result

        return step

    from runner import executor

    fake, rec = FakeSteps(), Recorder()
    options = executor.BuildOptions(jobs=jobs, backend_factory=lambda project: FakeBackend(fake, wrap))
    executor.build(p.load(), options, rec)
    assert "train:toy" in fake.ran
    ends = {e[1]: e for e in rec.events if e[0] == "end"}
    assert ends["train:toy"][2] == ("interrupted" if ending == "interrupted" else "failed")
    assert not work_folder(p.load(), "train", "toy").exists()
    if ending != "done":  # a step that completed says so in its error
        logs = [e[2] for e in rec.events if e[0] == "log" and e[1] == "train:toy"]
        assert (
            "warning: data/toy/00.png changed while the step ran: its work folder is dropped, and the next "
            "build starts it over"
        ) in logs


PHOTOS = [("dog", 0), ("dog", 2), ("toy", 1)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(ALL), st.sampled_from(PHOTOS), st.integers(0, 3), st.booleans()),
        min_size=1,
        max_size=3,
    )
)
def test_random_edits_during_builds_never_poison_the_cache(tmp_path_factory, edits):
    """Whatever is edited whenever, every cache entry holds what a clean build of the inputs its
    fingerprint names produces."""
    root = tmp_path_factory.mktemp("edits")
    p = Proj(root, PETS)
    states = [snapshot_inputs(root)]
    for step_id, (subject, index), seed, after_read in edits:
        photo = root / "data" / subject / f"{index:02d}.png"

        def edit(photo=photo, seed=seed):
            write_image(photo, seed=100 + seed)
            states.append(snapshot_inputs(root))

        build_with(p, during(step_id, edit, after_read))
    build_with(p, reading_train)  # and once more, undisturbed
    references: dict[str, dict[str, bytes]] = {}
    for i, state in enumerate(states):
        clean = tmp_path_factory.mktemp(f"clean{i}")
        q = Proj(clean, PETS)
        for rel, data in state.items():
            (clean / rel).write_bytes(data)
        assert build_with(q, reading_train)[0].ok
        references.update(entries(clean))
    disturbed = entries(root)
    assert disturbed
    for fp, files in disturbed.items():
        assert fp in references, "an entry keyed on inputs that never existed"
        assert files == references[fp]


def snapshot_inputs(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "data").rglob("*.png"))}


def test_force_replaces_the_cache_entry_and_says_so(tmp_path):
    p = Proj(tmp_path, PETS)
    build_with(p)
    fp = lockfile.read(p.lock)["render:base"]["fingerprint"]
    calls = []

    def different(run):
        def step(ctx):
            result = run(ctx)
            if ctx.step_id == "render:base":
                calls.append(1)
                (ctx.out / "0-0.png").write_text("new bytes")
            return result

        return step

    result, rec, ran = build_with(p, different, force=("render:base",))
    assert calls and ran == ["render:base"]
    assert entries(tmp_path)[fp]["0-0.png"] == b"new bytes"
    assert (tmp_path / "build/pets/renders/base/0-0.png").read_text() == "new bytes"
    assert (
        "log",
        "render:base",
        "warning: forced: replaced the run-cache entry of these inputs (it held different bytes)",
    ) in rec.events  # a warning: shown without -v
