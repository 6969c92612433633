"""What changed, for `dbl watch`: a watchdog observer (a PollingObserver with `--polling`) scheduled on the
folders runner.watch_targets names, a handler that keeps the changes that matter, and a debounce that hands
them to the loop (runner.watch) once things are quiet, less the build's own writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable

from watchdog.events import FileSystemEventHandler

from runner.watch_targets import Targets

# Event types that mean a file's content or presence changed (not opened, not read).
CHANGE_EVENTS = ("created", "deleted", "moved", "modified", "closed")
# A poll stats every watched file (about 20 us each, with watchdog's comparison): every 2 s, a folder of
# 4,000 images costs about 4 % of a core while idle, where every second cost 7.5 %.
POLL_INTERVAL_S = 2.0


class Changes:
    """Paths that changed, gathered from the observer's thread, handed out once things are quiet."""

    def __init__(self):
        self._cond = threading.Condition()
        # A dict, in the order first seen: unpacking 20,000 photos sends as many events, and a list's
        # membership test made each one slower than the last (6 s of CPU before the watch woke).
        self._paths: dict[str, None] = {}
        self._last = 0.0

    def add(self, path: str) -> None:
        with self._cond:
            self._paths[path] = None
            self._last = time.monotonic()
            self._cond.notify_all()

    def wait(
        self, debounce_s: float, stop: threading.Event, timeout: float | None = None
    ) -> list[str] | None:
        """Block until something changed and then nothing for `debounce_s`; None once `stop` is set, and []
        when `timeout` seconds pass without a change."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._paths:
                if stop.is_set():
                    return None
                if deadline is not None and (left := deadline - time.monotonic()) <= 0:
                    return []
                self._cond.wait(0.1 if deadline is None else min(left, 0.1))
            while (quiet := time.monotonic() - self._last) < debounce_s:
                if stop.is_set():
                    return None
                self._cond.wait(min(debounce_s - quiet, 0.1))
            paths, self._paths = list(self._paths), {}
            return paths


def next_change(
    changes: Changes,
    debounce_s: float,
    stop,
    targets: Targets,
    left: bytes | None,
    idle: tuple[float, Callable[[], None]] | None = None,
) -> list[str] | None:
    """The next changes, less the build's own: the lockfile while it holds what the last build left in it
    (the build writes it after every step), and a step's output folder removed that is back (a commit
    swaps the old outputs out and the new ones in), both seen once the build ends. The outputs' folder
    removed (`rm -rf build`) counts only while an output under it is still missing: the watch of the
    removed folder itself can say so late, after the build that the first word of it woke has made every
    output again. None once `stop` is set. idle: (seconds, call): `call()` once that long has passed
    without a change that counts."""
    deadline = None if idle is None else time.monotonic() + idle[0]
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if (changed := changes.wait(debounce_s, stop, timeout)) is None:
            return None
        if not changed:  # idle that long
            deadline = None
            idle[1]()
            continue
        changed = [p for p in changed if _not_the_builds(p, targets, left)]
        if changed:
            return changed


def _not_the_builds(path: str, targets: Targets, left: bytes | None) -> bool:
    if path == targets.lockfile:
        return file_bytes(path) != left
    if targets.holds_step_outputs(path) or targets.holds_outputs(path):
        return targets.outputs_gone(path)
    return True


def file_bytes(path: str) -> bytes | None:
    """The file's content, or None where it cannot be read (gone, a folder)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


class Handler(FileSystemEventHandler):
    """Forwards relevant changes to `Changes`; `targets` is swapped when the project is reloaded."""

    def __init__(self, changes: Changes):
        super().__init__()
        self.changes = changes
        self.targets = Targets("", (), ())

    def dispatch(self, event) -> None:
        if event.event_type not in CHANGE_EVENTS or (event.is_directory and event.event_type == "modified"):
            return
        targets = self.targets
        for p in (event.src_path, getattr(event, "dest_path", "")):
            if p and targets.relevant(os.fsdecode(p), event.is_directory):
                self.changes.add(os.path.normpath(os.fsdecode(p)))
        # `rm -rf build` or `mv build build-old`: no build removes its outputs' folder, only a user does;
        # nor one step's (`rm -rf build/pets/renders/park`), but for the instant a commit swaps it
        src = os.path.normpath(os.fsdecode(event.src_path))
        removed = event.is_directory and event.event_type in ("deleted", "moved")
        if removed and (targets.holds_outputs(src) or targets.holds_step_outputs(src)):
            self.changes.add(src)


def make_observer(polling: bool, interval: float):
    """A watchdog observer: OS events, or with `polling` a stat of every watched file each `interval` s."""
    logging.getLogger("watchdog.observers.inotify").addFilter(_stopped_emitter_notice)
    if polling:
        from watchdog.observers.polling import PollingObserver

        return PollingObserver(timeout=interval)
    from watchdog.observers import Observer

    return Observer()


def _stopped_emitter_notice(record: logging.LogRecord) -> bool:
    """False for watchdog's error that an emitter being stopped was woken (by the events that removing its
    watch sends): printed as the watch ended, or as it stopped watching a folder; nothing is lost."""
    return "called when the thread is inactive" not in record.getMessage()


def reschedule(observer, handler, scheduled: dict, wanted: set[tuple[str, bool]]) -> None:
    """Make the observer watch exactly `wanted`; folders may come and go between reloads. A folder
    replaced by another of its name (`mv dog dog-old && mv dog-new dog`) is watched anew: the old watch
    follows the old folder."""
    for key in list(scheduled):
        if key not in wanted or _identity(key[0]) != scheduled[key][1]:
            observer.unschedule(scheduled.pop(key)[0])
    for key in sorted(wanted - set(scheduled)):
        folder, recursive = key
        with contextlib.suppress(OSError):  # removed meanwhile; the next reload looks again
            identity = _identity(folder)  # before: a folder replaced meanwhile is watched anew next time
            scheduled[key] = (observer.schedule(handler, folder, recursive=recursive), identity)


def _identity(folder: str) -> tuple[int, int] | None:
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return st.st_dev, st.st_ino
