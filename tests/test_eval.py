"""The eval step kind: scores in scores.json and in the lockfile, what reruns it, project-file errors.

The renders here are tiny-sd's noise, so the scores are low; what they mean is tested on drawn pictures
in test_shapes.py, and on tiny-shapes' renders in test_tiny_shapes.py."""

from __future__ import annotations

import json
import re

import pytest

from runner import lockfile, shapes
from runner.cli import main
from runner.project import load_project
from runner.project.load import ProjectError

pytestmark = pytest.mark.torch

PROJECT = """
[project]
base_model = "tiny-sd"

[subjects.ring]
images = "ring"
instance_prompt = "a sks shape"

[renders.base]
adapter = "none"
prompts = ["a sks shape on a blue background", "a shape on a white background"]
steps = 2
seeds = [0, 1]

[evals.base]
render = "base"
subject = "ring"
"""


@pytest.fixture
def project(tmp_path):
    folder = tmp_path / "ring"
    folder.mkdir()
    for i, background in enumerate(("red", "blue", "black")):
        scene = shapes.Scene("ring", "yellow", background, "large", (30 + i, 32))
        shapes.draw(scene).save(folder / f"{i}.png")
    path = tmp_path / "p.toml"
    path.write_text(PROJECT)
    return path


def test_an_eval_scores_its_render_into_the_lockfile_and_scores_json(project, capsys):
    assert main(["build", str(project), "--only", "eval:base", "--no-progress", "-v"]) == 0
    lock = lockfile.read(project.with_suffix(".lock"))
    assert "train:ring" not in lock  # an eval needs the render, not the subject's training
    record = lock["eval:base"]
    scores = json.loads((project.parent / "build/p/evals/base/scores.json").read_text())
    assert scores["subject"] == {"shape": "ring", "colour": "yellow"}
    result = scores["adapters"]["none"]
    assert set(result["scores"]) == {"prompt_fidelity", "subject_fidelity", "class_drift"}
    assert record["metrics"] == result["scores"]
    assert result["counts"] == {"prompt_fidelity": 4, "subject_fidelity": 2, "class_drift": 2}
    assert [r["file"] for r in result["images"]] == ["0-0.png", "0-1.png", "1-0.png", "1-1.png"]
    assert record["inputs"]["render"]["output"] == lock["render:base"]["output_hash"]
    assert "subject ring: yellow ring in its photos" in capsys.readouterr().out


