"""The scheduler: run a plan, one writer for the lockfile, the run-cache and the display.

It decides what runs when: the plan of the project's Workspace (runner.exec.workspace), --only and
--keep-going, steps one at a time or, with -j, in workers (runner.exec.parallel), and the build's result
and exit code. What happens to each step, from its fingerprint to its lockfile record, is in
runner.exec.step_lifecycle.
"""

from __future__ import annotations

import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from runner import events, lockfile, planner, tempnames
from runner.errors import DblError, ImageError, StepInterrupted, UsageError, os_words
from runner.events import StepEvent
from runner.exec import backends, lastbuild, preflight
from runner.exec.devices import counts_problem, gpus_for_device, gpus_refused, inline_problem, needs_workers
from runner.exec.job import StepCrash
from runner.exec.step_lifecycle import begin_step, drop_work_if_changed, finish_step, make_job
from runner.exec.workspace import Workspace
from runner.gc import unfinished_commits
from runner.interrupt import exit_code_for
from runner.project.schema import Project
from runner.store import BuildLock
from runner.ui.plain import fmt_path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


@dataclass
class BuildOptions:
    dry_run: bool = False
    only: tuple[str, ...] = ()  # build these steps (and the stale steps they need), nothing else
    force: tuple[str, ...] | None = None  # rerun these steps; () means every step; None: none
    keep_going: bool = False  # after a failure, go on with the steps that do not depend on it
    num_processes: int | None = None  # overrides [project] num_processes for train steps
    should_stop: Callable[[], bool] = lambda: False  # True once the user asked to stop (Ctrl-C)
    # The signal that asked to stop, if any (SIGTERM from `timeout` or Slurm): the build's record for
    # `dbl report` says the exit code it implies (128 + its number), as the process exits with
    stop_signal: Callable[[], int | None] = lambda: None
    debug: bool = False  # show tracebacks of failing steps
    # Where steps run (see runner.exec.backends). None: `inline`, or `process` with jobs above 1 or gpus;
    # "inline" given with either is refused (it runs the steps in the build's own process, one at a time).
    backend: str | None = None
    backend_factory: Callable | None = None  # a backend instance maker (tests), instead of `backend`
    # Steps at once; above 1 each runs in a worker (the `process` backend by default). None: 1, or as
    # many as the backend has room for when it places steps itself (ray).
    jobs: int | None = None
    gpus: tuple[str, ...] | None = None  # GPUs to share out; None: all visible ones when jobs > 1
    per_gpu: int = 1  # steps that may share one GPU at once
    ray_address: str | None = None  # the ray backend's cluster: None a local instance, "auto", HOST:PORT
    # Set by dbl's command line: a usage error names its options (-j, --gpus, --only); else these fields
    # (jobs=, gpus=, only=), as a script gave them.
    command_line: bool = False


@dataclass
class BuildResult:
    ok: bool
    exit_code: int
    steps: list[StepEvent] = field(default_factory=list)


def backend_name(options: BuildOptions) -> str:
    """The backend that runs the steps: the one given, else `inline`, or `process` with -j above 1, since
    steps at once share no process, and with --gpus, since only a process started for them sees only those
    GPUs."""
    if options.backend is not None:
        return options.backend
    return "process" if needs_workers(options.jobs, options.gpus) else "inline"


