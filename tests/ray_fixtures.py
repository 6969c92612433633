"""Builds with `--executor ray` whose steps are fake ones, run by Ray workers: FakeSteps' outputs after a pause,
or a step that waits to be killed or stopped, each recording its pid in the project's records/ folder.
For the Ray tests, on a Ray instance they start.

Import by name (`from tests.ray_fixtures import build, pids_of`); `build(proj, run=NAME)` runs the
function NAME of this module as every step."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
from pathlib import Path

from runner import executor
from tests.conftest import FakeSteps, Recorder


def records_dir(ctx) -> Path:
    folder = Path(ctx.project.dir) / "records"
    folder.mkdir(exist_ok=True)
    return folder


def fake_step(ctx):
    """FakeSteps' outputs, after a pause; records when, on which GPUs and in which worker (records/*.json)."""
    begun = time.time()
    time.sleep(0.2)
    return _recorded(ctx, begun)


def overlapping_step(ctx):
    """fake_step, once another step has begun too (or after 20 s, where none can run beside it): steps
    that can run at once do so however loaded the machine is."""
    begun = time.time()
    folder = records_dir(ctx)
    (folder / f"begun-{ctx.kind}-{ctx.name}").touch()
    deadline = time.monotonic() + 20
    while len(list(folder.glob("begun-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    return _recorded(ctx, begun)


def _recorded(ctx, begun: float):
    metrics = FakeSteps()(ctx.kind)(ctx)
    record = {
        "id": ctx.step_id,
        "devices": list(ctx.devices),
        "pid": os.getpid(),
        "begun": begun,
        "ended": time.time(),
    }
    (records_dir(ctx) / f"{ctx.kind}-{ctx.name}.json").write_text(json.dumps(record))
    return metrics


def second_fails_step(ctx):
    """fake_step, but the second step to run (of a build of one step at a time) fails with a StepError,
    recorded with "failed"."""
    from runner.errors import StepError

    if len(list(records_dir(ctx).glob("*.json"))) == 1:
        record = {"id": ctx.step_id, "pid": os.getpid(), "begun": time.time(), "failed": True}
        record["ended"] = time.time()
        (records_dir(ctx) / f"{ctx.kind}-{ctx.name}.json").write_text(json.dumps(record))
        raise StepError(f"{ctx.step_id} failed on purpose")
    return fake_step(ctx)


def runs_of(proj) -> dict[str, dict]:
    """What fake_step recorded: {"kind-name": {"id", "pid", "begun", "ended", ...}}."""
    return {f.stem: json.loads(f.read_text()) for f in sorted((proj.root / "records").glob("*.json"))}


def killed_step(ctx):
    """Says its pid, then waits to be killed; a train step that finds its checkpoint finishes instead."""
    if ctx.kind == "train" and (ctx.work / "checkpoint-2").is_dir():
        ctx.log("resuming from checkpoint-2")
        return FakeSteps()(ctx.kind)(ctx)
    if ctx.kind == "train":
        (ctx.work / "checkpoint-2").mkdir()
    (records_dir(ctx) / f"pid-{ctx.kind}-{ctx.name}").write_text(str(os.getpid()))
    time.sleep(120)
    raise AssertionError("never killed")


def stoppable_step(ctx):
    """Says its pid, then runs until asked to stop at a safe point."""
    from runner.errors import StepInterrupted

    (records_dir(ctx) / f"pid-{ctx.kind}-{ctx.name}").write_text(str(os.getpid()))
    ctx.progress(1, 2)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if ctx.should_stop():
            (records_dir(ctx) / f"stopped-{ctx.kind}-{ctx.name}").touch()
            raise StepInterrupted(f"{ctx.step_id}: stopped at a safe point")
        time.sleep(0.05)
    raise AssertionError("never asked to stop")


def mailbox_killing_step(ctx):
    """SIGKILLs the build's mailbox actor (a sibling of this worker, under this node's raylet), says its
    pid, and once another has started says a log line."""
    import psutil

    raylet = psutil.Process(os.getpid()).parent()

    def mailboxes() -> dict[int, float]:
        """{pid: start time} of the live mailbox actors; an earlier build's may not have ended yet."""
        found = {}
        for child in raylet.children():
            with contextlib.suppress(psutil.Error):  # one that ended meanwhile, or the killed one's zombie
                if child.cmdline()[:1] == ["ray::Mailbox"] and child.status() != psutil.STATUS_ZOMBIE:
                    found[child.pid] = child.create_time()
        return found

    deadline = time.monotonic() + 30
    while not (before := mailboxes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = max(before, key=before.get)  # this build's: the newest
    os.kill(pid, signal.SIGKILL)
    (records_dir(ctx) / "pid-mailbox").write_text(str(pid))
    while not set(mailboxes()) - set(before) and time.monotonic() < deadline + 30:
        time.sleep(0.05)
    ctx.log("said after the mailbox was lost")
    return FakeSteps()(ctx.kind)(ctx)


def threads_step(ctx):
    """FakeSteps' outputs; records the OMP_NUM_THREADS it runs with."""
    (records_dir(ctx) / f"omp-{ctx.kind}-{ctx.name}").write_text(os.environ.get("OMP_NUM_THREADS", "unset"))
    return FakeSteps()(ctx.kind)(ctx)


class TwoArguments(Exception):
    """Pickles, but does not load: loading calls __init__ with the message alone."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")


def two_arguments_step(ctx):
    raise TwoArguments("dog/03.jpg", "the pixels do not decode")


def fake_ray(run: str):
    from runner.exec.ray_backend import RayBackend

    class FakeRay(RayBackend):
        def run(self, job, hooks):
            return super().run(dataclasses.replace(job, run=f"{__name__}:{run}"), hooks)

    return FakeRay


def build(proj, run: str = "fake_step", reporter=None, **options):
    rec = reporter or Recorder()
    opts = executor.BuildOptions(backend="ray", **options)
    factory = fake_ray(run)
    opts = dataclasses.replace(opts, backend_factory=lambda project: factory(project, opts))
    return executor.build(proj.load(), opts, rec), rec


def pids_of(proj, n: int) -> list[int]:
    """The pids of the first n steps that started."""
    deadline = time.monotonic() + 120
    while len(files := list((proj.root / "records").glob("pid-*"))) < n or not all(
        f.read_text() for f in files
    ):
        assert time.monotonic() < deadline, "the steps never started"
        time.sleep(0.05)
    return [int(f.read_text()) for f in files]


def no_ray_init(api=False):
    """A stand-in for runner.exec.ray_connect.import_ray: a Ray whose init must not be called."""
    from types import SimpleNamespace

    def init(**_):
        raise AssertionError("ray.init was called")

    return SimpleNamespace(is_initialized=lambda: False, init=init)
