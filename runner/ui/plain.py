"""Plain log lines for CI logs and pipes: one timestamped line per event, progress throttled.

    12:03:00 pets: 2 of 5 steps to run
    12:03:00 train:dog   start (lora.rank 16 -> 8)
    12:03:31 train:dog   step 80/800 (10%)  loss 0.1234  2.6 it/s  eta 4m37s
    12:08:01 train:dog   done in 5m01s -> build/pets/adapters/dog
    12:08:09 pets: built in 5m09s: 2 ran, 3 up to date

No rich here: the formatting helpers below are shared with the live display.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Sized
from pathlib import Path

from runner.events import (
    CACHED,
    DONE,
    FAILED,
    FRESH,
    INTERRUPTED,
    PENDING,
    RUNNING,
    SKIPPED,
    StepEvent,
    shown,
)
from runner.reasons import Naming

# A progress line every this fraction of a step, or after this many seconds without one.
PROGRESS_FRACTION = 0.1
PROGRESS_INTERVAL_S = 30.0

# Metric names a step may use for its own speed; otherwise the display measures it.
RATE_KEYS = ("it/s", "it_s", "its", "rate", "images/s", "img_s")


# --- formatting shared with the live display ---------------------------------------------------------


def fmt_duration(seconds: float) -> str:
    """'0.4s', '12s', '5m03s', '2h05m'."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def fmt_path(path: Path | str | None) -> str:
    """A path relative to the working folder when it lies below it, else as given. Through the links it
    names where it can (a linked folder of photos is named by its link, as the project file names it),
    else through the folders they lead to (a working folder reached through a link)."""
    if path is None:
        return ""
    p = Path(path)
    try:
        return Path(os.path.abspath(p)).relative_to(os.getcwd()).as_posix()
    except (ValueError, OSError):
        pass
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except (ValueError, OSError):
        return str(p)


_PATH_START = r"(?<![\w.~/\\-])"  # where a path may begin: not inside a word or another path


def fmt_paths_in(text: str) -> str:
    """`text` with the absolute paths in it that lie below the working folder written relative to it, as
    `fmt_path` writes an output folder: a step names its files absolutely (it may run in a worker of
    another folder), and a build's lines name them as the user would type them here."""
    if not text or os.sep not in text:
        return text
    try:
        bases = {os.getcwd(), str(Path.cwd().resolve())}
    except OSError:  # the working folder was removed
        return text
    for base in sorted(bases, key=len, reverse=True):
        prefix = base.rstrip(os.sep) + os.sep
        if prefix != os.sep:
            text = re.sub(_PATH_START + re.escape(prefix), "", text)
    return text


def unit_of(step: StepEvent) -> tuple[str, str]:
    """What a step's progress counts, as its kind says: ('step', 'it/s') for training ..."""
    from runner import steps

    try:
        return steps.get(step.kind).unit
    except KeyError:
        return "images", "img/s"


def metrics_text(step: StepEvent, rate: float | None) -> str:
    """'loss 0.1234  2.6 it/s  eta 4m37s' from the step's metrics and a measured rate."""
    parts = []
    m = step.metrics or {}
    if isinstance(m.get("loss"), (int, float)):
        parts.append(f"loss {m['loss']:#.4g}")
    if isinstance(m.get("lr"), (int, float)):
        parts.append(f"lr {m['lr']:.2g}")
    given = next((m[k] for k in RATE_KEYS if isinstance(m.get(k), (int, float))), None)
    rate = given if given is not None else rate
    if rate and unit_of(step)[1]:
        parts.append(f"{rate:.3g} {unit_of(step)[1]}")
        if step.total and step.done < step.total:
            parts.append(f"eta {fmt_duration((step.total - step.done) / rate)}")
    return "  ".join(parts)


def said_here(reason: str) -> str:
    """A reason as said to the user: the files it names (a `reasons.Naming`) as `fmt_path` names them, relative
    to the working folder, like the other paths of a build's lines; it records them relative to the project
    file."""
    if isinstance(reason, Naming):
        return reason.template.format(*(fmt_path(Path(reason.base) / path) for path in reason.paths))
    return reason


def reason_text(step) -> str:
    """The reasons of a step (a StepEvent or a planned step) as said to the user."""
    return "; ".join(map(said_here, step.reasons))


