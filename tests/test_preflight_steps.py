"""What a build finds before any step runs about a generation step's settings that only the base model's
configs tell: more denoising `steps` than its scheduler takes."""

from __future__ import annotations

from runner.events import FAILED, SKIPPED
from runner.project.problems import display
from tests.conftest import step_ends

DDIM = (
    "1500 steps are more than DDIM takes: at most the 1000 timesteps the model was trained with (line {line})"
    ' - use at most 1000, or scheduler = "euler", which takes more'
)


def test_more_steps_than_the_scheduler_takes_fail_the_step_before_any_step_runs(proj, build, fake_steps):
    """Said by the render once every step before it had run and it had loaded the model; by the prior
    once it had loaded the model."""
    proj.edit('prompts = ["a dog"]', 'prompts = ["a dog"]\nsteps = 1500')  # tiny-sd's own scheduler: DDIM
    proj.edit("num_images = 2", "num_images = 2\nsteps = 1500")
    result, rec = build(proj, keep_going=True)
    assert result.exit_code == 1
    assert fake_steps.ran == ["train:toy"]  # the others need prior:dog
    ended, shown = step_ends(rec), display(proj.path)
    assert ended["render:base"] == (FAILED, f"{shown}: renders.base.steps: {DDIM.format(line=42)}")
    assert ended["prior:dog"] == (FAILED, f"{shown}: priors.dog.steps: {DDIM.format(line=16)}")
    assert ended["train:dog"] == (SKIPPED, "upstream prior:dog failed")


def test_a_scheduler_that_takes_that_many_steps_is_not_refused(proj, build, fake_steps):
    proj.edit('prompts = ["a dog"]', 'prompts = ["a dog"]\nsteps = 1500\nscheduler = "euler"')
    result, _ = build(proj, only=("render:base",))
    assert result.ok and fake_steps.ran == ["render:base"]
