"""What the live build display costs in CPU: per redraw, and per second while a long step runs.

    python bench/live_bench.py [--seconds 5] [--json]

The display draws on an in-memory terminal (120 x 50). First, for plans of 10, 100 and 400 steps (a
quarter done, one training, the rest pending), the CPU time of one redraw as rich's refresh thread
makes it, after a progress event and with nothing new (the training step running for a minute, so
its time changes once a second), and, for 100 and 400 steps, one redraw while the steps are restored
from the run-cache one by one (a step restored between two redraws). Then, for a 351-step plan, the
CPU time the display takes per second of a long train step that reports progress once and ten times a
second (rich's own refresh thread redrawing eight times a second meanwhile), against the same loop
with no display.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

from runner.events import CACHED, DONE, PENDING, RUNNING, StepEvent  # noqa: E402
from runner.ui.live import LiveReporter  # noqa: E402


def plan(n: int) -> list[StepEvent]:
    return [
        StepEvent(f"render:r{i:03}", "render", f"r{i:03}", PENDING, ["never built"]) for i in range(n - 1)
    ] + [StepEvent("train:dog", "train", "dog", PENDING, ["never built"])]


def started(n: int, refresh_per_second: float) -> tuple[LiveReporter, StepEvent]:
    """A reporter drawing a plan of n steps: a quarter done, train:dog running at step 100 of 800."""
    console = Console(file=io.StringIO(), force_terminal=True, width=120, height=50)
    reporter = LiveReporter(console=console, refresh_per_second=refresh_per_second)
    steps = plan(n)
    reporter.plan("bench", steps)
    for s in steps[: n // 4]:
        s.status, s.duration_s, s.outputs = DONE, 1.0, Path(f"build/bench/renders/{s.name}")
        reporter.step_end(s)
    train = steps[-1]
    train.status = RUNNING
    reporter.step_start(train)
    train.done, train.total, train.metrics = 100, 800, {"loss": 0.12}
    reporter.step_progress(train)
    return reporter, train


def frame_ms(n: int, event: bool, frames: int = 50) -> float:
    """One redraw of a step running for a minute: after a progress event, or with nothing new."""
    reporter, train = started(n, refresh_per_second=0.01)  # rich's thread stays asleep: the redraws are ours
    reporter._started_at[train.id] -= 60
    t0 = time.process_time()
    for _ in range(frames):
        if event:
            train.done += 1
            reporter.step_progress(train)
        reporter._live.refresh()
    ms = (time.process_time() - t0) / frames * 1000
    reporter.close()
    return ms


def restore_frame_ms(n: int, frames: int = 50) -> float:
    """One redraw while a plan of n steps is restored from the run-cache: a step restored between two."""
    console = Console(file=io.StringIO(), force_terminal=True, width=120, height=50)
    reporter = LiveReporter(console=console, refresh_per_second=0.01)
    steps = plan(n)
    reporter.plan("bench", steps)
    t0 = time.process_time()
    for s in steps[:frames]:
        s.status = RUNNING
        reporter.step_start(s)
        s.status, s.duration_s, s.outputs = CACHED, 0.01, Path(f"build/bench/renders/{s.name}")
        reporter.step_end(s)
        reporter._live.refresh()
    ms = (time.process_time() - t0) / frames * 1000
    reporter.close()
    return ms


def cpu_per_second(seconds: float, display: bool, per_second: float) -> float:
    """CPU seconds per second of a train step running for a minute, reporting progress `per_second`."""
    if display:
        reporter, train = started(351, refresh_per_second=8)
        reporter._started_at[train.id] -= 60
    else:
        reporter, train = None, StepEvent("t", "train", "t", RUNNING)
    t0, c0 = time.monotonic(), time.process_time()
    while time.monotonic() - t0 < seconds:
        time.sleep(1 / per_second)
        train.done = min(train.done + 1, train.total or 800)
        if reporter:
            reporter.step_progress(train)
    used = (time.process_time() - c0) / (time.monotonic() - t0)
    if reporter:
        reporter.close()
    return used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = {}
    for n in (10, 100, 400):
        figures[f"redraw_ms_{n}_steps_after_event"] = round(frame_ms(n, event=True), 2)
        figures[f"redraw_ms_{n}_steps_nothing_new"] = round(frame_ms(n, event=False), 2)
    for n in (100, 400):
        figures[f"redraw_ms_{n}_steps_restoring"] = round(restore_frame_ms(n), 2)
    for per_second in (1, 10):
        figures[f"cpu_per_s_no_display_{per_second}_it_s"] = round(
            cpu_per_second(args.seconds, display=False, per_second=per_second), 4
        )
        figures[f"cpu_per_s_live_351_steps_{per_second}_it_s"] = round(
            cpu_per_second(args.seconds, display=True, per_second=per_second), 4
        )
    if args.json:
        print(json.dumps(figures))
        return
    for name, value in figures.items():
        print(f"{name:40} {value}")


if __name__ == "__main__":
    main()