def build(project: Project, options: BuildOptions, reporter: events.Reporter) -> BuildResult:
    """Build what is stale. Raises LockHeld, LockfileError, UsageError (options no build can use, as `dbl
    build` refuses them: the GPUs given are checked against this machine unless a `backend_factory` or a
    Ray cluster places the steps); step failures are results."""
    api = not options.command_line
    if (problem := inline_problem(options.backend, options.jobs, options.gpus, api)) is not None:
        raise UsageError(problem)
    if options.gpus is not None:
        problem = gpus_refused(  # the command line asked before, in its own words
            options.gpus, options.backend, options.ray_address, options.backend_factory is None, api=api
        )
        if problem is not None:
            raise UsageError(problem)
    if (problem := counts_problem(options.jobs, options.per_gpu, api)) is not None:
        raise UsageError(problem)
    n = options.num_processes
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise UsageError(
            f"num_processes={n!r}: give the processes a train step runs with, at least 1 (None: the "
            "project's num_processes)"
            if api
            else "--num-processes must be at least 1"
        )
    ws = Workspace(project)
    with BuildLock(project):
        lockfile.drop_leftover_temps(ws.lock_path)
        tempnames.drop_left_files(project.state_dir)  # the file-hash cache's, a lockfile parse's
        for folder in unfinished_commits(project):  # the old outputs, once the lockfile named the new ones
            shutil.rmtree(folder, ignore_errors=True)
        _fetch_hub_index(project)
        force_ids = set(options.force or ())
        if options.force is not None and not options.force:
            force_ids = {s.id for s in planner.graph(project)}
        try:
            lock, planned = ws.plan(force_ids, options.num_processes)
        except ImageError as found:  # every broken image at once, not those of the first folder alone
            lock = lockfile.read(ws.lock_path)
            raise preflight.every_broken_image(
                ws.hasher, lock, project, planner.graph(project), found
            ) from None
        planner.check_step_ids(planned, api=api, force=tuple(options.force or ()), only=options.only)
        if (problem := gpus_for_device(options.gpus, project.settings.device, api=api)) is not None:
            raise UsageError(f"{project.path.name}: {problem}")
        name = backend_name(options)
        factory = options.backend_factory or (lambda p: backends.create(name, p, options))
        backend = factory(project)
        try:
            return _run(ws, lock, planned, options, reporter, force_ids, backend)
        finally:
            backend.close()


def _fetch_hub_index(project: Project) -> None:
    """Put a hub base model's model_index.json in the Hugging Face cache before planning, where it is not
    there yet (quietly nothing offline). Its identity is the commit its revision resolves to there, and its
    family is read there: a model not cached yet would be planned as revision 'main' of SD 1.x, and once
    its steps had downloaded it, the next build would find another identity and run every step again."""
    from runner.models import BaseModel, fetch_hub_index

    fetch_hub_index(BaseModel.of(project.settings, project.dir))  # a cached model's build asks no network


def _resolve(project: Project, options: BuildOptions, backend) -> BuildOptions:
    """-j and the GPUs to share out, once the backend is known and started (connected to its cluster:
    a problem there is a UsageError, before any step runs)."""
    start = getattr(backend, "start", None)
    if start is not None:
        start()
    places = getattr(backend, "places_steps", False)  # Ray picks nodes and GPUs itself
    if options.jobs is None:
        options = replace(options, jobs=backend.default_jobs() if places else 1)
    if places:
        return replace(options, gpus=())
    if options.jobs > 1 and options.gpus is None:
        from runner.exec.devices import parse_gpus

        cpu = project.settings.device.startswith("cpu")
        options = replace(options, gpus=() if cpu else tuple(parse_gpus(None)))
    return options


def _event(p: planner.PlannedStep) -> StepEvent:
    return StepEvent(
        p.id, p.step.kind, p.step.name, events.PENDING if p.stale else events.FRESH, list(p.reasons)
    )


def removed_steps(ws: Workspace, lock: dict, current: set[str]) -> list[tuple[str, Path | None]]:
    """(step id, its output folder that the next build removes, or None) of each step the lockfile records
    that is gone from the project (removed or renamed). A folder is removed only where the record names
    outputs in it and it lies in the project's outputs folder."""
    found = []
    for sid in sorted(set(lock) - current):
        record = lock[sid]
        try:
            folder = ws.output_dir(sid)
        except KeyError:  # a kind this dbl does not know
            found.append((sid, None))
            continue
        owned = any(
            (ws.project.dir / rel).resolve().is_relative_to(folder) for rel in record.get("outputs", {})
        )
        found.append(
            (sid, folder if owned and folder.is_dir() and folder.is_relative_to(ws.project.out) else None)
        )
    return found


def _forget_removed(ws: Workspace, lock: dict, current: set[str], reporter, dry_run: bool) -> None:
    """Steps gone from the project (removed or renamed): drop their records and their output folders."""
    removed = removed_steps(ws, lock, current)
    if dry_run:
        for sid, folder in removed:
            if folder is not None:
                reporter.log(None, f"would remove {fmt_path(folder)}: {sid} is no longer in the project")
        return
    if not removed:
        return
    for sid, folder in removed:
        record = lock.pop(sid)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
            ws.hasher.forget(ws.project.dir / rel for rel in record.get("outputs", {}))
            reporter.log(None, f"removed {fmt_path(folder)}: {sid} is no longer in the project")
    lockfile.write(ws.lock_path, lock)
    ws.hasher.save()  # a build with nothing else to do saves it nowhere else


