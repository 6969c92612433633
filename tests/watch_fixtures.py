"""`dbl watch` run in a thread, with what it said, for the watch tests: started by the fixture `watcher` on
the project `proj` with fake steps, or made by hand.

Import by name (`from tests.watch_fixtures import Watcher, save, wait_for, watcher`)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from runner.ui.plain import PlainReporter
from runner.watch import watch

LIMIT_S = 20


class Watcher:
    """`watch` in a thread, with what it said and what its builds printed."""

    def __init__(
        self,
        path: Path,
        polling: bool = False,
        build_options: dict | None = None,
        keep_loaded_s: float = float("inf"),
    ):
        self.messages: list[str] = []
        self.lines: list[str] = []
        self.stop = threading.Event()
        self.code: int | None = None

        def run():
            self.code = watch(
                path,
                polling=polling,
                poll_interval=0.2,
                reporter_factory=lambda: PlainReporter(write=self.lines.append),
                debounce_s=0.1,
                stop_event=self.stop,
                echo=self.messages.append,
                build_options=build_options,
                keep_loaded_s=keep_loaded_s,
            )

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def idle_count(self) -> int:
        """How many times the loop went back to waiting: once after each build or report."""
        return sum(1 for m in self.messages if m.startswith("watching "))

    def wait_idle(self, after: int) -> None:
        wait_for(lambda: self.idle_count() > after, f"the watch to settle; it said {self.messages}")

    def close(self) -> int:
        self.stop.set()
        self.thread.join(LIMIT_S)
        assert not self.thread.is_alive(), "the watch did not stop"
        return self.code


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + LIMIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def worker_kept_by_a_watch(path: Path, build_options: dict, alive: Callable[[int], bool]) -> int:
    """Watch the project of the fixture `pid_notes` at `path` with `build_options`, and edit its note once
    the first build is done: the second build's step must run in the first one's worker, alive until the
    watch ends. Returns that worker's pid, once the watch has ended."""
    w = Watcher(path, build_options=build_options)
    note = path.parent / "build" / "n" / "notes" / "a" / "note.txt"
    try:
        w.wait_idle(0)
        text, first = note.read_text().split()
        assert text == "one" and int(first) != os.getpid()
        save(path, path.read_text().replace('"one"', '"two"'))
        wait_for(lambda: note.read_text().startswith("two"), f"the second build; the watch said {w.messages}")
        assert note.read_text().split()[1] == first  # the same worker
        assert alive(int(first))
    finally:
        w.close()
    return int(first)


def workers_let_go_by_a_watch(path: Path, build_options: dict, gone: Callable[[int], bool]) -> None:
    """Watch the project of the fixture `pid_notes` at `path` with `build_options`, keeping what a build
    loaded for 0.3 s: the first build's worker is ended once that passes without a change, and a build
    after it (the note edited) runs in a new worker, ended with the watch."""
    w = Watcher(path, build_options=build_options, keep_loaded_s=0.3)
    note = path.parent / "build" / "n" / "notes" / "a" / "note.txt"
    said = (
        "no change for 0.3 s: ended the idle worker and the base model it had loaded (the next build starts"
    )
    try:
        w.wait_idle(0)
        first = int(note.read_text().split()[1])
        wait_for(
            lambda: any(m.startswith(said) for m in w.messages), f"the worker let go; it said {w.messages}"
        )
        assert gone(first), "the idle worker was not ended"
        save(path, path.read_text().replace('"one"', '"two"'))
        wait_for(lambda: note.read_text().startswith("two"), f"the second build; the watch said {w.messages}")
        second = int(note.read_text().split()[1])
        assert second not in (first, os.getpid())
        assert sum(m.startswith(said) for m in w.messages) >= 1
    finally:
        w.close()
    assert gone(second), "the second worker outlived the watch"


def save(path: Path, text: str) -> None:
    """Save as editors do: write a temporary file, then rename it over the old one."""
    tmp = path.with_name(f".{path.name}.swp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def in_the_projects_folder(tmp_path, monkeypatch):
    """Run from tmp_path, the folder of the tests' projects, as `dbl watch` mostly is: the files it says
    changed, named as a build's lines name them (relative to the current folder), read as the project
    file names them."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def watcher(proj, fake_steps):
    started = []

    def start(polling: bool = False) -> Watcher:
        w = Watcher(proj.path, polling)
        started.append(w)
        w.wait_idle(0)
        return w

    yield start
    for w in started:
        w.stop.set()
        w.thread.join(LIMIT_S)
