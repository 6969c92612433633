"""`--executor ray`: steps as Ray tasks on a local Ray instance with fake GPUs (Ray counts GPUs it is
told of; the steps run on the CPU). The build's process stays the one writer."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import textwrap
import threading
import time
from pathlib import Path

import pytest

from runner import events, executor, lockfile
from tests.conftest import Recorder, write_image
from tests.folders import folder_bytes
from tests.ray_fixtures import build, fake_ray, pids_of, runs_of

pytestmark = pytest.mark.ray

STRIP = ("built", "duration_s")
SIGTERM_BEFORE_RAY: list = []  # this process's SIGTERM handler before ray_instance connected


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory):
    """A local Ray instance of 2 CPUs and 4 (fake) GPUs, started as `--executor ray` starts one."""
    ray = pytest.importorskip("ray")
    from runner.exec.ray_connect import connect

    # Ray's workers inherit this process's environment when it starts: built-in models go where the
    # other tests keep theirs (see conftest), never into the home folder.
    home = os.environ.get("DBL_TEST_HOME") or str(tmp_path_factory.getbasetemp() / "dbl-home")
    os.environ["DBL_TEST_HOME"] = home
    saved = os.environ.get("DBL_HOME")
    os.environ["DBL_HOME"] = home
    SIGTERM_BEFORE_RAY.append(signal.getsignal(signal.SIGTERM))
    try:
        connect(num_cpus=2, num_gpus=4)
    finally:
        if saved is None:
            os.environ.pop("DBL_HOME")
        else:
            os.environ["DBL_HOME"] = saved
    yield ray
    ray.shutdown()


class MissingOnTheNode:
    """Loads in the build's process only, as a job would on a node where dbl is not installed."""

    def __init__(self, driver: int | None = None):
        self.driver = driver or os.getpid()

    def __reduce__(self):
        return (load_missing, (self.driver,))


def load_missing(driver: int):
    if os.getpid() != driver:
        raise ModuleNotFoundError("No module named 'runner'")
    return MissingOnTheNode(driver)


def kill_when_started(proj, name: str) -> dict:
    """SIGKILL the worker that writes records/pid-<name>, from a thread; box['pid'] once done."""
    box: dict = {}

    def kill():
        pid_file = proj.root / "records" / f"pid-{name}"
        deadline = time.monotonic() + 120
        while not pid_file.is_file() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the step never started"
            time.sleep(0.05)
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGKILL)
        box["pid"] = pid

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    box["thread"] = thread
    return box


def gone(pid: int, wait_s: float = 30) -> bool:
    """The process dies within wait_s (gone, or a zombie its parent, Ray's raylet, has not reaped yet)."""
    import psutil

    deadline = time.monotonic() + wait_s
    while True:
        try:
            if psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def failed_alone(proj, step_id: str, backend_class) -> dict[str, str]:
    """{step id: error} of the failed steps of a build of `step_id` alone by `backend_class`, which fails."""
    opts = executor.BuildOptions(backend="ray", only=(step_id,))
    opts = dataclasses.replace(opts, backend_factory=lambda project: backend_class(project, opts))
    result = executor.build(proj.load(), opts, Recorder())
    assert result.exit_code == 1, result.steps
    return {s.id: s.error for s in result.steps if s.status == events.FAILED}


# --- tests ----------------------------------------------------------------------------------------------


def test_the_address_of_a_ray_cluster_is_taken_for_one(ray_instance):
    from runner.exec.ray_connect import _check_reachable

    _check_reachable(ray_instance.get_runtime_context().gcs_address)


def test_a_local_instance_leaves_the_sigterm_handler_as_it_was(ray_instance):
    assert SIGTERM_BEFORE_RAY and signal.getsignal(signal.SIGTERM) is SIGTERM_BEFORE_RAY[0]


def test_a_local_instance_listens_on_127_0_0_1_only(ray_instance):
    nodes = [n for n in ray_instance.nodes() if n["Alive"]]
    assert [n["NodeManagerAddress"] for n in nodes] == ["127.0.0.1"]
    assert ray_instance.cluster_resources()["GPU"] == 4


