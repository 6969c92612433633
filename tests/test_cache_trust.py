"""What the run-cache restores is what its fingerprint's inputs produce: inputs edited while a build
runs, forced reruns, damaged entries, renamed steps, and the effective settings a step ran with."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner import lockfile
from runner.store import RunCache
from tests.conftest import PETS, FakeBackend, FakeSteps, Proj, Recorder, use_backend, write_image

ALL = ["prior:dog", "train:dog", "train:toy", "blend:mix", "render:park", "render:mixed", "render:base"]


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


def build_with(p: Proj, wrap=None, **options):
    from runner import executor

    fake = FakeSteps()
    undo = use_backend(lambda project: FakeBackend(fake, wrap))
    try:
        rec = Recorder()
        result = executor.build(p.load(), executor.BuildOptions(**options), rec)
    finally:
        undo()
    return result, rec, fake.ran


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


# --- 1. inputs that change while the build runs --------------------------------------------------------


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
def test_checkpoints_made_from_an_image_edited_meanwhile_are_not_resumed(tmp_path, ending, jobs):
    """A train step that read a photo edited while it ran (put back as it was since) trained on other files
    than its fingerprint's: the next build, of the photo as it is, starts over instead of resuming from the
    checkpoints that step left, however it ended."""
    from runner.errors import StepError, StepInterrupted
    from runner.store import work_folder

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


# --- 2. --force replaces what the cache held --------------------------------------------------------


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


# --- 6. names are in the output layout, not in cached bytes -------------------------------------------


def kohya_train(run):
    def step(ctx):
        result = run(ctx)
        if ctx.kind in ("train", "blend"):
            (ctx.out / "kohya.safetensors").write_text(f"weights of {ctx.fingerprint}")
        return result

    return step


def test_a_renamed_subject_is_restored_under_its_new_name(tmp_path):
    p = Proj(tmp_path, PETS)
    build_with(p, kohya_train)
    assert (tmp_path / "build/pets/adapters/dog/dog.safetensors").is_file()
    text = p.path.read_text().replace("[subjects.dog]", "[subjects.rex]").replace("dog = 1.05", "rex = 1.05")
    p.path.write_text(text.replace('adapter = "dog"', 'adapter = "rex"'))
    result, rec, ran = build_with(p, kohya_train)
    assert ran == ["render:park"]  # restored, not trained; the render names its adapter in its images
    rex = tmp_path / "build/pets/adapters/rex"
    assert sorted(f.name for f in rex.iterdir()) == ["dbl.json", "rex.safetensors", "unet"]
    assert not (tmp_path / "build/pets/adapters/dog").exists()
    assert (
        "log",
        None,
        "removed build/pets/adapters/dog: train:dog is no longer in the project",
    ) in rec.events
    records = lockfile.read(p.lock)
    assert set(records) == set(ALL) - {"train:dog"} | {"train:rex"}
    # The blend did not run (the same parent bytes), and its record names the parent as it is now called.
    assert "blend:mix" not in ran
    assert {a["_name"] for a in records["blend:mix"]["inputs"]["adapters"]} == {"rex", "toy"}


def test_a_renamed_image_folder_is_what_the_lockfile_names_and_check_reads(tmp_path, capsys):
    from runner.cli import main

    p = Proj(tmp_path, PETS)
    build_with(p, kohya_train)
    before = p.lock.read_text()
    (tmp_path / "data" / "toy").rename(tmp_path / "data" / "toy2")
    p.edit('images = "data/toy"', 'images = "data/toy2"')
    assert main(["plan", str(p.path)]) == 0
    assert capsys.readouterr().out.startswith("all ")  # the same images: nothing is stale
    result, rec, ran = build_with(p, kohya_train)
    assert result.ok and ran == []
    assert lockfile.read(p.lock)["train:toy"]["inputs"]["images"]["_folder"] == "data/toy2"
    assert p.lock.read_text() != before and before.count("data/toy") > 0
    assert main(["check", str(p.path)]) == 0
    again = p.lock.read_text()
    build_with(p, kohya_train)
    assert p.lock.read_text() == again  # refreshed once, then left alone


@pytest.mark.parametrize("edit", ['name = "pets2"', 'out = "elsewhere"'])
def test_a_new_output_folder_gets_the_outputs_from_the_cache_and_the_lockfile_follows(tmp_path, capsys, edit):
    """[project] out and name are in no fingerprint: nothing reruns, but the outputs must be where they
    now belong, and the lockfile must say so (dbl ls, dbl check and the report read it)."""
    from runner.cli import main

    p = Proj(tmp_path, PETS)
    build_with(p, kohya_train)
    p.edit("[project]\n", f"[project]\n{edit}\n")
    folder = "build/pets2" if "name" in edit else "elsewhere"
    assert main(["plan", str(p.path)]) == 0
    out = capsys.readouterr().out
    reasons = {line.split()[0]: line.split(maxsplit=1)[1] for line in out.splitlines()[1:]}
    assert (
        reasons["train:toy"]
        == f"outputs in build/pets/adapters/toy, not {folder}/adapters/toy; restorable from cache"
    )
    assert reasons["render:base"].startswith(f"outputs in build/pets/renders/base, not {folder}/renders/base")
    result, rec, ran = build_with(p, kohya_train)
    assert result.ok and ran == []  # restored, not rebuilt
    records = lockfile.read(p.lock)
    assert set(records) == set(ALL)
    for record in records.values():
        assert record["outputs"] and all(rel.startswith(f"{folder}/") for rel in record["outputs"])
        assert all((tmp_path / rel).is_file() for rel in record["outputs"])
    assert main(["check", str(p.path)]) == 0
    assert main(["plan", str(p.path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"all {len(ALL)} steps are up to date"


def test_two_subjects_with_the_same_inputs_share_an_entry_and_keep_their_names(tmp_path):
    p = Proj(
        tmp_path,
        PETS + '\n[subjects.twin]\nimages = "data/toy"\ninstance_prompt = "a toy in the style of <1>"\n',
    )
    result, rec, ran = build_with(p, kohya_train)
    assert "train:toy" in ran and "train:twin" not in ran  # the second is a cache hit
    assert (tmp_path / "build/pets/adapters/twin/twin.safetensors").read_bytes() == (
        tmp_path / "build/pets/adapters/toy/toy.safetensors"
    ).read_bytes()


def naming_render(run):
    """The fake steps, with renders that name their adapters in their images, as the real one's Lora field
    and its per-adapter folders do."""

    def step(ctx):
        result = kohya_train(run)(ctx)
        if ctx.kind == "render":
            for image in ctx.out.glob("*.png"):
                image.write_text(f"{image.read_text()} Lora: {','.join(ctx.spec.adapter_names)}")
        return result

    return step


def _rename_dog(p: Proj, new: str) -> None:
    old = "dog" if new == "rex" else "rex"
    text = p.path.read_text().replace(f"[subjects.{old}]", f"[subjects.{new}]")
    text = text.replace(f"{old} = 1.05", f"{new} = 1.05")
    p.path.write_text(text.replace(f'adapter = "{old}"', f'adapter = "{new}"'))


def test_a_render_of_a_renamed_adapter_names_it_as_a_clean_build_does(tmp_path):
    """A render's images name their adapter, which is in no fingerprint: after a rename, keeping the
    render, or restoring the entry made under the old name, would keep images that name a subject the
    project no longer has. It runs again, and a rename back does too, to a clean build's bytes each time."""
    p = Proj(tmp_path, PETS)
    build_with(p, naming_render)
    image = tmp_path / "build/pets/renders/park/0-0.png"
    made = {"dog": image.read_bytes()}
    for turn, name in enumerate(("rex", "dog", "rex")):
        _rename_dog(p, name)
        result, rec, ran = build_with(p, naming_render)
        assert result.ok and ran == ["render:park"]  # the train step comes back from the run-cache
        reasons = {s: r for s, _, r in rec.planned}
        old = "dog" if name == "rex" else "rex"
        assert f"adapter {old!r} -> {name!r}, which its outputs name" in reasons["render:park"]
        assert image.read_text().endswith(f"Lora: {name}")
        made.setdefault(name, image.read_bytes())
        assert image.read_bytes() == made[name]
        clean = tmp_path / f"clean-{turn}"
        clean.mkdir()
        fresh = Proj(clean, p.path.read_text())
        build_with(fresh, naming_render)
        assert (clean / "build/pets/renders/park/0-0.png").read_bytes() == image.read_bytes()
        _, _, ran = build_with(p, naming_render)
        assert ran == []


