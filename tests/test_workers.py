"""The process backend's workers: each is kept for the steps after it (its imports and loaded base model
paid once), and a worker that failed, was stopped or died is not used again."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from runner.errors import StepError, StepInterrupted
from runner.exec.backends import ProcessBackend
from runner.exec.job import Hooks, Job
from tests.worker_jobs import render_job

HERE = __name__


def write_pid(ctx):
    (ctx.out / "pid").write_text(str(os.getpid()))
    return {"pid": os.getpid(), "devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


def fail(ctx):
    raise StepError(f"{ctx.step_id}: it went wrong in {os.getpid()}")


def warn(ctx):
    import warnings

    warnings.warn("mixed_precision = 'fp16' is ignored on the CPU; computing in fp32", stacklevel=2)
    return {}


def library_notice(ctx):
    import warnings

    warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=2)
    warnings.warn("a module-level function is deprecated", DeprecationWarning, stacklevel=2)
    warnings.warn("mixed_precision = 'fp16' is ignored on the CPU; computing in fp32", stacklevel=2)
    return {}


def stop_at_once(ctx):
    raise StepInterrupted(f"{ctx.step_id}: stopped in {os.getpid()}")


class Options:
    def __init__(self, jobs):
        self.jobs = jobs


def job(tmp_path: Path, name: str, run: str = "write_pid", devices: tuple[str, ...] = ()) -> Job:
    """A render step that runs this module's function `run`, with nothing upstream."""
    return render_job(tmp_path, name, f"{HERE}:{run}", devices)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): look at its state.
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def wait_gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not alive(pid)


@pytest.fixture
def backend():
    made: list[ProcessBackend] = []

    def make(jobs=1) -> ProcessBackend:
        made.append(ProcessBackend(None, Options(jobs)))
        return made[-1]

    yield make
    for b in made:
        b.close()


def test_steps_one_after_another_share_one_worker_which_ends_with_the_build(tmp_path, backend):
    b = backend()
    lines: list[str] = []
    pids = [b.run(job(tmp_path, n), Hooks(log=lines.append)).metrics["pid"] for n in ("a", "b", "c")]
    assert len(set(pids)) == 1 and pids[0] != os.getpid()
    assert lines == [f"running in worker process {pids[0]}"] * 3
    assert (tmp_path / "c" / "out" / "pid").read_text() == str(pids[0])
    b.close()
    assert wait_gone(pids[0]), "the worker outlived its build"


def test_a_worker_whose_step_failed_or_stopped_is_not_used_again(tmp_path, backend):
    b = backend()
    first = b.run(job(tmp_path, "a"), Hooks()).metrics["pid"]
    with pytest.raises(StepError, match=rf"render:b: it went wrong in {first}"):
        b.run(job(tmp_path, "b", run="fail"), Hooks())
    assert wait_gone(first)
    second = b.run(job(tmp_path, "c"), Hooks()).metrics["pid"]
    with pytest.raises(StepInterrupted, match=rf"stopped in {second}"):
        b.run(job(tmp_path, "d", run="stop_at_once"), Hooks())
    assert wait_gone(second)
    third = b.run(job(tmp_path, "e"), Hooks()).metrics["pid"]
    assert len({first, second, third}) == 3


def test_a_worker_killed_while_idle_is_replaced_and_the_step_runs(tmp_path, backend):
    b = backend()
    first = b.run(job(tmp_path, "a"), Hooks()).metrics["pid"]
    os.kill(first, signal.SIGKILL)
    assert wait_gone(first)  # it really died
    second = b.run(job(tmp_path, "b"), Hooks()).metrics["pid"]
    assert second != first
    assert (tmp_path / "b" / "out" / "pid").read_text() == str(second)


def test_workers_are_kept_per_gpu_set_and_no_more_live_than_steps_at_once(tmp_path, backend):
    b = backend(jobs=1)
    on0 = b.run(job(tmp_path, "a", devices=("0",)), Hooks()).metrics
    assert on0["devices"] == "0"
    on1 = b.run(job(tmp_path, "b", devices=("1",)), Hooks()).metrics
    assert on1["devices"] == "1" and on1["pid"] != on0["pid"]
    assert wait_gone(on0["pid"]), "-j 1 keeps one worker: the GPU 0 worker makes way"

    b = backend(jobs=2)
    pids = {}
    for name, devices in (("c", ("0",)), ("d", ("1",)), ("e", ("0",)), ("f", ("1",))):
        result = b.run(job(tmp_path, name, devices=devices), Hooks()).metrics
        assert result["devices"] == devices[0]
        pids.setdefault(devices, set()).add(result["pid"])
    assert [len(p) for p in pids.values()] == [1, 1], pids  # one worker per GPU, each used twice


def test_steps_at_once_run_in_different_workers(tmp_path, backend):
    b = backend(jobs=2)
    gate = tmp_path / "gate"
    results: dict[str, int] = {}

    def run(name):
        results[name] = b.run(job(tmp_path, name, run="wait_for_gate"), Hooks()).metrics["pid"]

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("*/out/started"))) < 2:  # both run at once
        assert time.monotonic() < deadline
        time.sleep(0.02)
    gate.touch()
    for t in threads:
        t.join(30)
    assert len(set(results.values())) == 2
    # Both are kept: the next two steps, one after the other, take them.
    again = {b.run(job(tmp_path, n), Hooks()).metrics["pid"] for n in ("c", "d")}
    assert again <= set(results.values())


