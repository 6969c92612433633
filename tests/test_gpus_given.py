"""`--gpus` against the machine and the project: a GPU that is not there, or a project that uses none,
is a usage error before anything runs, never steps run on the CPU and shown `on cuda:0`."""

from __future__ import annotations

import os

import pytest

from runner import executor
from runner.cli import main
from runner.errors import UsageError
from runner.exec import devices
from runner.exec.devices import gpus_for_device, gpus_missing, gpus_problem
from runner.exec.job import run_job
from runner.exec.scheduler import backend_name
from runner.project import load_project
from tests.conftest import FakeSteps, Recorder


@pytest.fixture
def machine(monkeypatch):
    """Sets the /dev/nvidiaN nodes this machine shows (None: it cannot tell) and no CUDA_VISIBLE_DEVICES."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def shows(nodes):
        monkeypatch.setattr(devices, "_device_nodes", lambda: nodes)

    return shows


@pytest.fixture
def project(tmp_path):
    def make(device: str = "auto"):
        path = tmp_path / "p.toml"
        path.write_text(f'[project]\nbase_model = "tiny-sd"\ndevice = "{device}"\n')
        return path

    return make


@pytest.mark.parametrize(
    "args",
    [["-j", "2"], ["-j", "2", "--executor", "process"], ["--executor", "ray"], ["--executor", "process"], []],
)
def test_gpus_on_a_machine_without_gpus_is_a_usage_error(machine, project, capsys, args):
    machine([])
    path = project()
    assert main(["build", str(path), *args, "--gpus", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--gpus 0: this machine has no CUDA GPU 0 (it shows none); leave --gpus out" in err
    assert "Traceback" not in err and not (path.parent / "p.lock").exists()


def test_gpus_hidden_by_an_empty_cuda_visible_devices_is_a_usage_error(machine, project, capsys, monkeypatch):
    machine(["nvidia0"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert main(["build", str(project()), "-j", "2", "--gpus", "0", "--no-progress"]) == 2
    assert "CUDA_VISIBLE_DEVICES='' hides every GPU from this build" in capsys.readouterr().err


def test_gpus_are_checked_against_what_the_machine_shows(machine, monkeypatch):
    machine(["nvidia0", "nvidia1"])
    assert gpus_missing(["1", "0"]) is None
    assert "no CUDA GPU 2 (it has 2: 0, 1)" in gpus_missing(["0", "2"])
    assert gpus_missing(["GPU-8932f937-d72c"]) is None  # a UUID: the machine's own business
    machine(None)  # WSL: no device nodes to count
    assert gpus_missing(["5"]) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert gpus_missing(["3"]) is None
    assert "GPU 0 is not among those CUDA_VISIBLE_DEVICES=2,3 shows this build (2, 3)" in gpus_missing(["0"])


def test_a_gpu_named_twice_is_a_usage_error(machine, project, capsys):
    """A local Ray instance offered `--gpus 0,0` as two GPUs: two steps at once on one."""
    machine(["nvidia0"])
    assert gpus_problem(["0", "1", "0"]).startswith("--gpus: 0 named twice")
    assert main(["build", str(project()), "--executor", "ray", "--gpus", "0,0", "--no-progress"]) == 2
    assert "--gpus: 0 named twice" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_gpus_with_a_project_that_uses_none_is_a_usage_error(machine, project, capsys, device):
    machine(["nvidia0", "nvidia1"])
    path = project(device)
    assert main(["build", str(path), "-j", "2", "--gpus", "0,1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f'p.toml: --gpus 0,1: device = "{device}" in [project] uses no CUDA GPU; leave --gpus out' in err
    with pytest.raises(UsageError) as refused:
        executor.build(load_project(path), executor.BuildOptions(gpus=("0",)), None)
    assert str(refused.value) == (  # the Python API's words
        f"p.toml: gpus=('0',): device = \"{device}\" in [project] uses no CUDA GPU; leave gpus out, or set "
        'device = "auto" or "cuda" to run on the GPUs'
    )
    assert gpus_for_device(None, device) is None and gpus_for_device(("0",), "auto") is None


class Recording:
    """Runs FakeSteps in this process and keeps the GPUs each step was given."""

    name = "recording"

    def __init__(self):
        self.fake, self.devices = FakeSteps(), {}

    def run(self, job, hooks):
        self.devices[job.step_id] = job.devices
        return run_job(job, hooks, models=None, run=self.fake(job.kind))

    def close(self):
        pass


def test_gpus_without_j_are_the_gpus_the_steps_run_on(proj):
    """`dbl build --gpus 1` ran every step in the build's process, on whichever GPU CUDA picked first."""
    backend = Recording()
    options = executor.BuildOptions(backend_factory=lambda p: backend, gpus=("1",))
    assert executor.build(proj.load(), options, Recorder()).ok
    assert backend.devices and set(backend.devices.values()) == {("1",)}
    assert backend_name(executor.BuildOptions(gpus=("1",))) == "process"  # a worker that sees GPU 1
    assert backend_name(executor.BuildOptions()) == "inline"


