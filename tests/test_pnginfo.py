"""The A1111 parameters text: floats written short where that is exact, and exactly where it is not."""

from __future__ import annotations

import pytest

from runner.pnginfo import number, parameters_text


@pytest.mark.parametrize(
    "value, text",
    [
        (7.5, "7.5"),
        (7.0, "7"),
        (1e-05, "1e-05"),
        (0.8, "0.8"),
        (0.123456789, "0.123456789"),
        (7.1234567, "7.1234567"),
    ],
)
def test_a_float_is_written_short_and_exact(value, text):
    assert number(value) == text
    assert float(number(value)) == value


def test_the_guidance_scale_is_given_back_exactly():
    """6 significant digits wrote 7.12346 for a guidance_scale of 7.1234567: PNG Info then gave another
    value than the one the image was drawn with."""
    text = parameters_text(
        "a dog", "", steps=3, sampler="DDIM", guidance_scale=7.1234567, seed=1, width=64, height=64, model="m"
    )
    assert "CFG scale: 7.1234567," in text
    usual = parameters_text(
        "a dog", "", steps=3, sampler="DDIM", guidance_scale=7.5, seed=1, width=64, height=64, model="m"
    )
    assert usual == "a dog\nSteps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 64x64, Model: m"
