"""The plain display: timestamped lines, for logs and for terminals that are not one."""

from __future__ import annotations

import re
import time
from pathlib import Path

from runner.events import FAILED, INTERRUPTED, PENDING, RUNNING, SKIPPED, StepEvent
from runner.ui import make_reporter
from runner.ui.live import LiveReporter
from runner.ui.plain import PlainReporter, fmt_duration
from tests.ui_fixtures import all_fresh, plan_steps, recording_console, run_build

TIME = r"\d\d:\d\d:\d\d "


class Clock:
    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def plain_lines(verbosity: int = 0, fail: bool = False) -> list[str]:
    lines: list[str] = []
    clock = Clock()

    def tick():
        clock.now += 1

    reporter = PlainReporter(verbosity=verbosity, write=lines.append, clock=clock)
    run_build(reporter, fail=fail, progress_hook=tick)
    for line in lines:
        assert re.match(TIME, line), line
    return [line[9:] for line in lines]


def test_plain_lines_tell_the_build_in_order():
    lines = plain_lines()
    assert lines[0] == "pets: 3 of 4 steps to run"
    assert lines[1] == "train:dog    start (lora.rank 16 -> 8)"
    progress = [line for line in lines if line.startswith("train:dog    step ")]
    # throttled: one line per tenth of the run, not one per event
    assert len(progress) == 10
    assert progress[0] == "train:dog    step 80/800 (10%)  loss 0.2420"
    assert "step 480/800 (60%)  loss 0.2020  " in progress[5] and "it/s  eta " in progress[5]
    assert "train:dog    done in 5m01s -> build/pets/adapters/dog" in lines
    assert "blend:mix    restored from cache -> build/pets/blends/mix" in lines
    assert "render:park  done in 3.5s -> build/pets/renders/park" in lines
    assert lines[-1] == "pets: built in 5m20s: 2 ran, 1 from cache, 1 up to date"
    assert not any("saved checkpoint" in line for line in lines)


def progress_lines(step_id: str, done: int, total: int) -> list[str]:
    """The plain lines of one step that reports steps 1 .. `done` of `total`, a second apart."""
    lines: list[str] = []
    clock = Clock()
    reporter = PlainReporter(write=lines.append, clock=clock)
    kind, name = step_id.split(":")
    step = StepEvent(step_id, kind, name, PENDING)
    reporter.plan("pets", [step])
    reporter.step_start(step)
    for n in range(1, done + 1):
        step.done, step.total = n, total
        clock.now += 1
        reporter.step_progress(step)
    return lines


def test_plain_progress_also_every_thirty_seconds():
    lines = progress_lines("train:dog", 39, 10_000)  # never a tenth of the run, but 39 s
    progress = [line for line in lines if " step " in line]
    assert len(progress) == 1 and "step 30/10000 (0%)" in progress[0] and "1 it/s" in progress[0]


def test_a_rate_is_measured_from_when_the_count_begins_to_move():
    """A prior says 0 of 8 as it copies the given images, loads its model, says 0 of 8 again and draws 4
    images in 2 s: 2 img/s, not 4 images over the model's load as well."""
    from runner.ui.plain import RateMeter

    clock = Clock()
    meter = RateMeter(clock)
    step = StepEvent("prior:dog", "prior", "dog", PENDING, total=8)
    seen = []
    for now, done in ((0, 0), (30, 0), (32, 4), (34, 8)):
        clock.now, step.done = now, done
        seen.append(meter.update(step))
    assert seen == [None, None, 2.0, 2.0]


def test_every_kinds_rate_names_what_it_counts():
    """'images 2/4 (50%)  1 img/s', not '1 /s': a rate says its unit, whatever the step kind; a blend counts
    its three stages (parents loaded, merged, saved), of unequal length: no rate, no eta."""
    from runner import steps

    rates = {kind.name: kind.unit[1] for kind in steps.kinds()}
    assert rates.pop("blend") == ""
    assert all(rate.endswith("/s") and len(rate) > 2 for rate in rates.values()), rates
    lines = progress_lines("render:park", 2, 4)
    assert lines[-1].endswith("render:park  images 2/4 (50%)  1 img/s  eta 2.0s"), lines
    lines = progress_lines("blend:mix", 2, 3)
    assert lines[-1].endswith("blend:mix  stage 2/3 (66%)"), lines


def test_plain_failure_and_quiet_mode():
    lines = plain_lines(fail=True)
    assert "train:dog    FAILED after 12s: CUDA out of memory" in lines
    assert "             lower train.batch_size or turn on gradient_checkpointing" in lines
    assert "blend:mix    skipped (upstream train:dog failed)" in lines
    assert lines[-1] == "pets: FAILED in 5m20s: train:dog; 1 up to date, 1 failed, 2 skipped"

    quiet = plain_lines(verbosity=-1, fail=True)
    assert quiet == [
        "train:dog    FAILED after 12s: CUDA out of memory",
        "             lower train.batch_size or turn on gradient_checkpointing",
        "pets: FAILED in 5m20s: train:dog; 1 up to date, 1 failed, 2 skipped",
    ]
    assert plain_lines(verbosity=-1) == ["pets: built in 5m20s: 2 ran, 1 from cache, 1 up to date"]


def test_a_failure_without_a_duration_is_timed_by_the_display():
    lines: list[str] = []
    clock = Clock()
    plain = PlainReporter(write=lines.append, clock=clock)
    console = recording_console()
    live = LiveReporter(console=console)
    steps = plan_steps()
    for reporter in (plain, live):
        reporter.plan("pets", steps)
        reporter.step_start(steps[1])
    clock.now += 75
    time.sleep(0.05)
    steps[1].status, steps[1].error = FAILED, "boom"
    for reporter in (plain, live):
        reporter.step_end(steps[1])
        reporter.finish(steps, 80)
        reporter.close()
    assert lines[-2].endswith("train:dog    FAILED after 1m15s: boom")
    assert re.search(r"train:dog\s+failed\s+0\.\ds\s+boom", console.export_text())


