"""A build's option errors in the words of whoever gave the options: BuildOptions' fields (`jobs=`,
`only`, `gpus`, `ray_address`) to a script, the command line's options (`-j`, `--only`, `--gpus`,
`--ray-address`) to `dbl build`."""

from __future__ import annotations

import socket

import pytest

from runner import executor
from runner.cli import main
from runner.errors import UsageError
from tests.conftest import Recorder


def refused(proj, **options) -> str:
    with pytest.raises(UsageError) as raised:
        executor.build(proj.load(), executor.BuildOptions(**options), Recorder())
    return str(raised.value)


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"jobs": 0}, "jobs=0: give the number of steps to run at once, at least 1"),
        ({"jobs": "2"}, "jobs='2': give the number of steps to run at once, at least 1"),
        ({"per_gpu": 0}, "per_gpu=0: give the number of steps that may share one GPU, at least 1"),
        ({"num_processes": 0}, "num_processes=0: give the processes a train step runs with, at least 1"),
    ],
)
def test_counts_a_script_gives_are_refused_in_its_words(proj, fake_steps, options, said):
    """`BuildOptions(jobs=0)` was told "-j and --per-gpu must be at least 1", options it never gave."""
    message = refused(proj, **options)
    assert message.startswith(said) and "--" not in message and "-j" not in message, message
    assert not proj.lock.exists()  # refused before anything was written


@pytest.mark.parametrize(("args", "said"), [(["-j", "0"], "-j must"), (["--per-gpu", "0"], "--per-gpu must")])
def test_the_command_line_says_its_own_options(proj, fake_steps, capsys, args, said):
    assert main(["build", str(proj.path), *args, "--no-progress"]) == 2
    assert capsys.readouterr().err == f"dbl: {said} be at least 1\n"


def test_a_step_forced_outside_what_only_selects_is_refused_in_the_words_of_each(proj, fake_steps, capsys):
    """`--only render:park --force train:toy` skipped train:toy without a word (said with -v alone)."""
    message = refused(proj, only=("render:park",), force=("train:toy", "train:dog"))
    assert message == (
        "force: train:toy is not among the steps only selects (render:park and the steps it needs), so it "
        "would not run; add train:toy to only, or leave only out"
    ), message
    assert not proj.lock.exists()  # refused before anything was written
    argv = ["build", str(proj.path), "--no-progress", "--only", "render:park", "render:base"]
    assert main([*argv, "--force", "train:toy", "blend:mix"]) == 2
    assert capsys.readouterr().err == (
        "dbl: --force: train:toy, blend:mix are not among the steps --only selects (render:park, render:base "
        "and the steps they need), so they would not run; add train:toy, blend:mix to --only, or leave --only "
        "out\n"
    )
    assert main([*argv, "--force", "train:dog", "--dry-run"]) == 0  # needed by render:park: it runs
    assert "train:dog" in capsys.readouterr().out


def test_the_steps_only_leaves_out_are_said_skipped_in_the_words_of_each(proj, fake_steps, capsys):
    result = executor.build(proj.load(), executor.BuildOptions(only=("train:toy",)), Recorder())
    skipped = {s.id: s.reasons for s in result.steps if s.status == "skipped"}
    assert skipped and all(reasons == ["not selected by only"] for reasons in skipped.values()), skipped
    proj.edit("sks dog on a beach", "sks dog in the snow")
    argv = ["build", str(proj.path), "--no-progress", "-v", "--only", "render:base"]
    assert main(argv) == 0
    assert "(not selected by --only)" in capsys.readouterr().out