def wait_for_gate(ctx):
    (ctx.out / "started").touch()
    gate = ctx.work.parent / "gate"
    while not gate.exists():
        time.sleep(0.01)
    return {"pid": os.getpid()}


def test_a_worker_that_dies_before_reading_its_step_is_reported_as_dead(tmp_path, backend):
    from runner.exec.backends import _receive

    b = backend()
    j = job(tmp_path, "a")
    worker = b._take(j)  # started, and the step sent to it
    os.kill(worker.pid, signal.SIGKILL)  # before it has read it: the pipe is reset, not closed
    with pytest.raises(StepError, match=r"render:a: its worker process died \(exit code -9\)"):
        _receive(worker, j, Hooks())


# --- dbl watch: its builds share the workers ----------------------------------------------------------------


def test_a_watch_keeps_its_workers_from_one_build_to_the_next_and_ends_them(pid_notes):
    from tests.watch_fixtures import worker_kept_by_a_watch

    pid = worker_kept_by_a_watch(pid_notes, {"jobs": 2}, alive)
    assert wait_gone(pid), "the watch's worker outlived it"


def test_a_watch_ends_its_idle_workers_after_keep_loaded_and_starts_new_ones(pid_notes):
    from tests.watch_fixtures import workers_let_go_by_a_watch

    workers_let_go_by_a_watch(pid_notes, {"jobs": 2}, wait_gone)


class Unpicklable(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


def raise_unpicklable(ctx):
    raise Unpicklable("holds a lock")


class TwoArguments(Exception):
    """Pickles, but does not load: loading calls __init__ with the message alone."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")


def raise_two_arguments(ctx):
    raise TwoArguments("dog/03.jpg", "the pixels do not decode")


@pytest.mark.parametrize(
    ("run", "message", "line"),
    [
        ("raise_unpicklable", "Unpicklable: holds a lock", 'raise Unpicklable("holds a lock")'),
        (
            "raise_two_arguments",
            "TwoArguments: dog/03.jpg: the pixels do not decode",
            'raise TwoArguments("dog/03.jpg", "the pixels do not decode")',
        ),
    ],
)
def test_an_error_that_does_not_pickle_comes_back_described_as_an_inline_one(
    tmp_path, backend, run, message, line
):
    """Its type and message, the traceback (the step's own) with --debug; one that pickles but does not
    load came back as the TypeError of loading it."""
    from runner.exec.scheduler import describe_error

    b = backend()
    with pytest.raises(Exception) as info:
        b.run(job(tmp_path, "a", run=run), Hooks())
    assert describe_error(info.value, debug=False) == f"{message} (run with --debug for the traceback)"
    trace = describe_error(info.value, debug=True)
    assert trace.startswith("Traceback (most recent call last):") and trace.endswith(message), trace
    assert f"in {run}\n    {line}" in trace, trace
    assert "pickle" not in trace, trace  # the step's traceback, not that of pickling it


def test_a_warning_raised_in_a_worker_is_a_log_line_of_its_step_not_worker_output(tmp_path, backend, capfd):
    b = backend()
    lines: list[str] = []
    for name in ("a", "b"):  # each step says it, though its worker said it before
        b.run(job(tmp_path, name, run="warn"), Hooks(log=lines.append))
    warned = [line for line in lines if not line.startswith("running in worker")]
    assert warned == ["warning: mixed_precision = 'fp16' is ignored on the CPU; computing in fp32"] * 2
    b.close()
    assert "UserWarning" not in capfd.readouterr().err  # the worker wrote nothing past the display


def test_a_warning_raised_in_an_inline_step_is_a_log_line_of_its_step(tmp_path, capfd):
    """In the build's own process (the inline backend, the default on one device) a step's warning went
    to standard error as a bare `dbl: warning:` line without the step's name, shown even with -q."""
    from runner.exec.backends import InlineBackend

    b = InlineBackend(None)
    lines: list[str] = []
    for name in ("a", "b"):  # each step says it, as in a worker
        b.run(job(tmp_path, name, run="warn"), Hooks(log=lines.append))
    assert lines == ["warning: mixed_precision = 'fp16' is ignored on the CPU; computing in fp32"] * 2
    assert "ignored on the CPU" not in capfd.readouterr().err


def test_a_librarys_notice_of_its_future_changes_is_no_line_of_a_step_built_from_a_script(tmp_path, capfd):
    """`executor.build` from a notebook, where no filter hides a library's deprecation notices: each build
    showed transformers' `is_gradient_checkpointing is deprecated` as a warning of its train and render
    steps, as if the project had a problem."""
    import warnings

    from runner.exec.backends import InlineBackend

    lines: list[str] = []
    with warnings.catch_warnings():
        warnings.resetwarnings()  # a notebook's filters: none of the `dbl` command's
        InlineBackend(None).run(job(tmp_path, "a", run="library_notice"), Hooks(log=lines.append))
    assert lines == ["warning: mixed_precision = 'fp16' is ignored on the CPU; computing in fp32"]
    assert "deprecated" not in capfd.readouterr().err
