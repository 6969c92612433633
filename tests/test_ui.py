"""The build displays: which one a build gets, and what they show of several steps at once and of a plan
too wide or too tall for the terminal."""

from __future__ import annotations

import io
import re
from pathlib import Path

from rich.console import Console

from runner.events import DONE, FAILED, FRESH, PENDING, RUNNING, SKIPPED, StepEvent
from runner.ui import make_reporter
from runner.ui.live import LiveReporter
from runner.ui.plain import PlainReporter
from tests.ui_fixtures import recording_console, text_of


def test_make_reporter_picks_live_on_a_terminal_and_plain_elsewhere():
    assert isinstance(make_reporter("auto", 0, console=recording_console()), LiveReporter)
    assert isinstance(make_reporter("auto", 0, console=Console(file=io.StringIO())), PlainReporter)
    assert isinstance(make_reporter("plain", 0, console=recording_console()), PlainReporter)
    assert isinstance(make_reporter("live", 0, console=Console(file=io.StringIO())), LiveReporter)


def test_make_reporter_rejects_an_unknown_mode():
    try:
        make_reporter("fancy", 0)
    except ValueError as exc:
        assert "auto, live, plain" in str(exc)
    else:
        raise AssertionError("no error")


def _two_running(reporter) -> list[StepEvent]:
    steps = [
        StepEvent("train:dog", "train", "dog", PENDING, device="cuda:0"),
        StepEvent("train:toy", "train", "toy", PENDING, device="cuda:1"),
    ]
    reporter.plan("pets", steps)
    for s, done in zip(steps, (100, 300), strict=True):
        s.status = RUNNING
        reporter.step_start(s)
        s.done, s.total = done, 800
        reporter.step_progress(s)
    return steps


def test_live_display_gives_each_running_step_its_bar_and_device():
    reporter = LiveReporter(console=recording_console(), refresh_per_second=1000)
    steps = _two_running(reporter)
    text = text_of(reporter.renderable())
    assert re.search(r"train:dog @cuda:0\s+running\s+━+.*step 100/800", text)
    assert re.search(r"train:toy @cuda:1\s+running\s+━+.*step 300/800", text)
    for s in steps:
        s.status, s.duration_s = DONE, 2.0
        reporter.step_end(s)
    reporter.finish(steps, 3.0)
    out = reporter.console.export_text()
    summary = out[out.rindex("step ") :]
    assert re.search(r"train:dog\s+done\s+2\.0s\s+cuda:0", summary)
    assert re.search(r"train:toy\s+done\s+2\.0s\s+cuda:1", summary)


def test_plain_lines_of_steps_at_once_name_the_step_and_its_device():
    lines: list[str] = []
    reporter = PlainReporter(write=lines.append)
    steps = _two_running(reporter)
    steps[0].status, steps[0].duration_s = DONE, 2.0
    reporter.step_end(steps[0])
    text = [line[9:] for line in lines]
    assert "train:dog  start on cuda:0" in text
    assert "train:toy  start on cuda:1" in text
    assert any(line.startswith("train:toy  step ") for line in text)
    assert "train:dog  done in 2.0s on cuda:0" in text


def test_the_final_line_counts_in_the_singular_and_says_when_nothing_was_built():
    from runner.ui.plain import final_text

    one = [
        StepEvent("train:dog", "train", "dog", status=PENDING),
        StepEvent("prior:dog", "prior", "dog", FRESH),
    ]
    assert final_text("pets", one, 0.0, dry_run=True) == "pets: dry run: 1 step would run: train:dog"
    only_fresh = [
        StepEvent("train:dog", "train", "dog", FRESH),
        StepEvent("blend:mix", "blend", "mix", SKIPPED),
    ]
    assert (
        final_text("pets", only_fresh, 0.0, dry_run=False)
        == "pets: nothing to build: 1 up to date, 1 skipped"
    )


def test_on_a_narrow_terminal_a_long_step_id_gives_way_to_the_status_and_time():
    console = Console(record=True, width=40, force_terminal=True)
    reporter = LiveReporter(console=console, refresh_per_second=1000)
    long = "render:a_very_long_render_name_for_the_park"
    steps = [
        StepEvent("train:dog", "train", "dog", PENDING, ["lora.rank 16 -> 8"]),
        StepEvent(long, "render", long[7:], PENDING, ["never built"]),
        StepEvent("train:cat", "train", "cat", PENDING, ["never built"]),
        StepEvent("prior:dog", "prior", "dog", FRESH),
    ]
    reporter.plan("pets", steps)
    for s in steps[:2]:
        s.status, s.device = RUNNING, "cpu"
        reporter.step_start(s)
    steps[0].done, steps[0].total = 3, 10
    reporter.step_progress(steps[0])
    live = Console(record=True, width=40, force_terminal=True)
    live.print(reporter.renderable())
    steps[0].status, steps[0].duration_s, steps[0].outputs = DONE, 3.0, Path("build/pets/adapters/dog")
    steps[1].status, steps[1].duration_s, steps[1].error = FAILED, 2.0, "ImageError: data/x.png: not an image"
    steps[2].status, steps[2].error = SKIPPED, "upstream train:x failed"
    for s in steps[:3]:
        reporter.step_end(s)
    reporter.finish(steps, 5.0)

    rows = live.export_text().splitlines()[1:]
    assert len(rows) == 4 and all(len(row) <= 40 for row in rows), rows
    for row, status in zip(rows, ("running", "running", "pending", "fresh"), strict=True):
        assert re.search(rf"^\S [^ ]+( @\S+)? +{status} ", row), row
    assert re.search(r"\d\.\ds$", rows[0]), rows[0]  # its time
    out = console.export_text()
    summary = re.sub(r"\s+", " ", out[out.rindex("step ") :])
    for status in ("done 3.0s cpu build", "failed 2.0s cpu Image", "skipped upstream", "fresh"):
        assert status in summary, summary


def test_a_plan_taller_than_the_terminal_keeps_its_running_steps_in_view():
    """rich cut the bottom off a table taller than the terminal: the running steps of a long plan with
    them."""
    console = Console(record=True, width=80, height=12, force_terminal=True)
    reporter = LiveReporter(console=console, refresh_per_second=1000)
    steps = [StepEvent(f"train:s{i:02}", "train", f"s{i:02}", PENDING, ["never built"]) for i in range(30)]
    reporter.plan("many", steps)
    for s in steps[:20]:
        s.status, s.duration_s = DONE, 1.0
        reporter.step_end(s)
    for s in steps[20:22]:
        s.status = RUNNING
        reporter.step_start(s)
    view = Console(record=True, width=80, height=12, force_terminal=True)
    view.print(reporter.renderable())
    lines = view.export_text().splitlines()
    reporter.close()
    assert len(lines) <= 12, lines
    shown = [line.split()[1] for line in lines[1:-1]]
    assert shown == [f"train:s{i}" for i in range(20, 29)], lines  # the running, then the next to run
    assert lines[-1].strip() == "... and 21 more steps: 20 done, 1 pending", lines[-1]