def test_steps_at_once_get_different_gpus_and_say_where_they_ran(ray_instance, proj):
    result, rec = build(proj, run="overlapping_step", jobs=4, num_processes=2)
    assert result.exit_code == 0, result.steps
    runs = [json.loads(p.read_text()) for p in sorted((proj.root / "records").glob("*.json"))]
    assert len(runs) == 7
    for run in runs:  # a train step of 2 processes takes 2 GPUs, the others one each
        assert len(set(run["devices"])) == (2 if run["id"].startswith("train:") else 1), run
    overlapping = [
        (a, b)
        for a in runs
        for b in runs
        if a["id"] < b["id"] and a["begun"] < b["ended"] and b["begun"] < a["ended"]
    ]
    assert overlapping, "no two steps ran at once"
    for a, b in overlapping:
        assert not set(a["devices"]) & set(b["devices"]), (a, b)
    host = socket.gethostname()
    done = [s for s in result.steps if s.status == events.DONE]
    assert len(done) == 7 and all(s.device.startswith(f"{host} cuda:") for s in done), [
        s.device for s in done
    ]
    logs = [e[2] for e in rec.events if e[0] == "log"]
    assert sum(f"running on node {host}" in m for m in logs) == 7
    assert set(lockfile.read(proj.lock)) == {r["id"] for r in runs}


def test_the_cluster_s_gpus_are_asked_once_a_build_not_once_a_step(ray_instance, proj, monkeypatch):
    """ray.cluster_resources has no timeout: asked as each step started, with the cluster's head lost
    between two steps, the build waited until Ray ended its process, without its summary."""
    import ray

    asked = []
    real = ray.cluster_resources

    def cluster_resources():
        asked.append(threading.current_thread().name)
        return real()

    monkeypatch.setattr(ray, "cluster_resources", cluster_resources)
    result, _ = build(proj, run="fake_step", jobs=2)
    assert result.exit_code == 0, result.steps
    assert len(runs_of(proj)) == 7  # seven steps started
    assert asked == ["MainThread"], asked  # at the build's start, by the scheduler


def test_steps_one_after_another_run_in_one_kept_worker(ray_instance, proj):
    """A worker is kept for the build's next steps, as -j keeps its processes: the imports and the model
    load are paid once, not once a step."""
    result, rec = build(proj, run="fake_step", jobs=1, only=("prior:dog", "train:dog", "train:toy"))
    assert result.exit_code == 0, result.steps
    runs = runs_of(proj)
    assert set(runs) == {"prior-dog", "train-dog", "train-toy"}
    assert len({r["pid"] for r in runs.values()}) == 1, runs
    assert gone(runs["prior-dog"]["pid"]), "the build's end left its worker alive"


def test_the_worker_of_a_failed_step_is_not_kept(ray_instance, proj):
    result, _ = build(proj, run="second_fails_step", jobs=1, keep_going=True)
    failed = [s.id for s in result.steps if s.status == events.FAILED]
    assert result.exit_code == 1 and len(failed) == 1, result.steps
    runs = runs_of(proj)
    (failure,) = [r for r in runs.values() if r.get("failed")]
    after = [r for r in runs.values() if r["begun"] > failure["ended"]]
    before = [r for r in runs.values() if r["ended"] < failure["begun"]]
    assert len(before) == 1 and after, runs  # steps ran on both sides of the failure
    assert before[0]["pid"] == failure["pid"], "the first step's worker was not kept"
    assert failure["pid"] not in {r["pid"] for r in after}, runs
    assert gone(failure["pid"])


class KillsTheWorkerBetweenSteps(Recorder):
    """SIGKILLs the worker of the first step once it has ended, while the worker is idle."""

    def __init__(self, proj):
        super().__init__()
        self.proj, self.killed = proj, None

    def step_end(self, step):
        super().step_end(step)
        if self.killed is None:
            self.killed = next(iter(runs_of(self.proj).values()))["pid"]
            os.kill(self.killed, signal.SIGKILL)
            assert gone(self.killed)


