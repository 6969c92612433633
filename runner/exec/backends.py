"""Backends: where a step's code runs. A registry, like step kinds and model families.

A backend takes a `Job` and the scheduler's callbacks, runs the step, and returns its `Outcome` or
raises what the step raised (`StepError`, `StepInterrupted`, ...). Progress and log lines come back
through the callbacks as they happen.

- `inline` (the default): in the build's own process, sharing one loaded base model between steps.
- `process`: steps in worker processes, each kept for the steps after it with its base model loaded;
  events come back over a pipe. What several-at-once and cluster backends build on.
- `ray` (runner/exec/ray_backend.py): each step in a Ray worker (an actor, kept for the steps after it) on
  a node of a Ray cluster, or of a local Ray instance; Ray decides where each step runs and on which GPUs.

A factory is called with the project and the build's options (`BuildOptions`: -j, --gpus, --per-gpu,
--ray-address). A backend may have a `start()`, called once before its first step (a problem there is a
usage error). One whose `keeps_workers` is true `dbl watch` keeps from build to build
(runner.watch_builds); it says how many workers it keeps idle (`kept()`), and may have a `leave()` that
ends more than `close()` does when the watch lets go. One whose `places_steps` is true chooses devices
itself: the scheduler then shares out no GPUs, and asks its `default_jobs()` how many steps to run at once
when -j is not given.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from runner.errors import StepError
from runner.exec.job import (
    Hooks,
    Job,
    Outcome,
    quiet_library_notices,
    reported_outcome,
    run_job,
    run_reported,
    warnings_as_step_lines,
)


class Backend(Protocol):
    name: str

    def run(self, job: Job, hooks: Hooks) -> Outcome:
        """Run one step; raise what it raised."""

    def close(self) -> None:
        """Release what the backend holds (processes, models)."""


_BACKENDS: dict[str, Callable[..., Backend]] = {}


def register(name: str, factory: Callable[..., Backend]) -> None:
    _BACKENDS[name] = factory


def names() -> list[str]:
    return list(_BACKENDS)


def factory(name: str) -> Callable[..., Backend]:
    """The registered factory of that name (a class, for the built-in backends)."""
    try:
        return _BACKENDS[name]
    except KeyError:
        from runner.errors import UsageError

        raise UsageError(f"no executor backend {name!r}; backends: {', '.join(_BACKENDS)}") from None


def create(name: str, project, options=None) -> Backend:
    """A new backend of that name for one build of `project` with `options` (a BuildOptions)."""
    return factory(name)(project, options)


# --- inline -----------------------------------------------------------------------------------------------


class LazyModels:
    """The base-model cache of the steps one process runs, made on first use, so that steps which need
    no model (and tests with fake steps) never import torch."""

    _shared: dict = {}  # one base model held at a time, across builds of one process (dbl watch)

    def __init__(self, project, loaded: Callable[[str], None] | None = None):
        self._project = project
        self._key = None
        self._loaded = loaded  # told the device torch resolved, once, when the step loads the model

    def __getattr__(self, name):
        from runner.models import BaseModel, ModelCache

        s = self._project.settings
        base = BaseModel.of(s, self._project.dir)
        if self._key is None:  # once per build (per step in a worker): the files as this build found them
            self._key = (base, model_files_stamp(base), s.device, s.mixed_precision)
        if self._key not in self._shared:
            self._shared.clear()
            self._shared[self._key] = ModelCache(base, s.device, s.mixed_precision)
        cache = self._shared[self._key]
        if name == "pipeline" and self._loaded is not None:  # not `device`: a blend reads it, runs on the CPU
            self._loaded, loaded = None, self._loaded
            loaded(cache.device)
        return getattr(cache, name)

    @classmethod
    def let_go(cls) -> bool:
        """Drop the base model this process holds (a watch with nothing to build for a while), freeing its
        memory; the next step loads it again. Whether one was held."""
        held = bool(cls._shared)
        if held:
            cls._shared.clear()
            import gc

            gc.collect()  # the pipeline's modules refer to each other
            release_cached_gpu_memory()
        return held


def model_files_stamp(base) -> tuple:
    """What tells a loaded base model from its files as they are now, at the cost of a stat per file:
    a local model's files by size, mtime, change time and inode (the stat snapshot a step's inputs are
    checked with), a hub model by the commit its revision names in the local cache. A base model's name
    alone kept a watch (or a script's builds) training and rendering with the weights it had loaded before
    a new fine-tune was saved into the same folder, under the new one's fingerprint."""
    from runner.fingerprint import hub_revision
    from runner.store import stat_snapshot

    if base.kind == "builtin":
        return ()
    if base.kind == "hub":
        return (hub_revision(base.ref, base.revision),)
    local, config = [base.ref], ()
    if base.config and os.path.isdir(base.config):
        local.append(base.config)
    elif base.config:
        config = ((base.config, hub_revision(base.config, None)),)  # a base_model_config hub id
    return config + tuple(sorted(stat_snapshot(local).items()))


class InlineBackend:
    """Steps run in the build's own process, one after the other, sharing the loaded base model."""

    name = "inline"

    def __init__(self, project, options=None):
        self.models = LazyModels(project)

    def run(self, job: Job, hooks: Hooks) -> Outcome:
        with warnings_as_step_lines(hooks):  # as a worker's: the step's lines, not bare ones on stderr
            return run_job(job, hooks, self.models)

    def close(self) -> None:
        pass


# --- process ----------------------------------------------------------------------------------------------


class ProcessBackend:
    """Each step in a worker process (spawned: a fresh interpreter, no inherited state), kept for the
    steps after it.

    A worker pays Python's imports and the loading of the base model once, then runs step after step,
    sharing its loaded model as the inline backend does. Workers are keyed by what is fixed when one
    starts: the GPUs it sees (`CUDA_VISIBLE_DEVICES`) and its thread count. A step takes an idle worker
    of its key, or starts one; no more workers live than steps may run at once (-j), so an idle worker of
    another key makes way. A worker whose step failed or was interrupted is not reused.

    Workers ignore SIGINT: the first Ctrl-C reaches a step as its job's stop file, at a safe point, and the
    second makes the scheduler terminate them. They die with the build's process.
    """

    name = "process"
    keeps_workers = True  # a watch keeps it from build to build (runner.watch_builds)

    def __init__(self, project, options=None):
        self._context = multiprocessing.get_context("spawn")
        self._limit = max(1, getattr(options, "jobs", None) or 1)  # workers alive at most
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []  # the oldest first
        self._busy: set[_Worker] = set()
        self.pids: dict[str, int] = {}  # step id -> its worker's pid, while it runs
        # Workers are started from this one thread, which lives as long as the backend: a worker asks the
        # kernel for SIGTERM when the thread that started it ends (die_with_parent), and the threads that
        # call run() end with their step.
        self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbl-workers")

    def run(self, job: Job, hooks: Hooks) -> Outcome:
        worker = self._take(job)
        self.pids[job.step_id] = worker.pid
        hooks.log(f"running in worker process {worker.pid}")
        kind = None
        try:
            kind, payload = _receive(worker, job, hooks)
        finally:
            self.pids.pop(job.step_id, None)
            self._give_back(worker, reusable=kind == "done")
        return reported_outcome(kind, payload)

    def _take(self, job: Job) -> _Worker:
        """A worker of the job's key, idle or new, with the job sent to it."""
        key = (job.devices, job.threads)
        while True:
            with self._lock:
                worker = next((w for w in self._idle if w.key == key), None)
                if worker is not None:
                    self._idle.remove(worker)
                while worker is None and self._idle and len(self._idle) + len(self._busy) >= self._limit:
                    self._idle.pop(0).stop()  # an idle worker of another key makes way
            fresh = worker is None
            if fresh:
                worker = self._starter.submit(_Worker, self._context, key).result()
            with self._lock:
                self._busy.add(worker)
            try:
                if not worker.process.is_alive():
                    raise OSError(f"worker {worker.pid} is gone")
                worker.conn.send(job)
                return worker
            except (OSError, ValueError):  # it died while idle (killed, out of memory): take another
                self._give_back(worker, reusable=False)
                if fresh:
                    raise StepError(
                        f"{job.step_id}: its worker process died at its start (exit code {worker.process.exitcode})"
                    ) from None

    def _give_back(self, worker: _Worker, reusable: bool) -> None:
        with self._lock:
            self._busy.discard(worker)
            if reusable and worker.process.is_alive():
                self._idle.append(worker)
                return
        worker.stop()

    def kept(self) -> int:
        """How many workers are kept, idle, for the next steps."""
        with self._lock:
            return len(self._idle)

    def cancel(self) -> None:
        """Terminate every worker (the second Ctrl-C when steps run at once)."""
        with self._lock:
            workers = [*self._busy, *self._idle]
        for worker in workers:  # close() joins them
            worker.process.terminate()

    def close(self) -> None:
        with self._lock:
            idle, busy = list(self._idle), list(self._busy)
            self._idle.clear()
        for worker in busy:  # only after a failure of the build itself: its steps are lost anyway
            worker.process.terminate()
        for worker in idle:  # all at once: they exit in parallel
            worker.leave()
        for worker in idle + busy:
            worker.stop()
        self._starter.shutdown(wait=False)


class _Worker:
    """A worker process and the build's end of its pipe. `key`: (devices, threads), fixed at its start."""

    def __init__(self, context, key: tuple):
        self.key = key
        devices, threads = key
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_serve, args=(child, os.getpid(), devices, threads), daemon=True
        )
        self.process.start()
        self.pid = self.process.pid
        self._stopping = threading.Lock()
        child.close()

    def leave(self) -> None:
        """Ask the worker to exit once it is between steps."""
        with contextlib.suppress(OSError, ValueError):  # gone already, or stopped
            self.conn.send(None)

    def stop(self) -> None:
        """End the worker (from whichever thread comes first): it exits by itself between steps, which
        lets it release what it holds (a terminated process leaves its semaphores to the resource
        tracker); it is terminated if it does not."""
        with self._stopping:
            if self.conn.closed:
                return
            if self.process.is_alive():
                self.leave()
                self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(timeout=30)
            self.conn.close()


