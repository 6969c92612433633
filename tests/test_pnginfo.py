"""The A1111 parameters text: floats written short where that is exact, and exactly where it is not; a
prompt line that readers would take for the negative prompt."""

from __future__ import annotations

import pytest

from runner.pnginfo import number, parameters_text, readable_prompt


def read_parameters(text: str) -> tuple[str, str, str]:
    """(prompt, negative prompt, settings line) as A1111's PNG Info reads a parameters text: the last line
    holds the settings, and a line that starts with "Negative prompt:" (after its spaces) ends the prompt."""
    *lines, settings = text.strip().split("\n")
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.strip().startswith("Negative prompt:"):
            in_negative = True
            line = line.strip()[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative), settings


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


def text_of(prompt: str, negative: str = "") -> str:
    return parameters_text(
        prompt, negative, steps=3, sampler="DDIM", guidance_scale=7.5, seed=1, width=64, height=64, model="m"
    )


def test_a_prompt_line_that_reads_as_the_negative_prompt_is_joined_to_the_line_before():
    prompt = "a photo of sks dog\n  Negative prompt: is what follows\non a beach"
    assert read_parameters(text_of(prompt, "blurry"))[:2] == (
        "a photo of sks dog   Negative prompt: is what follows\non a beach",
        "blurry",
    )
    written = text_of("a photo of sks dog\nNegative prompt: none", "")
    assert read_parameters(written)[:2] == ("a photo of sks dog Negative prompt: none", "")
    # Written as it was given, the reader would have split it: what the join is for.
    assert read_parameters("a photo of sks dog\nNegative prompt: none\nSteps: 3")[:2] == (
        "a photo of sks dog",
        "none",
    )


def test_other_prompts_are_written_as_they_are():
    for prompt in (
        "a dog",
        "a dog\non a beach",
        "a dog, negative prompt: lowercase",
        "Negative prompt: first line",
    ):
        assert readable_prompt(prompt) == prompt
    prompt, negative, settings = read_parameters(text_of("a dog\non a beach", "blurry\ndark"))
    assert (prompt, negative) == ("a dog\non a beach", "blurry\ndark")
    assert settings.startswith("Steps: 3, Sampler: DDIM")


@pytest.mark.torch
def test_the_text_encoder_reads_the_joined_prompt_as_the_given_one():
    from runner.families import tiny_shapes

    tokenizer = tiny_shapes.make_tokenizer()
    prompt = "a red ball\n  Negative prompt: on grass"
    assert readable_prompt(prompt) != prompt
    assert tokenizer(readable_prompt(prompt)).input_ids == tokenizer(prompt).input_ids