def stop_text(step: StepEvent) -> str:
    """What an interrupted step said as it stopped, less its id (`stopped after step 12 of 20; it resumes
    from there`); '' where it said nothing of its own."""
    said = first_line(fmt_paths_in(step.error or "")).removeprefix(f"{step.id} ")
    return "" if said == "interrupted" else said


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


class RateMeter:
    """Measures each step's progress speed from the progress events themselves, from the last event before
    its count first moved: a step that says its count before it loads a model (a prior, after copying the
    given class images) and again as its work begins is measured from the second."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._start: dict[str, tuple[float, int]] = {}

    def update(self, step: StepEvent) -> float | None:
        now = self._clock()
        t0, done0 = self._start.setdefault(step.id, (now, step.done))
        if step.done <= done0:
            self._start[step.id] = (now, done0)  # not begun yet: the work starts from here
            return None
        if now - t0 < 1e-6:
            return None
        return (step.done - done0) / (now - t0)

    def forget(self, step_id: str) -> None:
        self._start.pop(step_id, None)


def counts_text(steps: list[StepEvent]) -> str:
    """'2 ran, 1 from cache, 3 up to date, 1 failed, 2 skipped' (zero counts left out)."""
    labels = [
        (DONE, "ran"),
        (CACHED, "from cache"),
        (FRESH, "up to date"),
        (FAILED, "failed"),
        (INTERRUPTED, "interrupted"),
        (SKIPPED, "skipped"),
        (PENDING, "not run"),
        (RUNNING, "still running"),
    ]
    parts = []
    for status, label in labels:
        n = sum(1 for s in steps if s.status == status)
        if n:
            parts.append(f"{n} {label}")
    return ", ".join(parts) or "no steps"


def up_to_date_text(steps: Sized) -> str:
    """What a build or a plan with nothing stale says; `steps`: the project's steps."""
    if not steps:
        return "nothing to build: the project defines no steps"
    return f"all {len(steps)} steps are up to date" if len(steps) != 1 else "the one step is up to date"


def final_text(project_name: str, steps: list[StepEvent], duration_s: float, dry_run: bool) -> str:
    """The build's last line: what happened, in one line."""
    failed = [s.id for s in steps if s.status == FAILED]
    took = fmt_duration(duration_s)
    if failed:
        return f"{project_name}: FAILED in {took}: {', '.join(failed)}; {counts_text(steps)}"
    if any(s.status == INTERRUPTED for s in steps):
        return f"{project_name}: interrupted after {took}; {counts_text(steps)}"
    if dry_run:
        todo = [s.id for s in steps if s.status == PENDING]
        return f"{project_name}: dry run: {_count(len(todo), 'step')} would run: {', '.join(todo)}"
    if not any(s.status in (DONE, CACHED) for s in steps):  # --only of fresh steps: nothing happened
        return f"{project_name}: nothing to build: {counts_text(steps)}"
    return f"{project_name}: built in {took}: {counts_text(steps)}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def is_dry_run(steps: list[StepEvent]) -> bool:
    """A build that ended with steps still pending and none run, failed or interrupted ran nothing on purpose."""
    ran = {DONE, CACHED, FAILED, INTERRUPTED, RUNNING}
    return any(s.status == PENDING for s in steps) and not any(s.status in ran for s in steps)


# --- the reporter ------------------------------------------------------------------------------------