def test_a_run_cache_entry_restores_only_under_the_names_it_was_made_with(tmp_path):
    cache = RunCache(tmp_path / "cache")
    files, manifest = _files(tmp_path / "dog", "Lora: dog")
    cache.store("fp", files, manifest, {}, unhashed={"adapter": "dog"})
    assert cache.verify("fp", unhashed={"adapter": "dog"}) is not None
    assert cache.verify("fp", unhashed={"adapter": "rex"}) is None
    assert cache.verify("fp") is not None  # kept: a rename back restores it
    files, manifest = _files(tmp_path / "rex", "Lora: rex")
    assert cache.store("fp", files, manifest, {}, unhashed={"adapter": "rex"}) == ""  # replaced, unsaid
    assert cache.verify("fp", unhashed={"adapter": "rex"}) is not None
    assert (cache.entry("fp") / "files" / "a.bin").read_text() == "Lora: rex"
    # An entry made before names were kept with it holds unknown ones: it restores no render.
    del_names = json.loads((cache.entry("fp") / "manifest.json").read_text())
    del del_names["unhashed"]
    (cache.entry("fp") / "manifest.json").write_text(json.dumps(del_names))
    assert cache.verify("fp", unhashed={"adapter": "rex"}) is None


def test_an_entry_written_before_names_left_the_cache_fits_only_its_own_name(tmp_path):
    cache = RunCache(tmp_path / "cache")
    files = tmp_path / "files"
    files.mkdir()
    (files / "dog.safetensors").write_text("w")
    cache.store("fp", files, {"dog.safetensors": {"sha256": hashlib.sha256(b"w").hexdigest(), "size": 1}}, {})
    manifest = cache.entry("fp") / "manifest.json"
    meta = json.loads(manifest.read_text())
    del meta["version"]
    manifest.write_text(json.dumps(meta))
    assert cache.verify("fp", layout={"kohya.safetensors": "dog.safetensors"}) is not None
    assert cache.verify("fp", layout={"kohya.safetensors": "rex.safetensors"}) is None
    assert cache.verify("fp") is not None  # still intact: not dropped


