"""Warnings a step says about a key of the project file name the file and the key's line, as those of
loading it do, wherever the step runs."""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import runner
from runner.project import load_project
from runner.project.lines import LineIndex
from runner.project.problems import Source, display

TEXT = '[project]\nbase_model = "tiny-sd"\n\n[renders.dog]\nadapter = "none"\nprompts = ["a", "b"]\n'


def test_a_key_s_warning_names_the_file_and_line_as_loading_does(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(TEXT)
    source = load_project(path).source
    assert source.warning("renders.dog.prompts[1]", "is long", "shorten it") == (
        f"warning: {display(path)}: renders.dog.prompts[1]: is long (line 6) - shorten it"
    )
    assert source.warning("renders.dog", "says", at="renders.dog.adapter").endswith(
        "renders.dog: says (line 5)"
    )


def test_a_project_sent_to_a_worker_in_another_folder_says_it_the_same(tmp_path):
    """A worker process or a Ray task gets the project pickled; it may run in another folder, where the
    file is not (another machine): it says the file as the build's process showed it, and the line."""
    path = tmp_path / "p.toml"
    path.write_text(TEXT)
    project = load_project(path)
    here = Source.of(project).warning("renders.dog.prompts[0]", "is long")
    (tmp_path / "project.pickle").write_bytes(pickle.dumps(project))
    path.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import pickle, sys; from runner.project.problems import Source; "
        "p = pickle.loads(open(sys.argv[1], 'rb').read()); "
        "print(Source.of(p).warning('renders.dog.prompts[0]', 'is long'))"
    )
    said = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "project.pickle")],
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(Path(runner.__file__).resolve().parents[1])},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert said == here and here.endswith("renders.dog.prompts[0]: is long (line 6)")


def test_a_project_made_by_hand_names_its_file_without_a_line(tmp_path):
    from types import SimpleNamespace

    project = SimpleNamespace(path=tmp_path / "p.toml")
    assert Source.of(project).warning("renders.dog.seeds", "repeats 1") == (
        f"warning: {display(tmp_path / 'p.toml')}: renders.dog.seeds: repeats 1"
    )
    assert Source.of(SimpleNamespace()).warning("blends.mix", "only a") == "warning: blends.mix: only a"


@pytest.mark.torch
def test_a_train_step_names_the_line_of_an_instance_prompt_longer_than_the_text_encoder_reads(tmp_path):
    """The train step says it of the subject's instance prompt in the file's own form, with its line."""
    pytest.importorskip("torch")
    from runner.steps import train
    from runner.training.job import job_from_context
    from tests.steps_fixtures import draw_images, make_subject, train_context

    long = "a photo of sks dog " * 6  # 84 tokens to tiny-sd, and its start and end tokens
    subject = dataclasses.replace(
        make_subject(draw_images(tmp_path / "dog", 1), train=dict(steps=1, train_text_encoder=False)),
        instance_prompt=long,
    )
    text = (
        f'[project]\nbase_model = "tiny-sd"\n\n[subjects.dog]\nimages = "dog"\ninstance_prompt = "{long}"\n'
    )
    said = []
    ctx = train_context(tmp_path, subject, log=said.append)
    ctx.project = dataclasses.replace(ctx.project, source=Source("p.toml", LineIndex(text)))
    assert job_from_context(ctx).source is ctx.project.source  # what a train worker process is sent
    train.run(ctx)
    assert [line for line in said if "tokens" in line] == [
        "warning: p.toml: subjects.dog.instance_prompt: is 86 tokens; the text encoder reads 77, so the end "
        f"is cut off: {long[-40:]!r} (line 6)"
    ]


@pytest.mark.torch
def test_a_prior_step_names_the_line_of_a_class_prompt_of_its_list(tmp_path):
    """A class prompt of a list is named by its place in the list, at the line of class_prompt."""
    pytest.importorskip("torch")
    from runner.steps import prior
    from tests.steps_fixtures import make_prior, prior_context

    long = "a photo of dog " * 7  # 77 tokens to tiny-sd, and its start and end tokens
    spec = make_prior(class_prompt=("a photo of dog", long), num_images=2, steps=1, batch_size=2)
    text = f'[project]\nbase_model = "tiny-sd"\n\n[priors.dog]\nclass_prompt = ["a photo of dog", "{long}"]\n'
    said = []
    ctx = prior_context(tmp_path, spec, log=said.append)
    ctx.project = dataclasses.replace(ctx.project, source=Source("p.toml", LineIndex(text)))
    prior.run(ctx)
    assert [line for line in said if "tokens" in line] == [
        "warning: p.toml: priors.dog.class_prompt[1]: is 79 tokens; the text encoder reads 77, so the end "
        f"is cut off: {long[-40:]!r} (line 5)"
    ]
