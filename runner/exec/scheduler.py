"""The scheduler: run a plan, one writer for the lockfile, the run-cache and the display.

For each step, in order: recompute its fingerprint from its upstream steps' *current* output hashes;
skip it if the lockfile already holds that fingerprint with intact outputs; restore it if the run-cache
holds it; otherwise have the backend run it in `.dbl/tmp/<stem>/<kind>-<name>/`. Before its outputs
are kept, the files it read are checked against what the fingerprint was made of: a photo swapped while
the step ran would otherwise put the new photo's adapter under the old photo's fingerprint. Then the
outputs go into the run-cache, are swapped into place, and the lockfile (written atomically after every
step) records them.
"""

from __future__ import annotations

import shutil
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from runner import events, lockfile, planner, steps, store
from runner.errors import DblError, StepError, StepInterrupted, UsageError
from runner.events import WARNING, StepEvent
from runner.exec import backends, lastbuild
from runner.exec.job import Hooks, Job
from runner.fingerprint import FileHasher, fingerprint
from runner.merge import same as same_build
from runner.project.schema import Project
from runner.store import BuildLock, DiskFacts, RunCache, copy_tree, output_hash, replace_dir

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
STATE_SAVE_S = 10.0  # how often a build writes the file-hash cache between steps


@dataclass
class BuildOptions:
    dry_run: bool = False
    only: tuple[str, ...] = ()  # build these steps (and the stale steps they need), nothing else
    force: tuple[str, ...] | None = None  # rerun these steps; () means every step; None: none
    keep_going: bool = False  # after a failure, go on with the steps that do not depend on it
    num_processes: int | None = None  # overrides [project] num_processes for train steps
    should_stop: Callable[[], bool] = lambda: False  # True once the user asked to stop (Ctrl-C)
    debug: bool = False  # show tracebacks of failing steps
    backend: str = "inline"  # where steps run: see runner.exec.backends
    backend_factory: Callable | None = None  # a backend instance maker (tests), instead of `backend`
    # Steps at once; above 1 each runs in a worker (the `process` backend by default). None: 1, or as
    # many as the backend has room for when it places steps itself (ray).
    jobs: int | None = None
    gpus: tuple[str, ...] | None = None  # GPUs to share out when jobs > 1; None: all visible ones
    per_gpu: int = 1  # steps that may share one GPU at once
    ray_address: str | None = None  # the ray backend's cluster: None a local instance, "auto", HOST:PORT


@dataclass
class BuildResult:
    ok: bool
    exit_code: int
    steps: list[StepEvent] = field(default_factory=list)


class Workspace:
    """The paths and stores of one project: lockfile, .dbl/ state, run-cache, outputs."""

    def __init__(self, project: Project):
        self.project = project
        self.lock_path = lockfile.lock_path(project.path)
        self.state = project.state_dir
        self.hasher = FileHasher(self.state / "state")
        self.cache = RunCache(self.state / "cache")
        self.facts = DiskFacts(project, self.hasher, self.cache)

    @property
    def work_root(self) -> Path:
        return store.work_root(self.project)

    def tmp(self, step: planner.Step) -> Path:
        return store.work_folder(self.project, step.kind, step.name)

    def output_dir(self, step: planner.Step | str) -> Path:
        """The committed output folder of a step (or step id)."""
        if isinstance(step, str):
            return self.project.out / steps.output_dir(step)
        return self.project.out / step.output_dir

    def rel(self, path: Path) -> str:
        return planner.relative(self.project, path)

    def plan(
        self, force: set[str] | None = None, num_processes: int | None = None
    ) -> tuple[dict, list[planner.PlannedStep]]:
        lock = lockfile.read(self.lock_path)
        if not lock and not self.lock_path.exists():
            for other in sorted(self.project.dir.glob("*.lock")):
                # a project file renamed without its lockfile? (uv.lock, poetry.lock: another tool's)
                if not other.with_suffix(".toml").exists() and not lockfile.foreign(other):
                    warnings.warn(
                        f"{other.name} lies beside {self.project.path.name}, and no {other.stem}.toml: if "
                        f"this project file was renamed from it, rename the lockfile too (git mv {other.name} "
                        f"{self.lock_path.name})",
                        stacklevel=2,
                    )
        planned = planner.plan(self.project, lock, self.facts, force, num_processes)
        self.hasher.save()
        store.keep_out_of_git(self.state)
        return lock, planned

    def snapshot(self, step: planner.Step) -> store.Snapshot:
        """The stat of what a step reads: the visible files of its input folders (no step reads a hidden
        one, and a Finder's .DS_Store or an editor's swap file written meanwhile must not fail it), every
        file of its upstream steps' outputs and of a local base model."""
        folders = [Path(folder) for folder in steps.get(step.kind).folders(step.spec)]
        snap = store.stat_snapshot(folders, hidden=False)
        snap.update(
            store.stat_snapshot([self.output_dir(d) for d in step.deps] + self.facts.base_model_paths())
        )
        return snap


