"""Steps at once (`-j N`): a gated fake backend whose steps run only when the test lets them."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

from runner import events, executor, lockfile
from runner.errors import StepError, StepInterrupted
from runner.exec.backends import ProcessBackend
from runner.exec.devices import DevicePool, gpus_problem, parse_gpus
from runner.exec.job import run_job
from tests.conftest import FakeSteps, Recorder
from tests.folders import folder_bytes

STRIP = ("built", "duration_s")


class Gated:
    """Runs FakeSteps, each only once the test opens its gate (or at once with auto=True); keeps what
    ran at the same time and on which devices."""

    name = "gated"

    def __init__(self, fake: FakeSteps, auto: bool = False):
        self.fake, self.auto = fake, auto
        self.lock = threading.Lock()
        self.running: dict[str, tuple] = {}
        self.snapshots: list[dict] = []
        self.started: list[str] = []
        self.gates: dict[str, threading.Event] = {}
        self.die: set[str] = set()
        self.cancelled = False
        self.progress_once = False

    def gate(self, sid: str) -> threading.Event:
        with self.lock:
            return self.gates.setdefault(sid, threading.Event())

    def run(self, job, hooks):
        assert all(Path(d).is_dir() for d in job.inputs.values()), f"{job.step_id} before its inputs"
        with self.lock:
            self.running[job.step_id] = job.devices
            self.snapshots.append(dict(self.running))
            self.started.append(job.step_id)
        try:
            if self.progress_once:
                hooks.progress(1, 2)
            gate = self.gate(job.step_id)
            while not (self.auto or gate.wait(0.01)):
                if self.cancelled:
                    raise StepError(f"{job.step_id}: its worker process died (exit code -15)")
                if hooks.should_stop():
                    raise StepInterrupted(f"{job.step_id}: stopped at a safe point")
            if self.auto:
                time.sleep(0.02)
            if job.step_id in self.die:
                raise StepError(f"{job.step_id}: its worker process died (exit code -9)")
            return run_job(job, hooks, models=None, run=self.fake(job.kind))
        finally:
            with self.lock:
                self.running.pop(job.step_id)

    def cancel(self):
        self.cancelled = True

    def close(self):
        pass

    def wait_running(self, n: int, timeout: float = 20) -> set[str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if len(self.running) >= n:
                    return set(self.running)
            time.sleep(0.01)
        raise AssertionError(f"{n} steps never ran at once: {self.running}")


def start(proj, backend, reporter=None, **options):
    """Build in a thread; returns (thread, box) where box['result'] is set at the end."""
    rec = reporter or Recorder()
    box: dict = {"rec": rec}

    def go():
        box["result"] = executor.build(
            proj.load(), executor.BuildOptions(backend_factory=lambda p: backend, **options), rec
        )

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, box


def finish(thread, box):
    thread.join(60)
    assert not thread.is_alive()
    return box["result"], box["rec"]


def records(path):
    return {sid: {k: v for k, v in r.items() if k not in STRIP} for sid, r in lockfile.read(path).items()}


def outputs(root: Path) -> dict:
    return folder_bytes(root / "out")


def deps_of(proj) -> dict:
    from runner import planner

    return {s.id: set(s.deps) for s in planner.graph(proj.load())}


# --- the device pool --------------------------------------------------------------------------------------


def test_the_device_pool_shares_each_gpu_with_at_most_per_gpu_steps():
    pool = DevicePool(["0", "1"], per_gpu=2)
    got = [pool.acquire(1) for _ in range(4)]
    assert sorted(d for g in got for d in g) == ["0", "0", "1", "1"]
    assert pool.acquire(1) is None
    pool.release(got[0])
    assert pool.acquire(1) == got[0]


def test_a_step_of_p_processes_gets_p_different_gpus_or_waits():
    pool = DevicePool(["0", "1", "2"])
    two = pool.acquire(2)
    assert len(set(two)) == 2
    assert pool.acquire(2) is None
    assert pool.fits(3) and not pool.fits(4)
    pool.release(two)
    assert len(set(pool.acquire(3))) == 3


def test_no_gpus_every_step_runs_on_the_cpu():
    pool = DevicePool([])
    assert [pool.acquire(4) for _ in range(3)] == [(), (), ()]
    assert pool.fits(8)


def test_gpu_lists(monkeypatch):
    assert parse_gpus("0, 2,3") == ["0", "2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,2")
    assert parse_gpus(None) == ["1", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert parse_gpus(None) == []


def test_gpus_that_cuda_would_not_take_are_usage_errors(tmp_path, capsys):
    """CUDA_VISIBLE_DEVICES stops at the first entry it cannot read: `--gpus 1,two` would have
    shown the steps one GPU, `--gpus all` none, and they would have run on the CPU without a word."""
    from runner.cli import main

    assert gpus_problem(["0", "3", "GPU-8932f937-d72c", "MIG-1d5a"]) is None
    path = tmp_path / "p.toml"
    path.write_text('[project]\nbase_model = "tiny-sd"\n')
    for given, bad in (("all", "'all'"), ("0,two", "'two'"), ("cuda:0", "'cuda:0'")):
        assert main(["build", str(path), "-j", "2", "--gpus", given, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"--gpus: {bad} is not a GPU" in err and "Traceback" not in err
    assert not (tmp_path / "p.lock").exists()


# --- the scheduler ----------------------------------------------------------------------------------------


def test_j2_keeps_the_bound_and_the_order_and_builds_what_j1_builds(proj, tmp_path):
    fake = FakeSteps()
    backend = Gated(fake, auto=True)
    result, _ = finish(*start(proj, backend, jobs=2))
    assert result.exit_code == 0, result.steps
    assert max(len(s) for s in backend.snapshots) == 2  # it did run steps at once, never more than 2
    parallel_lock, parallel_out = records(proj.lock), outputs(proj.root)

    from tests.conftest import PETS, Proj

    other = tmp_path / "seq"
    other.mkdir()
    seq = Proj(other, PETS)
    result, _ = finish(*start(seq, Gated(FakeSteps(), auto=True), jobs=1))
    assert result.exit_code == 0
    assert records(seq.lock) == parallel_lock
    assert outputs(seq.root) == parallel_out
    assert len(parallel_lock) == 7


def test_a_step_starts_only_once_its_upstream_steps_are_committed(proj):
    fake = FakeSteps()
    backend = Gated(fake)
    thread, box = start(proj, backend, jobs=4)
    deps = deps_of(proj)
    done: set[str] = set()
    while len(done) < len(deps):
        running = backend.wait_running(1)
        for sid in running:
            assert deps[sid] <= done, (sid, deps[sid], done)
        sid = sorted(running)[0]
        backend.gate(sid).set()
        while sid in backend.running:
            time.sleep(0.01)
        done.add(sid)
        deadline = time.monotonic() + 10  # committed by the main thread before a dependent starts
        while sid not in lockfile.read(proj.lock) and time.monotonic() < deadline:
            time.sleep(0.01)
    result, _ = finish(thread, box)
    assert result.exit_code == 0
    assert max(len(s) for s in backend.snapshots) <= 4


def test_no_gpu_holds_more_than_per_gpu_steps(proj):
    backend = Gated(FakeSteps(), auto=True)
    result, _ = finish(*start(proj, backend, jobs=4, gpus=("0", "1"), per_gpu=1))
    assert result.exit_code == 0
    for snap in backend.snapshots:
        used = [d for devices in snap.values() for d in devices]
        assert len(used) == len(set(used)), snap
        assert all(len(devices) == 1 for devices in snap.values())
    assert max(len(s) for s in backend.snapshots) == 2
    assert {s.device for s in result.steps if s.status == events.DONE} <= {"cuda:0", "cuda:1"}


def test_a_train_step_of_two_processes_gets_two_gpus(proj):
    backend = Gated(FakeSteps(), auto=True)
    result, _ = finish(*start(proj, backend, jobs=3, gpus=("0", "1", "2"), per_gpu=2, num_processes=2))
    assert result.exit_code == 0
    trains = [d for snap in backend.snapshots for sid, d in snap.items() if sid.startswith("train:")]
    assert trains and all(len(set(d)) == 2 for d in trains)
    for snap in backend.snapshots:
        used = [d for devices in snap.values() for d in devices]
        assert all(used.count(d) <= 2 for d in used), snap


def test_keep_going_goes_on_with_independent_steps(proj):
    fake = FakeSteps()
    fake.fail = {"train:dog"}
    result, _ = finish(*start(proj, Gated(fake, auto=True), jobs=3, keep_going=True))
    status = {s.id: s.status for s in result.steps}
    assert result.exit_code == 1
    assert status["train:dog"] == events.FAILED
    assert status["train:toy"] == status["render:base"] == events.DONE
    assert status["blend:mix"] == status["render:park"] == status["render:mixed"] == events.SKIPPED
    assert "train:dog failed on purpose" in next(s.error for s in result.steps if s.id == "train:dog")
    errors = {s.id: s.error for s in result.steps}
    assert errors["blend:mix"] == "upstream train:dog failed"
    assert errors["render:mixed"] == "upstream blend:mix skipped"


def test_without_keep_going_a_failure_starts_nothing_new_and_lets_running_steps_finish(proj):
    fake = FakeSteps()
    fake.fail = {"prior:dog"}
    backend = Gated(fake)
    thread, box = start(proj, backend, jobs=2)
    running = backend.wait_running(2)
    assert "prior:dog" in running
    other = (running - {"prior:dog"}).pop()
    backend.gate("prior:dog").set()
    time.sleep(0.5)
    assert backend.started == sorted(running, key=backend.started.index)  # nothing new started
    backend.gate(other).set()
    result, rec = finish(thread, box)
    status = {s.id: s.status for s in result.steps}
    assert result.exit_code == 1
    assert status["prior:dog"] == events.FAILED and status[other] == events.DONE
    assert other in lockfile.read(proj.lock)
    assert any("starting nothing new" in e[2] for e in rec.events if e[0] == "log")


def test_a_dying_worker_is_a_failure_naming_the_step(proj):
    fake = FakeSteps()
    backend = Gated(fake, auto=True)
    backend.die = {"train:toy"}
    result, _ = finish(*start(proj, backend, jobs=2, keep_going=True))
    failed = {s.id: s.error for s in result.steps if s.status == events.FAILED}
    assert list(failed) == ["train:toy"]
    assert "train:toy: its worker process died" in failed["train:toy"]
    assert "train:toy" not in lockfile.read(proj.lock)
    assert "train:dog" in lockfile.read(proj.lock)


def test_ctrl_c_once_starts_nothing_new_and_asks_running_steps_to_stop(proj):
    flag = threading.Event()
    backend = Gated(FakeSteps())
    thread, box = start(proj, backend, jobs=2, should_stop=flag.is_set)
    running = backend.wait_running(2)
    flag.set()
    result, rec = finish(thread, box)
    assert result.exit_code == executor.EXIT_INTERRUPTED
    assert set(backend.started) == running  # nothing dispatched after the Ctrl-C
    status = {s.id: s.status for s in result.steps}
    assert all(status[sid] == events.INTERRUPTED for sid in running)
    assert not any(sid in lockfile.read(proj.lock) for sid in running) if proj.lock.exists() else True


class CtrlCOnFirstRestore(Recorder):
    """Ctrl-C (once) as the first step is restored from the run-cache."""

    def __init__(self):
        super().__init__()
        self.flag = threading.Event()

    def step_end(self, step):
        super().step_end(step)
        if step.status == events.CACHED:
            self.flag.set()


def test_ctrl_c_once_stops_a_run_of_restores(proj):
    """Restores run in the build's own process, one after another: they went on to the last one."""
    assert finish(*start(proj, Gated(FakeSteps(), auto=True), jobs=2))[0].ok
    import shutil

    shutil.rmtree(proj.root / "build")  # every step is restorable, none runs
    rec = CtrlCOnFirstRestore()
    result, _ = finish(*start(proj, Gated(FakeSteps()), reporter=rec, jobs=2, should_stop=rec.flag.is_set))
    assert rec.flag.is_set() and result.exit_code == executor.EXIT_INTERRUPTED
    restored = [s.id for s in result.steps if s.status == events.CACHED]
    assert len(restored) == 1 and len(result.steps) > 1, restored


