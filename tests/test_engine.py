"""The build engine with fake steps: staleness, the run-cache, the lockfile, failures and locking."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from runner import lockfile
from runner.events import CACHED, DONE, FAILED, FRESH, SKIPPED
from tests.conftest import write_image

ALL = ["prior:dog", "train:dog", "train:toy", "blend:mix", "render:park", "render:mixed", "render:base"]


def test_first_build_runs_every_step_in_order(proj, build, fake_steps):
    result, _ = build(proj)
    assert result.ok and result.exit_code == 0
    assert fake_steps.ran == ALL
    out = proj.root / "build" / "pets"
    assert sorted(p.name for p in (out / "renders" / "park").iterdir()) == [
        "0-0.png",
        "0-1.png",
        "1-0.png",
        "1-1.png",
    ]
    assert (out / "adapters" / "dog" / "unet" / "adapter.json").is_file()
    assert (out / "priors" / "dog" / "0001.txt").is_file()


def test_second_build_runs_nothing(proj, build, fake_steps):
    build(proj)
    lock_before = proj.lock.read_text()
    result, rec = build(proj)
    assert result.ok and fake_steps.ran == []
    assert all(status == FRESH for _, status, _ in rec.planned)
    assert proj.lock.read_text() == lock_before


def ran_after(proj, build, fake_steps, old, new):
    build(proj)
    proj.edit(old, new)
    result, rec = build(proj)
    assert result.ok
    return fake_steps.ran, rec


def test_blend_weight_reruns_the_blend_and_its_renders(proj, build, fake_steps):
    ran, rec = ran_after(proj, build, fake_steps, "dog = 1.05", "dog = 1.1")
    assert ran == ["blend:mix", "render:mixed"]
    reasons = dict((sid, r) for sid, _, r in rec.planned)
    assert reasons["blend:mix"] == ["adapters.dog 1.05 -> 1.1"]
    assert reasons["render:mixed"] == ["upstream blend:mix stale"]


def test_a_step_below_a_stale_one_says_its_own_changes_too(proj, build, fake_steps):
    """Its own change was hidden behind 'upstream ... stale' until the upstream step had run."""
    build(proj)
    proj.edit("dog = 1.05", "dog = 1.1")
    proj.edit('prompts = ["a sks dog toy"]', 'prompts = ["a sks dog toy on a shelf"]')
    result, rec = build(proj, dry_run=True)
    reasons = dict((sid, r) for sid, _, r in rec.planned)
    assert reasons["render:mixed"] == [
        "upstream blend:mix stale",
        "prompts[0] 'a sks dog toy' -> 'a sks dog toy on a shelf'",
    ]
    assert reasons["blend:mix"] == ["adapters.dog 1.05 -> 1.1"]
    proj.edit('prompts = ["a sks dog toy on a shelf"]', 'prompts = ["a sks dog toy"]')
    result, rec = build(proj, dry_run=True)  # the upstream change alone: nothing more to say
    assert dict((sid, r) for sid, _, r in rec.planned)["render:mixed"] == ["upstream blend:mix stale"]


def test_the_plan_says_what_a_restore_of_upstream_steps_leaves_to_do(proj, build, fake_steps):
    """Behind a restorable step, the plan knows the upstream outputs: a branch switched back builds
    nothing, and the plan says so, not 'upstream ... stale' alone."""
    build(proj)
    proj.edit("dog = 1.05", "dog = 1.1")
    build(proj)
    proj.edit("dog = 1.1", "dog = 1.05")  # back: both builds are in the run-cache
    _, rec = build(proj, dry_run=True)
    reasons = dict((sid, r) for sid, _, r in rec.planned)
    assert reasons["blend:mix"] == ["adapters.dog 1.1 -> 1.05", "restorable from cache"]
    assert reasons["render:mixed"] == ["upstream blend:mix stale", "restorable from cache"]
    assert build(proj)[0].ok and fake_steps.ran == []
    shutil.rmtree(proj.root / "build/pets/blends/mix")  # the blend alone: the render is up to date
    _, rec = build(proj, dry_run=True)
    reasons = dict((sid, r) for sid, _, r in rec.planned)
    assert reasons["render:mixed"] == [
        "upstream blend:mix stale",
        "up to date once its upstream steps are restored",
    ]
    result, rec = build(proj)
    assert fake_steps.ran == [] and {e.id: e.status for e in result.steps}["render:mixed"] == FRESH


def test_a_stale_upstream_step_is_said_once(proj, build, fake_steps):
    """'upstream prior:dog stale' says that its output changes: not also 'upstream prior dog changed'."""
    build(proj)
    proj.edit('class_prompt = "a photo of dog"', 'class_prompt = "a dog"')
    build(proj)
    proj.edit('class_prompt = "a dog"', 'class_prompt = "a photo of dog"')
    proj.edit("resolution = 64", "resolution = 64\nlearning_rate = 0.001")
    _, rec = build(proj, dry_run=True)
    reasons = dict((sid, r) for sid, _, r in rec.planned)
    assert reasons["train:dog"] == ["upstream prior:dog stale", "train.learning_rate 0.0001 -> 0.001"]
    proj.edit("resolution = 64\nlearning_rate = 0.001", "resolution = 64")
    _, rec = build(proj, dry_run=True)
    reasons = dict((sid, r) for sid, _, r in rec.planned)
    assert reasons["train:dog"] == ["upstream prior:dog stale", "restorable from cache"]


def test_one_prompt_reruns_that_render_only(proj, build, fake_steps):
    ran, rec = ran_after(proj, build, fake_steps, "sks dog on a beach", "sks dog on the moon")
    assert ran == ["render:park"]
    reasons = dict((sid, r) for sid, _, r in rec.planned)
    assert reasons["render:park"] == ["prompts[1] 'sks dog on a beach' -> 'sks dog on the moon'"]
    renders = proj.root / "build/pets/renders/park"
    assert (renders / "1-0.png").read_text().startswith("sks dog on the moon 0 ")
    assert (renders / "0-0.png").read_text().startswith("sks dog in a park 0 ")


def test_subject_rank_reruns_that_subject_and_dependents(proj, build, fake_steps):
    proj.edit(
        'instance_prompt = "a toy in the style of <1>"',
        'instance_prompt = "a toy in the style of <1>"\n[subjects.toy.lora]\nrank = 4',
    )
    ran, rec = ran_after(
        proj, build, fake_steps, "[subjects.toy.lora]\nrank = 4", "[subjects.toy.lora]\nrank = 8"
    )
    assert ran == ["train:toy", "blend:mix", "render:mixed"]
    reasons = dict((sid, r) for sid, _, r in rec.planned)
    assert reasons["train:toy"] == ["lora.rank 4 -> 8"]


@pytest.mark.parametrize("change", ["add", "remove", "edit"])
def test_image_changes_rerun_that_subjects_train(proj, build, fake_steps, change):
    build(proj)
    folder = proj.root / "data" / "toy"
    if change == "add":
        write_image(folder / "05.png", seed=99)
        expected = "image data/toy/05.png added"
    elif change == "remove":
        (folder / "01.png").unlink()
        expected = "image data/toy/01.png removed"
    else:
        write_image(folder / "01.png", seed=77)
        expected = "image data/toy/01.png changed"
    result, rec = build(proj)
    assert result.ok
    reasons = dict((sid, r) for sid, _, r in rec.planned)
    assert reasons["train:toy"] == [expected]
    assert fake_steps.ran[0] == "train:toy"
    assert "train:dog" not in fake_steps.ran and "render:park" not in fake_steps.ran


def test_naming_another_image_folder_says_so_and_where_a_removed_image_was(proj, build, fake_steps):
    """A removed image was named in the new folder (data/toy/02.png removed: toy never had it)."""
    build(proj)
    proj.edit('images = "data/dog"', 'images = "data/toy"')
    result, rec = build(proj)
    assert result.ok
    reasons = dict((sid, r) for sid, _, r in rec.planned)
    assert reasons["train:dog"] == [
        "images data/dog -> data/toy",
        "image data/toy/00.png changed",
        "image data/toy/01.png changed",
        "image data/dog/02.png removed",
    ]


def test_touching_a_file_changes_nothing(proj, build, fake_steps):
    build(proj)
    image = proj.root / "data" / "dog" / "00.png"
    later = time.time() + 100
    os.utime(image, (later, later))
    os.utime(proj.path, (later, later))
    result, _ = build(proj)
    assert result.ok and fake_steps.ran == []


def test_revert_restores_from_cache_without_running(proj, build, fake_steps):
    build(proj)
    park = proj.root / "build/pets/renders/park/1-1.png"
    original = park.read_bytes()
    proj.edit("sks dog on a beach", "sks dog in the snow")
    build(proj)
    assert park.read_bytes() != original
    proj.edit("sks dog in the snow", "sks dog on a beach")
    result, rec = build(proj)
    assert result.ok and fake_steps.ran == []
    assert dict((sid, r) for sid, _, r in rec.planned)["render:park"][-1] == "restorable from cache"
    assert ("end", "render:park", CACHED, "") in rec.events
    assert park.read_bytes() == original
    _, rec = build(proj)
    assert all(status == FRESH for _, status, _ in rec.planned)


def test_identical_upstream_output_stops_the_rebuild(proj, build, fake_steps):
    # The fake train output ignores train.steps: the train step reruns, its bytes do not change.
    ran, rec = ran_after(proj, build, fake_steps, "steps = 4", "steps = 5")
    assert ran == ["train:dog", "train:toy"]
    ends = {e[1]: e[2] for e in rec.events if e[0] == "end"}
    assert ends["blend:mix"] == FRESH and ends["render:park"] == FRESH


def test_missing_or_altered_output_is_restored(proj, build, fake_steps):
    build(proj)
    out = proj.root / "build/pets/adapters/dog/unet/adapter.json"
    out.write_text("tampered")
    _, rec = build(proj)
    reasons = dict((sid, r) for sid, _, r in rec.planned)
    assert reasons["train:dog"] == [
        "output build/pets/adapters/dog/unet/adapter.json differs from the lockfile's: another build's, or edited",
        "restorable from cache",
    ]
    assert fake_steps.ran == [] and out.read_text() != "tampered"
    shutil.rmtree(proj.root / "build/pets/renders")
    _, rec = build(proj)
    assert fake_steps.ran == []
    assert (proj.root / "build/pets/renders/park/0-0.png").is_file()


def test_failed_step_keeps_previous_outputs_and_lockfile(proj, build, fake_steps):
    build(proj)
    before = lockfile.read(proj.lock)
    adapter = proj.root / "build/pets/adapters/toy/unet/adapter.json"
    old = adapter.read_text()
    proj.edit("rank = 4", "rank = 6")
    fake_steps.fail = {"train:toy"}
    result, rec = build(proj)
    assert result.exit_code == 1 and not result.ok
    assert ("end", "train:toy", FAILED, "train:toy failed on purpose") in rec.events
    assert adapter.read_text() == old
    after = lockfile.read(proj.lock)
    assert after["train:toy"] == before["train:toy"]
    # train:dog ran before the failure and was recorded; nothing after the failure ran.
    assert after["train:dog"] != before["train:dog"]
    assert fake_steps.ran == ["train:dog", "train:toy"]


def test_keep_going_skips_only_dependents(proj, build, fake_steps):
    fake_steps.fail = {"train:toy"}
    result, rec = build(proj, keep_going=True)
    assert result.exit_code == 1
    assert fake_steps.ran == ["prior:dog", "train:dog", "train:toy", "render:park", "render:base"]
    final = dict(rec.final)
    assert final["blend:mix"] == SKIPPED and final["render:mixed"] == SKIPPED and final["render:park"] == DONE
    errors = {s.id: s.error for s in result.steps}
    assert errors["blend:mix"] == "upstream train:toy failed"
    assert errors["render:mixed"] == "upstream blend:mix skipped"  # not failed: it never ran


def test_only_builds_the_step_and_what_it_needs(proj, build, fake_steps):
    result, rec = build(proj, only=("render:park",))
    assert result.ok and fake_steps.ran == ["prior:dog", "train:dog", "render:park"]
    assert dict(rec.final)["render:mixed"] == SKIPPED


def test_force_reruns_ignoring_the_cache(proj, build, fake_steps):
    build(proj)
    build(proj, force=("train:dog",))
    assert fake_steps.ran == ["train:dog"]  # identical output: dependents stay fresh
    build(proj, force=())
    assert fake_steps.ran == ALL


def test_a_forced_step_starts_saying_forced_even_behind_another_forced_step(proj, build, fake_steps):
    """Behind a forced upstream its inputs are known only as it starts, and the same as recorded: it said
    `inputs changed`, which nothing had."""
    from runner import executor
    from tests.conftest import Recorder

    class Reasons(Recorder):
        def step_start(self, step):
            super().step_start(step)
            self.events.append(("reasons", step.id, list(step.reasons)))

    build(proj)
    rec = Reasons()
    assert executor.build(proj.load(), executor.BuildOptions(force=("train:toy", "blend:mix")), rec).ok
    said = {e[1]: e[2] for e in rec.events if e[0] == "reasons"}
    assert said == {"train:toy": ["forced"], "blend:mix": ["forced"]}


def test_unknown_step_id_is_a_usage_error(proj, build):
    from runner.executor import UsageError

    with pytest.raises(UsageError, match="no step 'train:cat'"):
        build(proj, only=("train:cat",))


def test_dry_run_runs_nothing(proj, build, fake_steps):
    result, rec = build(proj, dry_run=True)
    assert result.ok and fake_steps.ran == [] and not proj.lock.exists()
    assert [sid for sid, status, _ in rec.planned if status == "pending"] == ALL


def test_lockfile_is_deterministic_and_relative(proj, build):
    build(proj)
    text = proj.lock.read_text()
    assert str(proj.root) not in text
    data = lockfile.read(proj.lock)
    assert list(data) == sorted(data)
    record = data["train:dog"]
    assert record["inputs"]["lora"]["rank"] == 4
    assert set(record["outputs"]) == {
        "build/pets/adapters/dog/dbl.json",
        "build/pets/adapters/dog/unet/adapter.json",
    }
    assert text.startswith("# Written by dbl build") and "\nversion = 1\n" in text


def test_removed_step_is_dropped_from_lockfile(proj, build):
    build(proj)
    proj.edit('[renders.base]\nadapter = "none"\nprompts = ["a dog"]', "")
    build(proj)
    assert "render:base" not in lockfile.read(proj.lock)


def test_plan_and_a_dry_run_say_what_the_next_build_removes(proj, build, capsys, monkeypatch):
    """They said nothing of a step removed from the project, whose outputs the next build deletes. They name
    its folder as typed from the current folder, here the project's."""
    from runner.cli import main

    monkeypatch.chdir(proj.root)

    build(proj)
    proj.edit('[renders.base]\nadapter = "none"\nprompts = ["a dog"]', "")
    assert main(["plan", str(proj.path)]) == 0
    assert capsys.readouterr().out == (
        "all 6 steps are up to date\n"
        "1 step no longer in the project:\n"
        "  render:base  the next build removes build/pets/renders/base\n"
    )
    assert main(["plan", str(proj.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == [
        {"id": "render:base", "outputs": "build/pets/renders/base"}
    ]
    assert main(["build", str(proj.path), "--dry-run", "--no-progress"]) == 0
    assert "would remove build/pets/renders/base: render:base is no longer in the project" in (
        capsys.readouterr().out
    )
    assert (proj.root / "build" / "pets" / "renders" / "base").is_dir()  # a dry run removes nothing
    assert "render:base" in lockfile.read(proj.lock)


def test_names_are_not_fingerprinted(proj, build, fake_steps):
    build(proj)
    proj.edit("[renders.park]", "[renders.garden]")
    result, rec = build(proj)
    assert fake_steps.ran == []
    assert dict(rec.final)["render:garden"] == CACHED


def test_corrupt_lockfile_is_a_clear_error_and_deleting_it_recovers(proj, build, fake_steps):
    build(proj)
    proj.lock.write_text("version = 1\n[steps.oops\n")
    with pytest.raises(lockfile.LockfileError, match="cannot read the lockfile"):
        build(proj)
    proj.lock.unlink()
    result, _ = build(proj)
    assert result.ok and fake_steps.ran == []  # every step restored from the run-cache
    assert set(lockfile.read(proj.lock)) == set(ALL)


def test_second_build_is_refused_while_the_lock_is_held(proj, build):
    from runner.store import BuildLock, LockHeld

    with BuildLock(proj.load()), pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
        build(proj)
    result, _ = build(proj)  # released
    assert result.ok


def test_plan_json_shape(proj, build, capsys):
    from runner.cli import main

    build(proj)
    proj.edit("dog = 1.05", "dog = 0.5")
    assert main(["plan", str(proj.path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stale"] == [
        {"id": "blend:mix", "kind": "blend", "reasons": ["adapters.dog 1.05 -> 0.5"]},
        {"id": "render:mixed", "kind": "render", "reasons": ["upstream blend:mix stale"]},
    ]
    assert data["fresh"] == ["prior:dog", "train:dog", "train:toy", "render:park", "render:base"]
    assert data["removed"] == []


def test_prior_loss_weight_reruns_train_not_prior(proj, build, fake_steps):
    ran, rec = ran_after(proj, build, fake_steps, "num_images = 2", "num_images = 2\nloss_weight = 0.5")
    assert ran == ["train:dog"]
    reasons = dict((sid, r) for sid, _, r in rec.planned)
    assert reasons["train:dog"] == ["prior.loss_weight 1.0 -> 0.5"]


def test_a_prior_whose_count_alone_changed_is_given_its_previous_images(proj, build, fake_steps):
    previous = proj.root / "build" / "pets" / "priors" / "dog"
    ran_after(proj, build, fake_steps, "num_images = 2", "num_images = 3")
    assert fake_steps.earlier["prior:dog"] == previous
    build(proj, force=("prior:dog",))
    assert fake_steps.earlier["prior:dog"] is None
    (previous / "0000.txt").write_text("edited")
    proj.edit("num_images = 3", "num_images = 1")
    build(proj)
    assert fake_steps.earlier["prior:dog"] is None  # not as the lockfile says
    proj.edit("num_images = 1", "num_images = 2\nsteps = 3")
    build(proj)
    assert fake_steps.earlier["prior:dog"] is None  # other images


def test_added_seed_is_explained(proj, build, fake_steps):
    ran, rec = ran_after(proj, build, fake_steps, "seeds = [0, 1]", "seeds = [0, 1, 7]")
    assert ran == ["render:park"]
    assert dict((sid, r) for sid, _, r in rec.planned)["render:park"] == ["seeds 2 -> 3 items (added 7)"]
    proj.edit("seeds = [0, 1, 7]", "seeds = [5]")
    result, rec = build(proj)
    assert result.ok
    assert dict((sid, r) for sid, _, r in rec.planned)["render:park"] == [
        "seeds 3 -> 1 item (added 5; removed 0, 1, 7)"
    ]


def test_an_eval_names_its_changed_render_not_the_render_s_hash():
    from runner.reasons import explain

    old = {"render": {"_name": "base", "output": "a" * 64}, "identifier": "sks"}
    assert explain(old, {**old, "render": {"_name": "base", "output": "b" * 64}}) == [
        "upstream render base changed"
    ]
    assert explain(old, {**old, "render": {"_name": "park", "output": "b" * 64}}) == ["render base -> park"]


def test_a_blend_names_its_changed_parent_as_a_render_names_its_adapter():
    """'upstream adapter dog changed' for a blend's parent, as for a render's adapter: not 'upstream dog
    changed', which does not say what dog is."""
    from runner.reasons import explain

    old = {"adapters": [{"_name": "dog", "weight": 1.0, "output": "a" * 64}], "method": "cat"}
    new = {**old, "adapters": [{"_name": "dog", "weight": 1.0, "output": "b" * 64}]}
    assert explain(old, new) == ["upstream adapter dog changed"]
    render = {"adapter": {"_name": "dog", "output": "a" * 64}}
    assert explain(render, {"adapter": {"_name": "dog", "output": "b" * 64}}) == [
        "upstream adapter dog changed"
    ]


def test_a_renamed_step_is_restorable_not_never_built(proj, build, fake_steps):
    """A render renamed: no lockfile record has its new id, but its inputs were built."""
    ran, rec = ran_after(proj, build, fake_steps, "[renders.park]", "[renders.lawn]")
    assert ran == []
    reasons = dict((sid, r) for sid, _, r in rec.planned)
    assert reasons["render:lawn"] == ["not in the lockfile", "restorable from cache"]


def test_another_base_model_is_one_line_not_its_family_s_inputs_too():
    """SDXL -> SD 1.x: the base model's line says it; the family and its training version follow it and
    are not said again under their internal names."""
    from runner.reasons import explain

    sdxl = {"base_model": {"builtin": "tiny-sdxl", "family": "sdxl"}, "family_training": 2, "seed": 0}
    sd1 = {"base_model": {"builtin": "tiny-sd", "_family": "sd1"}, "seed": 0}
    assert explain(sdxl, sd1) == ["base_model.builtin 'tiny-sdxl' -> 'tiny-sd'"]
    assert explain(sd1, sdxl) == ["base_model.builtin 'tiny-sd' -> 'tiny-sdxl'"]
    # A fix that gives other bytes, alone: said in words.
    assert explain({**sdxl, "family_training": 1}, sdxl) == ["dbl trains this model family differently now"]
