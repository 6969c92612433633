"""`[train] compile`: when the denoiser is compiled, and that compiling changes no result beyond rounding."""

from __future__ import annotations

import json

import pytest

from runner.training.compiling import compiling, describe
from tests.folders import folder_bytes

AUTO_OFF = "auto: off, compiling takes minutes that a run of a few thousand steps does not earn back"


@pytest.mark.parametrize(
    "setting, device, buckets, expected",
    [
        ("auto", "cuda", False, (False, AUTO_OFF)),
        ("auto", "cuda:1", False, (False, AUTO_OFF)),
        ("auto", "cuda", True, (False, "auto: off with buckets, whose shapes would each compile anew")),
        ("auto", "cpu", False, (False, "auto: off on cpu, where compiling takes longer than it saves")),
        ("auto", "mps", False, (False, "auto: off on mps, where compiling takes longer than it saves")),
        (True, "cpu", True, (True, "set in [train]")),
        (False, "cuda", False, (False, "set in [train]")),
    ],
)
def test_auto_leaves_compiling_off_and_a_setting_wins(setting, device, buckets, expected):
    assert compiling(setting, device, buckets=buckets) == expected


def test_auto_leaves_compiling_to_cuda_graphs_where_they_replay():
    assert compiling("auto", "cuda", graphs=True) == (False, "auto: off, the denoiser replays CUDA graphs")
    assert compiling(True, "cuda", graphs=True) == (True, "set in [train]")


def test_a_bad_setting_is_refused_and_the_log_line_says_the_choice():
    with pytest.raises(ValueError, match="compile must be true, false or 'auto'"):
        compiling("yes", "cuda")
    assert describe(False, AUTO_OFF) == f"compile: off ({AUTO_OFF})"
    assert describe(True, "set in [train]") == "compile: on (set in [train])"
    assert describe(False, "set in [train]") == "compile: off (set in [train])"


@pytest.mark.torch
def test_uncompiling_a_module_leaves_it_as_it_was(tmp_path, monkeypatch):
    import torch

    from runner.training.compiling import compile_module, is_compiled, uncompile_module

    monkeypatch.setenv("DBL_HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    module = torch.nn.Linear(3, 2)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    compile_module(module)  # lazy: nothing compiles until the module is called
    assert is_compiled(module)
    assert torch.os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torch-compile")
    uncompile_module(module)
    assert not is_compiled(module)
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())


@pytest.mark.torch
@pytest.mark.slow
def test_a_compiled_denoiser_trains_the_same_adapter_to_rounding(tmp_path, images_for_compile, monkeypatch):
    """Three steps on tiny-sd with the UNet compiled (minutes on a CPU: inductor compiles the forward and
    the backward) and not: the same losses to 1e-4 and the same adapter to rounding, the log says which,
    and the shared pipeline's UNet runs eagerly again afterwards. A compiled run stopped after its
    checkpoint resumes, compiled again, to the bytes of the uninterrupted compiled run."""
    import torch

    from runner.adapters import lora_delta
    from runner.steps import StepInterrupted, train
    from runner.training.compiling import is_compiled
    from tests.steps_fixtures import make_subject, model_cache, train_context

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    instance = images_for_compile
    runs = {}
    for setting, line in ((False, "compile: off (set in [train])"), (True, "compile: on (set in [train])")):
        logs = []
        subject = make_subject(
            instance, train=dict(steps=3, train_text_encoder=False, compile=setting, checkpoint_every=2)
        )
        ctx = train_context(tmp_path, subject, work=tmp_path / f"work-{setting}", log=logs.append)
        train.run(ctx)
        assert line in logs
        runs[setting] = ctx.out
    assert not is_compiled(model_cache().pipeline().unet)
    # Stopped after step 2's checkpoint, then resumed (from inductor's cache: seconds, not minutes).
    stops = []
    stopped = train_context(
        tmp_path, subject, work=tmp_path / "resumed", should_stop=lambda: stops.append(1) or len(stops) == 2
    )
    with pytest.raises(StepInterrupted, match="after step 2"):
        train.run(stopped)
    logs = []
    resumed = train_context(tmp_path, subject, work=tmp_path / "resumed", log=logs.append)
    train.run(resumed)
    assert "resuming from checkpoint-2" in logs and "compile: on (set in [train])" in logs
    assert folder_bytes(resumed.out) == folder_bytes(runs[True])
    eager, compiled = (
        json.loads((runs[s] / "dbl.json").read_text())["log"]["instance_loss"] for s in (False, True)
    )
    assert len(eager) == len(compiled) == 3
    for a, b in zip(eager, compiled, strict=True):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6)
    a, b = lora_delta(runs[False], "unet"), lora_delta(runs[True], "unet")
    for key in a:
        # Adam divides each gradient by its own running size, so rounding in a gradient entry near zero can
        # move that entry by up to the learning rate; the delta as a whole must agree.
        assert (a[key] - b[key]).norm() <= 1e-2 * a[key].norm() + 1e-7
        assert torch.isfinite(b[key]).all()


@pytest.fixture
def images_for_compile(tmp_path):
    from tests.steps_fixtures import draw_images

    return draw_images(tmp_path / "dog", 3, size=(64, 64))


@pytest.mark.torch
def test_a_compiler_that_fails_leaves_the_run_eager_with_a_warning_and_the_same_adapter(
    tmp_path, images_for_compile, monkeypatch
):
    """A backend that raises (as a missing C compiler or an unknown operator would): the run says so and
    trains the same adapter as with compile = false."""
    from runner.steps import train
    from runner.training import compiling as compiling_module

    calls = []

    def broken_backend(graph, example_inputs):
        calls.append(len(example_inputs))
        raise RuntimeError("no C compiler here")

    monkeypatch.setattr(compiling_module, "compile_module", lambda m: m.compile(backend=broken_backend))
    from tests.steps_fixtures import make_subject, train_context

    outputs, logs = {}, {}
    for setting in (True, False):
        logs[setting] = []
        subject = make_subject(
            images_for_compile, train=dict(steps=2, train_text_encoder=False, compile=setting)
        )
        ctx = train_context(tmp_path, subject, work=tmp_path / f"work-{setting}", log=logs[setting].append)
        train.run(ctx)
        outputs[setting] = {p.name: p.read_bytes() for p in sorted(ctx.out.rglob("*")) if p.is_file()}
    assert calls, "the broken backend was never called"
    warnings = [line for line in logs[True] if line.startswith("warning: compiling the denoiser failed")]
    assert len(warnings) == 1 and "no C compiler here" in warnings[0]
    assert outputs[True] == outputs[False]