class Devices(Recorder):
    """Keeps the device each step was shown to start on."""

    def __init__(self):
        super().__init__()
        self.on: dict[str, str] = {}

    def step_start(self, step):
        super().step_start(step)
        self.on[step.id] = step.device


def test_a_restore_is_shown_on_no_device(proj):
    """A restore copies files in the build's own process: it said `start on cuda:0`."""
    assert finish(*start(proj, Gated(FakeSteps(), auto=True), jobs=2, gpus=("0", "1")))[0].ok
    import shutil

    shutil.rmtree(proj.root / "build")
    rec = Devices()
    result, _ = finish(*start(proj, Gated(FakeSteps(), auto=True), reporter=rec, jobs=2, gpus=("0", "1")))
    restored = {s.id for s in result.steps if s.status == events.CACHED}
    assert restored and restored == set(rec.on), rec.on
    assert set(rec.on.values()) == {""} and all(s.device == "" for s in result.steps), rec.on


class InterruptOnProgress(Recorder):
    """The second Ctrl-C lands while the main thread shows a step's progress."""

    def step_progress(self, step):
        raise KeyboardInterrupt


def test_ctrl_c_twice_cancels_the_running_steps(proj):
    backend = Gated(FakeSteps())
    backend.progress_once = True
    result, _ = finish(*start(proj, backend, reporter=InterruptOnProgress(), jobs=2))
    assert result.exit_code == executor.EXIT_INTERRUPTED
    assert backend.cancelled
    interrupted = [s for s in result.steps if s.status == events.INTERRUPTED]
    assert interrupted and all(s.error == "cancelled" for s in interrupted)
    assert not lockfile.read(proj.lock) if proj.lock.exists() else True


