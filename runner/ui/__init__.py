"""How a build shows itself: a live table on a terminal, plain log lines elsewhere.

This package is the only place that imports rich, and it does so only for the live display or
when given a rich Console, so that plain output in CI costs no rich import.
"""

from __future__ import annotations

import os
import sys

from runner.events import Reporter

MODES = ("auto", "live", "plain")


def make_reporter(mode: str = "auto", verbosity: int = 0, console=None) -> Reporter:
    """A display for `dbl build`.

    mode: "live" (rich table), "plain" (timestamped lines, `--no-progress`), or "auto": live when
    standard output is a terminal, plain otherwise. verbosity: -1 (`-q`) shows only failures and the
    final line, 0 the steps, 1 (`-v`) also the steps' log messages. console: a rich Console to draw
    on instead of standard output (tests record one).
    """
    if mode not in MODES:
        raise ValueError(f"display mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "auto":
        mode = "live" if _is_terminal(console) else "plain"
    if mode == "live":
        from runner.ui.live import LiveReporter

        return LiveReporter(verbosity=verbosity, console=console)

    from runner.ui.plain import PlainReporter

    if console is None:
        return PlainReporter(verbosity=verbosity)

    def write(line: str) -> None:
        console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)

    return PlainReporter(verbosity=verbosity, write=write)


def _is_terminal(console) -> bool:
    if console is not None:
        return console.is_terminal and not console.is_dumb_terminal
    # sys.stdout is None when the process started with its standard output closed.
    out = sys.stdout
    return out is not None and out.isatty() and os.environ.get("TERM", "") != "dumb"
