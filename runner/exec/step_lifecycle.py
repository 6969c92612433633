"""One step of a build, in the build's own process: skipped, restored or run, then kept and recorded.

For each step, in order: recompute its fingerprint from its upstream steps' *current* output hashes;
skip it if the lockfile already holds that fingerprint with intact outputs; restore it if the run-cache
holds it; otherwise have the backend run it in `.dbl/tmp/<stem>/<kind>-<name>/`. Before its outputs
are kept, the files it read are checked against what the fingerprint was made of: a photo swapped while
the step ran would otherwise put the new photo's adapter under the old photo's fingerprint. Then the
outputs go into the run-cache, are swapped into place, and the lockfile (written atomically after every
step) records them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from runner import events, lockfile, planner, steps, store
from runner.errors import DblError, StepError
from runner.events import WARNING, StepEvent
from runner.exchange import replace_dir
from runner.exec.job import Hooks, Job
from runner.exec.workspace import Workspace
from runner.fingerprint import FileHasher, fingerprint
from runner.merge import same as same_build
from runner.reasons import explain
from runner.store import RunCache, output_hash
from runner.ui.plain import fmt_path

STATE_SAVE_S = 10.0  # how often a build writes the file-hash cache between steps


def _plain_data(value):
    """Metrics as TOML can hold them: no None, no tuples, no tensors or paths."""
    if isinstance(value, dict):
        return {str(k): _plain_data(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain_data(v) for v in value if v is not None]
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


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
    recorded: dict | None = None  # the step's record in the lockfile when it started


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
        problem = planner.record_problem(ws.facts, step, record, inputs)
        if not problem:
            ev.status = events.FRESH
            ev.reasons = [_fresh_behind(ws, p, hashes, fp, options.num_processes)]
            if planner.take_current(step, record, inputs):
                lockfile.write(ws.lock_path, lock)
            return None
        ev.reasons = [problem]
    elif force:  # its inputs may be the same, and it runs anyway: said so, not "inputs changed"
        ev.reasons = ["forced"]
    elif p.inputs is None and record:  # planned behind a stale upstream: now the inputs are known
        ev.reasons = explain(record.get("inputs", {}), inputs, base=ws.project.dir)
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
        else ws.cache.verify(
            fp,
            layout=_layout(kind, step.name),
            warn=_warner(ws, reporter, ev),
            unhashed=steps.unhashed_of(kind, inputs),
            since=store.trusted_since(step.kind, inputs),
            read=False,  # its bytes are hashed as they are copied out, next
        )
    )
    if meta is not None and not _stage_entry(ws, step, fp, meta, _warner(ws, reporter, ev)):
        meta = None
    ev.device = device if meta is None else ""
    if meta is not None:
        ev.status = events.CACHED
        metrics = meta.get("metrics", {})
        _commit(ws, lock, step, inputs, fp, meta, metrics, begun, time.monotonic() - clock, record)
        _ended(ws, lock, step, ev, metrics, clock)
        return None
    if force:
        # A rerun from the start, as asked: not resumed from an interrupted attempt's checkpoints or images,
        # which a suspect state would be among, and whose bytes the rerun is to be compared with.
        shutil.rmtree(ws.tmp(step), ignore_errors=True)
    earlier = None if force else _earlier(ws, kind, step, record, inputs)
    return Started(p, before, inputs, fp, begun, clock, force, options.num_processes, earlier, record)


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
    kind = steps.get(step.kind)
    unhashed = steps.unhashed_of(kind, s.inputs)
    since = store.trusted_since(step.kind, s.inputs)
    # The outputs are copied out to be committed and hashed as they are copied, in one read: the hashes are
    # those of the bytes committed, and of those read from the step's folder, which is then moved (renamed)
    # into the run-cache.
    staged = _staging(ws, step)
    try:
        manifest = store.stage(outcome.out, staged, _layout(kind, step.name), ws.hasher)
    except OSError:
        _keep_after_failed_copy(ws, s, outcome, unhashed, since)
        raise
    replaced = ws.cache.store(
        s.fp, outcome.out, manifest, outcome.metrics, replace=s.force, unhashed=unhashed, since=since
    )
    if replaced:  # different bytes from the same inputs: the step does not reproduce itself; say so always
        shown = WARNING if replaced == RunCache.HELD_DIFFERENT else ""
        reporter.log(ev, f"{shown}forced: replaced the run-cache entry of these inputs ({replaced})")
    metrics, meta = outcome.metrics, ws.cache.manifest(s.fp)
    if meta is None:  # no entry could be put in place: the staged files are still these bytes
        meta = {"outputs": manifest}
    elif meta["outputs"] != manifest:  # another build stored these inputs first, with other bytes: as a
        _unstage(ws, staged)  # restore would, commit those, which the run-cache holds
        if not _stage_entry(ws, step, s.fp, meta, _warner(ws, reporter, ev)):
            raise StepError(
                f"{step.id}: the run-cache entry of its inputs changed as it was copied out; its outputs were "
                "not kept. Run dbl build again"
            )
    after = ws.snapshot(step)
    changed = after.changed_since(s.before)
    if changed:
        ws.cache.drop(s.fp)
        shutil.rmtree(ws.tmp(step), ignore_errors=True)  # see drop_work_if_changed
        _unstage(ws, staged)
        first = str(changed[0])
        how = (
            "was added"
            if s.before.get(first) is None
            else "was removed"
            if after.get(first) is None
            else "changed"
        )
        raise StepError(
            f"{step.id}: {fmt_path(changed[0])} {how} while the step ran"
            + (f" (and {len(changed) - 1} more)" if len(changed) > 1 else "")
            + "; its outputs were not kept. Run dbl build again to build from the files as they are now"
        )
    ev.status = events.DONE
    _keep_extras(ws, lock, s, ev, outcome, reporter)  # before the commit removes the work folder
    seconds = time.monotonic() - s.clock
    ev.remade = _commit(ws, lock, step, s.inputs, s.fp, meta, metrics, s.begun, seconds, s.recorded)
    _ended(ws, lock, step, ev, metrics, s.clock)


def _keep_after_failed_copy(ws: Workspace, s: Started, outcome, unhashed, since: int) -> None:
    """A full disk as the outputs were copied out: keep them in the run-cache all the same (a rename, and a
    manifest of a few bytes), so that the next build restores them rather than running the step again;
    unless what the step read changed meanwhile. Only what can be is kept: the copy's error is the step's."""
    if ws.snapshot(s.p.step).changed_since(s.before):
        return
    with contextlib.suppress(OSError, DblError):
        manifest = store.file_manifest(outcome.out, FileHasher())
        ws.cache.store(
            s.fp, outcome.out, manifest, outcome.metrics, replace=s.force, unhashed=unhashed, since=since
        )


def _staging(ws: Workspace, step) -> Path:
    """The empty place where a step's new outputs are put together before they replace its old ones."""
    ws.work_root.mkdir(parents=True, exist_ok=True)
    staged, _ = store.commit_folders(ws.project, step.kind, step.name)
    shutil.rmtree(staged, ignore_errors=True)
    return staged