@pytest.mark.parametrize("given, said", [(["-j", "2"], "-j 2"), (["--gpus", "0"], "--gpus 0")])
def test_inline_named_with_j_or_gpus_is_a_usage_error(machine, project, capsys, given, said):
    """`--executor inline -j 2` ran its steps in worker processes, though inline had been asked for by name."""
    machine(["nvidia0"])
    path = project()
    assert main(["build", str(path), "--executor", "inline", *given, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--executor inline runs the steps in this process, one at a time, and {said} needs worker" in err
    assert "give --executor process, or leave out --executor" in err and "Traceback" not in err
    assert not (path.parent / "p.lock").exists()
    assert main(["build", str(path), *given, "--dry-run", "--no-progress"]) == 0  # inline by default: process
    assert main(["build", str(path), "--executor", "inline", "-j", "1", "--dry-run", "--no-progress"]) == 0


def test_the_default_gpus_are_cuda_indices_not_device_node_numbers(monkeypatch):
    """A container given the host's GPUs 2 and 3 has /dev/nvidia2 and /dev/nvidia3, which CUDA calls 0 and
    1: `-j 2` gave its workers CUDA_VISIBLE_DEVICES=2 and 3, which show no GPU there."""
    from runner.exec.devices import parse_gpus

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    listdir, dev = os.listdir, ["nvidia3", "nvidiactl", "nvidia2", "nvidia-uvm", "null"]
    monkeypatch.setattr(os, "listdir", lambda path=".": dev if path == "/dev" else listdir(path))
    assert parse_gpus(None) == ["0", "1"]
    assert gpus_missing(parse_gpus(None)) is None and "it has 2: 0, 1" in gpus_missing(["2"])
    dev.append("dxg")  # WSL: GPUs without device nodes, none to count
    assert parse_gpus(None) == [] and gpus_missing(["2"]) is None


@pytest.mark.parametrize("given", ["", ",", " , "])
def test_gpus_naming_no_gpu_is_a_usage_error(machine, project, capsys, given):
    """`-j 2 --gpus ,` gave the steps no GPU: their workers saw every GPU, used the first, and were
    shown `on cpu`."""
    machine(["nvidia0"])
    assert main(["build", str(project()), "-j", "2", "--gpus", given, "--no-progress"]) == 2
    assert "--gpus names no GPU; leave it out" in capsys.readouterr().err


class _Conn:
    """The worker's end of its pipe: what it sends."""

    def __init__(self):
        self.sent = []

    def send(self, message) -> None:
        self.sent.append(message)


@pytest.mark.parametrize(
    ("gpus", "device", "said"),
    [
        (("0",), "cpu", [("where", "cpu")]),  # given a GPU torch cannot see: it ran on the CPU
        ((), "cuda", [("where", "cuda")]),  # given none (none found), torch chose CUDA all the same
        (("1", "3"), "cuda", []),  # where it was told: shown `on cuda:1,3` as the build gave them
        ((), "cpu", []),
    ],
)
def test_a_worker_says_the_device_its_step_loads_the_model_on_where_it_is_not_the_one_given(
    proj, monkeypatch, gpus, device, said
):
    # The step was shown (and recorded) `on cuda:0` from the GPUs given, whatever torch chose.
    from types import SimpleNamespace

    from runner import models
    from runner.exec import backends

    monkeypatch.setattr(backends.LazyModels, "_shared", {})
    monkeypatch.setattr(
        models, "ModelCache", lambda base, dev, mp: SimpleNamespace(device=device, pipeline=lambda: "pipe")
    )
    conn = _Conn()
    lazy = backends.LazyModels(proj.load(), backends._said_where(conn, gpus))
    assert lazy.pipeline() == lazy.pipeline() == "pipe"
    assert conn.sent == said  # once a step


def test_the_process_backend_passes_where_its_worker_says_its_step_runs(proj):
    import multiprocessing
    from types import SimpleNamespace

    from runner.exec import backends
    from runner.exec.job import Hooks

    ours, theirs = multiprocessing.Pipe()
    theirs.send(("where", "cpu"))
    theirs.send(("done", "the outcome"))
    worker = SimpleNamespace(conn=ours, process=SimpleNamespace(is_alive=lambda: True))
    places = []
    job = SimpleNamespace(step_id="train:dog", stop_file=None)
    assert backends._receive(worker, job, Hooks(where=places.append)) == ("done", "the outcome")
    assert places == ["cpu"]


@pytest.mark.parametrize(
    ("gpus", "said"),
    [
        (("0",), "gpus=('0',): this machine has no CUDA GPU 0 (it shows none); leave gpus out"),
        (("0", "0"), "gpus: 0 named twice; name each GPU once (per_gpu=K lets K steps share one)"),
        ((), "gpus=() names no GPU; leave it out"),
        (
            ("x",),
            """gpus: 'x' is not a GPU; give indices or UUIDs (nvidia-smi -L), e.g. gpus=("0", "1", "3")""",
        ),
        ((0,), 'give each GPU as a string, e.g. gpus=("0", "1")'),
        ("0,1", 'give each GPU as a string, e.g. gpus=("0", "1")'),
    ],
)
def test_the_python_api_refuses_the_gpus_the_command_line_refuses(machine, project, gpus, said):
    """`executor.build(..., BuildOptions(gpus=...))` took what `dbl build --gpus` refuses, and ran the
    steps on the CPU (a dry run said they would run)."""
    machine([])
    path = project()
    options = executor.BuildOptions(gpus=gpus, jobs=2, dry_run=True)
    with pytest.raises(UsageError) as refused:
        executor.build(load_project(path), options, Recorder())
    assert said in str(refused.value) and "--" not in str(refused.value)  # the API's words, not --gpus
    assert not (path.parent / "p.lock").exists() and not (path.parent / ".dbl").exists()


def test_the_python_api_checks_the_gpus_against_the_machine_only_for_its_own_backends(machine, proj):
    """A backend made by the caller (or a Ray cluster) has GPUs of its own: only their form is checked."""
    machine([])
    backend = Recording()
    options = executor.BuildOptions(backend_factory=lambda p: backend, gpus=("1",))
    assert executor.build(proj.load(), options, Recorder()).ok
    with pytest.raises(UsageError, match="named twice"):
        executor.build(
            proj.load(), executor.BuildOptions(backend_factory=lambda p: backend, gpus=("1", "1")), None
        )
    assert devices.gpus_refused(("3",), "ray", "auto") is None
    assert "no CUDA GPU 3" in devices.gpus_refused(("3",), "ray", "local")