def test_a_kept_worker_killed_while_idle_is_replaced_unseen(ray_instance, proj):
    rec = KillsTheWorkerBetweenSteps(proj)
    result, _ = build(proj, run="fake_step", reporter=rec, jobs=1, only=("prior:dog", "train:toy"))
    assert rec.killed is not None, "no worker was killed"
    assert result.exit_code == 0, result.steps
    runs = runs_of(proj)
    assert len(runs) == 2 and rec.killed in {r["pid"] for r in runs.values()}
    assert len({r["pid"] for r in runs.values()}) == 2, runs
    logs = [e[2] for e in rec.events if e[0] == "log"]
    assert not any("died" in m or "lost" in m for m in logs), logs


def test_a_killed_worker_fails_its_step_with_a_message_naming_it(ray_instance, proj):
    box = kill_when_started(proj, "render-base")
    result, _ = build(proj, run="killed_step", only=("render:base",))
    box["thread"].join(10)
    assert gone(box["pid"]), "the worker was not killed"
    failed = {s.id: s.error for s in result.steps if s.status == events.FAILED}
    assert result.exit_code == 1 and list(failed) == ["render:base"]
    assert failed["render:base"].startswith(
        f"render:base: its Ray worker on node {socket.gethostname()} died"
    )
    assert "render:base" not in (lockfile.read(proj.lock) if proj.lock.exists() else {})


def test_rays_own_paragraph_on_a_lost_worker_goes_to_standard_error(ray_instance, proj, capfd, monkeypatch):
    """Ray prints a `(raylet)` paragraph when a worker dies; on standard output it broke scripts that
    read the build's output there."""
    from ray._private import worker

    for printed in (worker.stdout_deduplicator, worker.stderr_deduplicator):  # not held as a repeat of
        monkeypatch.setattr(printed, "deduplicate", lambda data: [data])  # another test's paragraph
    box = kill_when_started(proj, "render-base")
    result, _ = build(proj, run="killed_step", only=("render:base",))
    box["thread"].join(10)
    assert gone(box["pid"]) and result.exit_code == 1, "the worker was not killed"
    out = err = ""
    deadline = time.monotonic() + 60  # Ray says it from a thread of its own, when the error reaches it
    while "(raylet)" not in out + err and time.monotonic() < deadline:
        time.sleep(0.2)
        said = capfd.readouterr()
        out, err = out + said.out, err + said.err
    assert "(raylet)" in err and "A worker died or was killed" in err, (out, err)
    assert "(raylet)" not in out, out


def test_a_step_error_that_does_not_load_reads_as_in_an_inline_build(ray_instance, proj):
    """Ray failed to load it in the build's process, and said so with a traceback of its own code."""
    result, _ = build(proj, run="two_arguments_step", only=("render:base",))
    failed = {s.id: s.error for s in result.steps if s.status == events.FAILED}
    assert result.exit_code == 1 and failed == {
        "render:base": "TwoArguments: dog/03.jpg: the pixels do not decode (run with --debug for the traceback)"
    }, failed


def test_a_job_that_a_worker_cannot_load_fails_in_one_line_that_says_why(ray_instance, proj):
    """Ray's error held its traceback, in terminal colours, under two wrappers of its own."""
    from runner.exec.ray_backend import RayBackend

    class Unloadable(RayBackend):
        def run(self, job, hooks):
            return super().run(dataclasses.replace(job, inputs={"x": MissingOnTheNode()}), hooks)

    failed = failed_alone(proj, "render:base", Unloadable)
    assert failed == {
        "render:base": "render:base: Ray could not run it: ModuleNotFoundError: No module named 'runner' "
        "(dbl, the same version, must be installed on every node of the cluster)"
    }, failed


