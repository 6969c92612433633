"""The terminal display: a live table of the plan while it builds, a summary table when it ends.

    pets: 2 of 5 steps to run
      ✓ prior:dog     fresh
      ⠹ train:dog     running  ━━━━━━╸━━━━━━━━━━  120/800  loss 0.123  2.6 it/s  eta 4m21s   46s
      · render:park   pending  upstream train:dog stale

Events may come from any thread; the table is redrawn by rich's refresh thread from a snapshot
taken under a lock. Laying the table out takes tens of milliseconds, eight times a second, on a CPU
that may be training: so the lines laid out are kept and laid out again only when what they show has
changed (an event, the width or height of the terminal, a running step's time), and only the spinners
are drawn into them afresh. Even then, only the rows that changed are laid out again (see _RowLines).
"""

from __future__ import annotations

import threading
import time
from collections import Counter

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.segment import Segment
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

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
from runner.ui.plain import (
    RateMeter,
    _count,
    final_text,
    first_line,
    fmt_duration,
    fmt_path,
    fmt_paths_in,
    is_dry_run,
    metrics_text,
    reason_text,
    stop_text,
    unit_of,
    up_to_date_text,
)

STYLES = {
    PENDING: ("·", "dim"),
    RUNNING: ("", "cyan"),
    DONE: ("✓", "green"),
    CACHED: ("✓", "blue"),
    FRESH: ("✓", "dim green"),
    SKIPPED: ("-", "yellow"),
    FAILED: ("✗", "bold red"),
    INTERRUPTED: ("!", "magenta"),
}