def _receive(worker: _Worker, job: Job, hooks: Hooks) -> tuple[str, object]:
    """Pass the step's progress and log lines on until its end: ("done", Outcome), ("interrupted",
    message) or ("error", exception). A worker that dies is a StepError; one whose
    build stops waiting (KeyboardInterrupt) is terminated."""
    conn, process = worker.conn, worker.process
    try:
        while True:
            if hooks.should_stop() and job.stop_file is not None and not job.stop_file.exists():
                job.stop_file.parent.mkdir(parents=True, exist_ok=True)
                job.stop_file.touch()
            if not conn.poll(0.1):
                if not process.is_alive() and not conn.poll(0):
                    raise StepError(
                        f"{job.step_id}: its worker process died (exit code {process.exitcode}) without a word"
                    )
                continue
            try:
                kind, payload = conn.recv()
            except (EOFError, ConnectionError):  # it died while writing, or with its message unread
                process.join(timeout=5)
                raise StepError(
                    f"{job.step_id}: its worker process died (exit code {process.exitcode})"
                ) from None
            if kind == "progress":
                done, total, metrics = payload
                hooks.progress(done, total, **metrics)
            elif kind == "log":
                hooks.log(payload)
            elif kind == "where":
                hooks.where(payload)
            else:
                return kind, payload
    except BaseException:
        process.terminate()
        raise


