"""Snapshots: `save_steps` keeps a subject's adapter at earlier steps as adapters of their own
(`dog@2`), equal to what a run of that many steps writes; the final adapter does not depend on them."""

from __future__ import annotations

import textwrap

import pytest

from runner import executor, lockfile
from runner.project import load_project
from tests.conftest import Recorder, write_image
from tests.folders import folder_bytes

pytestmark = pytest.mark.torch

PROJECT = """
[project]
base_model = "tiny-sd"

[train]
resolution = 64
steps = 6
checkpoint_every = 0
random_flip = true
{train}

[lora]
rank = 4
alpha = 8
text_encoder_rank = 2
text_encoder_alpha = 3

[priors.dog]
class_prompt = "a photo of dog"
num_images = 2
steps = 2

[subjects.dog]
images = "dog"
instance_prompt = "a photo of sks dog"
prior = "dog"
{subject}
"""


def write(folder, train="", subject=""):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        write_image(folder / "dog" / f"{i}.png", seed=i, size=64)
    path = folder / "p.toml"
    path.write_text(textwrap.dedent(PROJECT.format(train=train, subject=subject)))
    return path


def build(path, **options):
    rec = Recorder()
    result = executor.build(load_project(path), executor.BuildOptions(**options), rec)
    assert result.ok, rec.events
    return {e.id: e for e in result.steps}, [e[2] for e in rec.events if e[0] == "log"]


RENDER = """
[renders.pick]
adapters = ["dog@2", "dog@4", "dog"]
prompts = ["a photo of sks dog"]
steps = 2
"""


def test_a_snapshot_is_the_adapter_of_a_run_of_that_many_steps(tmp_path):
    path = write(tmp_path / "p", train="save_steps = [2, 4]")
    path.write_text(path.read_text() + RENDER)
    events, logs = build(path)
    # The render compares the snapshots with the finished adapter: one grid column each.
    renders = tmp_path / "p" / "build" / "p" / "renders" / "pick"
    assert events["render:pick"].status == "done"
    assert [f.parent.name for f in sorted(renders.glob("*/*.png"))] == ["dog", "dog@2", "dog@4"]
    columns = [__import__("PIL.Image").Image.open(f).tobytes() for f in sorted(renders.glob("*/*.png"))]
    assert len(set(columns)) == 3
    assert events["train:dog"].status == "done"
    assert events["snapshot:dog@2"].status == "cached" and events["snapshot:dog@4"].status == "cached"
    assert "kept snapshot:dog@2 in the run-cache" in logs
    adapters = tmp_path / "p" / "build" / "p" / "adapters"
    assert (adapters / "dog@4" / "dog@4.safetensors").is_file()

    # A 4-step run of the same subject writes the very bytes of dog@4 (its kohya file named after it).
    short = write(tmp_path / "short", train="steps = 4")
    short.write_text(short.read_text().replace("steps = 6\n", ""))
    build(short)
    four = folder_bytes(tmp_path / "short" / "build" / "p" / "adapters" / "dog")
    snapshot = folder_bytes(adapters / "dog@4")
    snapshot["dog.safetensors"] = snapshot.pop("dog@4.safetensors")
    assert snapshot == four
    assert folder_bytes(adapters / "dog@2") != snapshot

    # The final adapter does not depend on save_steps: a project without them has the same bytes
    # and the same fingerprint.
    plain = write(tmp_path / "plain")
    build(plain)
    assert folder_bytes(tmp_path / "plain" / "build" / "p" / "adapters" / "dog") == folder_bytes(
        adapters / "dog"
    )
    assert (
        lockfile.read(plain.with_suffix(".lock"))["train:dog"]["fingerprint"]
        == lockfile.read(path.with_suffix(".lock"))["train:dog"]["fingerprint"]
    )


