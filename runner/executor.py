"""Run a plan: work folders, atomic commits, the run-cache and the lockfile, one step at a time.

For each step, in order: recompute its fingerprint from its upstream steps' *current* output hashes;
skip it if the lockfile already holds that fingerprint with intact outputs; restore it if the run-cache
holds it; otherwise run it in `.dbl/tmp/<stem>/<kind>-<name>/`, store its outputs in the run-cache,
swap them into place and record them in the lockfile (written atomically after every step).
"""

from __future__ import annotations

import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from runner import events, lockfile, planner
from runner.errors import DblError, StepInterrupted, UsageError
from runner.events import StepEvent
from runner.fingerprint import FileHasher, fingerprint
from runner.project.schema import Project
from runner.steps import OUTPUT_DIRS, StepContext, get_runner
from runner.store import BuildLock, DiskFacts, RunCache, copy_tree, file_manifest, output_hash, replace_dir

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


@dataclass
class BuildOptions:
    dry_run: bool = False
    only: tuple[str, ...] = ()  # build these steps (and the stale steps they need), nothing else
    force: tuple[str, ...] | None = None  # rerun these steps; () means every step; None: none
    keep_going: bool = False  # after a failure, go on with the steps that do not depend on it
    num_processes: int | None = None  # overrides [project] num_processes for train steps
    should_stop: Callable[[], bool] = lambda: False  # True once the user asked to stop (Ctrl-C)
    debug: bool = False  # show tracebacks of failing steps


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

    def tmp(self, step: planner.Step) -> Path:
        return self.state / "tmp" / self.project.path.stem / f"{step.kind}-{step.name}"

    def output_dir(self, step: planner.Step | str) -> Path:
        """The committed output folder of a step (or step id)."""
        if isinstance(step, str):
            kind, name = step.split(":", 1)
            return self.project.out / OUTPUT_DIRS[kind] / name
        return self.project.out / step.output_dir

    def rel(self, path: Path) -> str:
        return planner.relative(self.project, path)

    def plan(self, force: set[str] | None = None) -> tuple[dict, list[planner.PlannedStep]]:
        lock = lockfile.read(self.lock_path)
        planned = planner.plan(self.project, lock, self.facts, force)
        self.hasher.save()
        return lock, planned


def check_step_ids(planned: list[planner.PlannedStep], ids: tuple[str, ...], option: str) -> None:
    known = [p.id for p in planned]
    for sid in ids:
        if sid not in known:
            raise UsageError(f"{option}: no step '{sid}'; steps: {', '.join(known) or 'none'}")


def build(project: Project, options: BuildOptions, reporter: events.Reporter) -> BuildResult:
    """Build what is stale. Raises LockHeld, LockfileError, UsageError; step failures are results."""
    ws = Workspace(project)
    with BuildLock(project):
        force_ids = set(options.force or ())
        if options.force is not None and not options.force:
            force_ids = {s.id for s in planner.graph(project)}
        lock, planned = ws.plan(force_ids)
        check_step_ids(planned, tuple(force_ids), "--force")
        check_step_ids(planned, options.only, "--only")
        return _run(ws, lock, planned, options, reporter, force_ids)


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


def _run(ws, lock, planned, options, reporter, force_ids) -> BuildResult:
    started = time.monotonic()
    current = {p.id for p in planned}
    if set(lock) - current:  # steps removed from the project: forget them
        for sid in set(lock) - current:
            del lock[sid]
        if not options.dry_run:
            lockfile.write(ws.lock_path, lock)
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

    failed: set[str] = set()
    exit_code = EXIT_OK
    steps = [p.step for p in planned]
    for p in todo:
        ev = evs[p.id]
        blocked = [d for d in p.step.deps if d in failed]
        if blocked:
            ev.status, ev.error = events.SKIPPED, f"upstream {blocked[0]} failed"
            failed.add(p.id)
            reporter.step_end(ev)
            continue
        clock = time.monotonic()
        try:
            _run_step(ws, lock, p, ev, options, reporter, force=p.id in force_ids)
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
            ev.error = _describe_error(exc, options.debug)
            reporter.step_end(ev)
            failed.add(p.id)
            exit_code = EXIT_FAILED
            if not options.keep_going:
                break
            for sid in planner.dependents(steps, {p.id}):
                failed.add(sid)
        else:
            reporter.step_end(ev)
        if options.should_stop() and exit_code == EXIT_OK:
            exit_code = EXIT_INTERRUPTED
            break
    for ev in evs.values():
        if ev.status == events.PENDING:
            ev.status = events.SKIPPED
    ws.hasher.save()
    reporter.finish(list(evs.values()), time.monotonic() - started)
    return BuildResult(exit_code == EXIT_OK, exit_code, list(evs.values()))