def quiet_openmp() -> None:
    """Make OpenMP threads wait passively (before torch starts). Workers that run at once each have as
    many threads as there are cores; spinning while waiting, OpenMP's default, then takes the cores from
    the threads with work, and steps run many times slower (a -j 2 build on 2 cores: 600 s, not 100 s).
    The thread count, and so every result, stays as it is. OMP_WAIT_POLICY set by the user wins."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _serve(conn, parent_pid: int, devices: tuple[str, ...], threads: int) -> None:
    """A worker process: run the jobs it is sent, one after another, sending each one's events and its
    outcome (or error) back; exit when sent None or when the pipe closes."""
    # Ctrl-C and a closed terminal reach the build's process, which stops the step through the job's
    # stop file; SIGTERM (from the build, or the kernel when the build dies) ends the worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from runner.interrupt import die_with_parent

    die_with_parent(parent_pid)
    if devices:  # before torch is imported: the steps see only these GPUs, as cuda:0, cuda:1...
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    if threads:  # torch reads these when it starts: torch.get_num_threads() == threads
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    quiet_openmp()
    quiet_library_notices()
    hooks = Hooks(
        progress=lambda done, total, **metrics: conn.send(("progress", (done, total, metrics))),
        log=lambda message: conn.send(("log", message)),
    )
    while True:
        try:
            job = conn.recv()
        except EOFError:
            job = None
        if job is None:
            _exit()
        models = LazyModels(job.project, _said_where(conn, devices))  # the model stays loaded for the next
        result = run_reported(job, hooks, models)
        release_cached_gpu_memory()
        conn.send(result)


def _said_where(conn, gpus: tuple[str, ...]) -> Callable[[str], None]:
    """What a worker given `gpus` does with the device its step loads the model on: the build shows the
    step on the GPUs it gave (the CPU where none), and is told the device torch chose where that differs
    (no CUDA device under the GPUs given, or CUDA where none was given)."""
    from runner.exec.devices import shown

    given = shown("cuda" if gpus else "cpu", gpus)

    def loaded(device: str) -> None:
        if shown(device, gpus) != given:
            conn.send(("where", shown(device, gpus)))

    return loaded


def release_cached_gpu_memory() -> None:
    """Give the GPU memory torch keeps cached, but no longer uses, back to the card: a worker waiting for
    its next step must not hold memory that steps in other processes on the same GPU need (a train step
    of several processes, another worker). The loaded base model stays."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _exit() -> None:
    """End the worker process now. Its exit handlers run (they release what it holds, such as named
    semaphores); the interpreter's teardown of every module, a second or two with torch loaded, does not:
    the build waits for its workers to end."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):  # None where the build's were closed (`dbl build >&-`)
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
    os._exit(0)


register("inline", InlineBackend)
register("process", ProcessBackend)

from runner.exec import ray_backend  # noqa: E402, F401 - registers `ray` (Ray itself is imported on use)
