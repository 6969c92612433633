"""The `dbl` command's entry point: Ctrl-C while Python is still importing dbl ends it as an interrupted
command does (`dbl: interrupted`, exit code 130), not with a traceback of the import under way."""

from __future__ import annotations

import signal
import sys

EXIT_INTERRUPTED = 130  # runner.exec.scheduler's; importing that would reopen the window this closes


def _interrupted(signum, frame) -> None:
    print("\ndbl: interrupted", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_INTERRUPTED)


def main() -> int:
    previous = signal.signal(signal.SIGINT, _interrupted)
    try:
        from runner.cli import main as dbl
    finally:
        signal.signal(signal.SIGINT, previous)  # from here on, the command handles Ctrl-C itself
    return dbl()
