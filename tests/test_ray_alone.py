"""`--executor ray` without the shared local Ray instance of tests/test_ray.py: what a step reserves, a
step whose node Ray lost before its worker started (Ray faked), a cluster's head (its GCS) lost mid-build
(a Ray instance of its own, in a process of its own, a part of which the test kills), a watch that stops
the local instance it started, and a build through a Ray Client address (`ray://`) of a head started by
`ray start`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from runner import executor

pytestmark = pytest.mark.ray


def test_what_a_step_reserves(proj):
    """A step's share of a GPU is 1/--per-gpu; a train step of P processes takes P whole GPUs."""
    from types import SimpleNamespace

    from runner.exec.ray_backend import RayBackend

    pytest.importorskip("ray")
    proj.edit('base_model = "tiny-sd"', 'base_model = "tiny-sd"\ndevice = "cuda"')
    backend = RayBackend(proj.load(), executor.BuildOptions(per_gpu=3))
    step = lambda kind, processes=1: SimpleNamespace(kind=kind, num_processes=processes)  # noqa: E731
    assert backend.gpus_for(step("render")) == backend.gpus_for(step("train")) == 0.3333
    assert backend.gpus_for(step("train", 2)) == 2 and backend.gpus_for(step("render", 2)) == 0.3333
    proj.edit('device = "cuda"', 'device = "cpu"')
    assert RayBackend(proj.load(), executor.BuildOptions()).gpus_for(step("train", 2)) == 0


def test_a_step_lost_before_it_started_is_not_said_to_have_had_a_worker_that_died(proj):
    """Its node's raylet was killed before the step's worker started: `its Ray worker died` named
    neither node nor worker, there being none."""
    from types import SimpleNamespace

    pytest.importorskip("ray")
    from ray import exceptions

    from runner.exec.job import Hooks
    from runner.exec.ray_backend import RayBackend, _WorkerLost

    def get(ref, timeout=None):
        if ref == "events":
            return []
        raise exceptions.LocalRayletDiedError()

    fake = SimpleNamespace(wait=lambda refs, timeout: (refs, []), get=get)
    backend = RayBackend(proj.load(), executor.BuildOptions())
    backend._mailbox = SimpleNamespace(take=SimpleNamespace(remote=lambda sid: "events"))
    job = SimpleNamespace(step_id="render:base", stop_file=None)
    with pytest.raises(_WorkerLost) as info:
        backend._wait(fake, "task", job, Hooks(), 0)
    assert str(info.value) == (
        "render:base: Ray lost it before it started (The task's local raylet died. Check raylet.out for "
        "more information.)"
    )
    backend._where["render:base"] = "gpu-node-2 cuda:1"  # said by its worker, once started
    with pytest.raises(_WorkerLost, match=r"^render:base: its Ray worker on node gpu-node-2 died \(The"):
        backend._wait(fake, "task", job, Hooks(), 0)


HEAD_KILLED = """
import json, os, sys, threading, time
from pathlib import Path

import psutil

from runner import events, lockfile
from runner.exec import ray_backend
from tests.conftest import PETS, Proj
from tests.ray_fixtures import build, pids_of

ray_backend.HEAD_LOST_S = 3.0
proj = Proj(Path(sys.argv[1]), PETS)
ray_backend.connect(num_cpus=2)
result, _ = build(proj, only=("prior:dog",))
before = proj.lock.read_bytes()
killed = {}

def kill_the_head():
    pids_of(proj, 2)  # train:toy and render:base run
    (head,) = [p for p in psutil.Process().children(recursive=True) if p.name() == "gcs_server"]
    head.kill()
    killed["at"] = time.monotonic()

threading.Thread(target=kill_the_head, daemon=True).start()
result, _ = build(proj, run="stoppable_step", only=("train:toy", "render:base"), jobs=2)
ended = time.monotonic()
print(json.dumps({
    "exit": result.exit_code,
    "failed": {s.id: s.error for s in result.steps if s.status == events.FAILED},
    "after_s": ended - killed["at"],
    "lock_kept": proj.lock.read_bytes() == before,
    "stopped": sorted(p.name for p in (proj.root / "records").glob("stopped-*")),
}))
"""


LET_GO = """
import dataclasses, json, sys
from pathlib import Path

import psutil
import ray

from runner import steps
from tests.note_kind import NOTE, run_note_with_pid
from tests.watch_fixtures import Watcher, save, wait_for

steps.register(dataclasses.replace(NOTE, run=run_note_with_pid))
path = Path(sys.argv[1]) / "n.toml"
path.write_text('[project]\\nbase_model = "tiny-sd"\\n\\n[notes.a]\\ntext = "one"\\n')
note = path.parent / "build" / "n" / "notes" / "a" / "note.txt"
heads = lambda: [p.pid for p in psutil.Process().children(recursive=True) if p.name() == "gcs_server"]
w = Watcher(path, build_options={"backend": "ray", "jobs": 1}, keep_loaded_s=0.5)
try:
    w.wait_idle(0)
    first = {"note": note.read_text(), "heads": heads()}
    wait_for(lambda: any(m.startswith("no change for 0.5 s: ended") for m in w.messages), "let go")
    wait_for(lambda: not heads(), "the local instance to stop")
    let_go = {"connected": ray.is_initialized(), "heads": heads()}
    save(path, path.read_text().replace('"one"', '"two"'))
    wait_for(lambda: note.read_text().startswith("two"), "the second build")
finally:
    code = w.close()
print(json.dumps({"first": first, "let_go": let_go, "second": note.read_text(), "code": code, "said": w.messages}))
"""