class PlainReporter:
    """Writes one line per event. verbosity -1: failures and the final line; 0: also the steps' warnings;
    1: also their other log messages."""

    def __init__(
        self,
        verbosity: int = 0,
        write: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        progress_fraction: float = PROGRESS_FRACTION,
        progress_interval_s: float = PROGRESS_INTERVAL_S,
    ):
        self.verbosity = verbosity
        self._write = write or _stdout_line
        self._clock = clock
        self._fraction = progress_fraction
        self._interval = progress_interval_s
        self._rates = RateMeter(clock)
        self._project = "build"
        self._width = 0
        self._last_progress: dict[str, tuple[float, int]] = {}  # step id -> (time, fraction bucket)
        self._started: dict[str, float] = {}  # step id -> when it started
        self._up_to_date_line = ""

    # Reporter protocol

    def plan(self, project_name: str, steps: list[StepEvent]) -> None:
        self._project = project_name
        self._width = max((len(s.id) for s in steps), default=0)
        if all(s.status == FRESH for s in steps):
            self._up_to_date_line = up_to_date_text(steps)
            self._line(self._up_to_date_line)
            return
        todo = [s for s in steps if s.status == PENDING]
        if self.verbosity >= 0:
            self._line(f"{project_name}: {len(todo)} of {len(steps)} steps to run")
        if self.verbosity >= 1:
            for s in steps:
                self._line(f"{self._id(s)}{s.status}" + (f" ({reason_text(s)})" if s.reasons else ""))

    def step_start(self, step: StepEvent) -> None:
        self._started[step.id] = self._clock()
        self._rates.forget(step.id)
        self._last_progress[step.id] = (self._clock(), 0)
        if self.verbosity >= 0:
            reasons = f" ({reason_text(step)})" if step.reasons else ""
            on = f" on {step.device}" if step.device else ""
            self._line(f"{self._id(step)}start{on}{reasons}")

    def step_progress(self, step: StepEvent) -> None:
        rate = self._rates.update(step)
        if self.verbosity < 0:
            return
        now = self._clock()
        last_t, last_bucket = self._last_progress.get(step.id, (now, 0))
        parts = max(1, round(1 / self._fraction))
        bucket = step.done * parts // step.total if step.total else 0
        if bucket <= last_bucket and now - last_t < self._interval:
            return
        self._last_progress[step.id] = (now, max(bucket, last_bucket))
        unit = unit_of(step)[0]
        count = (
            f"{step.done}/{step.total} ({100 * step.done // step.total}%)" if step.total else f"{step.done}"
        )
        extra = metrics_text(step, rate)
        self._line(f"{self._id(step)}{unit} {count}" + (f"  {extra}" if extra else ""))

    def log(self, step: StepEvent | None, message: str) -> None:
        if step is None:
            # The executor may say "all N steps are up to date" itself; the plan already did.
            if message.strip() == self._up_to_date_line or self.verbosity < 0:
                return
            for line in message.rstrip().splitlines():
                self._line(line)
        elif shown(message, self.verbosity):
            for line in fmt_paths_in(message).rstrip().splitlines():
                self._line(f"{self._id(step)}{line}")

    def step_end(self, step: StepEvent) -> None:
        self._rates.forget(step.id)
        # A step that failed or was interrupted may come without its duration: measure it here.
        seconds = step.duration_s or (
            self._clock() - self._started[step.id] if step.id in self._started else 0.0
        )
        took = fmt_duration(seconds)
        out = f" -> {fmt_path(step.outputs)}" if step.outputs else ""
        reasons = f" ({reason_text(step)})" if step.reasons and step.id not in self._started else ""
        if step.status == FAILED:
            lines = fmt_paths_in(step.error).strip().splitlines() or ["(no message)"]
            self._line(f"{self._id(step)}FAILED after {took}: {lines[0]}")
            for line in lines[1:]:
                self._line(f"{' ' * (self._width + 2)}{line}")
            return
        if self.verbosity < 0:
            return
        if step.status == DONE:
            text = f"done in {took}" + (f" on {step.device}" if step.device else "") + out
        elif step.status == CACHED:
            text = f"restored from cache{reasons}{out}"
        elif step.status == SKIPPED:
            why = first_line(fmt_paths_in(step.error)) or reason_text(step)
            text = "skipped" + (f" ({why})" if why else "")
        elif step.status == INTERRUPTED:
            said = stop_text(step)
            text = f"interrupted after {took}" + (f" ({said})" if said else "")
        else:
            text = f"{step.status}{reasons}{out}"
        self._line(f"{self._id(step)}{text}")

    def finish(self, steps: list[StepEvent], duration_s: float) -> None:
        if self._up_to_date_line and all(s.status == FRESH for s in steps):
            return  # the plan said it in one line
        dry_run = is_dry_run(steps)
        if dry_run and self.verbosity == 0:  # why each would run (-v said it with the plan)
            for s in steps:
                if s.status == PENDING:
                    self._line(f"{self._id(s)}would run" + (f" ({reason_text(s)})" if s.reasons else ""))
        self._line(final_text(self._project, steps, duration_s, dry_run))

    def close(self) -> None:
        pass

    # helpers

    def _id(self, step: StepEvent) -> str:
        return step.id.ljust(max(self._width, len(step.id))) + "  "

    def _line(self, text: str) -> None:
        self._write(f"{time.strftime('%H:%M:%S', time.localtime(self._clock()))} {text}")


def _stdout_line(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
