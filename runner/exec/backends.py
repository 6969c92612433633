"""Backends: where a step's code runs. A registry, like step kinds and model families.

A backend takes a `Job` and the scheduler's callbacks, runs the step, and returns its `Outcome` or
raises what the step raised (`StepError`, `StepInterrupted`, ...). Progress and log lines come back
through the callbacks as they happen.

- `inline` (the default): in the build's own process, sharing one loaded base model between steps.
- `process`: each step in a fresh worker process, which loads its own models; events come back over a
  pipe. What several-at-once and cluster backends build on.
- `ray` (runner/exec/ray_backend.py): each step a Ray task on a node of a Ray cluster, or of a local Ray
  instance; Ray decides where each step runs and on which GPUs.

A factory is called with the project and the build's options (`BuildOptions`: -j, --gpus, --per-gpu,
--ray-address). A backend may have a `start()`, called once before its first step (a problem there is a
usage error). One whose `places_steps` is true chooses devices itself: the scheduler then shares out no
GPUs, and asks its `default_jobs()` how many steps to run at once when -j is not given.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import traceback
from collections.abc import Callable
from typing import Protocol

from runner.errors import StepError, StepInterrupted
from runner.exec.job import Hooks, Job, Outcome, quiet_library_notices, run_job


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

    def __init__(self, project):
        self._project = project

    def __getattr__(self, name):
        from runner.models import BaseModel, ModelCache

        s = self._project.settings
        base = BaseModel.of(s, self._project.dir)
        key = (base, s.device, s.mixed_precision)
        if key not in self._shared:
            self._shared.clear()
            self._shared[key] = ModelCache(base, s.device, s.mixed_precision)
        return getattr(self._shared[key], name)


class InlineBackend:
    """Steps run in the build's own process, one after the other, sharing the loaded base model."""

    name = "inline"

    def __init__(self, project, options=None):
        self.models = LazyModels(project)

    def run(self, job: Job, hooks: Hooks) -> Outcome:
        return run_job(job, hooks, self.models)

    def close(self) -> None:
        pass


# --- process ----------------------------------------------------------------------------------------------


class ProcessBackend:
    """Each step in a worker process of its own (spawned: a fresh interpreter, no inherited state).

    The worker ignores SIGINT: the first Ctrl-C reaches it as the job's stop file, at a safe point,
    and the second makes the scheduler terminate it. It dies with the build's process.
    """

    name = "process"

    def __init__(self, project, options=None):
        self._context = multiprocessing.get_context("spawn")
        self._live: set = set()  # the workers running now (several when steps run at once)
        self.pids: dict[str, int] = {}  # step id -> its worker's pid, while it runs

    def run(self, job: Job, hooks: Hooks) -> Outcome:
        parent, child = self._context.Pipe(duplex=False)
        process = self._context.Process(target=_worker, args=(job, child, os.getpid()), daemon=True)
        process.start()
        self._live.add(process)
        self.pids[job.step_id] = process.pid
        child.close()
        hooks.log(f"running in worker process {process.pid}")
        try:
            return _receive(parent, process, job, hooks)
        except BaseException:
            if process.is_alive():
                process.terminate()
            raise
        finally:
            process.join(timeout=30)
            parent.close()
            self._live.discard(process)
            self.pids.pop(job.step_id, None)

    def cancel(self) -> None:
        """Terminate every running worker (the second Ctrl-C when steps run at once)."""
        for process in list(self._live):
            if process.is_alive():
                process.terminate()

    def close(self) -> None:
        self.cancel()


def _receive(conn, process, job: Job, hooks: Hooks) -> Outcome:
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
        except EOFError:
            process.join(timeout=5)
            raise StepError(
                f"{job.step_id}: its worker process died (exit code {process.exitcode})"
            ) from None
        if kind == "progress":
            done, total, metrics = payload
            hooks.progress(done, total, **metrics)
        elif kind == "log":
            hooks.log(payload)
        elif kind == "done":
            return payload
        elif kind == "interrupted":
            raise StepInterrupted(payload)
        elif kind == "error":
            raise payload
        elif kind == "crash":
            raise StepError(payload)


def quiet_openmp() -> None:
    """Make OpenMP threads wait passively (before torch starts). Workers that run at once each have as
    many threads as there are cores; spinning while waiting, OpenMP's default, then takes the cores from
    the threads with work, and steps run many times slower (a -j 2 build on 2 cores: 600 s, not 100 s).
    The thread count, and so every result, stays as it is. OMP_WAIT_POLICY set by the user wins."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _worker(job: Job, conn, parent_pid: int) -> None:
    """A worker process: run the job, send its events and its outcome (or error) to the scheduler."""
    # Ctrl-C and a closed terminal reach the build's process, which stops the step through the job's
    # stop file; SIGTERM (from the build, or the kernel when the build dies) ends the worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from runner.interrupt import die_with_parent

    die_with_parent(parent_pid)
    if job.devices:  # before torch is imported: the step sees only its own GPUs, as cuda:0, cuda:1...
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(job.devices)
    if job.threads:  # torch reads these when it starts: torch.get_num_threads() == job.threads
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(job.threads)
    quiet_openmp()
    quiet_library_notices()
    hooks = Hooks(
        progress=lambda done, total, **metrics: conn.send(("progress", (done, total, metrics))),
        log=lambda message: conn.send(("log", message)),
    )
    try:
        outcome = run_job(job, hooks, LazyModels(job.project))
        conn.send(("done", outcome))
    except StepInterrupted as exc:
        conn.send(("interrupted", str(exc)))
    except Exception as exc:
        try:
            conn.send(("error", exc))  # the scheduler describes it as it would an inline failure
        except Exception:  # an exception that does not pickle
            conn.send(("crash", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        conn.close()


register("inline", InlineBackend)
register("process", ProcessBackend)

from runner.exec import ray_backend  # noqa: E402, F401 - registers `ray` (Ray itself is imported on use)
