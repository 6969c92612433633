"""The live display: a rich table on terminals, redrawn only when what it shows changes."""

from __future__ import annotations

import io
import re
from pathlib import Path

from rich.console import Console

from runner.events import CACHED, FAILED, INTERRUPTED, PENDING, RUNNING, StepEvent
from runner.ui.live import LiveReporter
from tests.ui_fixtures import all_fresh, plan_steps, recording_console, run_build, text_of


def test_live_display_shows_statuses_reasons_progress_and_summary():
    console = recording_console()
    reporter = LiveReporter(console=console, refresh_per_second=1000)
    shown = []
    run_build(reporter, progress_hook=lambda: shown.append(text_of(reporter.renderable())))

    mid = shown[0]
    assert "pets: 3 of 4 steps to run" in mid
    assert re.search(r"prior:dog\s+fresh", mid)
    assert re.search(r"train:dog\s+running\s+━+.*step 400/800\s+loss 0\.21", mid)
    assert re.search(r"blend:mix\s+pending\s+upstream train:dog stale", mid)
    assert re.search(r"render:park\s+pending\s+renders\.park\.prompts changed", mid)

    out = console.export_text()
    summary = out[out.rindex("step ") :]
    assert re.search(r"train:dog\s+done\s+5m01s\s+build/pets/adapters/dog", summary)
    assert re.search(r"blend:mix\s+cached\s+build/pets/blends/mix", summary)
    assert re.search(r"render:park\s+done\s+3\.5s\s+build/pets/renders/park", summary)
    assert re.search(r"prior:dog\s+fresh", summary)
    assert summary.strip().splitlines()[-1] == "pets: built in 5m20s: 2 ran, 1 from cache, 1 up to date"


def test_live_display_shows_images_of_a_render():
    reporter = LiveReporter(console=recording_console())
    steps = plan_steps()
    reporter.plan("pets", steps)
    render = steps[3]
    render.status = RUNNING
    reporter.step_start(render)
    render.done, render.total = 3, 8
    reporter.step_progress(render)
    text = text_of(reporter.renderable())
    reporter.close()
    assert re.search(r"render:park\s+running\s+━+.*images 3/8", text)


def test_live_display_says_what_an_interrupted_step_said_as_it_stopped():
    """In the table and in the summary: what the next build does with the interrupted step's work."""
    console = recording_console()
    reporter = LiveReporter(console=console)
    steps = plan_steps()
    reporter.plan("pets", steps)
    render = steps[3]
    render.status = RUNNING
    reporter.step_start(render)
    render.status, render.duration_s = INTERRUPTED, 9.6
    render.error = "render:park stopped after 14 of 16 images; the next build keeps them and draws the rest"
    reporter.step_end(render)
    said = "stopped after 14 of 16 images; the next build keeps them"  # the rest cut or folded
    assert re.search(r"render:park\s+interrupted\s+" + re.escape(said), text_of(reporter.renderable()))
    reporter.finish(steps, 10)
    reporter.close()
    out = console.export_text()
    assert re.search(r"render:park\s+interrupted\s+9\.6s\s+" + re.escape(said), out[out.rindex("step ") :])


def test_live_display_reports_a_failure_with_its_whole_message():
    console = recording_console()
    run_build(LiveReporter(console=console), fail=True)
    out = console.export_text()
    assert "train:dog failed after 12s" in out
    assert "lower train.batch_size or turn on gradient_checkpointing" in out
    assert re.search(r"blend:mix\s+skipped\s+upstream train:dog failed", out)
    assert (
        out.strip().splitlines()[-1] == "pets: FAILED in 5m20s: train:dog; 1 up to date, 1 failed, 2 skipped"
    )


def test_live_display_says_nothing_stale_in_one_line():
    console = recording_console()
    reporter = LiveReporter(console=console)
    steps = all_fresh()
    reporter.plan("pets", steps)
    reporter.log(None, "all 3 steps are up to date")  # whether or not the executor says it too
    reporter.finish(steps, 0.01)
    reporter.close()
    assert console.export_text().strip().splitlines() == ["all 3 steps are up to date"]


