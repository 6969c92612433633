"""A caption_extension under which no image has a caption file trains every image on its prompt: the
step that reads the folder says so, naming the file and the key's line."""

from __future__ import annotations

from dataclasses import replace

import pytest

from runner.project.lines import LineIndex
from runner.project.problems import Source

FIX = "check the extension against the caption files' names"


@pytest.mark.torch
def test_a_train_step_says_when_no_image_has_a_caption(tmp_path):
    from runner.training.data import read_images
    from runner.training.job import job_from_context
    from tests.steps_fixtures import draw_images, make_subject, train_context

    folder = draw_images(tmp_path / "dog", 2)
    (folder / "00.caption").write_text("a dog on a sofa")
    subject = replace(make_subject(folder), caption_extension=".txt")
    ctx = train_context(tmp_path, subject)
    text = (
        '[subjects.dog]\nimages = "dog"\ninstance_prompt = "a photo of sks dog"\ncaption_extension = ".txt"\n'
    )
    ctx.project = replace(ctx.project, source=Source("p.toml", LineIndex(text)))
    said = []
    images, _ = read_images(job_from_context(ctx), said.append)
    assert images.prompts["instance"] == ["a photo of sks dog"] * 2
    assert [line for line in said if "caption" in line] == [
        f"warning: p.toml: subjects.dog.caption_extension: caption_extension = '.txt', but no image in {folder} "
        "has a caption file (such as 00.txt beside 00.png): every image trains on the instance prompt (line 4) "
        f"- {FIX}"
    ]


@pytest.mark.torch
def test_a_prior_says_when_no_given_class_image_has_a_caption(tmp_path):
    from runner.steps import prior as prior_step
    from tests.steps_fixtures import draw_images, make_prior, prior_context

    given = draw_images(tmp_path / "given", 2, size=(64, 64))
    (given / "01.txt").write_text("a dog on a sofa")
    logs = []
    spec = make_prior(num_images=2, images=str(given), caption_extension=".caption")
    ctx = prior_context(tmp_path, spec, log=logs.append)
    text = '[priors.dog]\nclass_prompt = "a photo of dog"\nimages = "given"\ncaption_extension = ".caption"\n'
    ctx.project = replace(ctx.project, source=Source("p.toml", LineIndex(text)))
    prior_step.run(ctx)
    assert [line for line in logs if line.startswith("warning: ")] == [
        f"warning: p.toml: priors.dog.caption_extension: caption_extension = '.caption', but no image in {given} "
        "has a caption file (such as 00.caption beside 00.png): every image trains on its class prompt (line 4) "
        f"- {FIX}"
    ]
