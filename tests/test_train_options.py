"""The train step on tiny-sd with the optional keys: Prodigy, min-SNR weighting, offset noise and DoRA
train, and an interrupted run resumes to the same bytes as an uninterrupted one."""

from __future__ import annotations

import io
import sys

import pytest

from runner.steps import StepError, StepInterrupted
from tests import steps_fixtures
from tests.folders import folder_bytes
from tests.steps_fixtures import DORA_KOHYA_NOTE, make_prior, make_subject, run_train, stop_at, train_context

pytestmark = pytest.mark.torch


images = steps_fixtures.train_images  # the fixture, as `images`


PRODIGY = dict(optimizer="prodigy", learning_rate=1.0, prodigy_d_coef=2.0, prodigy_use_bias_correction=True)


def test_prodigy_with_min_snr_offset_noise_and_dora_resumes_to_the_same_bytes(tmp_path, images, capsys):
    import torch

    from runner.adapters import read_adapter_weights

    instance, classes = images
    prior = make_prior(num_images=4)
    subject = make_subject(
        instance,
        prior="dog",
        train=dict(
            steps=5,
            batch_size=2,
            center_crop=False,
            checkpoint_every=2,
            snr_gamma=5.0,
            noise_offset=0.1,
            **PRODIGY,
        ),
        lora=dict(use_dora=True, text_encoder_use_dora=True),
    )
    whole = train_context(tmp_path, subject, prior=prior, class_dir=classes, work=tmp_path / "w1")
    with pytest.warns(UserWarning, match=DORA_KOHYA_NOTE):
        metrics = run_train(whole)
    assert capsys.readouterr().out == ""  # Prodigy's own print is kept off the build's display
    # It trained: the B matrices left their zero start.
    state = read_adapter_weights(whole.out, "unet")
    assert max(float(v.abs().max()) for k, v in state.items() if ".lora_B." in k) > 0
    assert metrics["steps"] == 5

    first = train_context(
        tmp_path, subject, prior=prior, class_dir=classes, work=tmp_path / "w2", should_stop=stop_at(3)
    )
    with pytest.raises(StepInterrupted, match="after step 3"):
        run_train(first)
    saved = torch.load(tmp_path / "w2" / "checkpoint-3" / "training_state.pt", weights_only=True)
    group = saved["optimizer"]["param_groups"][0]
    # Prodigy's step-size estimate and its statistics are in the checkpoint.
    assert group["k"] == 3 and {"d", "d0", "d_max", "d_numerator"} <= set(group)
    assert all({"s", "p0", "exp_avg", "exp_avg_sq"} <= set(s) for s in saved["optimizer"]["state"].values())
    logs = []
    again = train_context(
        tmp_path, subject, prior=prior, class_dir=classes, work=tmp_path / "w2", log=logs.append
    )
    with pytest.warns(UserWarning, match=DORA_KOHYA_NOTE):
        assert run_train(again)["resumed_from"] == 3
    assert "resuming from checkpoint-3" in logs
    assert folder_bytes(again.out) == folder_bytes(whole.out)


def test_min_snr_and_offset_noise_change_what_is_learned(tmp_path, images):
    from runner.adapters import read_adapter_weights

    instance, _ = images
    outs = {}
    for label, train in (
        ("plain", {}),
        ("snr", dict(snr_gamma=1.0)),
        ("offset", dict(noise_offset=0.5)),
        ("explicit defaults", dict(noise_offset=0.0, optimizer="adamw")),
    ):
        # Two examples a step: min-SNR weights them against each other (Adam undoes a common factor).
        train = dict(steps=2, batch_size=2, train_text_encoder=False, **train)
        subject = make_subject(instance, train=train)
        ctx = train_context(tmp_path / label, subject)
        run_train(ctx)
        outs[label] = read_adapter_weights(ctx.out, "unet")
    for label in ("snr", "offset"):
        assert any(not v.equal(outs["plain"][k]) for k, v in outs[label].items()), label
    assert all(v.equal(outs["plain"][k]) for k, v in outs["explicit defaults"].items())