def blocked_by(evs: dict[str, StepEvent], dep: str) -> str:
    """Why a step is skipped: its upstream step `dep` failed, was interrupted, or was skipped itself."""
    status = evs[dep].status
    return f"upstream {dep} {status if status in (events.FAILED, events.INTERRUPTED) else events.SKIPPED}"


def _renamed(ws: Workspace, lock: dict, planned, dry_run: bool) -> None:
    """Fresh steps whose record names what has been renamed since (an image folder, a parent subject or
    blend: display keys, in no fingerprint) take the current names, so that the lockfile reads true and
    `dbl check` reads the files the project names; those that lack a value out of the fingerprint their
    outputs depend on (written by an older version) take the current one. Nothing runs."""
    renamed = False
    for p in planned:
        record = lock.get(p.id)
        if not p.stale and record is not None and p.inputs is not None:
            renamed |= planner.take_current(p.step, record, p.inputs)
    if renamed and not dry_run:
        lockfile.write(ws.lock_path, lock)


def _run(ws, lock, planned, options, reporter, force_ids, backend) -> BuildResult:
    started, began = time.monotonic(), time.time()
    _forget_removed(ws, lock, {p.id for p in planned}, reporter, options.dry_run)
    _renamed(ws, lock, planned, options.dry_run)
    selected = planner.upstream([p.step for p in planned], set(options.only)) if options.only else None
    evs = {p.id: _event(p) for p in planned}
    for p in planned:
        if selected is not None and p.id not in selected and p.stale:
            evs[p.id].status = events.SKIPPED
            evs[p.id].reasons = [f"not selected by {planner.option_name('only', not options.command_line)}"]
    reporter.plan(ws.project.name, list(evs.values()))
    todo = [p for p in planned if evs[p.id].status == events.PENDING]
    if not todo or options.dry_run:
        reporter.finish(list(evs.values()), time.monotonic() - started)
        return BuildResult(True, EXIT_OK, list(evs.values()))
    graph = [p.step for p in planned]
    failed: set[str] = set()
    todo, exit_code = _fail_before_start(ws, lock, todo, evs, options, reporter, graph, failed, backend)
    # Nothing left to run: no backend to start (a cluster to join), and the build ran one step at a time
    options = _resolve(ws.project, options, backend) if todo else replace(options, jobs=options.jobs or 1)

    if todo and (options.jobs > 1 or options.gpus):  # --gpus: the steps take theirs from the pool
        from runner.exec import parallel

        exit_code = (
            parallel.run(ws, lock, todo, evs, options, reporter, force_ids, backend, graph) or exit_code
        )
        todo = []
    for p in todo:
        ev = evs[p.id]
        blocked = [d for d in p.step.deps if d in failed]
        if blocked:
            ev.status, ev.error = events.SKIPPED, blocked_by(evs, blocked[0])
            failed.add(p.id)
            reporter.step_end(ev)
            continue
        clock = time.monotonic()
        try:
            _run_step(ws, lock, p, ev, options, reporter, p.id in force_ids, backend)
        except (KeyboardInterrupt, StepInterrupted) as exc:
            ev.duration_s = time.monotonic() - clock
            ev.status = events.INTERRUPTED
            ev.error = str(exc) or "interrupted"
            reporter.step_end(ev)
            exit_code = EXIT_INTERRUPTED
            break
        except Exception as exc:  # a failing step must not take the build's state with it
            ev.duration_s = time.monotonic() - clock
            ev.status = events.FAILED
            ev.error = describe_error(exc, options.debug)
            reporter.step_end(ev)
            failed.add(p.id)
            exit_code = EXIT_FAILED
            if not options.keep_going:
                break
            failed |= planner.dependents(graph, {p.id})
        else:
            reporter.step_end(ev)
        if options.should_stop() and exit_code == EXIT_OK:
            exit_code = EXIT_INTERRUPTED
            break
    for ev in evs.values():
        if ev.status == events.PENDING:
            ev.status = events.SKIPPED
    ws.hasher.save()
    seconds = time.monotonic() - started
    recorded = exit_code
    if exit_code == EXIT_INTERRUPTED and (signum := options.stop_signal()) is not None:
        recorded = exit_code_for(signum)
    what = lastbuild.record(list(evs.values()), began, seconds, recorded, backend.name, options.jobs)
    if problem := lastbuild.write(ws.project, what):
        reporter.log(None, problem)
    reporter.finish(list(evs.values()), seconds)
    return BuildResult(exit_code == EXIT_OK, exit_code, list(evs.values()))


