"""Several steps at once (`dbl build -j N`), with the build's process still the only writer.

Each running step's `backend.run` is called from a thread of its own; its progress and log lines, and
its outcome, come back as events on one queue that the main thread drains. Only the main thread
touches the reporter, the lockfile, the run-cache and the output folders (the same `begin_step` and
`finish_step` as a sequential build), so outputs and lockfile are those of `-j 1`.

A step is ready when every step it depends on is committed (or fresh). Without --keep-going, the first
failure dispatches nothing new and lets running steps finish. The first Ctrl-C (options.should_stop)
dispatches nothing new and asks running steps to stop at a safe point (the backend touches their stop
files); the second (KeyboardInterrupt) cancels what runs.
"""

from __future__ import annotations

import queue
import threading
import time

from runner import events, planner
from runner.errors import StepError, StepInterrupted
from runner.exec import scheduler as sch
from runner.exec.devices import DevicePool, shown
from runner.exec.job import Hooks
from runner.exec.step_lifecycle import begin_step, drop_work_if_changed, finish_step, make_job


def run(ws, lock, todo, evs, options, reporter, force_ids, backend, graph) -> int:
    """Run the `todo` steps, up to options.jobs at once. Returns the exit code."""
    pool = DevicePool(options.gpus or (), options.per_gpu)
    inbox: queue.Queue = queue.Queue()
    waiting = list(todo)
    running: dict[str, tuple] = {}  # step id -> (Started, devices)
    failed: set[str] = set()
    settled: set[str] = set()  # committed, fresh, restored (or not part of this build)
    todo_ids = {p.id for p in todo}
    settled |= {sid for sid in evs if sid not in todo_ids}
    exit_code = sch.EXIT_OK
    stop_dispatch = False
    said_stop = False
    # The step the main thread is starting, restoring or committing, until it is settled either way: a
    # second Ctrl-C that lands meanwhile interrupts it too.
    handling: str | None = None

    def dispatch() -> None:
        nonlocal exit_code, handling
        for p in list(waiting):
            # A Ctrl-C is read here too: restores run in this process, one after another, and a run of
            # them would go on to the last.
            if stop_dispatch or options.should_stop() or len(running) >= options.jobs:
                return
            ev = evs[p.id]
            blocked = [d for d in p.step.deps if d in failed]
            if blocked:
                waiting.remove(p)
                ev.status, ev.error = events.SKIPPED, sch.blocked_by(evs, blocked[0])
                failed.add(p.id)
                reporter.step_end(ev)
                continue
            if not all(d in settled for d in p.step.deps):
                continue
            need = _gpus_needed(p, ws, options)
            if not pool.fits(need):
                waiting.remove(p)
                given = planner.option_name("gpus", not options.command_line)
                _fail(ev, StepError(f"{p.id}: needs {need} GPUs; {given} gives {len(pool.devices)}"), options)
                reporter.step_end(ev)
                failed.add(p.id)
                exit_code = sch.EXIT_FAILED
                continue
            devices = pool.acquire(need)
            if devices is None:
                continue
            waiting.remove(p)
            ev.device = _device_name(devices, backend)  # shown from step_start on
            handling = p.id
            try:
                started = begin_step(ws, lock, p, ev, options, reporter, p.id in force_ids)
            except Exception as exc:
                handling = None
                pool.release(devices)
                _failed(p, ev, exc)
                continue
            handling = None
            if started is None:  # fresh, or restored from the run-cache and committed: nothing ran
                pool.release(devices)
                ev.device = ""
                settled.add(p.id)
                reporter.step_end(ev)
                continue
            running[p.id] = (started, devices)
            job, _ = make_job(ws, started, ev, options, reporter, devices)
            threading.Thread(target=_work, args=(backend, job, options, inbox), daemon=True).start()

    def _failed(p, ev, exc) -> None:
        nonlocal exit_code, stop_dispatch
        _fail(ev, exc, options)
        reporter.step_end(ev)
        failed.add(p.id)
        exit_code = sch.EXIT_FAILED
        failed.update(planner.dependents(graph, {p.id}))
        if not options.keep_going:
            stop_dispatch = True
            if running:
                reporter.log(None, f"{p.id} failed: starting nothing new; waiting for {len(running)} running")

    try:
        dispatch()
        while running:
            try:
                kind, sid, payload = inbox.get(timeout=0.2)
            except queue.Empty:
                kind = None
            if options.should_stop() and not stop_dispatch:
                stop_dispatch = True
            if stop_dispatch and options.should_stop() and not said_stop:
                said_stop = True
                reporter.log(None, f"stopping: starting nothing new; asking {len(running)} running to stop")
            if kind is None:
                continue
            ev = evs[sid]
            if kind == "progress":
                done, total, metrics = payload
                ev.done, ev.total = done, total
                ev.metrics.update(metrics)
                reporter.step_progress(ev)
                continue
            if kind == "log":
                reporter.log(ev, payload)
                continue
            if kind == "where":
                ev.device = payload
                reporter.step_progress(ev)
                continue
            started, devices = running.pop(sid)
            pool.release(devices)
            p = started.p
            if kind == "outcome":
                handling = sid
                try:
                    finish_step(ws, lock, started, ev, payload, reporter)
                except Exception as exc:
                    handling = None
                    _failed(p, ev, exc)
                else:
                    handling = None
                    settled.add(sid)
                    reporter.step_end(ev)
            elif isinstance(payload, StepInterrupted):
                drop_work_if_changed(ws, started, ev, reporter)
                ev.duration_s = time.monotonic() - started.clock
                ev.status, ev.error = events.INTERRUPTED, str(payload) or "interrupted"
                reporter.step_end(ev)
                exit_code = sch.EXIT_INTERRUPTED
                stop_dispatch = True
            else:
                drop_work_if_changed(ws, started, ev, reporter)
                ev.duration_s = time.monotonic() - started.clock
                _failed(p, ev, payload)
            dispatch()
    except KeyboardInterrupt:  # the second Ctrl-C: stop what runs now
        cancel = getattr(backend, "cancel", None)
        if cancel is not None:
            cancel()
        for sid, (started, _) in running.items():
            ev = evs[sid]
            ev.duration_s = time.monotonic() - started.clock
            ev.status, ev.error = events.INTERRUPTED, "cancelled"
            reporter.step_end(ev)
        running.clear()
        if handling is not None:  # neither committed nor left as it was: interrupted, as in a -j 1 build
            ev = evs[handling]
            ev.duration_s = time.time() - ev.started if ev.started else 0.0
            ev.status, ev.error = events.INTERRUPTED, "interrupted"
            reporter.step_end(ev)
        return sch.EXIT_INTERRUPTED
    if options.should_stop() and exit_code == sch.EXIT_OK and waiting:
        exit_code = sch.EXIT_INTERRUPTED
    return exit_code