def _unstage(ws: Workspace, staged: Path) -> None:
    """Remove staged outputs that will not be committed, and their hashes."""
    ws.hasher.forget(Path(root) / name for root, _, files in os.walk(staged) for name in files)
    shutil.rmtree(staged, ignore_errors=True)


def _stage_entry(ws: Workspace, step, fp: str, meta: dict, warn) -> bool:
    """Copy a run-cache entry's files out to be committed, hashing them as they are copied (the one read of
    a restore): whether they are the bytes its manifest records. An entry altered since is dropped, said
    through `warn`, and nothing is staged."""
    entry = ws.cache.entry(fp)
    staged = _staging(ws, step)
    copied = store.stage(entry / "files", staged, _layout(steps.get(step.kind), step.name), ws.hasher)
    if all(
        rel in copied and (copied[rel]["sha256"], copied[rel]["size"]) == (item["sha256"], item["size"])
        for rel, item in meta["outputs"].items()
    ):
        return True
    _unstage(ws, staged)
    warn(f"run-cache entry {entry} is damaged (a file altered); dropped it")
    ws.cache.drop(fp)
    return False


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
            f"{WARNING}{fmt_path(changed[0])} changed while the step ran: its work folder is dropped, and "
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
            inputs = planner.step_inputs(ws.project, step, ws.facts, hashes, s.num_processes)
        except KeyError:  # it reads an output that is not built: it will run by itself
            continue
        fp, unhashed = fingerprint(inputs), steps.unhashed_of(steps.get(step.kind), inputs)
        held, since = ws.cache.manifest(fp), store.trusted_since(step.kind, inputs)
        if held is None or not store.made_under(held, unhashed, since):
            ws.cache.store(fp, Path(folder), manifest, metrics, unhashed=unhashed, since=since)
            reporter.log(ev, f"kept {step_id} in the run-cache")


