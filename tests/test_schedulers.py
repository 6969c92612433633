"""Sampler names: every schema name makes its scheduler from the base config, and has an A1111 name."""

from __future__ import annotations

import subprocess
import sys

import pytest

from runner import schedulers
from runner.project.schema import SCHEDULERS


def test_every_schema_name_is_known_and_import_is_cheap():
    assert set(SCHEDULERS) == set(schedulers.SAMPLERS)
    code = (
        "import sys, runner.schedulers; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a1111_names():
    assert schedulers.sampler_name("euler_a") == "Euler a"
    assert schedulers.sampler_name("dpm++_karras") == "DPM++ 2M Karras"
    assert schedulers.sampler_name("pndm") == "PLMS"


@pytest.mark.torch
def test_schedulers_keep_the_base_config():
    from diffusers import DDIMScheduler

    base = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"
    )
    for name in SCHEDULERS:
        try:
            scheduler = schedulers.make_scheduler(name, base.config)
        except ValueError as exc:  # lms needs scipy, which is optional
            assert name == "lms" and "scipy" in str(exc)
            continue
        assert scheduler.config.prediction_type == "v_prediction", name
        assert scheduler.config.beta_schedule == "scaled_linear", name
        assert schedulers.sampler_name(None, scheduler) == schedulers.sampler_name(name), name
    assert type(schedulers.make_scheduler(None, base)) is DDIMScheduler
    assert schedulers.make_scheduler("dpm++_karras", base.config).config.use_karras_sigmas
    with pytest.raises(ValueError, match="unknown scheduler"):
        schedulers.make_scheduler("k_lms", base.config)
