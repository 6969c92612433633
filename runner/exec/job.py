"""A step to run, as plain data, and what running it means wherever it runs.

A `Job` holds everything a worker needs and pickles: no callbacks, no live models. `run_job` runs it:
the step's code in its work folder. The scheduler, in the build's own process, checks the inputs, hashes
and stores the outputs; workers never touch the lockfile.
"""

from __future__ import annotations

import contextlib
import pickle
import shutil
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.errors import StepError, StepInterrupted
from runner.events import WARNING
from runner.fingerprint import FileHasher
from runner.steps import StepContext, StepFunction, load_run
from runner.store import file_manifest


@dataclass(frozen=True)
class Job:
    """One step to run, with everything a worker needs to run it."""

    step_id: str  # "train:dog"
    kind: str
    name: str
    spec: Any  # the step's resolved table
    project: Any  # runner.project.schema.Project (frozen dataclasses: it pickles)
    fingerprint: str
    run: str  # 'module:function' of the kind's run function
    inputs: dict[str, Path]  # upstream step id -> its committed output folder
    work: Path  # the step's work folder, kept across attempts of one fingerprint (checkpoints)
    num_processes: int = 1
    devices: tuple[str, ...] = ()  # devices given to the step; empty: the project's `device`
    stop_file: Path | None = None  # its existence asks the step to stop at a safe point
    threads: int = 0  # CPU threads for torch in a worker sharing the cores with others; 0: torch's own
    earlier: Path | None = None  # the step's committed outputs, when its kind reuses them (StepKind.reuses)
    earlier_record: dict | None = None  # the lockfile's record of those outputs: their inputs and metrics
    # what the step's fingerprint is made of, as the lockfile records it
    fingerprint_inputs: dict | None = None

    @property
    def out(self) -> Path:
        return self.work / "out"


@dataclass
class Hooks:
    """How a running step talks back; live objects that stay in the process that runs the step."""

    progress: Callable[..., None] = lambda done, total, **metrics: None
    log: Callable[[str], None] = lambda message: None
    should_stop: Callable[[], bool] = lambda: False
    where: Callable[[str], None] = lambda place: None  # the backend says where it runs: "node-2 cuda:1"
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """What a step produced: its output folder (job.out), and its metrics. The build's process hashes the
    folder's files as it copies them out to be committed (runner.store.stage): one read of each byte."""

    out: Path
    metrics: dict
    # Outputs of other steps made on the way: step id -> (folder, manifest, metrics).
    extras: dict = field(default_factory=dict)


def prepare(job: Job) -> None:
    """Make the work folder: kept when it belongs to this fingerprint (a train step resumes from its
    checkpoints), started over otherwise; and an empty output folder inside it."""
    marker = job.work / "fingerprint"
    if job.work.exists() and (not marker.is_file() or marker.read_text() != job.fingerprint):
        shutil.rmtree(job.work)  # checkpoints of other inputs cannot be resumed
    job.work.mkdir(parents=True, exist_ok=True)
    marker.write_text(job.fingerprint)
    shutil.rmtree(job.out, ignore_errors=True)
    job.out.mkdir()


def quiet_library_notices() -> None:
    """Hide the libraries' notices of their own future changes (FutureWarning, DeprecationWarning):
    they mean nothing to someone running a build. Called by the build's process and by every worker
    process, which inherits no warning filter."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def run_job(job: Job, hooks: Hooks, models, run: StepFunction | None = None) -> Outcome:
    """Run the step's code (`run`, default: the job's) into `job.out`, and hash the outputs it made for other
    steps (`Outcome.extras`, which go to the run-cache only)."""
    prepare(job)

    def should_stop() -> bool:
        return hooks.should_stop() or (job.stop_file is not None and job.stop_file.exists())

    ctx = StepContext(
        step_id=job.step_id,
        kind=job.kind,
        name=job.name,
        spec=job.spec,
        project=job.project,
        work=job.work,
        out=job.out,
        inputs=dict(job.inputs),
        models=models,
        fingerprint=job.fingerprint,
        num_processes=job.num_processes,
        devices=job.devices,
        progress=hooks.progress,
        log=hooks.log,
        should_stop=should_stop,
        extra=hooks.extra,
        earlier=job.earlier,
        earlier_record=job.earlier_record,
        fingerprint_inputs=job.fingerprint_inputs,
    )
    metrics = (run or load_run(job.run))(ctx) or {}
    hasher = FileHasher()
    extras = {
        step_id: (folder, file_manifest(folder, hasher), extra_metrics)
        for step_id, (folder, extra_metrics) in ctx.extras.items()
    }
    return Outcome(job.out, metrics, extras)


class StepCrash(Exception):
    """A step's exception that a worker cannot send back as it is (it does not pickle and load): its type's
    name, message and traceback, which the scheduler shows as it would the exception's own."""

    def __init__(self, kind: str, message: str, trace: str):
        super().__init__(kind, message, trace)
        self.kind, self.message, self.trace = kind, message, trace

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


def run_reported(job: Job, hooks: Hooks, models) -> tuple[str, Any]:
    """Run the job in a worker and say how it ended, as a pair that pickles: ("done", Outcome),
    ("interrupted", message) or ("error", exception: a StepCrash for one that does not pickle).
    `reported_outcome` turns it back into what `run_job` returns or raises.

    A Python warning raised while the step runs becomes one of its log lines (`warning: ...`), as the
    step's own warnings are: the display shows it with the step's name, and not with -q. Written to the
    worker's standard error, it would land unnamed in the middle of the display. A worker runs one step
    at a time, so this process's warning display is the step's for as long as it runs."""

    with warnings_as_step_lines(hooks):
        return _run_reported(job, hooks, models)


@contextlib.contextmanager
def warnings_as_step_lines(hooks: Hooks):
    """Python warnings raised while a step runs become its log lines (`warning: ...`), in a worker and in
    the build's own process alike (see `run_reported`); the display is restored after the step, and each
    warning is shown again for the next one."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        hooks.log(f"{WARNING}{message}")

    with warnings.catch_warnings():
        warnings.showwarning = show
        # as the `dbl` command and its workers do, for a build started from a script or a notebook too,
        # which set no filter: a library's notice of its own future changes is no line of the step
        quiet_library_notices()
        yield


def _run_reported(job: Job, hooks: Hooks, models) -> tuple[str, Any]:
    try:
        return "done", run_job(job, hooks, models)
    except StepInterrupted as exc:
        return "interrupted", str(exc)
    except Exception as exc:
        try:
            # Loaded too: an exception whose __init__ takes other arguments than its message pickles, but
            # fails to load in the build's process, which then sees only that TypeError.
            pickle.loads(pickle.dumps(exc))
        except Exception:
            return "error", StepCrash(type(exc).__name__, str(exc), "".join(traceback.format_exception(exc)))
        return "error", exc  # the scheduler describes it as it would an inline failure


def reported_outcome(kind: str, payload) -> Outcome:
    """The Outcome a worker reported (`run_reported`), or the error it reported, raised."""
    if kind == "done":
        return payload
    if kind == "interrupted":
        raise StepInterrupted(payload)
    if kind == "error":
        raise payload
    raise StepError(payload)