def test_prodigy_without_prodigyopt_says_how_to_install_it(tmp_path, images, monkeypatch):
    instance, _ = images
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import prodigyopt raises ImportError
    ctx = train_context(tmp_path, make_subject(instance, train=dict(train_text_encoder=False, **PRODIGY)))
    with pytest.raises(
        StepError,
        match=r"train.optimizer: \"prodigy\" needs the prodigyopt package - pip install 'dbl\[prodigy\]'",
    ):
        run_train(ctx)


def test_adamw8bit_without_cuda_is_a_clear_error(tmp_path, images):
    instance, _ = images
    ctx = train_context(tmp_path, make_subject(instance, train=dict(optimizer="adamw8bit")))
    with pytest.raises(StepError, match='train.optimizer: "adamw8bit" needs a CUDA device'):
        run_train(ctx)


def test_prodigy_is_quiet_while_it_is_made(capsys):
    import torch

    from runner.project.schema import TrainSettings
    from runner.training.optimizers import OPTIMIZERS

    param = torch.nn.Parameter(torch.ones(2))
    ts = TrainSettings(optimizer="prodigy", learning_rate=1.0)
    stdout = sys.stdout
    sys.stdout = io.StringIO()
    try:
        optimizer = OPTIMIZERS["prodigy"]([{"params": [param], "lr": 1.0}], ts, "cpu")
    finally:
        printed, sys.stdout = sys.stdout.getvalue(), stdout
    assert printed == "" and type(optimizer).__name__ == "Prodigy"
    assert optimizer.param_groups[0]["weight_decay"] == ts.adam_weight_decay


@pytest.mark.parametrize(
    "lora, expected",
    [
        (
            dict(target_modules=["nonexistent_mod"]),
            "lora.target_modules: 'nonexistent_mod' names no module of the unet",
        ),
        (
            dict(text_encoder_target_modules=["to_q", "query"]),
            "lora.text_encoder_target_modules: 'query', 'to_q' names no module of the text_encoder",
        ),
    ],
)
def test_a_target_module_that_matches_nothing_says_which_and_what_there_is(tmp_path, images, lora, expected):
    instance, _ = images
    ctx = train_context(
        tmp_path, make_subject(instance, train=dict(steps=1, train_text_encoder=True), lora=lora)
    )
    with pytest.raises(StepError, match=expected) as raised:
        run_train(ctx)
    # What there is to name instead: the layers of that component.
    assert ("q_proj" if "text_encoder" in expected else "to_q") in str(raised.value)
    pipe = ctx.models.pipeline(ctx.models.dtype)  # the build's shared pipeline: left without LoRA layers
    assert not any("lora" in name for name, _ in pipe.unet.named_modules())
    assert not any("lora" in name for name, _ in pipe.text_encoder.named_modules())


def test_a_target_module_problem_names_the_table_that_sets_it(tmp_path, images):
    """A subject's own [subjects.dog.lora] target_modules that matched nothing was said as
    'lora.target_modules', a key the file may not have: the key is the subject's where its value is not
    the project-wide [lora]'s."""
    from dataclasses import replace

    instance, _ = images
    subject = make_subject(instance, train=dict(steps=1), lora=dict(target_modules=["nonexistent_mod"]))
    for project_lora, key in (
        (None, "subjects.dog.lora.target_modules"),
        (subject.lora, "lora.target_modules"),
    ):
        ctx = train_context(tmp_path / key, subject)
        if project_lora is not None:  # the value written in [lora], which the subject inherits
            ctx = replace(ctx, project=replace(ctx.project, lora=project_lora))
        with pytest.raises(StepError) as raised:
            run_train(ctx)
        said = str(raised.value)  # with the project file, as the plan says its problems
        assert f"project.toml: {key}: 'nonexistent_mod' names no module of the unet (its layers" in said, said
