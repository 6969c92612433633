"""The build displays: a live rich table on terminals, plain timestamped lines elsewhere."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

from rich.console import Console

from runner.events import CACHED, DONE, FAILED, FRESH, INTERRUPTED, PENDING, RUNNING, SKIPPED, StepEvent
from runner.ui import make_reporter
from runner.ui.live import LiveReporter
from runner.ui.plain import PlainReporter, fmt_duration

TIME = r"\d\d:\d\d:\d\d "


def plan_steps() -> list[StepEvent]:
    return [
        StepEvent("prior:dog", "prior", "dog", FRESH),
        StepEvent("train:dog", "train", "dog", PENDING, ["lora.rank 16 -> 8"]),
        StepEvent("blend:mix", "blend", "mix", PENDING, ["upstream train:dog stale"]),
        StepEvent("render:park", "render", "park", PENDING, ["renders.park.prompts changed"]),
    ]


def run_build(reporter, *, fail: bool = False, progress_hook=None) -> list[StepEvent]:
    """Drive a reporter the way the executor does: plan, then each step, then finish."""
    steps = plan_steps()
    reporter.plan("pets", steps)
    train = steps[1]
    train.status = RUNNING
    reporter.step_start(train)
    for done in range(0, 801, 20):
        train.done, train.total = done, 800
        train.metrics["loss"] = 0.25 - done / 10_000
        reporter.step_progress(train)
        if progress_hook and done == 400:
            progress_hook()
    reporter.log(train, "saved checkpoint-800")
    reporter.log(train, "warning: caption 01.txt is empty; the instance prompt is used")
    if fail:
        train.status, train.duration_s = FAILED, 12.0
        train.error = "CUDA out of memory\nlower train.batch_size or turn on gradient_checkpointing"
        reporter.step_end(train)
        for s in steps[2:]:
            s.status, s.error = SKIPPED, "upstream train:dog failed"
            reporter.step_end(s)
    else:
        train.status, train.duration_s, train.outputs = DONE, 301.0, Path("build/pets/adapters/dog")
        reporter.step_end(train)
        blend = steps[2]
        blend.status = RUNNING
        reporter.step_start(blend)
        blend.status, blend.outputs = CACHED, Path("build/pets/blends/mix")
        reporter.step_end(blend)
        render = steps[3]
        render.status = RUNNING
        reporter.step_start(render)
        render.done, render.total = 3, 4
        reporter.step_progress(render)
        render.status, render.duration_s, render.outputs = DONE, 3.5, Path("build/pets/renders/park")
        reporter.step_end(render)
    reporter.finish(steps, 320.0)
    reporter.close()
    return steps


def all_fresh() -> list[StepEvent]:
    return [
        StepEvent(i, i.split(":")[0], i.split(":")[1], FRESH)
        for i in ("prior:dog", "train:dog", "render:park")
    ]


def recording_console() -> Console:
    return Console(record=True, width=100, force_terminal=True)


# --- choosing a display ------------------------------------------------------------------------------


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


# --- live display ------------------------------------------------------------------------------------


def test_live_display_shows_statuses_reasons_progress_and_summary():
    console = recording_console()
    reporter = LiveReporter(console=console, refresh_per_second=1000)
    shown = []
    run_build(reporter, progress_hook=lambda: shown.append(_text(reporter.renderable())))

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
    text = _text(reporter.renderable())
    reporter.close()
    assert re.search(r"render:park\s+running\s+━+.*images 3/8", text)


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
    text = _text(reporter.renderable())
    reporter.close()
    assert re.search(r"train:dog\s+pending", text)


# --- plain lines -------------------------------------------------------------------------------------


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
    assert progress[0] == "train:dog    step 80/800 (10%)  loss 0.242"
    assert "step 480/800 (60%)  loss 0.202  " in progress[5] and "it/s  eta " in progress[5]
    assert "train:dog    done in 5m01s -> build/pets/adapters/dog" in lines
    assert "blend:mix    restored from cache -> build/pets/blends/mix" in lines
    assert "render:park  done in 3.5s -> build/pets/renders/park" in lines
    assert lines[-1] == "pets: built in 5m20s: 2 ran, 1 from cache, 1 up to date"
    assert not any("saved checkpoint" in line for line in lines)


def test_plain_progress_also_every_thirty_seconds():
    lines: list[str] = []
    clock = Clock()
    reporter = PlainReporter(write=lines.append, clock=clock)
    step = StepEvent("train:dog", "train", "dog", PENDING)
    reporter.plan("pets", [step])
    reporter.step_start(step)
    for done in range(1, 40):  # 40 of 10_000 steps: never a tenth, but 39 s
        step.done, step.total = done, 10_000
        clock.now += 1
        reporter.step_progress(step)
    progress = [line for line in lines if " step " in line]
    assert len(progress) == 1 and "step 30/10000 (0%)" in progress[0] and "1 it/s" in progress[0]


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
    reporter.step_end(steps[1])
    for s in steps[2:]:
        s.status = SKIPPED
    reporter.finish(steps, 41)
    assert lines[-2].endswith("train:dog    interrupted after 40s")
    assert lines[-1].endswith("pets: interrupted after 41s; 1 up to date, 1 interrupted, 2 skipped")


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


def _text(renderable) -> str:
    console = Console(record=True, width=100, force_terminal=True)
    console.print(renderable)
    return console.export_text()


# --- steps at once (-j) -----------------------------------------------------------------------------------


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
    text = _text(reporter.renderable())
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
