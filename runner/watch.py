"""`dbl watch`: rebuild what goes stale as the project file or its input images change.

One loop, in the caller's thread: load the project, build what is stale, wait for a change, repeat.
A watchdog observer (a PollingObserver with `--polling`, for network and container mounts where
file events do not arrive) watches the project file, every input folder the project names (the
subjects' and priors' images) and a local base model. `.dbl/` and the
insides of the outputs are never watched, so a build does not wake the watcher; only the folders above
each step's output folder are, where one removed by hand shows (a commit swaps it for an instant, but it
is back when the build ends). Nor does the lockfile wake it while it holds what the last build left in
it. Changes are debounced; a change that arrives while a build runs is kept and handled when that build
ends. So is a change that arrives while another build (a manual `dbl build`)
holds the project's lock: the watch waits for the lock to free, then builds. An invalid project file
is reported and the watch goes on; the folders it names are watched anyway, so that creating a
missing folder wakes it. The base model a build loaded (in this process, or in the workers kept for the
next build) is let go after `keep_loaded_s` without a change.

The watch ends with exit code 0 on Ctrl-C or when `stop_event` is set: leaving is the normal way
to end a watch, not a failure. SIGTERM and SIGHUP (`docker stop`, a closed terminal) end it the same
way, resting or building, with the exit code they give `dbl build` (143, 129).

This module is the loop, its stop signals and what it says. Its parts: runner.watch_targets (what is
watched, and which changes matter), runner.watch_changes (the observer and the debounce),
runner.watch_builds (one build, and the checks before the first).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from runner.events import Reporter
from runner.executor import EXIT_INTERRUPTED, EXIT_USAGE
from runner.interrupt import exit_code_for
from runner.watch_builds import (
    build_when_free,
    gpus_problem,
    kept_workers,
    load_or_report,
    options_problem,
    state_dir_problem,
)
from runner.watch_changes import (
    POLL_INTERVAL_S,
    Changes,
    Handler,
    file_bytes,
    make_observer,
    next_change,
    reschedule,
)
from runner.watch_targets import Targets, targets_of

# How long a watch with nothing to build keeps the base model its builds loaded (and the workers that hold
# it, with -j or --executor ray): a rebuild within it starts at once; after it, the memory and the GPUs
# are free for other work.
KEEP_LOADED_S = 600.0


def watch(
    project_path: Path,
    *,
    polling: bool = False,
    poll_interval: float = POLL_INTERVAL_S,
    reporter_factory: Callable[[], Reporter],
    debounce_s: float = 0.5,
    stop_event: threading.Event | None = None,
    echo: Callable[[str], None] | None = None,
    build_options: dict | None = None,
    keep_loaded_s: float = KEEP_LOADED_S,
) -> int:
    """Build `project_path`, then rebuild what goes stale each time its inputs change.

    polling: poll every `poll_interval` seconds instead of using OS events. reporter_factory makes the
    display of one build. echo prints the watch's own messages (what it watches, what changed, the project's
    problems, what ends it); default: standard output, and standard error for the project's problems, what
    ends the watch at its start and why a build did not run, as `dbl build` prints them. Returns 0 when
    stopped by Ctrl-C or `stop_event`, 2 when there is no project file to watch (its folder does not exist,
    the name is a folder's, or no file has it: a misspelt name would be watched for ever), 143 or 129 when
    stopped by SIGTERM or SIGHUP. build_options: more BuildOptions fields for each build (jobs, gpus,
    per_gpu, backend). keep_loaded_s: after that many seconds without a change, the base model a build
    loaded (in this process, or in the workers kept for the next build) is let go; inf keeps it.
    """
    stop = stop_event or threading.Event()
    say = echo or _print
    problems = echo or _problems  # the project file's, said as `dbl build` says them
    # what ends the watch at its start, and why a build did not run, said as `dbl build` says it
    refuse = echo or _refuse
    # As named, links and all: each reload follows them anew (`ln -sf exp4.toml dbl.toml`).
    given = Path(os.path.abspath(project_path))
    path = given.resolve()
    if not path.is_file():  # its folder missing too
        load_or_report(Path(project_path), problems)  # says why, as `dbl build` would
        return EXIT_USAGE

    if (refused := options_problem(build_options)) is not None:
        refuse(refused)
        return EXIT_USAGE

    changes = Changes()
    handler = Handler(changes)
    observer = make_observer(polling, poll_interval)
    scheduled: dict[tuple[str, bool], tuple] = {}  # (folder, recursive) -> (watch, identity)
    workers = kept_workers(build_options)
    if workers is not None:
        build_options = {**build_options, "backend_factory": workers}
    signals: list[int] = []  # the stop signals received, the first one first
    # The cleanup too: a SIGTERM while the workers end (after a Ctrl-C) killed the watch where it stood.
    with _stopped_by_signals(stop, signals):
        observer.start()
        try:
            project = load_or_report(given, problems)
            if (broken := state_dir_problem(project) or gpus_problem(project, build_options)) is not None:
                refuse(broken)  # no change the watch sees would mend it
                return EXIT_USAGE
            while not stop.is_set():
                handler.targets = targets_of(given, project)
                reschedule(observer, handler, scheduled, handler.targets.watches())
                code = None
                if project is not None:
                    code = build_when_free(
                        project, reporter_factory, stop, say, build_options, signals, fail=refuse
                    )
                if code == EXIT_INTERRUPTED:
                    break  # the build was interrupted (Ctrl-C): leave the watch too
                left = file_bytes(handler.targets.lockfile)  # the lockfile as the build left it
                if stop.is_set():
                    break
                # the folders the build made (build/pets/renders/ of a first build), where outputs removed show
                reschedule(observer, handler, scheduled, handler.targets.watches())
                say(f"watching {_watched_text(handler.targets)} (Ctrl-C to stop)")
                idle = None
                if keep_loaded_s != float("inf"):
                    idle = (keep_loaded_s, lambda: _let_go(workers, keep_loaded_s, say))
                changed = next_change(changes, debounce_s, stop, handler.targets, left, idle)
                if changed is None:
                    break
                say(f"changed: {_changed_text(changed)}")
                project = load_or_report(given, problems)
        except KeyboardInterrupt:
            pass
        finally:
            with _ctrl_c_waits():
                observer.stop()
                observer.join(timeout=5)
                if workers is not None:
                    workers.end()
    return exit_code_for(signals[0]) if signals and signals[0] != signal.SIGINT else 0


# --- stop signals ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _stopped_by_signals(stop: threading.Event, signals: list[int]):
    """SIGTERM and SIGHUP (and SIGINT, where it was ignored) stop a resting watch as Ctrl-C does, through
    the cleanup that ends its workers (their default action killed the watch where it stood: a `-j` watch's
    worker processes were left to notice, and Python warned of a leaked semaphore). During a build, the build's own handlers take
    over: its step stops at a safe point."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set in the main thread
        return

    def handle(signum, frame) -> None:
        signals.append(signum)
        stop.set()

    names = ["SIGTERM", "SIGHUP"]  # no SIGHUP on Windows
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # A watch a script started in the background (`dbl watch &`) inherits SIGINT ignored: `kill -INT`
        # stops it as Ctrl-C does, as it stops `dbl build` started so.
        names.append("SIGINT")
    found = (getattr(signal, name, None) for name in names)
    previous = {signum: signal.signal(signum, handle) for signum in found if signum is not None}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _ctrl_c_waits():
    """A Ctrl-C while the watch ends its observer and its workers (a few seconds at most) lets them end:
    it raised out of the cleanup, left the workers to notice, and ended the watch with 130, where a watch
    stopped by Ctrl-C ends with 0."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set in the main thread
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# --- what the watch holds between builds --------------------------------------------------------------


def _let_go(workers, seconds: float, say: Callable[[str], None]) -> None:
    """No change for `seconds`: end the kept workers (and a local Ray instance the watch started) and drop
    the base model this process holds, and say so when there was something to let go of."""
    from runner.exec.backends import LazyModels

    ended, also = workers.let_go() if workers is not None else (0, "")
    held = LazyModels.let_go()
    why = f"no change for {_duration(seconds)}" if seconds > 0 else "--keep-loaded 0"
    if ended:
        who, pronoun = ("the idle worker", "it") if ended == 1 else (f"the {ended} idle workers", "they")
        gone = [who, f"the base model {pronoun} had loaded", *([also] if also else [])]
        say(f"{why}: ended {', '.join(gone[:-1])} and {gone[-1]} (the next build starts them again)")
    elif held:
        say(f"{why}: let go of the loaded base model (the next build loads it again)")
    elif also:
        say(f"{why}: stopped {also} (the next build starts it again)")


def _duration(seconds: float) -> str:
    return f"{seconds:g} s" if seconds < 60 else f"{seconds / 60:g} min"


# --- what the watch says -----------------------------------------------------------------------------


def _watched_text(targets: Targets) -> str:
    from runner.ui.plain import fmt_path

    n = len(targets.folders)
    # named as the user would type it here, as the changes are (`changed: dog/01.png`)
    parts = [fmt_path(targets.project_file)] + ([f"{n} input folder{'s' if n != 1 else ''}"] if n else [])
    parts += ["the base model"] if targets.models else []
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


def _changed_text(paths: list[str]) -> str:
    """The files that changed, named as the plan's reasons and a build's lines name them (`fmt_path`)."""
    from runner.ui.plain import fmt_path

    paths = _outermost(paths)
    shown = [fmt_path(p) for p in paths[:3]]
    more = f" (+{len(paths) - 3} more)" if len(paths) > 3 else ""
    return ", ".join(shown) + more


def _outermost(paths: list[str]) -> list[str]:
    """`paths` less those inside another of them: `rm -rf build` is one change, not one per step's folder."""
    given = set(paths)

    def inside_another(path: str) -> bool:
        parent = os.path.dirname(path)
        while parent != path:
            if parent in given:
                return True
            path, parent = parent, os.path.dirname(parent)
        return False

    return [p for p in paths if not inside_another(p)]


def _print(message: str) -> None:
    print(message, flush=True)


def _problems(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _refuse(message: str) -> None:
    print(f"dbl: {message}", file=sys.stderr, flush=True)
