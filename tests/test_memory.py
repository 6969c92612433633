"""gradient_checkpointing = "auto": the choice from the device's free memory and the step's estimate."""

from __future__ import annotations

import pytest

from runner.training.memory import HEADROOM, checkpointing, describe, step_bytes

GB = 10**9


def test_auto_is_off_when_the_step_fits_the_free_memory():
    on, why = checkpointing("auto", "cuda", free=80 * GB, needed=6 * GB)
    assert not on
    assert why == "auto: the step needs about 6.0 GB, 80.0 GB free"


def test_auto_is_on_when_the_step_would_not_fit():
    on, why = checkpointing("auto", "cuda:1", free=10 * GB, needed=30 * GB)
    assert on
    assert "30.0 GB" in why and "10.0 GB free" in why


def test_auto_keeps_headroom_for_the_allocator():
    free = 10 * GB
    assert not checkpointing("auto", "cuda", free=free, needed=int(HEADROOM * free))[0]
    assert checkpointing("auto", "cuda", free=free, needed=int(HEADROOM * free) + GB)[0]


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_auto_is_off_off_cuda(device):
    # Memory numbers do not matter there: host memory is not what limits a step.
    assert checkpointing("auto", device, free=1, needed=10 * GB) == (False, f"auto: off on {device}")


@pytest.mark.parametrize("setting", [True, False])
def test_true_and_false_are_obeyed(setting):
    assert checkpointing(setting, "cuda", free=1, needed=10 * GB) == (setting, "set in [train]")


def test_other_values_are_refused():
    with pytest.raises(ValueError, match="true, false or 'auto'"):
        checkpointing("yes", "cuda")


def test_the_log_line_says_the_choice_and_why():
    assert describe(False, "auto: off on cpu") == "gradient checkpointing: off (auto: off on cpu)"
    assert describe(True, "set in [train]") == "gradient checkpointing: on (set in [train])"


def test_the_estimate_grows_with_examples_pixels_and_precision():
    sd15 = dict(denoiser_parameters=860_000_000, trainable=3_000_000)
    one = step_bytes(latent_pixels=64 * 64, examples=1, value_bytes=2, **sd15)
    # SD 1.5 at 512 px in fp16, one example: about 2.1 GB of activations (the calibration point).
    assert 2.0 * GB < one < 2.3 * GB
    assert step_bytes(latent_pixels=64 * 64, examples=2, value_bytes=2, **sd15) > 1.9 * one
    assert step_bytes(latent_pixels=128 * 128, examples=1, value_bytes=2, **sd15) > 3.9 * one
    assert step_bytes(latent_pixels=64 * 64, examples=1, value_bytes=4, **sd15) > 1.9 * one