def _fail_before_start(ws: Workspace, lock, todo, evs, options, reporter, graph, failed: set[str], backend):
    """Fail the steps of `todo` that would fail on a broken image or caption, on LoRA targets that name
    no module, or on an optimizer or scheduler this machine cannot run: before any step runs (and loads a
    model). The steps after them are skipped. The steps left to run, and the exit code so far. Raises a
    UsageError where this machine lacks the project's device."""
    running = [p.step for p in todo if not p.restorable]
    if not running:
        return todo, EXIT_OK
    places = getattr(backend, "places_steps", False)  # a cluster's workers may have what this machine lacks
    if not places and (problem := preflight.device_problem(ws.project, running)) is not None:
        raise UsageError(problem)  # the project's setting: said once, as a project problem (exit 2)
    errors = preflight.failing_steps(ws.hasher, lock, ws.project, running)
    notes: list[str] = []
    found = [
        preflight.caption_errors(ws.project, running),
        preflight.target_errors(ws.project, running, notes),
        preflight.step_count_errors(ws.project, running),
    ]
    for note in notes:
        reporter.log(None, note)
    if not places:
        found.append(preflight.machine_errors(ws.project, running))
    for sid, error in [item for more in found for item in more.items()]:
        errors[sid] = f"{errors[sid]}\n{error}" if sid in errors else error
    if not errors:
        return todo, EXIT_OK
    for sid in _said_upstream(graph, errors):
        del errors[sid]  # skipped below, as depending on the step that says it
    failed |= set(errors)
    behind = planner.dependents(graph, set(errors))
    for p in todo:
        ev = evs[p.id]
        if p.id in errors:
            ev.status, ev.error = events.FAILED, errors[p.id]
        elif p.id in behind:
            dep = next(d for d in p.step.deps if d in errors or d in behind)
            ev.status, ev.error = events.SKIPPED, blocked_by(evs, dep)
            failed.add(p.id)
        else:
            continue
        reporter.step_end(ev)
    return ([p for p in todo if p.id not in failed] if options.keep_going else []), EXIT_FAILED


def _said_upstream(graph, errors: dict[str, str]) -> list[str]:
    """The steps of `errors` whose every line a step they depend on says already: a snapshot of a subject
    whose train step fails on the same photo or LoRA target repeated its error word for word. A step
    that fails for a reason of its own keeps its error, so that every broken file is named at once."""
    found = []
    for sid, error in errors.items():
        above = planner.upstream(graph, {sid}) - {sid}
        said = {line for up in above if up in errors for line in errors[up].splitlines()}
        if set(error.splitlines()) <= said:
            found.append(sid)
    return found


def describe_error(exc: BaseException, debug: bool) -> str:
    if isinstance(exc, StepCrash):  # raised in a worker: its traceback is the worker's
        return exc.trace.rstrip() if debug else f"{exc} (run with --debug for the traceback)"
    if debug:
        return "".join(traceback.format_exception(exc)).rstrip()
    if isinstance(exc, OSError):
        return os_words(exc)
    if isinstance(exc, DblError):
        return str(exc)
    return f"{type(exc).__name__}: {exc} (run with --debug for the traceback)"


def _run_step(ws: Workspace, lock: dict, p, ev: StepEvent, options, reporter, force: bool, backend) -> None:
    """Bring one step up to date: skip, restore from the run-cache, or run it; then record it."""
    started = begin_step(ws, lock, p, ev, options, reporter, force)
    if started is None:
        return
    job, hooks = make_job(ws, started, ev, options, reporter)
    try:
        outcome = backend.run(job, hooks)
    except Exception:  # failed or interrupted: it resumes from its work folder, if that can be trusted
        drop_work_if_changed(ws, started, ev, reporter)
        raise
    finally:
        job.stop_file.unlink(missing_ok=True)
    finish_step(ws, lock, started, ev, outcome, reporter)
