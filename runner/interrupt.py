"""Stopping a build: Ctrl-C, and the signals that `timeout`, Slurm, `docker stop` and a closed terminal send.

The first SIGINT, SIGTERM or SIGHUP asks the running step to stop at its next safe point (a train
step saves a checkpoint); a second one stops at once. Either way the lockfile stays valid, and the
display is closed on the way out, so the terminal gets its cursor back. The exit code says which
signal ended the build: 128 + its number (130 SIGINT, 143 SIGTERM, 129 SIGHUP), as a shell would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

STOP_SIGNALS = tuple(
    s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None
)


def exit_code_for(signum: int) -> int:
    """The exit code of a process ended by signal `signum`, as shells report it."""
    return 128 + int(signum)


class StopOnInterrupt:
    """Context manager that turns the first SIGINT, SIGTERM or SIGHUP into a stop request and the
    second into KeyboardInterrupt. `signum` is the first signal received (None: none)."""

    def __init__(self, message: str = "stopping at the next safe point ({again} again to stop now)"):
        self.message = message
        self.signum: int | None = None
        self._event = threading.Event()
        self._previous: dict[int, object] = {}

    def requested(self) -> bool:
        return self._event.is_set()

    def _handle(self, signum, frame) -> None:
        if self._event.is_set():
            raise KeyboardInterrupt
        self.signum = signum
        self._event.set()
        name = signal.Signals(signum).name
        again = "Ctrl-C" if signum == signal.SIGINT else f"{name} or Ctrl-C"
        with contextlib.suppress(Exception):  # the terminal that sent SIGHUP may be gone
            prefix = "" if signum == signal.SIGINT else f"{name}: "
            print(f"\ndbl: {prefix}{self.message.format(again=again)}", file=sys.stderr, flush=True)

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int | None = None) -> bool:
    """Ask the kernel to send this process SIGTERM when its parent dies (Linux; elsewhere a no-op).

    Worker processes call it first thing, so that a build killed with SIGKILL leaves no orphaned
    worker holding a GPU. `parent_pid`: the parent expected; if it is gone already (it died before
    the request was made), this process terminates itself at once. True when the request was made.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)
    return True