def test_what_reruns_an_eval(project, capsys):
    assert main(["build", str(project), "--only", "eval:base", "--no-progress"]) == 0
    text = project.read_text()
    project.write_text(text.replace("steps = 2", "steps = 3"))  # the render changes: both rerun
    assert main(["plan", str(project)]) == 0
    out = capsys.readouterr().out
    assert "render:base" in out and "eval:base" in out
    project.write_text(
        text.replace(
            'render = "base"\nsubject = "ring"', 'render = "base"\nsubject = "ring"\nidentifier = "zwx"'
        )
    )
    assert main(["build", str(project), "--only", "eval:base", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "eval:base    start" in out and "render:base  start" not in out
    shapes.draw(shapes.Scene("ring", "red", "white", "large", (32, 32))).save(
        project.parent / "ring" / "3.png"
    )
    assert main(["plan", str(project)]) == 0
    assert "subject" in capsys.readouterr().out


@pytest.mark.parametrize(
    "edit, message",
    [
        ('render = "base"', "evals.base.render: 'nope' is not a render"),
        ('subject = "ring"', "evals.base.subject: 'nope' is not a subject"),
    ],
)
def test_an_eval_of_an_unknown_render_or_subject_is_a_project_error(project, edit, message):
    project.write_text(project.read_text().replace(edit, edit.split("=")[0] + '= "nope"'))
    with pytest.raises(ProjectError) as err:
        load_project(project)
    assert message in str(err.value)


# The project warns that its evals score renders of tiny-sd, as this module's are.
TINY_SD_EVALS = "evals score renders of the built-in tiny-shapes model"


def test_the_report_shows_an_evals_scores_beside_its_render(project):
    from runner import report

    assert main(["build", str(project), "--only", "eval:base", "--no-progress"]) == 0
    with pytest.warns(UserWarning, match=TINY_SD_EVALS):
        loaded = load_project(project)
    page = report.render(loaded)
    section = page[page.index('id="render:base"') :]
    assert "fidelity (eval:base)" in section and "subject fidelity" in section and "class drift" in section


def test_the_report_leaves_out_scores_of_an_earlier_build_of_the_render(project):
    """A render rebuilt without its eval (--only, or an eval that failed) keeps the eval's record of the
    images it had: those scores are not shown as the new grid's."""
    from runner import report

    assert main(["build", str(project), "--only", "eval:base", "--no-progress"]) == 0
    project.write_text(project.read_text().replace("steps = 2", "steps = 3"))
    assert main(["build", str(project), "--only", "render:base", "--no-progress"]) == 0
    with pytest.warns(UserWarning, match=TINY_SD_EVALS):
        loaded = load_project(project)
    page = report.render(loaded)
    section = page[page.index('id="render:base"') :]
    section = section[: section.index("</section>")]
    assert "fidelity (eval:base)" not in section and "subject fidelity" not in section
    assert "eval:base scored an earlier build of this render" in section


def test_what_an_eval_cannot_score_is_a_warning(project):
    """An identifier that is not a word of letters is in no prompt, a snapshot is not a subject, and a
    render of several adapters has no default subject: each left subject fidelity and class drift out of
    the scores without a word. Each is said as the file loads, with its line."""
    project.write_text(
        PROJECT.replace('subject = "ring"\n', 'identifier = "sks1"\n')
        + '\n[subjects.ring.train]\nsave_steps = [2]\n\n[renders.snap]\nadapter = "ring@2"\nprompts = ["a sks shape"]\n'
        + '\n[evals.snap]\nrender = "snap"\n'
        + '\n[renders.side]\nadapters = ["none", "ring@2", "ring"]\nprompts = ["a sks shape"]\n'
        + '\n[evals.side]\nrender = "side"\n'
    )
    said = _eval_warnings(project)
    assert said == [
        "evals.base: identifier 'sks1' is not a word of letters, and prompts are read as such words: no "
        "prompt names it, so subject fidelity is not counted (line 17)",  # the line of identifier
        "evals.snap: the render's adapter ring@2 is a snapshot of ring, not a subject (line 27) - set "
        'subject = "ring" to score subject fidelity and class drift',  # the line of render
        "evals.side: the render has several adapters, so none is the subject by default (line 34) - set "
        'subject = "ring" to score subject fidelity and class drift',
    ]
    lines = project.read_text().split("\n")
    assert [lines[n - 1] for n in (17, 27, 34)] == [
        'identifier = "sks1"',
        'render = "snap"',
        'render = "side"',
    ]
    project.write_text(PROJECT)  # a subject named, a plain identifier: nothing to say
    assert _eval_warnings(project) == []


def _eval_warnings(project, world: bool = False) -> list[str]:
    """What loading the project file `project` warns of about its evals, without the file's name; the
    warning that its model is not tiny-shapes (these tests render tiny-sd, which is quicker) only where
    `world`."""
    import warnings

    from runner.project.problems import display

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        load_project(project)
    head = f"{display(project)}: "
    return [
        str(w.message).removeprefix(head)
        for w in said
        if head + "evals." in str(w.message) and (world or "world of coloured shapes" not in str(w.message))
    ]


def test_evals_of_another_model_than_tiny_shapes_are_warned_of_once(project):
    """Their scores read the shapes world: on another model they say nothing of what was learned."""
    project.write_text(PROJECT + '\n[evals.again]\nrender = "base"\nsubject = "ring"\n')
    assert _eval_warnings(project, world=True) == [
        "evals.base: evals score renders of the built-in tiny-shapes model, whose world of coloured shapes "
        "they know; base_model 'tiny-sd' draws other pictures, which they cannot tell apart (line 15) - "
        'remove the [evals] tables, or use base_model = "tiny-shapes"'
    ]
    project.write_text(PROJECT.replace('"tiny-sd"', '"tiny-shapes"'))
    assert _eval_warnings(project, world=True) == []


def test_what_an_eval_cannot_score_is_said_before_the_build_not_by_its_step(project, capsys):
    """The warning needs no model: `dbl plan` says it, and the eval step does not say it again."""
    project.write_text(PROJECT.replace('subject = "ring"\n', 'subject = "ring"\nidentifier = "sks1"\n'))
    assert main(["plan", str(project)]) == 0
    assert "evals.base: identifier 'sks1' is not a word of letters" in capsys.readouterr().err
    assert main(["build", str(project), "--only", "eval:base", "--no-progress"]) == 0
    said = capsys.readouterr()
    assert (said.out + said.err).count("identifier 'sks1' is not a word of letters") == 1


def test_a_render_of_the_base_model_or_a_blend_for_the_subject_s_prompts_is_a_warning(project):
    """Without `subject`, an eval of a render of 'none' or of a blend whose prompts name the identifier
    left subject fidelity and class drift out of the scores without a word."""
    project.write_text(
        PROJECT.replace('subject = "ring"\n', "")
        + '\n[subjects.toy]\nimages = "ring"\ninstance_prompt = "a zwx shape"\n'
        + "\n[blends.mix]\nadapters = { toy = 1.0, ring = 1.0 }\n"
        + '\n[renders.mixed]\nadapter = "mix"\nprompts = ["a sks shape"]\n\n[evals.mixed]\nrender = "mixed"\n'
        + '\n[renders.plain]\nadapter = "none"\nprompts = ["a shape"]\n\n[evals.plain]\nrender = "plain"\n'
    )
    said = _eval_warnings(project)
    assert [re.sub(r" \(line \d+\)", "", line) for line in said] == [
        "evals.base: the render draws the base model ('none'), not a subject, for prompts that name 'sks' - "
        'set subject = "ring" or "toy" to score subject fidelity and class drift',
        "evals.mixed: the render draws blend mix, not a subject, for prompts that name 'sks' - set "
        'subject = "toy" or "ring" to score subject fidelity and class drift',
    ]  # evals.plain: the class prompt alone: the base model's prompt fidelity is what is asked


def test_an_identifier_no_prompt_names_is_a_warning(project):
    """The cross's prompts say 'zwx'; the identifier left at its default, 'sks', is in none of them, and
    subject fidelity was left out of the scores without a word."""
    project.write_text(PROJECT.replace('subject = "ring"', 'subject = "ring"\nidentifier = "zwx"'))
    assert _eval_warnings(project) == [
        "evals.base: no prompt of renders.base names the identifier 'zwx', so subject fidelity is not counted "
        "(line 18) - set identifier to the word that stands for ring (its instance prompt: 'a sks shape')"
    ]


def test_a_subject_photo_broken_after_the_check_names_its_file(project, monkeypatch, capsys):
    """The build checks the photos before any step runs; one damaged after that check (replaced while
    the render ran) failed the eval saying only Pillow's 'image file is truncated'."""
    from runner.steps import evaluate

    photo = project.parent / "ring" / "1.png"
    scored = evaluate.run

    def damaged_then_scored(ctx):  # after the check before the build, as the step begins
        data = photo.read_bytes()
        photo.write_bytes(data[: len(data) // 2])
        return scored(ctx)

    monkeypatch.setattr(evaluate, "run", damaged_then_scored)
    size = photo.stat().st_size
    assert main(["build", str(project), "--only", "eval:base", "--no-progress"]) == 1
    assert photo.stat().st_size < size  # it was damaged after the check
    said = capsys.readouterr()
    assert f"{photo}: the image is damaged or truncated (image file is truncated" in said.out + said.err
    assert "Traceback" not in said.out + said.err
