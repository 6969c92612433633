"""The `dbl` command's entry point: Ctrl-C while Python is still importing dbl ends it as an interrupted
command does (`dbl: interrupted`, exit code 130), not with a traceback of the import under way; and a stop
signal while the process exits ends it with that signal's exit code too (see _exit)."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from typing import NoReturn

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
    _exit(dbl())


def _exit(code: int) -> NoReturn:
    """End the process with the command's exit code, without the interpreter's teardown of every module.

    With torch loaded that teardown takes one to two seconds after the command is done, and in it the
    signal handlers are back to their defaults: a SIGTERM (`docker stop`, Slurm, `timeout`) killed dbl by
    the signal (-15, where dbl's own exit code is 143), and a Ctrl-C printed a KeyboardInterrupt traceback
    from torch's exit handlers or killed it by SIGINT. What the interpreter would do first still happens:
    non-daemon threads are waited for and the exit handlers run (they end worker processes, flush logs);
    meanwhile a stop signal ends the process at once with its exit code (130, 143, 129)."""
    from runner.interrupt import STOP_SIGNALS

    for signum in STOP_SIGNALS:
        signal.signal(signum, _stopped)
    shutdown = getattr(threading, "_shutdown", None)  # the interpreter's own first step of exiting
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    _flush()
    os._exit(code)


def _stopped(signum, frame) -> NoReturn:
    from runner.interrupt import exit_code_for

    _flush()
    os._exit(exit_code_for(signum))


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # closed, or its reader gone (`dbl plan | head -1`)
            stream.flush()
