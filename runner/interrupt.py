"""Ctrl-C during a build: the first asks the running step to stop at its next safe point (a train
step saves a checkpoint), the second stops at once. Either way the lockfile stays valid."""

from __future__ import annotations

import signal
import sys
import threading


class StopOnInterrupt:
    """Context manager that turns the first SIGINT into a stop request and the second into KeyboardInterrupt."""

    def __init__(self, message: str = "stopping at the next safe point (Ctrl-C again to stop now)"):
        self.message = message
        self._event = threading.Event()
        self._previous = None

    def requested(self) -> bool:
        return self._event.is_set()

    def _handle(self, signum, frame) -> None:
        if self._event.is_set():
            raise KeyboardInterrupt
        self._event.set()
        print(f"\ndbl: {self.message}", file=sys.stderr, flush=True)

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def die_with_parent() -> None:
    """Ask the kernel to send this process SIGTERM when its parent dies (Linux; elsewhere nothing), so
    that a worker never outlives a killed build."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