def backend_name(options: BuildOptions) -> str:
    """The backend that runs the steps: `inline` becomes `process` with -j above 1, since steps at once
    share no process."""
    if options.backend == "inline" and (options.jobs or 1) > 1:
        return "process"
    return options.backend


def build(project: Project, options: BuildOptions, reporter: events.Reporter) -> BuildResult:
    """Build what is stale. Raises LockHeld, LockfileError, UsageError; step failures are results."""
    ws = Workspace(project)
    with BuildLock(project):
        force_ids = set(options.force or ())
        if options.force is not None and not options.force:
            force_ids = {s.id for s in planner.graph(project)}
        lock, planned = ws.plan(force_ids, options.num_processes)
        planner.check_step_ids(planned, force=tuple(options.force or ()), only=options.only)
        if (options.jobs is not None and options.jobs < 1) or options.per_gpu < 1:
            raise UsageError("-j and --per-gpu must be at least 1")
        name = backend_name(options)
        factory = options.backend_factory or (lambda p: backends.create(name, p, options))
        backend = factory(project)
        try:
            return _run(ws, lock, planned, options, reporter, force_ids, backend)
        finally:
            backend.close()


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


def _plain_data(value):
    """Metrics as TOML can hold them: no None, no tuples, no tensors or paths."""
    if isinstance(value, dict):
        return {str(k): _plain_data(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain_data(v) for v in value if v is not None]
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _forget_removed(ws: Workspace, lock: dict, current: set[str], reporter, dry_run: bool) -> None:
    """Steps gone from the project (removed or renamed): drop their records and their output folders."""
    removed = sorted(set(lock) - current)
    if not removed or dry_run:
        return
    for sid in removed:
        record = lock.pop(sid)
        try:
            folder = ws.output_dir(sid)
        except KeyError:  # a kind this dbl does not know
            continue
        owned = any(
            (ws.project.dir / rel).resolve().is_relative_to(folder) for rel in record.get("outputs", {})
        )
        if owned and folder.is_dir() and folder.is_relative_to(ws.project.out):
            shutil.rmtree(folder, ignore_errors=True)
            reporter.log(None, f"removed {ws.rel(folder)}: {sid} is no longer in the project")
    lockfile.write(ws.lock_path, lock)


def blocked_by(evs: dict[str, StepEvent], dep: str) -> str:
    """Why a step is skipped: its upstream step `dep` failed, was interrupted, or was skipped itself."""
    status = evs[dep].status
    return f"upstream {dep} {status if status in (events.FAILED, events.INTERRUPTED) else events.SKIPPED}"


def _renamed(ws: Workspace, lock: dict, planned, dry_run: bool) -> None:
    """Fresh steps whose record names what has been renamed since (an image folder, a parent subject or
    blend: display keys, in no fingerprint) take the current names, so that the lockfile reads true and
    `dbl check` reads the files the project names. Nothing runs."""
    renamed = False
    for p in planned:
        record = lock.get(p.id)
        if not p.stale and record is not None and p.inputs is not None:
            renamed |= lockfile.take_names(record, p.inputs)
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
            evs[p.id].reasons = ["not selected by --only"]
    reporter.plan(ws.project.name, list(evs.values()))
    todo = [p for p in planned if evs[p.id].status == events.PENDING]
    if not todo or options.dry_run:
        reporter.finish(list(evs.values()), time.monotonic() - started)
        return BuildResult(True, EXIT_OK, list(evs.values()))
    options = _resolve(ws.project, options, backend)

    failed: set[str] = set()
    exit_code = EXIT_OK
    graph = [p.step for p in planned]
    if options.jobs > 1:
        from runner.exec import parallel

        exit_code = parallel.run(ws, lock, todo, evs, options, reporter, force_ids, backend, graph)
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
    what = lastbuild.record(list(evs.values()), began, seconds, exit_code, backend.name, options.jobs)
    if problem := lastbuild.write(ws.project, what):
        reporter.log(None, problem)
    reporter.finish(list(evs.values()), seconds)
    return BuildResult(exit_code == EXIT_OK, exit_code, list(evs.values()))


def describe_error(exc: BaseException, debug: bool) -> str:
    if debug:
        return "".join(traceback.format_exception(exc)).rstrip()
    if isinstance(exc, (DblError, OSError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc} (run with --debug for the traceback)"


@dataclass
class Started:
    """A step that must run: what its finish needs once the backend returns."""

    p: planner.PlannedStep
    before: store.Snapshot
    inputs: dict
    fp: str
    begun: float
    clock: float
    force: bool
    num_processes: int | None = None  # --num-processes, part of a train step's inputs
    earlier: Path | None = None  # the step's committed outputs, for a kind that reuses them


def _run_step(ws: Workspace, lock: dict, p, ev: StepEvent, options, reporter, force: bool, backend) -> None:
    """Bring one step up to date: skip, restore from the run-cache, or run it; then record it."""
    started = begin_step(ws, lock, p, ev, options, reporter, force)
    if started is None:
        return
    job, hooks = make_job(ws, p.step, started.fp, ev, options, reporter, earlier=started.earlier)
    try:
        outcome = backend.run(job, hooks)
    except Exception:  # failed or interrupted: it resumes from its work folder, if that can be trusted
        drop_work_if_changed(ws, started, ev, reporter)
        raise
    finally:
        job.stop_file.unlink(missing_ok=True)
    finish_step(ws, lock, started, ev, outcome, reporter)


def begin_step(ws: Workspace, lock: dict, p, ev: StepEvent, options, reporter, force: bool):
    """Skip the step (fresh) or restore it from the run-cache and commit it (returns None); or mark it
    running and return what its finish needs. Main thread only."""
    project, step = ws.project, p.step
    before = ws.snapshot(step)  # before hashing: any change from here on shows in `after`
    ws.facts.forget()  # what the plan hashed may have changed since
    hashes = {d: lock[d]["output_hash"] for d in step.deps}
    inputs = planner.step_inputs(project, step, ws.facts, hashes, options.num_processes)
    fp = fingerprint(inputs)
    record = lock.get(step.id)
    if not force and record and record["fingerprint"] == fp:
        problem = ws.facts.outputs_intact(record, step.output_dir)
        if not problem:
            ev.status = events.FRESH
            ev.reasons = [_fresh_behind(ws, p, hashes, fp, options.num_processes)]
            if lockfile.take_names(record, inputs):
                lockfile.write(ws.lock_path, lock)
            return None
        ev.reasons = [problem]
    elif p.inputs is None and record:  # planned behind a stale upstream: now the inputs are known
        ev.reasons = planner.explain(record.get("inputs", {}), inputs)
    ev.status = events.RUNNING
    device = ev.device
    if not force and ws.cache.has(fp):  # a restore runs here, on no device
        ev.device = ""
    reporter.step_start(ev)
    begun = ev.started = time.time()
    clock = time.monotonic()
    kind = steps.get(step.kind)
    meta = (
        None
        if force
        else ws.cache.verify(fp, layout=_layout(kind, step.name), warn=_warner(ws, reporter, ev))
    )
    ev.device = device if meta is None else ""
    if meta is not None:
        ev.status = events.CACHED
        metrics = meta.get("metrics", {})
        _commit(ws, lock, step, inputs, fp, meta, metrics, begun, time.monotonic() - clock, record)
        _ended(ws, step, ev, metrics, clock)
        return None
    earlier = None if force else _earlier(ws, kind, step, record, inputs)
    return Started(p, before, inputs, fp, begun, clock, force, options.num_processes, earlier)


def _fresh_behind(ws: Workspace, p, hashes: dict[str, str], fp: str, num_processes) -> str:
    """Why a step planned behind stale upstream steps is fresh once they ran: they rebuilt the outputs it
    reads as they were, or it reads none of their outputs."""
    if not p.behind:  # planned stale for its own reasons, which no longer hold
        return "inputs unchanged"
    if planner.reads_outputs(ws.project, p.step, ws.facts, hashes, p.behind, fp, num_processes):
        return "upstream rebuilt with identical outputs"
    return planner.not_read(p.behind)


def _earlier(ws: Workspace, kind: steps.StepKind, step, record: dict | None, inputs: dict) -> Path | None:
    """The step's committed outputs when its kind can reuse them for the new inputs and they are as the
    lockfile recorded them (a file edited since would be reused as if the step had made it)."""
    if kind.reuses is None or not record or not kind.reuses(record.get("inputs", {}), inputs):
        return None
    if ws.facts.outputs_intact(record, step.output_dir):
        return None
    return ws.output_dir(step)


def finish_step(ws: Workspace, lock: dict, s: Started, ev: StepEvent, outcome, reporter) -> None:
    """Keep what the backend produced: check the inputs did not change, store, commit. Main thread only."""
    step = s.p.step
    replaced = ws.cache.store(s.fp, outcome.out, outcome.manifest, outcome.metrics, replace=s.force)
    if replaced:  # different bytes from the same inputs: the step does not reproduce itself; say so always
        shown = WARNING if replaced == RunCache.HELD_DIFFERENT else ""
        reporter.log(ev, f"{shown}forced: replaced the run-cache entry of these inputs ({replaced})")
    metrics, meta = outcome.metrics, ws.cache.manifest(s.fp)
    after = ws.snapshot(step)
    changed = after.changed_since(s.before)
    if changed:
        ws.cache.drop(s.fp)
        shutil.rmtree(ws.tmp(step), ignore_errors=True)  # see drop_work_if_changed
        first = str(changed[0])
        how = (
            "was added"
            if s.before.get(first) is None
            else "was removed"
            if after.get(first) is None
            else "changed"
        )
        raise StepError(
            f"{step.id}: {ws.rel(changed[0])} {how} while the step ran"
            + (f" (and {len(changed) - 1} more)" if len(changed) > 1 else "")
            + "; its outputs were not kept. Run dbl build again to build from the files as they are now"
        )
    ev.status = events.DONE
    _keep_extras(ws, lock, s, ev, outcome, reporter)  # before the commit removes the work folder
    _commit(ws, lock, step, s.inputs, s.fp, meta, metrics, s.begun, time.monotonic() - s.clock)
    _ended(ws, step, ev, metrics, s.clock)


def drop_work_if_changed(ws: Workspace, s: Started, ev: StepEvent, reporter) -> None:
    """Drop the work folder of a step that failed or was interrupted when what it reads changed while it
    ran: its checkpoints may hold training on files that are not those of its fingerprint, and the next
    build, of the files as they are then (even put back as they were), must not resume from them."""
    changed = ws.snapshot(s.p.step).changed_since(s.before)
    work = ws.tmp(s.p.step)
    if changed and work.exists():
        shutil.rmtree(work, ignore_errors=True)
        reporter.log(
            ev,
            f"{WARNING}{ws.rel(changed[0])} changed while the step ran: its work folder is dropped, and "
            "the next build starts it over",
        )


def _keep_extras(ws: Workspace, lock: dict, s: Started, ev: StepEvent, outcome, reporter) -> None:
    """Store in the run-cache the outputs a step made for other steps (a train step's snapshots), under
    those steps' fingerprints, so that they restore instead of running."""
    extras = getattr(outcome, "extras", None) or {}
    if not extras:
        return
    declared = {step.id: step for step in planner.graph(ws.project)}
    for step_id, (folder, manifest, metrics) in sorted(extras.items()):
        step = declared.get(step_id)
        if step is None:
            continue
        hashes = {d: lock[d]["output_hash"] for d in step.deps if d in lock and d != s.p.step.id}
        try:
            fp = fingerprint(planner.step_inputs(ws.project, step, ws.facts, hashes, s.num_processes))
        except KeyError:  # it reads an output that is not built: it will run by itself
            continue
        if ws.cache.manifest(fp) is None:
            ws.cache.store(fp, Path(folder), manifest, metrics)
            reporter.log(ev, f"kept {step_id} in the run-cache")


def _ended(ws: Workspace, step, ev: StepEvent, metrics: dict, clock: float) -> None:
    ev.duration_s = time.monotonic() - clock
    ev.outputs = ws.output_dir(step)
    ev.metrics.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})