class InterruptOnSecondStart(Recorder):
    """The second Ctrl-C lands while the main thread starts a step (or restores it from the run-cache)."""

    def step_start(self, step):
        super().step_start(step)
        if sum(1 for e in self.events if e[0] == "start") == 2:
            raise KeyboardInterrupt


def test_ctrl_c_twice_while_a_step_starts_interrupts_that_step_too(proj):
    from runner.exec import lastbuild

    result, rec = finish(*start(proj, Gated(FakeSteps()), reporter=InterruptOnSecondStart(), jobs=2))
    assert result.exit_code == executor.EXIT_INTERRUPTED
    second = [e[1] for e in rec.events if e[0] == "start"][1]  # the step the Ctrl-C landed in
    status = {s.id: s.status for s in result.steps}
    assert status[second] == events.INTERRUPTED, status
    assert events.RUNNING not in status.values(), status
    assert ("end", second, events.INTERRUPTED, "interrupted") in rec.events
    outcomes = {row["id"]: row["outcome"] for row in lastbuild.read(proj.load())["steps"]}
    assert outcomes[second] == "interrupted"
    assert set(outcomes.values()) <= set(lastbuild.OUTCOMES.values()), outcomes


# --- a real worker process that dies ----------------------------------------------------------------------


def die(ctx):
    """A step whose worker is killed (as by the OOM killer)."""
    os.kill(os.getpid(), signal.SIGKILL)


class DyingProcesses(ProcessBackend):
    def __init__(self, project, doomed: str):
        super().__init__(project)
        self.doomed = doomed

    def run(self, job, hooks):
        if job.step_id == self.doomed:
            job = dataclasses.replace(job, run=f"{__name__}:die")
        else:
            job = dataclasses.replace(job, run=f"{__name__}:nothing")
        return super().run(job, hooks)


def nothing(ctx):
    (ctx.out / "x.txt").write_text(ctx.step_id)
    return {}


def test_a_killed_worker_process_is_reported_with_the_step_name(proj):
    project = proj.load()
    backend = DyingProcesses(project, "render:base")
    result = executor.build(
        project,
        executor.BuildOptions(
            backend_factory=lambda p: backend, jobs=2, keep_going=True, only=("render:base",)
        ),
        Recorder(),
    )
    failed = {s.id: s.error for s in result.steps if s.status == events.FAILED}
    assert "render:base" in failed
    assert "render:base: its worker process died" in failed["render:base"]
    assert "-9" in failed["render:base"]