def test_live_quiet_shows_only_failures_and_the_final_line():
    console = recording_console()
    run_build(LiveReporter(verbosity=-1, console=console), fail=True)
    out = console.export_text()
    assert "train:dog failed after 12s" in out
    assert "CUDA out of memory" in out
    assert "prior:dog" not in out and "saved checkpoint" not in out and "step 400" not in out
    assert out.strip().splitlines()[-1].startswith("pets: FAILED")


def test_live_verbose_adds_the_steps_log_messages_and_only_quiet_hides_their_warnings():
    quiet, default, verbose = recording_console(), recording_console(), recording_console()
    run_build(LiveReporter(verbosity=-1, console=quiet))
    run_build(LiveReporter(verbosity=0, console=default))
    run_build(LiveReporter(verbosity=1, console=verbose))
    quiet, default, verbose = (c.export_text() for c in (quiet, default, verbose))  # export clears
    assert "saved checkpoint-800" not in default
    assert "train:dog  saved checkpoint-800" in verbose
    warning = "train:dog  warning: caption 01.txt is empty"
    assert warning in default and warning in verbose
    assert "warning" not in quiet


def _count_event_redraws(monkeypatch) -> list:
    """A list that gains an item each time the live display redraws from an event (the main thread), not
    from rich's refresh thread."""
    import threading

    from rich.live import Live

    redraws = []
    refresh = Live.refresh

    def counted(live):
        if threading.current_thread() is threading.main_thread():
            redraws.append(1)
        refresh(live)

    monkeypatch.setattr(Live, "refresh", counted)
    return redraws


def test_live_display_does_not_redraw_after_each_of_many_quick_steps(monkeypatch):
    # A redraw takes tens of milliseconds: a few hundred steps restored from the run-cache in a second
    # must not wait for a few hundred redraws (rich's own thread keeps redrawing meanwhile).
    redraws = _count_event_redraws(monkeypatch)
    steps = [StepEvent(f"render:r{i}", "render", f"r{i}", PENDING) for i in range(200)]
    reporter = LiveReporter(console=recording_console(), refresh_per_second=0.5)
    reporter.plan("pets", steps)
    for s in steps:
        s.status = RUNNING
        reporter.step_start(s)
        s.status = CACHED
        reporter.step_end(s)
    reporter.finish(steps, 1.0)
    assert len(redraws) < 10