def _layout(kind: steps.StepKind, name: str) -> dict[str, str]:
    return kind.layout(name) if kind.layout else {}


def _warner(ws: Workspace, reporter, ev):
    return lambda message: reporter.log(ev, WARNING + message)


def make_job(ws: Workspace, step, fp: str, ev: StepEvent, options, reporter, devices=(), earlier=None):
    """The step's Job, and hooks that report its progress and log lines on `reporter`."""
    work = ws.tmp(step)
    job = Job(
        step_id=step.id,
        kind=step.kind,
        name=step.name,
        spec=step.spec,
        project=ws.project,
        fingerprint=fp,
        run=steps.get(step.kind).run_ref,
        inputs={d: ws.output_dir(d) for d in step.deps},
        work=work,
        num_processes=options.num_processes or ws.project.settings.num_processes,
        devices=tuple(devices),
        # CPU workers keep torch's own thread count: fewer threads change how float sums are split,
        # and so the bytes of what a step writes (a -j 3 build must write what -j 1 writes).
        threads=0,
        stop_file=ws.work_root / f".stop-{step.kind}-{step.name}",
        earlier=earlier,
    )
    job.stop_file.unlink(missing_ok=True)

    def progress(done: int, total: int, **metrics) -> None:
        ev.done, ev.total = done, total
        ev.metrics.update(metrics)
        reporter.step_progress(ev)

    def where(place: str) -> None:
        ev.device = place
        reporter.step_progress(ev)

    hooks = Hooks(
        progress=progress,
        log=lambda message: reporter.log(ev, message),
        should_stop=options.should_stop,
        where=where,
    )
    return job, hooks