def _fail(ev, exc, options) -> None:
    ev.status = events.FAILED
    ev.error = sch.describe_error(exc, options.debug)


def _gpus_needed(p, ws, options) -> int:
    if p.step.kind == "train":
        return max(1, options.num_processes or ws.project.settings.num_processes)
    return 1


def _device_name(devices: tuple[str, ...], backend) -> str:
    if getattr(backend, "places_steps", False):
        return ""  # known once the step is placed: the backend says so through hooks.where
    where = getattr(backend, "node", "")
    gpu = shown("cuda" if devices else "cpu", devices)  # a worker says so where torch chose otherwise
    return f"{where} {gpu}".strip()


def _work(backend, job, options, inbox: queue.Queue) -> None:
    """A step's thread: run it through the backend, its events and outcome (or error) onto the queue."""
    sid = job.step_id
    hooks = Hooks(
        progress=lambda done, total, **metrics: inbox.put(("progress", sid, (done, total, metrics))),
        log=lambda message: inbox.put(("log", sid, message)),
        should_stop=options.should_stop,
        where=lambda place: inbox.put(("where", sid, place)),
    )
    try:
        outcome = backend.run(job, hooks)
    except BaseException as exc:  # noqa: BLE001 - reported on the main thread
        ended = ("error", sid, exc)
    else:
        ended = ("outcome", sid, outcome)
    # Before the end is told: the build may end, and this daemon thread with it, once the last one is.
    job.stop_file.unlink(missing_ok=True)
    inbox.put(ended)