def test_live_display_lays_the_table_out_again_only_when_what_it_shows_changes(monkeypatch):
    # Laying out the table took tens of milliseconds eight times a second, on a CPU that may be training:
    # with nothing new, the redraws only turn the spinner.
    from types import SimpleNamespace

    from runner.ui import live

    clock = [1000.0]
    monkeypatch.setattr(live, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    layouts = []
    rows_that_fit = live._rows_that_fit

    def counted(*args):  # once a layout
        layouts.append(1)
        return rows_that_fit(*args)

    monkeypatch.setattr(live, "_rows_that_fit", counted)
    screen = Console(record=True, width=100, force_terminal=True, get_time=lambda: clock[0])
    # rich's own redraws wait 100 s: the test makes its own.
    reporter = LiveReporter(console=recording_console(), refresh_per_second=0.01)
    steps = plan_steps()
    reporter.plan("pets", steps)
    steps[1].status = RUNNING
    reporter.step_start(steps[1])
    clock[0] += 60
    layouts.clear()
    steps[1].done, steps[1].total = 100, 800
    reporter.step_progress(steps[1])

    def frames(n: int) -> list[str]:
        shown = []
        for _ in range(n):
            clock[0] += 0.01
            screen.print(reporter.renderable())
            shown.append(screen.export_text().splitlines()[2])
        return shown

    rows = frames(20)
    assert len(layouts) == 1
    assert len({row[0] for row in rows}) > 1, rows  # the spinner turns
    assert {row[1:] for row in rows} == {rows[0][1:]}, rows
    assert re.search(r"train:dog +running +━+.*step 100/800 +1m00s", rows[0]), rows[0]
    steps[1].done = 101
    reporter.step_progress(steps[1])
    assert "step 101/800" in frames(5)[-1] and len(layouts) == 2
    clock[0] += 1  # its time shows a second more
    assert frames(5)[-1].endswith("1m01s") and len(layouts) == 3
    reporter.close()


def test_an_event_redraws_nothing_just_after_rich_drew_a_frame(monkeypatch):
    # rich's thread redraws refresh_per_second times a second; an event redrawing between its frames
    # laid the table out twice as often.
    redraws = _count_event_redraws(monkeypatch)
    steps = plan_steps()
    reporter = LiveReporter(console=recording_console(), refresh_per_second=1)
    reporter.plan("pets", steps)
    Console(file=io.StringIO(), width=100).print(reporter.renderable())  # a frame, as rich's thread draws it
    steps[1].status = RUNNING
    reporter.step_start(steps[1])
    assert not redraws
    reporter.close()


def test_live_display_lays_out_again_only_the_rows_an_event_changed(monkeypatch):
    # A build restoring hundreds of steps from the run-cache changes a row or two an event; laying out
    # every row each redraw cost more CPU than the restores.
    from rich.text import Text

    steps = [StepEvent(f"render:r{i:02}", "render", f"r{i:02}", PENDING, ["never built"]) for i in range(10)]
    reporter = LiveReporter(console=recording_console(), refresh_per_second=0.01)
    reporter.plan("pets", steps)
    screen = Console(record=True, width=100, force_terminal=True)
    screen.print(reporter.renderable())
    drawn = []
    render = Text.__rich_console__

    def counted(text, console, options):
        drawn.append(text.plain)
        return render(text, console, options)

    monkeypatch.setattr(Text, "__rich_console__", counted)
    steps[0].status, steps[0].outputs = CACHED, Path("out/r00")  # no wider than the rest: same widths
    reporter.step_end(steps[0])
    screen.print(reporter.renderable())
    reporter.close()
    assert "render:r00" in drawn and "render:r01" not in drawn, drawn


def test_live_table_rows_laid_out_one_by_one_are_the_tables():
    from rich.text import Text

    from runner.ui import live

    def cut(text: str, style: str = "") -> Text:
        return Text(text, style=style, no_wrap=True, overflow="ellipsis")

    rows = [
        (
            Text("✓", style="blue"),
            cut("render:r00-a-long-name"),
            Text("cached", style="blue"),
            cut("build/x"),
            cut(""),
        ),
        (
            Text("✗", style="red"),
            cut("train:dog"),
            Text("failed", style="red"),
            cut("CUDA out of memory"),
            cut("12s"),
        ),
        (
            Text("·"),
            cut("render:park"),
            Text("pending"),
            cut("never built; renders.park.prompts changed"),
            cut(""),
        ),
    ]
    for width in (12, 20, 33, 60, 120):
        console = Console(width=width, force_terminal=True, color_system="truecolor")
        table = live._grid()
        for cells in rows:
            table.add_row(*cells)
        whole = console.render_lines(table, console.options, pad=False)
        assert live._RowLines()(console, console.options, rows) == whole, width


def test_live_table_rows_are_the_tables_with_a_rich_that_measures_otherwise(monkeypatch):
    """The rows are laid out one by one at the widths of rich's private Table._calculate_column_widths;
    a rich without it lays out the whole table each time."""
    from rich.text import Text

    from runner.ui import live

    assert live._column_widths(live._grid(), Console(), Console().options)  # this rich: rows one by one
    assert live._column_widths(object(), Console(), Console().options) is None
    monkeypatch.setattr(live, "_column_widths", lambda *args: None)
    rows = [(Text("✓"), Text("train:dog"), Text("cached"), Text("build/x"), Text(""))]
    console = Console(width=60, force_terminal=True)
    table = live._grid()
    table.add_row(*rows[0])
    assert live._RowLines()(console, console.options, rows) == console.render_lines(table, pad=False)


def test_live_display_keeps_its_own_copy_of_events():
    reporter = LiveReporter(console=recording_console())
    steps = plan_steps()
    reporter.plan("pets", steps)
    steps[1].status = FAILED  # the executor's object changes; the display changes on events only
    text = text_of(reporter.renderable())
    reporter.close()
    assert re.search(r"train:dog\s+pending", text)