def test_files_below_the_working_folder_are_named_relative_to_it_as_outputs_are(tmp_path, monkeypatch):
    """A step names its files absolutely (`/home/u/p/dog/a.png: the file is empty`) where the build's
    lines name outputs relative to the working folder (`-> build/p/adapters/dog`): both as typed here."""
    from runner.ui.plain import fmt_paths_in

    monkeypatch.chdir(tmp_path)
    here = str(Path.cwd())
    assert fmt_paths_in(f"{here}/dog/a.png: empty; caption '{here}/c d.txt' ({here}/x)") == (
        "dog/a.png: empty; caption 'c d.txt' (x)"
    )
    for kept in (f"/elsewhere{here}/a.png", f"{here}-other/a.png", here, f"word{here}/a", "no path at all"):
        assert fmt_paths_in(kept) == kept

    lines: list[str] = []
    plain = PlainReporter(write=lines.append, verbosity=1)
    console = recording_console()
    live = LiveReporter(console=console, verbosity=1)
    steps = plan_steps()
    for reporter in (plain, live):
        reporter.plan("pets", steps)
        reporter.step_start(steps[1])
        reporter.log(steps[1], f"warning: {here}/dog/tiny.jpg: 1x1 pixels is small")
    steps[1].status, steps[1].error = FAILED, f"{here}/dog/empty.png: the file is empty (0 bytes)"
    for reporter in (plain, live):
        reporter.step_end(steps[1])
        reporter.finish(steps, 1)
        reporter.close()
    assert any(line.endswith("train:dog    warning: dog/tiny.jpg: 1x1 pixels is small") for line in lines), (
        lines
    )
    assert any(
        line.endswith("train:dog    FAILED after 0.0s: dog/empty.png: the file is empty (0 bytes)")
        for line in lines
    ), lines
    shown = console.export_text()
    assert (
        "dog/tiny.jpg: 1x1" in shown and "dog/empty.png: the file is empty" in shown and here not in shown
    ), shown
    assert steps[1].error.startswith(here)  # the event itself, which a script reads, keeps the whole path


def test_plain_verbose_lists_the_plan_and_log_messages():
    lines = plain_lines(verbosity=1)
    assert "prior:dog    fresh" in lines
    assert "blend:mix    pending (upstream train:dog stale)" in lines
    assert "train:dog    saved checkpoint-800" in lines


def test_plain_shows_the_steps_warnings_unless_quiet():
    warning = "train:dog    warning: caption 01.txt is empty; the instance prompt is used"
    assert warning in plain_lines(verbosity=0) and warning in plain_lines(verbosity=1)
    assert "train:dog    saved checkpoint-800" not in plain_lines(verbosity=0)
    assert not any("warning" in line for line in plain_lines(verbosity=-1))


def test_plain_says_nothing_stale_in_one_line():
    for verbosity in (-1, 0, 1):
        lines: list[str] = []
        reporter = PlainReporter(verbosity=verbosity, write=lines.append)
        reporter.plan("pets", all_fresh())
        reporter.log(None, "all 3 steps are up to date")
        reporter.finish(all_fresh(), 0.01)
        reporter.close()
        assert [line[9:] for line in lines] == ["all 3 steps are up to date"]


def test_plain_dry_run_and_interruption():
    lines: list[str] = []
    reporter = PlainReporter(write=lines.append)
    steps = plan_steps()
    reporter.plan("pets", steps)
    reporter.finish(steps, 0.1)
    assert [line[9:] for line in lines[1:]] == [  # why each would run, as the live table and plan say
        "train:dog    would run (lora.rank 16 -> 8)",
        "blend:mix    would run (upstream train:dog stale)",
        "render:park  would run (renders.park.prompts changed)",
        "pets: dry run: 3 steps would run: train:dog, blend:mix, render:park",
    ]
    lines.clear()

    steps = plan_steps()
    reporter.plan("pets", steps)
    steps[1].status = RUNNING
    reporter.step_start(steps[1])
    steps[1].status, steps[1].duration_s = INTERRUPTED, 40
    steps[1].error = "interrupted"  # a KeyboardInterrupt, which says nothing
    reporter.step_end(steps[1])
    for s in steps[2:]:
        s.status = SKIPPED
    reporter.finish(steps, 41)
    assert lines[-2].endswith("train:dog    interrupted after 40s")
    assert lines[-1].endswith("pets: interrupted after 41s; 1 up to date, 1 interrupted, 2 skipped")
    # what the step said as it stopped, less its id: what the next build does with it
    steps[1].error = "train:dog stopped after step 12 of 20; it resumes from there"
    reporter.step_end(steps[1])
    assert lines[-1].endswith(
        "train:dog    interrupted after 40s (stopped after step 12 of 20; it resumes from there)"
    )


def test_plain_through_make_reporter_off_a_terminal(capsys):
    reporter = make_reporter("auto", 0)  # pytest's captured stdout is no terminal
    assert isinstance(reporter, PlainReporter)
    run_build(reporter)
    out = capsys.readouterr().out
    assert "\x1b[" not in out
    assert re.search(TIME + r"pets: built in 5m20s", out)


def test_durations():
    assert [fmt_duration(s) for s in (0.04, 3.5, 12, 59.6, 303, 7500)] == [
        "0.0s",
        "3.5s",
        "12s",
        "1m00s",
        "5m03s",
        "2h05m",
    ]