class LiveReporter:
    """rich Live display. verbosity -1: no table, only failures and the final line; 1: also log messages."""

    def __init__(self, verbosity: int = 0, console: Console | None = None, refresh_per_second: float = 8):
        self.verbosity = verbosity
        self.console = console or Console()
        self._refresh_per_second = refresh_per_second
        self._lock = threading.RLock()
        self._live: Live | None = None
        self._project = "build"
        self._todo = 0
        self._steps: dict[str, StepEvent] = {}
        self._started_at: dict[str, float] = {}
        self._rates = RateMeter()
        self._rate: dict[str, float | None] = {}
        self._spinners: dict[str, Spinner] = {}
        self._up_to_date_line = ""
        self._last_refresh = 0.0  # when a frame was last drawn, by rich's thread or by an event
        self._version = 0  # counts the events that change the table
        self._laid_out: tuple | None = None  # (what it shows, its lines, {line: running step id})
        self._rows = _RowLines()

    # Reporter protocol

    def plan(self, project_name: str, steps: list[StepEvent]) -> None:
        with self._lock:
            self._project = project_name
            self._steps = {s.id: _copy(s) for s in steps}
            self._todo = sum(1 for s in steps if s.status == PENDING)
            self._version += 1
        if all(s.status == FRESH for s in steps):
            self._up_to_date_line = up_to_date_text(steps)
            self.console.print(self._up_to_date_line, style="green", highlight=False)
            return
        if self.verbosity < 0:
            return
        self._live = Live(
            console=self.console,
            get_renderable=self.renderable,
            refresh_per_second=self._refresh_per_second,
            transient=True,
        )
        self._live.start()

    def step_start(self, step: StepEvent) -> None:
        with self._lock:
            self._steps[step.id] = _copy(step, status=RUNNING)
            self._started_at[step.id] = time.monotonic()
            self._rates.forget(step.id)
            self._rate[step.id] = None
            self._spinners[step.id] = Spinner("dots", style="cyan")
            self._version += 1
        self._refresh_due()

    def step_progress(self, step: StepEvent) -> None:
        with self._lock:
            first = self._rate.get(step.id) is None
            self._steps[step.id] = _copy(step, status=RUNNING)
            self._rate[step.id] = self._rates.update(step)
            self._version += 1
        if first:
            self._refresh()
        else:
            self._refresh_due()

    def log(self, step: StepEvent | None, message: str) -> None:
        if step is None:
            if message.strip() == self._up_to_date_line or self.verbosity < 0:
                return
            self.console.print(Text(message.rstrip(), style="yellow"))
        elif shown(message, self.verbosity):
            self.console.print(Text.assemble((f"{step.id}  ", "dim"), fmt_paths_in(message).rstrip()))

    def step_end(self, step: StepEvent) -> None:
        with self._lock:
            begun = self._started_at.pop(step.id, None)
            # A step that failed or was interrupted may come without its duration: measure it here.
            seconds = step.duration_s or (time.monotonic() - begun if begun is not None else 0.0)
            step = _copy(step, duration_s=seconds, error=fmt_paths_in(step.error))
            self._steps[step.id] = step
            self._spinners.pop(step.id, None)
            self._rates.forget(step.id)
            self._version += 1
        if step.status == FAILED:
            # Printed above the table, so the whole message stays in the scrollback.
            head = Text.assemble((f"{step.id} failed", "bold red"), f" after {fmt_duration(step.duration_s)}")
            self.console.print(head)
            self.console.print(Text(step.error.strip() or "(no message)", style="red"))
        self._refresh_due()

    def finish(self, steps: list[StepEvent], duration_s: float) -> None:
        self._stop_live()
        if self._up_to_date_line and all(s.status == FRESH for s in steps):
            return  # the plan said it in one line
        if self.verbosity >= 0 and steps:
            with self._lock:
                mine = dict(self._steps)
            timed = [
                _copy(s, duration_s=s.duration_s or getattr(mine.get(s.id), "duration_s", 0.0)) for s in steps
            ]
            self.console.print(summary_table(timed))
        line = final_text(self._project, steps, duration_s, is_dry_run(steps))
        ok = not any(s.status in (FAILED, INTERRUPTED) for s in steps)
        self.console.print(Text(line, style="bold green" if ok else "bold red"))

    def close(self) -> None:
        self._stop_live()

    # drawing

    def renderable(self):
        """The live table: every step of the plan with its status, progress or reason, and time."""
        return self

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        with self._lock:
            version = self._version
            started = dict(self._started_at)
            spinners = dict(self._spinners)
        now = self._last_refresh = time.monotonic()
        # What the lines show besides the events: the running steps' times, and the room for them.
        times = [fmt_duration(now - t) for t in started.values()]
        shows = (version, times, options.max_width, self.console.size.height)
        if self._laid_out is not None and self._laid_out[0] == shows:
            _, lines, running = self._laid_out
        else:
            lines, running = self._lay_out(console, options, now, spinners=False)
            if running is not None:
                self._laid_out = (shows, lines, running)
            else:  # a row took more than one line, so where its spinner goes is not known: draw them in
                lines, running = self._lay_out(console, options, now, spinners=True)[0], {}
        for i, line in enumerate(lines):
            step_id = running.get(i)
            if step_id in spinners:
                frame = spinners[step_id].render(console.get_time())
                yield from console.render_lines(frame, options.update_width(1), pad=False)[0]
                line = list(Segment.divide(line, [1, Segment.get_line_length(line)]))[1]
            yield from line
            yield Segment.line()

    def _lay_out(
        self, console: Console, options: ConsoleOptions, now: float, spinners: bool
    ) -> tuple[list[list[Segment]], dict[int, str] | None]:
        """The table's lines, and which line shows which running step (its first cell blank where the
        spinner goes, unless `spinners`); None for those when a row took more than one line."""
        with self._lock:
            steps = [_copy(s) for s in self._steps.values()]
            started = dict(self._started_at)
            rates = dict(self._rate)
            marks = dict(self._spinners) if spinners else {}
        title = Text.assemble((self._project, "bold"), f": {self._todo} of {len(steps)} steps to run")
        # The title, and the line that counts the steps left out, beside the rows.
        shown, left_out = _rows_that_fit(steps, max(3, self.console.size.height - 3))
        cells = []
        for s in shown:
            icon, style = STYLES.get(s.status, ("?", ""))
            mark = marks.get(s.id) if s.status == RUNNING else None
            elapsed = now - started[s.id] if s.id in started else s.duration_s
            timed = s.status in (RUNNING, DONE, FAILED, INTERRUPTED) or (s.status == CACHED and elapsed)
            when = fmt_duration(elapsed) if timed else ""
            cells.append(
                (
                    mark or Text(icon, style=style),
                    Text.assemble(
                        (s.id, "bold" if s.status == RUNNING else ""),
                        (f" @{s.device}" if s.device and s.status == RUNNING else "", "dim"),
                        no_wrap=True,
                        overflow="ellipsis",
                    ),
                    Text(s.status, style=style),
                    _detail(s, rates.get(s.id)),
                    Text(when, style="dim"),
                )
            )
        top = console.render_lines(title, options, pad=False)
        rows = self._rows(console, options, cells)
        lines = top + rows
        if left_out:
            counts = Counter(s.status for s in left_out)
            more = ", ".join(f"{n} {status}" for status, n in counts.items())
            more_text = Text(f"  ... and {_count(len(left_out), 'more step')}: {more}", style="dim")
            lines += console.render_lines(more_text, options, pad=False)
        if len(rows) != len(shown):
            return lines, None
        running = {len(top) + i: s.id for i, s in enumerate(shown) if s.status == RUNNING}
        return lines, running

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.refresh()

    def _refresh_due(self) -> None:
        # rich's own refresh thread redraws often enough; refresh here only when it has drawn nothing for
        # as long as it waits between redraws. (A redraw of the table takes tens of milliseconds: after
        # every step start and end, a few hundred steps restored from the run-cache took longer to show
        # than to restore; and redrawn between the thread's redraws, twice as many.)
        if time.monotonic() - self._last_refresh > 1 / self._refresh_per_second:
            self._refresh()

    def _stop_live(self) -> None:
        if self._live is not None:
            live, self._live = self._live, None
            live.stop()


