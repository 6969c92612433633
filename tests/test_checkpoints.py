"""Train checkpoints that cannot be trusted: a damaged one is skipped with one message, a full disk is
named, and neither leaves a half-written folder or fails every later build."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from runner.errors import StepError, StepInterrupted
from tests.folders import folder_bytes
from tests.steps_fixtures import draw_images, make_subject, run_train, stop_at, train_context

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def instance(tmp_path_factory):
    return draw_images(tmp_path_factory.mktemp("images") / "dog", 3, size=(64, 64))


@pytest.fixture(scope="module")
def subject(instance):
    return make_subject(instance, train=dict(steps=4, train_text_encoder=False))


@pytest.fixture(scope="module")
def whole(tmp_path_factory, subject):
    """The bytes of an uninterrupted run."""
    ctx = train_context(tmp_path_factory.mktemp("whole"), subject)
    run_train(ctx)
    return folder_bytes(ctx.out)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _without_digests(state: Path) -> None:
    data = json.loads(state.read_text())
    del data["sha256"]
    state.write_text(json.dumps(data))


DAMAGE = {
    "truncated weights": lambda f: _truncate(f / "lora.safetensors"),
    "bad state.json": lambda f: (f / "state.json").write_text("{not json"),
    "empty state.json": lambda f: (f / "state.json").write_text("{}"),
    # A checkpoint from before the digests: the damage is found when loading.
    "truncated training state, no digests": lambda f: (
        _without_digests(f / "state.json"),
        _truncate(f / "training_state.pt"),
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_reported_once_and_the_run_starts_over(tmp_path, subject, whole, damage):
    first = train_context(tmp_path, subject, should_stop=stop_at(2))
    with pytest.raises(StepInterrupted):
        run_train(first)
    folder = first.work / "checkpoint-2"
    assert json.loads((folder / "state.json").read_text())["sha256"].keys() == {
        "lora.safetensors",
        "training_state.pt",
    }
    DAMAGE[damage](folder)

    logs = []
    again = train_context(tmp_path, subject, log=logs.append)
    metrics = run_train(again)
    reports = [line for line in logs if "damaged" in line]
    assert len(reports) == 1 and str(folder) in reports[0], logs
    assert metrics["resumed_from"] is None
    assert folder_bytes(again.out) == whole
    assert not folder.exists()  # reported once: the next build does not meet it again


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, subject, whole):
    first = train_context(tmp_path, subject, should_stop=stop_at(2))
    with pytest.raises(StepInterrupted):
        run_train(first)
    shutil.copytree(first.work / "checkpoint-2", tmp_path / "kept")
    second = train_context(tmp_path, subject, should_stop=stop_at(1))
    with pytest.raises(StepInterrupted, match="after step 3"):
        run_train(second)
    shutil.copytree(tmp_path / "kept", first.work / "checkpoint-2")  # as if the cleanup had not run
    _truncate(first.work / "checkpoint-3" / "lora.safetensors")

    logs = []
    metrics = run_train(train_context(tmp_path, subject, log=logs.append))
    assert [line for line in logs if "damaged" in line] == [
        f"damaged checkpoint {first.work / 'checkpoint-3'}: lora.safetensors does not match its sha256 in "
        "state.json (truncated or altered); skipping it"
    ]
    assert "resuming from checkpoint-2" in logs
    assert metrics["resumed_from"] == 2


def test_a_full_disk_while_checkpointing_is_named_and_leaves_no_partial_folder(
    tmp_path, subject, monkeypatch
):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to see which file a write goes to")
    real_write = os.write
    raised = []

    def full_disk(fd, data):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if ".checkpoint-" not in target or ".tmp-" not in target:
            return real_write(fd, data)
        if not raised and len(data) > 64:
            raised.append(None)  # the first write to the checkpoint fits in part
            return real_write(fd, bytes(data[:64]))
        error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target)
        raised.append(error)
        raise error

    monkeypatch.setattr(os, "write", full_disk)
    ctx = train_context(
        tmp_path,
        make_subject(subject.images, train=dict(steps=2, checkpoint_every=1, train_text_encoder=False)),
    )
    with pytest.raises(StepError, match="no space left on device") as caught:
        run_train(ctx)
    monkeypatch.undo()
    assert any(
        isinstance(e, OSError) and e.errno == errno.ENOSPC for e in raised
    )  # the fault really happened
    assert str(ctx.work) in str(caught.value)
    assert not list(ctx.work.glob(".checkpoint-*")) and not list(ctx.work.glob("checkpoint-*"))
    # The disk has room again: the next build trains from the start and succeeds.
    assert (
        run_train(
            train_context(
                tmp_path, make_subject(subject.images, train=dict(steps=2, train_text_encoder=False))
            )
        )["steps"]
        == 2
    )


def test_a_snapshot_that_trains_by_itself_names_itself_when_it_stops(tmp_path, instance):
    """Its run is the snapshot step's, to the snapshot's step (here 3 of a 4-step cosine schedule), not
    the subject's train step: the message that says where it stopped (the build report shows it) names it."""
    import dataclasses

    from runner.steps import snapshot

    subject = make_subject(
        instance, train=dict(steps=4, lr_scheduler="cosine", save_steps=[3], train_text_encoder=False)
    )
    ctx = dataclasses.replace(
        train_context(tmp_path, subject, should_stop=stop_at(1)),
        step_id="snapshot:dog@3",
        kind="snapshot",
        name="dog@3",
        spec=snapshot.Snapshot("dog@3", subject, 3),
    )
    with pytest.raises(StepInterrupted) as stopped:
        snapshot.run(ctx)
    assert str(stopped.value) == "snapshot:dog@3 stopped after step 1 of 3; it resumes from there"