def test_a_worker_that_cannot_start_fails_its_step_in_one_line_that_says_why(
    ray_instance, proj, tmp_path, monkeypatch
):
    """A node without dbl cannot load the worker's class: Ray said so in a paragraph with its traceback."""
    folder = tmp_path / "here-only"
    folder.mkdir()
    (folder / "dbl_here_only.py").write_text(
        "from runner.exec.ray_backend import StepWorker\n\n\nclass Worker(StepWorker):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(folder))  # this process's path only: Ray's workers do not have it
    import dbl_here_only

    class Unstartable(fake_ray("fake_step")):
        def _connect(self):
            ray = super()._connect()
            self._worker_class = ray.remote(max_restarts=0, max_task_retries=0)(dbl_here_only.Worker)
            return ray

    failed = failed_alone(proj, "render:base", Unstartable)
    assert failed == {
        "render:base": "render:base: Ray could not run it: ModuleNotFoundError: No module named 'dbl_here_only' "
        "(dbl, the same version, must be installed on every node of the cluster)"
    }, failed


def test_the_lines_after_a_lost_mailbox_are_still_seen(ray_instance, proj):
    """The actor that carries the steps' progress and log lines is started again when its process dies:
    the rest of the build ran unseen."""
    result, rec = build(proj, run="mailbox_killing_step", only=("render:base",))
    assert result.exit_code == 0, result.steps
    assert gone(int((proj.root / "records" / "pid-mailbox").read_text())), "the mailbox was not killed"
    assert ("log", "render:base", "said after the mailbox was lost") in rec.events, rec.events


def test_a_killed_train_worker_runs_once_more_from_its_checkpoint(ray_instance, proj):
    box = kill_when_started(proj, "train-toy")
    result, rec = build(proj, run="killed_step", only=("train:toy",))
    box["thread"].join(10)
    assert gone(box["pid"]), "the worker was not killed"
    assert result.exit_code == 0, result.steps
    logs = [e[2] for e in rec.events if e[0] == "log" and e[1] == "train:toy"]
    assert any(
        "its Ray worker on node" in m and "running it once more, from checkpoint-2" in m for m in logs
    ), logs
    assert "resuming from checkpoint-2" in logs
    assert "train:toy" in lockfile.read(proj.lock)


def test_ctrl_c_once_stops_running_steps_at_a_safe_point_and_cancels_the_waiting_one(ray_instance, proj):
    (proj.root / "records").mkdir()
    asked = threading.Event()

    def ask_when_two_run():
        pids_of(proj, 2)  # prior:dog, train:toy and render:base are ready; Ray has CPUs for two
        time.sleep(1)
        asked.set()

    threading.Thread(target=ask_when_two_run, daemon=True).start()
    result, _ = build(proj, run="stoppable_step", jobs=4, should_stop=asked.is_set)
    assert result.exit_code == executor.EXIT_INTERRUPTED
    stopped = {s.id: s.error for s in result.steps if s.status == events.INTERRUPTED}
    assert set(stopped) == {"prior:dog", "train:toy", "render:base"}, stopped
    errors = sorted(e.removeprefix(sid).removeprefix(":").strip() for sid, e in stopped.items())
    assert errors == ["stopped at a safe point"] * 2 + ["stopped before it started"], stopped
    assert not lockfile.read(proj.lock) if proj.lock.exists() else True


def test_ctrl_c_once_stops_a_step_that_started_before_the_build_heard_of_it_at_a_safe_point(
    ray_instance, proj
):
    """The first Ctrl-C cancelled a step whose worker had started it less than a poll before (Ray interrupts
    it anywhere): here the build never hears of its start."""

    class Unheard(fake_ray("stoppable_step")):
        def _deliver(self, ray, sid, hooks):
            super()._deliver(ray, sid, hooks)
            self._where.pop(sid, None)

    (proj.root / "records").mkdir()
    asked = threading.Event()
    threading.Thread(target=lambda: (pids_of(proj, 1), asked.set()), daemon=True).start()
    opts = executor.BuildOptions(backend="ray", only=("render:base",), should_stop=asked.is_set)
    opts = dataclasses.replace(opts, backend_factory=lambda project: Unheard(project, opts))
    result = executor.build(proj.load(), opts, Recorder())
    stopped = {s.id: s.error for s in result.steps if s.status == events.INTERRUPTED}
    assert result.exit_code == executor.EXIT_INTERRUPTED
    assert stopped == {"render:base": "render:base: stopped at a safe point"}, stopped
    assert (proj.root / "records" / "stopped-render-base").is_file()


class InterruptOnProgress(Recorder):
    """The second Ctrl-C lands while the main thread shows a step's progress (once it has said its pid)."""

    def step_progress(self, step):
        if step.done:
            raise KeyboardInterrupt


def test_ctrl_c_twice_ends_the_running_workers(ray_instance, proj):
    result, _ = build(proj, run="stoppable_step", reporter=InterruptOnProgress(), jobs=4)
    assert result.exit_code == executor.EXIT_INTERRUPTED
    cancelled = [s for s in result.steps if s.status == events.INTERRUPTED]
    assert cancelled and all(s.error == "cancelled" for s in cancelled)
    pids = [int(f.read_text()) for f in (proj.root / "records").glob("pid-*") if f.read_text()]
    assert pids and all(gone(pid) for pid in pids), "a cancelled worker lives on"


# --- real steps on tiny-sd ------------------------------------------------------------------------------

PROJECT = """
[project]
base_model = "tiny-sd"

[train]
resolution = 64
steps = 4

[lora]
rank = 4
alpha = 8

[subjects.toy]
images = "toy"
instance_prompt = "a photo of sks toy"

[subjects.cat]
images = "cat"
instance_prompt = "a photo of sks cat"

[blends.pair]
adapters = { toy = 1.0, cat = 0.5 }

[renders.pair]
adapter = "pair"
prompts = ["a toy cat"]
steps = 2
seeds = [0]
"""


def tiny_project(folder: Path):
    from runner.project import load_project

    folder.mkdir(parents=True)
    (folder / "p.toml").write_text(textwrap.dedent(PROJECT))
    for n, name in enumerate(("toy", "cat")):
        for i in range(2):
            write_image(folder / name / f"{i}.png", seed=10 * n + i, size=64)
    return load_project(folder / "p.toml")


def built(folder: Path):
    out = folder / "build" / "p"
    files = folder_bytes(out)
    records = {
        k: {f: v for f, v in r.items() if f not in STRIP} for k, r in lockfile.read(folder / "p.lock").items()
    }
    return files, records


def test_a_watch_keeps_its_ray_workers_from_one_build_to_the_next_and_ends_them(ray_instance, pid_notes):
    """As a -j watch keeps its worker processes: the second build's step runs in the worker the first
    build's step left (with the base model it loaded, for a step that loads one)."""
    from tests.watch_fixtures import worker_kept_by_a_watch

    pid = worker_kept_by_a_watch(
        pid_notes, {"backend": "ray", "jobs": 1}, lambda pid: not gone(pid, wait_s=0)
    )
    assert gone(pid), "the watch's Ray worker outlived it"


def test_a_watch_ends_its_idle_ray_workers_after_keep_loaded_and_starts_new_ones(ray_instance, pid_notes):
    from tests.watch_fixtures import workers_let_go_by_a_watch

    workers_let_go_by_a_watch(pid_notes, {"backend": "ray", "jobs": 1}, gone)


@pytest.mark.torch
def test_steps_of_a_local_instance_take_the_builds_thread_count(ray_instance, proj, monkeypatch):
    """OMP_NUM_THREADS of the build's environment sets the thread count of an inline build's steps, and so
    their bytes: a step on a local Ray instance takes it too, not Ray's one thread a task, nor torch's own."""
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    result, _ = build(proj, run="threads_step")
    assert result.exit_code == 0, result.steps
    seen = {p.name: p.read_text() for p in (proj.root / "records").glob("omp-*")}
    assert len(seen) == 7 and set(seen.values()) == {"3"}, seen


def test_ray_builds_the_bytes_and_lockfile_of_an_inline_build(ray_instance, tmp_path):
    inline, on_ray = tmp_path / "inline", tmp_path / "ray"
    result = executor.build(tiny_project(inline), executor.BuildOptions(), Recorder())
    assert result.exit_code == 0, result.steps
    rec = Recorder()
    result = executor.build(tiny_project(on_ray), executor.BuildOptions(backend="ray", jobs=2), rec)
    assert result.exit_code == 0, [(s.id, s.error) for s in result.steps]
    assert {s.status for s in result.steps} == {events.DONE}
    files, records = built(on_ray)
    assert len(records) == 4 and len(files) > 10
    assert built(inline) == (files, records)
    said = [e[2] for e in rec.events if e[0] == "log" and "(worker pid" in e[2]]
    pids = {line.split("(worker pid ")[1].split(",")[0].rstrip(")") for line in said}
    assert len(said) == 4 and len(pids) < 4, said  # a worker kept its model for a later step