def test_step_ids_a_script_gives_are_refused_in_its_words(proj, fake_steps, capsys):
    message = refused(proj, only=("train:dgo",), force=("pets.toml",))
    assert message.startswith("force: no step 'pets.toml' (a project file, not a step id); only: no step "), (
        message
    )
    assert "'train:dgo' (did you mean train:dog?)" in message and "--" not in message, message
    assert main(["build", str(proj.path), "--only", "train:dgo", "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("dbl: --only: no step 'train:dgo' (did you mean train:dog?)")


@pytest.mark.ray
def test_ray_options_a_script_gives_are_refused_in_its_words(proj, monkeypatch, capsys):
    """`BuildOptions(backend="ray", ray_address=..., gpus=...)` was told to leave out --gpus, and to leave
    --ray-address out."""
    from runner.exec import ray_connect
    from tests.ray_fixtures import no_ray_init

    pytest.importorskip("ray")
    message = refused(proj, backend="ray", ray_address="auto", gpus=("0",))
    assert "gpus picks GPUs of this machine" in message and "leave gpus out with ray_address" in message
    assert "--" not in message.replace("--num-gpus", ""), message
    monkeypatch.setattr(ray_connect, "import_ray", no_ray_init)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    message = refused(proj, backend="ray", ray_address=address)
    assert "cannot reach a Ray cluster" in message and "leave ray_address out" in message, message
    assert "--ray-address" not in message, message
    monkeypatch.setenv("RAY_ADDRESS", address)
    message = refused(proj, backend="ray")
    assert 'give ray_address="local" or unset RAY_ADDRESS' in message, message
    assert main(["build", str(proj.path), "--executor", "ray", "--no-progress"]) == 2
    assert "give --ray-address local or unset RAY_ADDRESS" in capsys.readouterr().err


def test_a_missing_ray_is_said_in_the_script_s_words(proj, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    assert refused(proj, backend="ray").startswith("""backend="ray" needs Ray, which is not installed""")
    assert main(["build", str(proj.path), "--executor", "ray", "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("dbl: --executor ray needs Ray, which is not installed")


def test_a_missing_ray_or_unknown_executor_is_refused_with_nothing_to_build(proj, build, monkeypatch, capsys):
    """Up to date, a build asked for no backend, and a watch started with a missing Ray or a mistyped
    executor, saying so only at its first rebuild: both refuse at once, as they do with steps to run."""
    import importlib.util

    assert build(proj)[0].ok
    assert main(["build", str(proj.path), "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["build", str(proj.path), "--executor", "inlin", "--no-progress"]) == 2
    assert "dbl: no executor backend 'inlin'; backends: inline, process, ray" in capsys.readouterr().err
    assert main(["watch", str(proj.path), "--executor", "inlin"]) == 2
    assert "dbl: no executor backend 'inlin'" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    assert main(["build", str(proj.path), "--executor", "ray", "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("dbl: --executor ray needs Ray, which is not installed")
    assert main(["watch", str(proj.path), "--executor", "ray"]) == 2
    assert capsys.readouterr().err.startswith("dbl: --executor ray needs Ray, which is not installed")


@pytest.mark.parametrize(("options", "given"), [({"jobs": 2}, "jobs=2"), ({"gpus": ("0",)}, "gpus=('0',)")])
def test_the_inline_backend_named_with_workers_is_refused_as_the_command_line_refuses_it(
    proj, fake_steps, capsys, options, given
):
    """`BuildOptions(backend="inline", jobs=2)` ran the steps two at a time in worker processes, the
    `process` backend, where `dbl build --executor inline -j 2` is a usage error."""
    message = refused(proj, backend="inline", **options)
    assert message.startswith(
        f'backend="inline" runs the steps in this process, one at a time, and {given} '
    ), message
    assert 'give backend="process", or leave backend out' in message and "--" not in message, message
    assert not proj.lock.exists()  # refused before anything was written
    assert main(["build", str(proj.path), "--executor", "inline", "-j", "2", "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("dbl: --executor inline runs the steps in this process")


@pytest.mark.parametrize(
    ("options", "backend"),
    [({}, "inline"), ({"jobs": 2}, "process"), ({"gpus": ("0",)}, "process"), ({"backend": "ray"}, "ray")],
)
def test_a_build_without_a_backend_runs_inline_unless_it_needs_workers(options, backend):
    from runner.exec.scheduler import backend_name

    assert backend_name(executor.BuildOptions(**options)) == backend