def _files(root: Path, text: str) -> tuple[Path, dict]:
    root.mkdir()
    (root / "a.bin").write_text(text)
    return root, {"a.bin": {"sha256": hashlib.sha256(text.encode()).hexdigest(), "size": len(text)}}


def test_an_entry_another_build_stores_first_is_kept_not_replaced(tmp_path, monkeypatch):
    """Two builds store one fingerprint: the second looked before the first renamed its entry into place.
    The first build may be copying that entry into its outputs now, so it must stay where it is."""
    cache = RunCache(tmp_path / "cache")
    cache.store("fp", *_files(tmp_path / "first", "w"), {})
    inode = (cache.entry("fp") / "files" / "a.bin").stat().st_ino
    looked = []
    real = RunCache.manifest

    def not_there_yet(self, fingerprint):
        if not looked:  # the second build's first look: the entry was not there then
            looked.append(fingerprint)
            return None
        return real(self, fingerprint)

    monkeypatch.setattr(RunCache, "manifest", not_there_yet)
    assert cache.store("fp", *_files(tmp_path / "second", "w"), {}) == ""
    assert looked == ["fp"]  # the race really was staged
    assert (cache.entry("fp") / "files" / "a.bin").stat().st_ino == inode
    assert cache.verify("fp") is not None and not cache.leftovers()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["fp"]


def test_storing_over_an_entry_with_an_unreadable_manifest_replaces_it(tmp_path):
    cache = RunCache(tmp_path / "cache")
    cache.store("fp", *_files(tmp_path / "first", "w"), {})
    (cache.entry("fp") / "manifest.json").write_text("{")
    cache.store("fp", *_files(tmp_path / "second", "v"), {})
    assert cache.verify("fp")["outputs"]["a.bin"]["size"] == 1
    assert (cache.entry("fp") / "files" / "a.bin").read_text() == "v"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["fp"]


# --- 7. damaged entries ----------------------------------------------------------------------------------