def _commit(
    ws: Workspace,
    lock: dict,
    step,
    inputs,
    fp: str,
    meta: dict,
    metrics: dict,
    begun: float,
    seconds: float,
    restored_over: dict | None = None,
) -> None:
    """Copy the cache entry into the output folder, swap it in, and record it in the lockfile.

    `restored_over` is the record a restore from the run-cache replaces: where it records this very
    build (a branch switched back to, outputs deleted), when and how long that build ran stay as they
    were, so that a committed lockfile is not rewritten by a build that ran nothing."""
    entry = ws.cache.entry(fp) / "files"
    ws.work_root.mkdir(parents=True, exist_ok=True)
    staged, trash = store.commit_folders(ws.project, step.kind, step.name)
    shutil.rmtree(staged, ignore_errors=True)
    names = _layout(steps.get(step.kind), step.name)
    copy_tree(entry, staged, names)
    target = ws.output_dir(step)
    replace_dir(staged, target, trash)
    outputs = {}
    for rel, item in meta["outputs"].items():
        path = target / names.get(rel, rel)
        ws.hasher.hash(path)  # prime the stat cache: the next plan need not re-read outputs
        outputs[ws.rel(path)] = {"sha256": item["sha256"], "size": item["size"]}
    lock[step.id] = lockfile.record(
        kind=step.kind,
        fingerprint=fp,
        output_hash=output_hash(meta["outputs"]),
        inputs=inputs,
        outputs=outputs,
        metrics=_plain_data(metrics),
        built=datetime.fromtimestamp(begun, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        duration_s=round(seconds, 3),
    )
    made = restored_over or {}
    if same_build(made, lock[step.id]) and "built" in made and "duration_s" in made:
        lock[step.id].update(built=made["built"], duration_s=made["duration_s"])
    lockfile.write(ws.lock_path, lock)
    # The end of the build saves the rest: a killed build loses at most these seconds of hashes, which
    # the next plan reads again.
    ws.hasher.save(max_age_s=STATE_SAVE_S)
    shutil.rmtree(ws.tmp(step), ignore_errors=True)