def _describe_error(exc: Exception, debug: bool) -> str:
    if debug:
        return "".join(traceback.format_exception(exc)).rstrip()
    if isinstance(exc, (DblError, OSError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc} (run with --debug for the traceback)"


def _run_step(
    ws: Workspace, lock: dict, p: planner.PlannedStep, ev: StepEvent, options, reporter, force: bool
) -> None:
    """Bring one step up to date: skip, restore from the run-cache, or run it; then record it."""
    project, step = ws.project, p.step
    hashes = {d: lock[d]["output_hash"] for d in step.deps}
    inputs = planner.step_inputs(project, step, ws.facts, hashes)
    fp = fingerprint(inputs)
    record = lock.get(step.id)
    if not force and record and record["fingerprint"] == fp and not ws.facts.outputs_intact(record):
        ev.status = events.FRESH
        ev.reasons = ["upstream rebuilt with identical outputs"]
        return
    ev.status = events.RUNNING
    ev.reasons = (
        ev.reasons
        if p.inputs is not None or not record
        else planner.explain(record.get("inputs", {}), inputs)
    )
    reporter.step_start(ev)
    begun = time.time()
    clock = time.monotonic()
    meta = None if force else ws.cache.verify(fp)
    if meta is not None:
        ev.status = events.CACHED
        metrics = meta.get("metrics", {})
    else:
        metrics = _execute(ws, step, inputs, fp, ev, options, reporter)
        ev.status = events.DONE
        meta = ws.cache.manifest(fp)
    _commit(ws, lock, step, inputs, fp, meta, metrics, begun, time.monotonic() - clock)
    ev.duration_s = time.monotonic() - clock
    ev.outputs = ws.output_dir(step)
    ev.metrics.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})


def _execute(ws: Workspace, step, inputs: dict, fp: str, ev: StepEvent, options, reporter) -> dict:
    """Run the step's code in its work folder and move its outputs into the run-cache."""
    work = ws.tmp(step)
    marker = work / "fingerprint"
    if work.exists() and (not marker.is_file() or marker.read_text() != fp):
        shutil.rmtree(work)  # checkpoints of other inputs cannot be resumed
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(fp)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()

    def progress(done: int, total: int, **metrics) -> None:
        ev.done, ev.total = done, total
        ev.metrics.update(metrics)
        reporter.step_progress(ev)

    ctx = StepContext(
        step_id=step.id,
        kind=step.kind,
        name=step.name,
        spec=step.spec,
        project=ws.project,
        work=work,
        out=out,
        inputs={d: ws.output_dir(d) for d in step.deps},
        models=_LazyModels(ws),
        fingerprint=fp,
        num_processes=options.num_processes or ws.project.settings.num_processes,
        progress=progress,
        log=lambda message: reporter.log(ev, message),
        should_stop=options.should_stop,
    )
    metrics = get_runner(step.kind)(ctx) or {}
    manifest = file_manifest(out, ws.hasher)
    ws.cache.store(fp, out, manifest, metrics)
    return metrics


class _LazyModels:
    """The build's shared base-model cache, made on first use, so steps that need no model (and
    tests with fake steps) never import torch."""

    _shared: dict = {}  # one base model held at a time, across builds of one process (dbl watch)

    def __init__(self, ws: Workspace):
        self._ws = ws

    def __getattr__(self, name):
        from runner.models import BaseModel, ModelCache

        s = self._ws.project.settings
        base = BaseModel.parse(s.base_model, self._ws.project.dir, s.revision, s.allow_pickle)
        key = (base, s.device, s.mixed_precision)
        if key not in self._shared:
            self._shared.clear()
            self._shared[key] = ModelCache(base, s.device, s.mixed_precision)
        return getattr(self._shared[key], name)


def _commit(
    ws: Workspace, lock: dict, step, inputs, fp: str, meta: dict, metrics: dict, begun: float, seconds: float
) -> None:
    """Copy the cache entry into the output folder, swap it in, and record it in the lockfile."""
    entry = ws.cache.entry(fp) / "files"
    work_root = ws.state / "tmp" / ws.project.path.stem
    work_root.mkdir(parents=True, exist_ok=True)
    staged = work_root / f".staged-{step.kind}-{step.name}"
    shutil.rmtree(staged, ignore_errors=True)
    copy_tree(entry, staged)
    target = ws.output_dir(step)
    replace_dir(staged, target, work_root / f".trash-{step.kind}-{step.name}")
    outputs = {}
    for rel, item in meta["outputs"].items():
        path = target / rel
        ws.hasher.hash(path)  # prime the stat cache: the next plan need not re-read outputs
        outputs[ws.rel(path)] = {"sha256": item["sha256"], "size": item["size"]}
    lock[step.id] = {
        "kind": step.kind,
        "fingerprint": fp,
        "output_hash": output_hash(meta["outputs"]),
        "inputs": inputs,
        "outputs": outputs,
        "metrics": _plain_data(metrics),
        "built": datetime.fromtimestamp(begun, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "duration_s": round(seconds, 3),
    }
    lockfile.write(ws.lock_path, lock)
    ws.hasher.save()
    shutil.rmtree(ws.tmp(step), ignore_errors=True)