def _grid(widths: list[int] | None = None) -> Table:
    """The live table's columns; with `widths` (rich's for the whole table, the space between columns
    included), fixed at those, for rows laid out one by one."""
    fixed = [1, None, None, None, None] if widths is None else [w - (i < 4) for i, w in enumerate(widths)]
    # On a narrow terminal, or beside a long step id, the id and the detail give way (cut short with
    # an ellipsis, their cells do not wrap); the mark, the status and the time keep their width.
    table = Table.grid(padding=(0, 1))
    table.add_column(width=fixed[0], no_wrap=True)
    table.add_column(width=fixed[1], overflow="ellipsis")
    table.add_column(width=fixed[2], no_wrap=True)
    table.add_column(width=fixed[3], ratio=1, overflow="ellipsis")
    table.add_column(width=fixed[4], justify="right", no_wrap=True)
    return table


class _RowLines:
    """The lines of the table's rows, each row laid out again only when it or the columns' widths change:
    a build restoring hundreds of steps changes a row or two an event, and laying out every row took
    tens of milliseconds a redraw. A row laid out alone at the widths rich gives the whole table is the
    row as the table lays it out. The rows of the last few redraws are kept: a column's width comes and
    goes as steps start and end (the time column's, while no step shown has a time)."""

    FRAMES = 4

    def __init__(self):
        self._frames: list[dict[tuple, list[list[Segment]]]] = []  # the rows of each redraw, oldest first

    def __call__(self, console: Console, options: ConsoleOptions, rows: list[tuple]) -> list[list[Segment]]:
        table = _grid()
        for cells in rows:
            table.add_row(*cells)
        widths = _column_widths(table, console, options)
        if widths is None or any(w < 1 for w in widths[:-1]):  # or too narrow for the space between columns
            return console.render_lines(table, options, pad=False)
        frame: dict[tuple, list[list[Segment]]] = {}
        lines = []
        for cells in rows:
            key = _key(cells, widths)
            found = next((f[key] for f in self._frames if key in f), None) if key else None
            if found is None:
                one = _grid(widths)
                one.add_row(*cells)
                found = console.render_lines(one, options, pad=False)
            if key:
                frame[key] = found
            lines += found
        self._frames = [*self._frames[1 - self.FRAMES :], frame]
        return lines


def _column_widths(table: Table, console: Console, options: ConsoleOptions) -> list[int] | None:
    """The widths rich gives the table's columns, by its own private measure; None from a rich that has
    it no more (the whole table is then laid out each time, as it shows the same)."""
    measure = getattr(table, "_calculate_column_widths", None)
    try:
        return list(measure(console, options)) if measure else None
    except TypeError:  # measured with other arguments
        return None