def test_a_watch_that_let_go_of_its_ray_workers_stops_the_local_instance_it_started(tmp_path):
    """A local Ray instance's processes hold some 650 MB: a watch with nothing to build for --keep-loaded
    minutes stops the one its first build started, and its next build starts another."""
    import subprocess
    import sys

    pytest.importorskip("ray")
    home = os.environ.get("DBL_TEST_HOME") or str(tmp_path / "dbl-home")
    env = {**os.environ, "DBL_HOME": home, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", LET_GO, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    said = json.loads(done.stdout.strip().splitlines()[-1])
    assert said["first"]["note"].startswith("one ") and len(said["first"]["heads"]) == 1, said
    assert said["let_go"] == {"connected": False, "heads": []}, said
    assert said["second"].startswith("two ") and said["code"] == 0, said
    assert said["second"].split()[1] != said["first"]["note"].split()[1], said  # a new worker
    assert (
        "no change for 0.5 s: ended the idle worker, the base model it had loaded and the local Ray instance "
        "(the next build starts them again)"
    ) in said["said"], said


@pytest.mark.slow
def test_a_lost_head_ends_the_build_with_its_summary_before_ray_ends_the_process(tmp_path):
    """Ray ended the build's process from its C++ code a minute after the head's GCS was lost (exit 1, no
    summary, and a train step that could have saved a checkpoint did not)."""
    import subprocess
    import sys

    pytest.importorskip("ray")
    home = os.environ.get("DBL_TEST_HOME") or str(tmp_path / "dbl-home")
    env = {**os.environ, "DBL_HOME": home, "PYTHONPATH": str(Path(__file__).parents[1])}
    begun = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", HEAD_KILLED, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - begun
    assert done.returncode == 0, done.stderr[-3000:]
    said = json.loads(done.stdout.strip().splitlines()[-1])
    assert said["exit"] == 1 and said["lock_kept"], said
    assert set(said["failed"]) == {"train:toy", "render:base"}, said
    for error in said["failed"].values():
        assert "the Ray cluster's head is lost (its GCS at " in error, said
        assert "has not answered for 3s); rerun the build once it is back" in error, said
    assert said["stopped"] == ["stopped-render-base", "stopped-train-toy"], said  # at a safe point
    assert said["after_s"] < 20 and took < 60, (said, took)  # well before Ray's minute


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port: int, head, log: Path, wait_s: float = 60) -> None:
    """Wait until something listens on the port of 127.0.0.1 (the head started by `ray start`, which
    writes `log`)."""
    import socket

    deadline = time.monotonic() + wait_s
    while True:
        assert head.poll() is None, f"ray start ended with {head.returncode}: {log.read_text()[-3000:]}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port} after {wait_s}s"
            time.sleep(0.2)


def end_head(head, temp_dir: Path) -> None:
    """Kill a head started by `ray start --block` and every process it started (SIGTERM drains the node for
    30 s first), and assert that none is left."""
    import signal

    import psutil

    os.killpg(head.pid, signal.SIGKILL)
    head.wait(30)
    left = [p for p in psutil.process_iter(["cmdline"]) if str(temp_dir) in " ".join(p.info["cmdline"] or [])]
    for p in left:
        p.kill()
    assert not [p.pid for p in left], "processes of the head outside its process group"


@pytest.mark.slow
def test_a_build_through_a_ray_client_address_makes_the_bytes_of_an_inline_build(tmp_path):
    """`--ray-address ray://HOST:PORT` (Ray Client, how a laptop reaches a remote cluster): a head started
    with `ray start --head`, as a user starts one, and projects/flow.toml built through it."""
    import re
    import shutil
    import subprocess
    import sys
    import tempfile

    from runner import lockfile
    from tests.conftest import ROOT
    from tests.folders import folder_bytes

    pytest.importorskip("ray")
    home = os.environ.get("DBL_TEST_HOME") or str(tmp_path / "dbl-home")
    # No token: the head is this test's, on 127.0.0.1 (Ray's token, where one is asked for, is the user's).
    env = {**os.environ, "DBL_HOME": home, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    gcs, client = free_port(), free_port()
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's socket paths must stay under 108 bytes
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--num-cpus", "2"]
        + ["--node-ip-address", "127.0.0.1", "--port", str(gcs), "--ray-client-server-port", str(client)]
        + ["--include-dashboard", "false", "--temp-dir", str(temp)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "ray-start.txt").open("w"),
        start_new_session=True,
    )
    built = {}
    try:
        answers(client, head, tmp_path / "ray-start.txt")
        for how, flags in {
            "inline": [],
            "client": ["--executor", "ray", "--ray-address", f"ray://127.0.0.1:{client}", "-j", "2"],
        }.items():
            folder = tmp_path / how
            shutil.copytree(ROOT / "projects", folder)
            done = subprocess.run(
                [sys.executable, "-m", "runner", "build", str(folder / "flow.toml"), "--no-progress", *flags],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            assert "flow: built in" in done.stdout and "6 ran" in done.stdout, done.stdout[-2000:]
            records = lockfile.read(folder / "flow.lock")
            for record in records.values():
                del record["built"], record["duration_s"]
            built[how] = (folder_bytes(folder / "build" / "flow"), records)
            if how == "client":  # each step said the node it ran on: in a worker of the head's node
                assert len(re.findall(r" done in \S+ on \S+ cpu -> ", done.stdout)) == 6, done.stdout[-2000:]
    finally:
        end_head(head, temp)
        shutil.rmtree(temp, ignore_errors=True)
    assert len(built["inline"][0]) == 33 and len(built["inline"][1]) == 6
    assert built["client"] == built["inline"]
