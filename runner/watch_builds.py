"""One build of `dbl watch`, and what is checked before the first: the options and the project the watch
starts on, refused as `dbl build` refuses them; the worker processes kept from build to build; a build that
waits for another build of the project (a manual `dbl build`) to end, and a crash reported, not raised, so
that the watch goes on. The loop that calls these is runner.watch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from runner import lockfile
from runner.errors import DblError, os_words
from runner.events import Reporter
from runner.executor import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_LOCKED, EXIT_USAGE
from runner.store import LockHeld

EXIT_LOCKFILE = -1  # within the watch: the build found the lockfile unreadable (a usage error outside)
LOCK_POLL_S = 0.25  # how often a watch whose build found the lock held tries again


class _KeptBackend:
    """A backend that lives as long as the watch, made by the first build that runs a step; the builds'
    backend_factory. Each build's close() ends only what was the build's own (the backend's `build_ended`),
    and each next build tells it its project (`next_build`): the workers stay."""

    def __init__(self, make: Callable):
        self._make = make
        self.backend = None

    def __call__(self, project):
        if self.backend is None:
            self.backend = self._make(project)
        elif (next_build := getattr(self.backend, "next_build", None)) is not None:
            next_build(project)
        return self

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def close(self) -> None:
        if (ended := getattr(self.backend, "build_ended", None)) is not None:
            ended()

    def end(self) -> None:
        """The watch's end: end the backend and its workers."""
        if self.backend is not None:
            self.backend.close()

    def let_go(self) -> tuple[int, str]:
        """End the backend and its workers (the watch has had nothing to build for a while), and leave what
        it connected to (`leave`: a local Ray instance stops); the next build that runs a step makes
        another. How many idle workers there were, and what else ended ("the local Ray instance", or "")."""
        if self.backend is None:
            return 0, ""
        kept = self.backend.kept()
        if (leave := getattr(self.backend, "leave", None)) is not None:
            also = leave()
        else:
            self.backend.close()
            also = ""
        self.backend = None
        return kept, also


def kept_workers(build_options: dict | None) -> _KeptBackend | None:
    """For builds whose steps run in workers (a backend whose `keeps_workers` is true: -j, --executor
    process or ray): one backend for the whole watch, so that its workers, and the base model each has
    loaded, serve build after build as the build's own process does for inline builds."""
    from runner import executor
    from runner.exec import backends
    from runner.exec.scheduler import backend_name

    options = executor.BuildOptions(**(build_options or {}))
    if options.backend_factory is not None:
        return None
    factory = backends.factory(backend_name(options))
    if not getattr(factory, "keeps_workers", False):
        return None
    return _KeptBackend(lambda project: factory(project, options))


def load_or_report(path: Path, say: Callable[[str], None]):
    """The project, or None after reporting why it cannot be used."""
    from runner.project import ProjectError, load_project

    try:
        return load_project(path)
    except ProjectError as exc:
        say(str(exc))
    except (OSError, UnicodeDecodeError) as exc:  # an editor's save in progress
        say(f"{path.name}: cannot read: {exc}")
    return None


def state_dir_problem(project) -> str | None:
    """Why the project's `.dbl/` cannot be used (a file where a folder should be), or None."""
    from runner.exec.workspace import check_state_dir

    try:
        if project is not None:
            check_state_dir(project)
    except DblError as exc:
        from runner.ui.plain import fmt_paths_in

        return fmt_paths_in(str(exc))  # as `dbl build` names the folder
    return None


def options_problem(build_options: dict | None) -> str | None:
    """Why no build can run with the options the watch was given (`--executor inlin`, `--gpus 0,0`), or
    None: every build would be refused the same way, as `dbl build` refuses it (exit 2)."""
    from runner import executor
    from runner.exec import backends
    from runner.exec.devices import gpus_refused
    from runner.exec.scheduler import backend_name

    options = executor.BuildOptions(**(build_options or {}))
    mine = options.backend_factory is None
    if mine:
        try:
            backends.factory(backend_name(options))
        except DblError as exc:
            return str(exc)
    if options.gpus is not None:
        return gpus_refused(options.gpus, options.backend, options.ray_address, mine)
    return None


def gpus_problem(project, build_options: dict | None) -> str | None:
    """Why the project the watch starts on cannot be given its GPUs (`--gpus` with device = "cpu"), or
    None: a usage error of `dbl build` (exit 2), where the watch would refuse every build the same way.
    A project edited to that device while watched is refused by its build, and the watch goes on."""
    from runner.exec.devices import gpus_for_device

    gpus = (build_options or {}).get("gpus")
    if project is None or (problem := gpus_for_device(gpus, project.settings.device)) is None:
        return None
    return f"{project.path.name}: {problem}"


def build_when_free(
    project,
    reporter_factory: Callable[[], Reporter],
    stop: threading.Event,
    say: Callable[[str], None],
    extra: dict | None = None,
    signals: list[int] | None = None,
    fail: Callable[[str], None] | None = None,
) -> int:
    """Build; while another build (a manual `dbl build`) holds the lock, wait for it and build after
    it, so that a change made meanwhile is not lost. `say` tells of the wait; `fail` (default `say`)
    says why a build did not run, as `dbl build` says it."""
    from runner.store import BuildLock

    fail = fail or say
    code = build_once(project, reporter_factory, stop, fail, extra, signals)
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
        code = build_once(project, reporter_factory, stop, fail, extra, signals)
    return code


def build_once(
    project,
    reporter_factory: Callable[[], Reporter],
    stop: threading.Event,
    say: Callable[[str], None],
    extra: dict | None = None,
    signals: list[int] | None = None,
) -> int:
    """Run what is stale; the build's exit code. A crash is reported, not raised: the watch goes on.
    `say` says why the build did not run or crashed. The stop signal that interrupted the build, if
    any, is added to `signals`."""
    from runner import executor
    from runner.interrupt import StopOnInterrupt

    if (problem := gpus_problem(project, extra)) is not None:  # a project edited to device = "cpu"
        say(problem)  # in the command line's words, before the reporter starts
        return EXIT_USAGE
    reporter = reporter_factory()
    interrupt = StopOnInterrupt()
    try:
        # The first Ctrl-C lets the running step stop at a safe point (a train step saves a checkpoint).
        with interrupt:
            options = executor.BuildOptions(
                should_stop=lambda: stop.is_set() or interrupt.requested(),
                stop_signal=lambda: interrupt.signum,
                **(extra or {}),
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
        elif isinstance(exc, OSError):  # a full disk or an unreadable file outside any step, as build says it
            say(os_words(exc))
        else:
            say(f"build crashed: {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        return EXIT_FAILED
    finally:
        if interrupt.signum is not None and signals is not None:
            signals.append(interrupt.signum)
        reporter.close()