def _key(cells: tuple, widths: list[int]) -> tuple | None:
    """What a row shows, at what widths; None for a row that changes by itself (a spinner, a progress
    bar), laid out each time."""
    if not all(isinstance(cell, Text) for cell in cells):
        return None
    shown = tuple((c.plain, str(c.style), tuple(c.spans), c.justify, c.overflow, c.no_wrap) for c in cells)
    return (*shown, *widths)


# Which rows a plan taller than the terminal keeps: running steps, then failed ones, then the next to
# run, then the latest done; fresh and skipped ones last. (rich would cut the table's bottom off, and with
# it the running steps of a long plan.)
_KEEP_FIRST = {RUNNING: 0, FAILED: 1, INTERRUPTED: 1, PENDING: 2, DONE: 3, CACHED: 3}


def _rows_that_fit(steps: list[StepEvent], rows: int) -> tuple[list[StepEvent], list[StepEvent]]:
    """(the steps shown, in plan order; those left out) for a table of at most `rows` rows."""
    if len(steps) <= rows:
        return steps, []

    def rank(i: int) -> tuple[int, int]:
        first = _KEEP_FIRST.get(steps[i].status, 4)
        return first, i if first <= 2 else -i  # the next pending first, the latest done first

    kept = set(sorted(range(len(steps)), key=rank)[:rows])
    return [s for i, s in enumerate(steps) if i in kept], [s for i, s in enumerate(steps) if i not in kept]


def _detail(s: StepEvent, rate: float | None):
    """The fourth column: progress for a running step, why for the others."""
    if s.status == RUNNING:
        if not s.total:
            return _cut(reason_text(s), "dim")
        bar = ProgressBar(total=s.total, completed=s.done, width=20)
        count = f"{unit_of(s)[0]} {s.done}/{s.total}"
        extra = metrics_text(s, rate)
        line = Table.grid(padding=(0, 1))
        line.add_row(bar, Text(count + ("  " + extra if extra else ""), no_wrap=True, overflow="ellipsis"))
        return line
    if s.status == FAILED:
        return _cut(first_line(s.error), "red")
    if s.status == SKIPPED:
        return _cut(first_line(s.error) or reason_text(s), "yellow")
    if s.status == INTERRUPTED and (said := stop_text(s)):
        return _cut(said, "magenta")
    if s.status in (DONE, CACHED) and s.outputs:
        return _cut(fmt_path(s.outputs), "dim")
    return _cut(reason_text(s), "dim")


def _cut(text: str, style: str) -> Text:
    """A cell of one line, cut short with an ellipsis where the column is narrower."""
    return Text(text, style=style, no_wrap=True, overflow="ellipsis")


def summary_table(steps: list[StepEvent]) -> Table:
    """Every step with its status, time and output folder, for the end of a build."""
    # A long step id or a narrow terminal folds the id and the detail onto more lines; the status and
    # the time keep their width.
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    table.add_column("step", overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    where = any(s.device for s in steps)  # steps ran at once (-j, Ray): on which device or node
    if where:
        table.add_column("on", overflow="fold")
    table.add_column("outputs / reason", overflow="fold")
    for s in steps:
        style = STYLES.get(s.status, ("", ""))[1]
        ran = s.status in (DONE, FAILED, INTERRUPTED)
        if s.status == FAILED:
            detail = Text(first_line(fmt_paths_in(s.error)), style="red")
        elif s.status == SKIPPED:
            detail = Text(first_line(fmt_paths_in(s.error)) or reason_text(s), style="yellow")
        elif s.status == INTERRUPTED and (said := stop_text(s)):
            detail = Text(said, style="magenta")
        elif s.outputs:
            detail = Text(fmt_path(s.outputs))
        else:
            detail = Text(reason_text(s), style="dim")
        cells = [escape(s.id), Text(s.status, style=style), fmt_duration(s.duration_s) if ran else ""]
        table.add_row(*cells, *([escape(s.device if ran else "")] if where else []), detail)
    return table


def _copy(step: StepEvent, **changes) -> StepEvent:
    """A snapshot, so that the executor may keep mutating its own event objects."""
    fields = dict(step.__dict__)
    fields["reasons"] = list(step.reasons)
    fields["metrics"] = dict(step.metrics)
    fields.update(changes)
    return StepEvent(**fields)