def test_adding_a_save_step_to_a_built_subject_trains_only_the_snapshot(tmp_path):
    path = write(tmp_path, train="")
    build(path)
    path.write_text(
        path.read_text().replace("checkpoint_every = 0\n", "checkpoint_every = 0\nsave_steps = [3]\n")
    )
    events, logs = build(path)
    assert events["train:dog"].status == "fresh"  # the subject is not trained again
    assert events["snapshot:dog@3"].status == "done"
    assert events["snapshot:dog@3"].metrics["steps"] == 3
    info = (tmp_path / "build" / "p" / "adapters" / "dog@3" / "dbl.json").read_text()
    assert '"steps": 3' in info and len(__import__("json").loads(info)["log"]["instance_loss"]) == 3
    # Removing it removes the snapshot's outputs; the subject stays fresh.
    path.write_text(path.read_text().replace("save_steps = [3]\n", ""))
    events, _ = build(path)
    assert "snapshot:dog@3" not in events and not (tmp_path / "build" / "p" / "adapters" / "dog@3").exists()
    assert events["train:dog"].status == "fresh"


def test_with_a_schedule_of_the_whole_run_a_snapshot_is_that_runs_step(tmp_path):
    path = write(tmp_path, train='save_steps = [3]\nlr_scheduler = "cosine"')
    events, _ = build(path)
    assert events["snapshot:dog@3"].status == "cached"
    kept = folder_bytes(tmp_path / "build" / "p" / "adapters" / "dog@3")
    # Built by itself (the cache emptied), the snapshot trains 3 steps of the 6-step schedule: same bytes.
    import shutil

    shutil.rmtree(tmp_path / ".dbl" / "cache")
    events, _ = build(path, force={"snapshot:dog@3"})
    assert events["snapshot:dog@3"].status == "done"
    assert folder_bytes(tmp_path / "build" / "p" / "adapters" / "dog@3") == kept
    info = __import__("json").loads(kept["dbl.json"])
    assert info["snapshot_at"] == 3 and info["steps"] == 6 and len(info["log"]["lr"]) == 3


def test_tensorboard_logs_hold_every_step_and_change_no_output(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = write(tmp_path / "p", train='log = "tensorboard"')
    events, logs = build(path)
    folder = tmp_path / "p" / "build" / "p" / "logs" / "dog"
    assert f"TensorBoard logs in {folder}" in logs
    acc = EventAccumulator(str(folder))
    acc.Reload()
    for tag in ("loss", "instance_loss", "prior_loss", "lr", "step_time_s"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3, 4, 5, 6], tag
    info = __import__("json").loads(
        (tmp_path / "p" / "build" / "p" / "adapters" / "dog" / "dbl.json").read_text()
    )
    logged = [e.value for e in acc.Scalars("instance_loss")]  # float32 in the event file
    assert logged == pytest.approx(info["log"]["instance_loss"], rel=1e-5)
    # Not an input: without it, nothing is stale.
    path.write_text(path.read_text().replace('log = "tensorboard"', ""))
    from runner import executor as ex

    _, planned = ex.Workspace(load_project(path)).plan()
    assert not [p.id for p in planned if p.stale]


def test_a_render_of_a_snapshot_that_is_not_saved_is_a_project_file_error(tmp_path):
    from runner.project.load import ProjectError

    path = write(tmp_path, train="save_steps = [2]")
    path.write_text(path.read_text() + RENDER)
    with pytest.raises(ProjectError) as err:
        load_project(path)
    assert (
        "renders.pick.adapters: 'dog@4' is not a subject, snapshot or blend (line 30) - add 4 to the "
        "save_steps of dog; subjects: dog; snapshots: dog@2; or 'none'"
    ) in str(err.value)


def test_an_empty_save_steps_turns_off_the_snapshots_of_train_for_one_subject(tmp_path):
    """[train] save_steps = [2], and one subject of 2 steps: its inherited save step is its last, an error,
    and `save_steps = []`, the way to turn it off, was refused as 'must not be empty'."""
    path = write(tmp_path, train="save_steps = [2]")
    write_image(tmp_path / "cat" / "0.png", size=64)
    cat = '\n[subjects.cat]\nimages = "cat"\ninstance_prompt = "a photo of sks cat"\ntrain = { steps = 2, %s }\n'
    path.write_text(path.read_text() + cat % "save_steps = []")
    project = load_project(path)
    assert project.tables["train"]["cat"].train.save_steps is None  # as if [train] had none
    assert list(project.tables["snapshot"]) == ["dog@2"]
    path.write_text(path.read_text().replace("save_steps = []", "random_flip = true"))
    with pytest.raises(Exception, match=r"save_steps: step 2 is not before the last step \(subjects.cat"):
        load_project(path)  # what it would be without the key