def test_a_damaged_manifest_is_reported_once_and_the_step_reruns(tmp_path):
    p = Proj(tmp_path, PETS)
    build_with(p)
    fp = lockfile.read(p.lock)["train:dog"]["fingerprint"]
    (tmp_path / ".dbl/cache" / fp / "manifest.json").write_text('{"outputs": [1, 2], "output_hash": 3}')
    shutil.rmtree(tmp_path / "build/pets/adapters/dog")
    _, rec, _ = build_with(p, dry_run=True)
    assert "restorable from cache" not in dict((s, r) for s, _, r in rec.planned)["train:dog"]
    result, rec, ran = build_with(p)
    assert result.ok and "train:dog" in ran
    warnings = [e for e in rec.events if e[0] == "log" and "damaged" in e[2]]
    assert len(warnings) == 1 and str(tmp_path / ".dbl/cache" / fp) in warnings[0][2]
    assert RunCache(tmp_path / ".dbl/cache").verify(fp) is not None  # stored afresh


def test_a_damaged_manifest_does_not_stop_a_forced_rerun(tmp_path):
    p = Proj(tmp_path, PETS)
    build_with(p)
    fp = lockfile.read(p.lock)["render:base"]["fingerprint"]
    (tmp_path / ".dbl/cache" / fp / "manifest.json").write_text("[]")
    result, rec, ran = build_with(p, force=("render:base",))
    assert result.ok and ran == ["render:base"], rec.events
    assert RunCache(tmp_path / ".dbl/cache").verify(fp) is not None


def test_missing_outputs_say_so_when_their_step_starts(tmp_path):
    """train:dog is planned behind its prior (whose outputs are gone too), and the plan says what the
    build finds once the prior is back with the same bytes: its missing output, not 'inputs changed'."""
    p = Proj(tmp_path, PETS)
    build_with(p)
    shutil.rmtree(tmp_path / "build/pets/priors/dog")
    shutil.rmtree(tmp_path / "build/pets/adapters/dog")
    _, rec, _ = build_with(p, dry_run=True)
    assert dict((s, r) for s, _, r in rec.planned)["train:dog"] == [
        "upstream prior:dog stale",
        "output build/pets/adapters/dog/dbl.json missing",
        "restorable from cache",
    ]
    result, rec, ran = build_with(p)
    assert ran == []
    train = next(ev for ev in result.steps if ev.id == "train:dog")
    assert train.status == "cached"
    assert train.reasons == ["output build/pets/adapters/dog/dbl.json missing"]


# --- the settings a step really ran with ------------------------------------------------------------------


def test_num_processes_from_the_command_line_is_in_the_fingerprint(tmp_path):
    p = Proj(tmp_path, PETS)
    build_with(p, num_processes=2)
    assert lockfile.read(p.lock)["train:dog"]["inputs"]["num_processes"] == 2
    _, rec, ran = build_with(p)
    assert "train:dog" in ran and "train:toy" in ran
    reasons = dict((s, r) for s, _, r in rec.planned)
    assert reasons["train:dog"][0] == "num_processes 2 -> 1"
    _, rec, ran = build_with(p, num_processes=2)
    assert ran == [] and all(status == "cached" or status == "fresh" for _, status in rec.final)


# --- 11. a prompt longer than the text encoder reads ----------------------------------------------------


@pytest.mark.parametrize("jobs", [None, 2])
def test_a_prompt_longer_than_the_text_encoder_reads_is_a_warning_with_its_token_count(tmp_path, jobs):
    """Named as the project file's warnings are, with the file and the line of the prompt, by a step in a
    worker process (-j 2) as by one in the build's own: from the file as it loaded (a line added above it
    since is not counted)."""
    pytest.importorskip("torch")
    from runner import executor
    from runner.project import load_project
    from runner.project.problems import display

    long = "a photo of a dog " * 8  # tiny-sd reads characters: 8 x 12 + start and end = 98 tokens
    path = tmp_path / "p.toml"
    path.write_text(
        f'[project]\nbase_model = "tiny-sd"\n[renders.base]\nadapter = "none"\nprompts = ["a dog", "{long}"]\nsteps = 1\n'
    )
    rec = Recorder()
    project = load_project(path)
    path.write_text("# a comment added since\n" + path.read_text())
    assert executor.build(project, executor.BuildOptions(jobs=jobs), rec).ok
    logged = [e[2] for e in rec.events if e[0] == "log" and "warning" in e[2]]
    assert logged == [
        f"warning: {display(path)}: renders.base.prompts[1]: is 98 tokens; the text encoder reads 77, so the "
        f"end is cut off: {long[-40:]!r} (line 5)"
    ]
