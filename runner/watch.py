"""`dbl watch`: rebuild what goes stale as the project file or its input images change.

One loop, in the caller's thread: load the project, build what is stale, wait for a change, repeat.
A watchdog observer (a PollingObserver with `--polling`, for network and container mounts where
file events do not arrive) watches the project file, every input folder the project names (the
subjects' and priors' images) and a local base model (see runner.watch_targets). `.dbl/` and the
insides of the outputs are never watched, so a build does not wake the watcher; only the folders above
each step's output folder are, where one removed by hand shows (a commit swaps it for an instant, but it
is back when the build ends). Nor does the lockfile wake it while it holds what the last build left in
it. Changes are debounced; a change that arrives while a build runs is kept and handled when that build
ends. So is a change that arrives while another build (a manual `dbl build`)
holds the project's lock: the watch waits for the lock to free, then builds. An invalid project file
is reported and the watch goes on; the folders it names are watched anyway, so that creating a
missing folder wakes it.

The watch ends with exit code 0 on Ctrl-C or when `stop_event` is set: leaving is the normal way
to end a watch, not a failure. SIGTERM and SIGHUP (`docker stop`, a closed terminal) end it the same
way, resting or building, with the exit code they give `dbl build` (143, 129).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEventHandler

from runner import lockfile
from runner.errors import DblError
from runner.events import Reporter
from runner.executor import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_LOCKED, EXIT_USAGE
from runner.interrupt import exit_code_for
from runner.store import LockHeld
from runner.watch_targets import Targets, targets_of

# Event types that mean a file's content or presence changed (not opened, not read).
CHANGE_EVENTS = ("created", "deleted", "moved", "modified", "closed")
# A poll stats every watched file (about 20 us each, with watchdog's comparison): every 2 s, a folder of
# 4,000 images costs about 4 % of a core while idle, where every second cost 7.5 %.
POLL_INTERVAL_S = 2.0
EXIT_LOCKFILE = -1  # within the watch: the build found the lockfile unreadable (a usage error outside)
LOCK_POLL_S = 0.25  # how often a watch whose build found the lock held tries again


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
) -> int:
    """Build `project_path`, then rebuild what goes stale each time its inputs change.

    polling: poll every `poll_interval` seconds instead of using OS events. reporter_factory makes the
    display of one build. echo prints the watch's own messages (the
    project's problems, what changed); default: standard output. Returns 0 when stopped by Ctrl-C
    or `stop_event`, 2 when there is no project file to watch (its folder does not exist, the name is
    a folder's, or no file has it: a misspelt name would be watched for ever), 143 or 129 when stopped by
    SIGTERM or SIGHUP. build_options: more BuildOptions fields for each build (jobs, gpus, per_gpu,
    backend).
    """
    stop = stop_event or threading.Event()
    say = echo or _print
    # As named, links and all: each reload follows them anew (`ln -sf exp4.toml dbl.toml`).
    given = Path(os.path.abspath(project_path))
    path = given.resolve()
    if not path.parent.is_dir():
        say(f"{project_path}: no such folder")
        return 2
    if not path.is_file():
        _load(Path(project_path), say)  # says why, as `dbl build` would
        return EXIT_USAGE

    if (refused := _options_problem(build_options)) is not None:
        say(refused)
        return EXIT_USAGE

    changes = _Changes()
    handler = _Handler(changes)
    observer = _make_observer(polling, poll_interval)
    scheduled: dict[tuple[str, bool], tuple] = {}  # (folder, recursive) -> (watch, identity)
    workers = _kept_workers(build_options)
    if workers is not None:
        build_options = {**build_options, "backend_factory": lambda project: workers}
    signals: list[int] = []  # the stop signals received, the first one first
    # The cleanup too: a SIGTERM while the workers end (after a Ctrl-C) killed the watch where it stood.
    with _stopped_by_signals(stop, signals):
        observer.start()
        try:
            project = _load(given, say)
            if (broken := _state_dir_problem(project) or _gpus_problem(project, build_options)) is not None:
                say(broken)  # no change the watch sees would mend it
                return EXIT_USAGE
            while not stop.is_set():
                handler.targets = targets_of(given, project)
                _reschedule(observer, handler, scheduled, handler.targets.watches())
                code = None
                if project is not None:
                    code = _build_when_free(project, reporter_factory, stop, say, build_options, signals)
                if code == EXIT_INTERRUPTED:
                    break  # the build was interrupted (Ctrl-C): leave the watch too
                left = _read(handler.targets.lockfile)  # the lockfile as the build left it
                if stop.is_set():
                    break
                # the folders the build made (build/pets/renders/ of a first build), where outputs removed show
                _reschedule(observer, handler, scheduled, handler.targets.watches())
                say(f"watching {_watched_text(handler.targets)} (Ctrl-C to stop)")
                changed = _next_change(changes, debounce_s, stop, handler.targets, left)
                if changed is None:
                    break
                say(f"changed: {_changed_text(changed, Path(handler.targets.project_file).parent)}")
                project = _load(given, say)
        except KeyboardInterrupt:
            pass
        finally:
            with _ctrl_c_waits():
                observer.stop()
                observer.join(timeout=5)
                if workers is not None:
                    workers.backend.close()
    return exit_code_for(signals[0]) if signals and signals[0] != signal.SIGINT else 0


# --- the loop's parts -------------------------------------------------------------------------------


class _KeptBackend:
    """A backend that lives as long as the watch: each build's close() leaves it as it is."""

    def __init__(self, backend):
        self.backend = backend

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def close(self) -> None:
        pass


def _kept_workers(build_options: dict | None) -> _KeptBackend | None:
    """For builds whose steps run in worker processes (-j, --executor process): one process backend for
    the whole watch, so that its workers, and the base model each has loaded, serve build after build as
    the build's own process does for inline builds."""
    from runner import executor
    from runner.exec.backends import ProcessBackend
    from runner.exec.scheduler import backend_name

    options = executor.BuildOptions(**(build_options or {}))
    if options.backend_factory is not None or backend_name(options) != ProcessBackend.name:
        return None
    return _KeptBackend(ProcessBackend(None, options))


@contextlib.contextmanager
def _stopped_by_signals(stop: threading.Event, signals: list[int]):
    """SIGTERM and SIGHUP stop a resting watch as Ctrl-C does, through the cleanup that ends its workers
    (their default action killed the watch where it stood: a `-j` watch's worker processes were left to
    notice, and Python warned of a leaked semaphore). During a build, the build's own handlers take
    over: its step stops at a safe point."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set in the main thread
        return

    def handle(signum, frame) -> None:
        signals.append(signum)
        stop.set()

    found = (getattr(signal, name, None) for name in ("SIGTERM", "SIGHUP"))  # no SIGHUP on Windows
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


def _load(path: Path, say: Callable[[str], None]):
    """The project, or None after reporting why it cannot be used."""
    from runner.project import ProjectError, load_project

    try:
        return load_project(path)
    except ProjectError as exc:
        say(str(exc))
    except (OSError, UnicodeDecodeError) as exc:  # an editor's save in progress
        say(f"{path.name}: cannot read: {exc}")
    return None


def _state_dir_problem(project) -> str | None:
    """Why the project's `.dbl/` cannot be used (a file where a folder should be), or None."""
    from runner.exec.workspace import check_state_dir

    try:
        if project is not None:
            check_state_dir(project)
    except DblError as exc:
        return str(exc)
    return None


def _options_problem(build_options: dict | None) -> str | None:
    """Why no build can run with the options the watch was given (`--executor inlin`, `--gpus 0,0`), or
    None: every build would be refused the same way, as `dbl build` refuses it (exit 2)."""
    from runner.exec import backends
    from runner.exec.devices import gpus_refused

    options = build_options or {}
    mine = options.get("backend_factory") is None
    if mine:
        try:
            backends.factory(options.get("backend", "inline"))
        except DblError as exc:
            return str(exc)
    if options.get("gpus") is not None:
        return gpus_refused(
            options["gpus"], options.get("backend", "inline"), options.get("ray_address"), mine
        )
    return None


def _gpus_problem(project, build_options: dict | None) -> str | None:
    """Why the project the watch starts on cannot be given its GPUs (`--gpus` with device = "cpu"), or
    None: a usage error of `dbl build` (exit 2), where the watch would refuse every build the same way.
    A project edited to that device while watched is refused by its build, and the watch goes on."""
    from runner.exec.devices import gpus_for_device

    gpus = (build_options or {}).get("gpus")
    if project is None or (problem := gpus_for_device(gpus, project.settings.device)) is None:
        return None
    return f"{project.path.name}: {problem}"


def _build_when_free(
    project,
    reporter_factory: Callable[[], Reporter],
    stop: threading.Event,
    say: Callable[[str], None],
    extra: dict | None = None,
    signals: list[int] | None = None,
) -> int:
    """Build; while another build (a manual `dbl build`) holds the lock, wait for it and build after
    it, so that a change made meanwhile is not lost."""
    from runner.store import BuildLock

    code = _build(project, reporter_factory, stop, say, extra, signals)
    while code == EXIT_LOCKED and not stop.is_set():
        say("building when it ends")
        while not stop.wait(LOCK_POLL_S):
            try:
                with BuildLock(project):
                    break
            except LockHeld:
                continue
        else:
            break  # stopped while waiting
        code = _build(project, reporter_factory, stop, say, extra, signals)
    return code


def _build(
    project,
    reporter_factory: Callable[[], Reporter],
    stop: threading.Event,
    say: Callable[[str], None],
    extra: dict | None = None,
    signals: list[int] | None = None,
) -> int:
    """Run what is stale; the build's exit code. A crash is reported, not raised: the watch goes on.
    The stop signal that interrupted the build, if any, is added to `signals`."""
    from runner import executor
    from runner.interrupt import StopOnInterrupt

    reporter = reporter_factory()
    interrupt = StopOnInterrupt()
    try:
        # The first Ctrl-C lets the running step stop at a safe point (a train step saves a checkpoint).
        with interrupt:
            options = executor.BuildOptions(
                should_stop=lambda: stop.is_set() or interrupt.requested(), **(extra or {})
            )
            code = executor.build(project, options, reporter).exit_code
        return EXIT_INTERRUPTED if interrupt.requested() else code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except LockHeld as exc:
        say(str(exc))
        return EXIT_LOCKED
    except lockfile.LockfileError as exc:
        say(str(exc))
        return EXIT_LOCKFILE
    except DblError as exc:
        say(str(exc))
        return EXIT_USAGE
    except Exception as exc:  # a bug in one build must not end the watch
        if (extra or {}).get("debug"):
            import traceback

            say("build crashed: " + "".join(traceback.format_exception(exc)).rstrip())
        else:
            say(f"build crashed: {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        return EXIT_FAILED
    finally:
        if interrupt.signum is not None and signals is not None:
            signals.append(interrupt.signum)
        reporter.close()


class _Changes:
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

    def wait(self, debounce_s: float, stop: threading.Event) -> list[str] | None:
        """Block until something changed and then nothing for `debounce_s`; None once `stop` is set."""
        with self._cond:
            while not self._paths:
                if stop.is_set():
                    return None
                self._cond.wait(0.1)
            while (quiet := time.monotonic() - self._last) < debounce_s:
                if stop.is_set():
                    return None
                self._cond.wait(min(debounce_s - quiet, 0.1))
            paths, self._paths = list(self._paths), {}
            return paths


def _next_change(
    changes: _Changes, debounce_s: float, stop, targets: Targets, left: bytes | None
) -> list[str] | None:
    """The next changes, less the build's own: the lockfile while it holds what the last build left in it
    (the build writes it after every step), and a step's output folder removed that is back (a commit
    swaps the old outputs out and the new ones in), both seen once the build ends."""
    while (changed := changes.wait(debounce_s, stop)) is not None:
        changed = [p for p in changed if _not_the_builds(p, targets, left)]
        if changed:
            return changed
    return None


def _not_the_builds(path: str, targets: Targets, left: bytes | None) -> bool:
    if path == targets.lockfile:
        return _read(path) != left
    if targets.holds_step_outputs(path) and not targets.holds_outputs(path):
        return targets.outputs_gone(path)
    return True


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


class _Handler(FileSystemEventHandler):
    """Forwards relevant changes to `_Changes`; `targets` is swapped when the project is reloaded."""

    def __init__(self, changes: _Changes):
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


def _make_observer(polling: bool, interval: float):
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


def _reschedule(observer, handler, scheduled: dict, wanted: set[tuple[str, bool]]) -> None:
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


def _watched_text(targets: Targets) -> str:
    n = len(targets.folders)
    parts = [Path(targets.project_file).name] + ([f"{n} input folder{'s' if n != 1 else ''}"] if n else [])
    parts += ["the base model"] if targets.models else []
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


def _changed_text(paths: list[str], base: Path) -> str:
    paths = _outermost(paths)
    shown = [_relative(p, base) for p in paths[:3]]
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


def _relative(path: str, base: Path) -> str:
    """As the plan names a file: relative to the project's folder, ../ included."""
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:  # another drive
        return path


def _print(message: str) -> None:
    print(message, flush=True)