def _ended(ws: Workspace, lock: dict, step, ev: StepEvent, metrics: dict, clock: float) -> None:
    ev.duration_s = time.monotonic() - clock
    ev.outputs = ws.output_dir(step)
    ev.output_hash = lock[step.id]["output_hash"]  # which record is this build's, once another replaces it
    ev.metrics.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})


def _layout(kind: steps.StepKind, name: str) -> dict[str, str]:
    return kind.layout(name) if kind.layout else {}


def _warner(ws: Workspace, reporter, ev):
    return lambda message: reporter.log(ev, WARNING + message)


def make_job(ws: Workspace, started: Started, ev: StepEvent, options, reporter, devices=()):
    """The started step's Job, and hooks that report its progress and log lines on `reporter`."""
    step = started.p.step
    work = ws.tmp(step)
    job = Job(
        step_id=step.id,
        kind=step.kind,
        name=step.name,
        spec=step.spec,
        project=ws.project,
        fingerprint=started.fp,
        run=steps.get(step.kind).run_ref,
        inputs={d: ws.output_dir(d) for d in step.deps},
        work=work,
        num_processes=options.num_processes or ws.project.settings.num_processes,
        devices=tuple(devices),
        # CPU workers keep torch's own thread count: fewer threads change how float sums are split,
        # and so the bytes of what a step writes (a -j 3 build must write what -j 1 writes).
        threads=0,
        stop_file=ws.work_root / f".stop-{step.kind}-{step.name}",
        earlier=started.earlier,
        earlier_record=started.recorded if started.earlier is not None else None,
        fingerprint_inputs=started.inputs,
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
    replaced: dict | None = None,
) -> bool:
    """Swap the staged outputs (see `stage`: `meta` records them) into the output folder, and record them in
    the lockfile.

    `replaced` is the record this one replaces: where it records this very build (a branch switched back
    to, outputs deleted, a fresh clone whose deterministic steps ran again to the recorded bytes), when
    and how long that build ran stay as they were, so that a committed lockfile is not rewritten by a
    build that made nothing new; whether it did keep that record."""
    staged, trash = store.commit_folders(ws.project, step.kind, step.name)
    names = _layout(steps.get(step.kind), step.name)
    files = [names.get(rel, rel) for rel in meta["outputs"]]
    target = ws.output_dir(step)
    old = replace_dir(staged, target, trash)
    # From here until the lockfile names them, the new outputs are in place under the old record: only
    # stats and the lockfile's own write happen in between.
    for name in files:
        ws.hasher.moved(staged / name, target / name)
    outputs = {}
    for rel, item in meta["outputs"].items():
        outputs[ws.rel(target / names.get(rel, rel))] = {"sha256": item["sha256"], "size": item["size"]}
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
    made = replaced or {}
    kept_record = same_build(made, lock[step.id]) and "built" in made and "duration_s" in made
    if kept_record:
        # its inputs as recorded too (the same fingerprint): only a name changed since rewrites them, as
        # for a fresh step, and a display key a previous version did not write stays unwritten
        kept = {**lock[step.id], "inputs": made.get("inputs", {})}
        lockfile.take_names(kept, inputs)
        lock[step.id] = {**kept, "built": made["built"], "duration_s": made["duration_s"]}
    lockfile.write(ws.lock_path, lock)
    shutil.rmtree(old, ignore_errors=True)
    # the outputs the new ones did not replace (an image of a seed no longer rendered) are gone
    ws.hasher.forget(
        ws.project.dir / rel for rel in (replaced or {}).get("outputs", {}) if rel not in outputs
    )
    # The end of the build saves the rest: a killed build loses at most these seconds of hashes, which
    # the next plan reads again.
    ws.hasher.save(max_age_s=STATE_SAVE_S)
    shutil.rmtree(ws.tmp(step), ignore_errors=True)
    return kept_record
