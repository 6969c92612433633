"""A step kind registered by a test alone (nothing under runner/ knows it) loads, plans, builds and
reports like the built-in ones."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from runner import lockfile, steps
from tests.conftest import Recorder
from tests.note_kind import NOTE

PROJECT = """
[project]
base_model = "tiny-sd"

[notes.second]
text = "world"
after = "first"

[notes.first]
text = "hello "
times = 2
"""


@pytest.fixture
def notes(tmp_path):
    steps.register(NOTE)
    path = tmp_path / "n.toml"
    path.write_text(PROJECT)
    yield path
    steps.unregister("note")


def build(path, **options):
    from runner import executor
    from runner.project import load_project

    rec = Recorder()
    result = executor.build(load_project(path), executor.BuildOptions(**options), rec)
    assert result.ok, rec.events
    return [e[1] for e in rec.events if e[0] == "start"], rec


def test_a_new_kind_plans_builds_and_reports(notes, capsys):
    from runner.cli import main

    assert main(["plan", str(notes), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    # Dependencies first, whatever the order of the tables.
    assert [s["id"] for s in plan["stale"]] == ["note:first", "note:second"]
    assert plan["stale"][0]["reasons"] == ["never built"]

    ran, rec = build(notes)
    assert ran == ["note:first", "note:second"]
    out = notes.parent / "build" / "n" / "notes"
    assert (out / "second" / "note.txt").read_text() == "hello hello world"
    lock = lockfile.read(notes.with_suffix(".lock"))
    assert lock["note:first"]["metrics"] == {"chars": 12}
    assert ("log", "note:first", "wrote 2 times") in rec.events

    assert build(notes)[0] == []  # nothing changed: nothing runs
    notes.write_text(
        PROJECT.replace('colour = "plain"', "").replace('text = "world"', 'text = "world"\ncolour = "red"')
    )
    assert build(notes)[0] == []  # not fingerprinted
    notes.write_text(PROJECT.replace("times = 2", "times = 3"))
    ran, rec = build(notes)
    assert ran == ["note:first", "note:second"]
    reasons = {sid: r for sid, _, r in rec.planned}
    assert reasons == {"note:first": ["times 2 -> 3"], "note:second": ["upstream note:first stale"]}

    assert main(["build", str(notes), "--no-progress"]) == 0
    assert "all 2 steps are up to date" in capsys.readouterr().out


def test_a_new_kind_is_validated_and_documented(notes):
    from runner.project import ProjectError, load_project
    from runner.project.docs import reference_markdown

    notes.write_text(PROJECT.replace('after = "first"', 'after = "frist"\ntimez = 1'))
    with pytest.raises(ProjectError) as err:
        load_project(notes)
    assert [str(p) for p in err.value.problems] == [
        "notes.second: unknown key 'timez' (line 8) - did you mean 'times'?",
    ]
    notes.write_text(PROJECT.replace('after = "first"', 'after = "frist"'))
    with pytest.raises(ProjectError) as err:
        load_project(notes)
    assert [str(p) for p in err.value.problems] == [
        "notes.second.after: 'frist' is not a note (line 7) - name another note"
    ]
    assert "### [notes.<name>]" in reference_markdown()
    assert "| `times` | `1` | how many times to write it |" in reference_markdown()


def test_an_unregistered_kind_is_an_unknown_table(tmp_path):
    from runner.project import ProjectError, load_project

    path = tmp_path / "n.toml"
    path.write_text(PROJECT)
    with pytest.raises(ProjectError, match="unknown key 'notes'"):
        load_project(path)


def test_a_new_kind_runs_in_a_worker_process_and_is_reported(notes, capsys):
    """The process backend imports the kind's run function and table by reference in a fresh
    interpreter: a kind defined in a test module runs there too."""
    from runner.cli import main

    assert main(["build", str(notes), "--no-progress", "-v", "--executor", "process"]) == 0
    out = capsys.readouterr().out
    assert "note:first" in out and "note:second" in out and "notes 1/1" in out
    assert "wrote 2 times" in out
    text = (notes.parent / "build" / "n" / "notes" / "second" / "note.txt").read_text()
    assert text == "hello hello world"


@pytest.mark.parametrize(
    "reads, edit, reason",
    [
        (
            True,
            ('text = "hello "\ntimes = 2', 'text = "hello hello "'),
            "upstream rebuilt with identical outputs",
        ),
        (False, ("times = 2", "times = 3"), "the output of note:first is not among its inputs"),
    ],
    ids=["reads it", "reads it not"],
)
def test_a_step_behind_a_rebuilt_one_says_why_it_is_fresh(notes, reads, edit, reason):
    """A step that runs after another without reading its output (as a snapshot after its train step) is
    not fresh because that step's outputs came out identical."""
    from runner import executor
    from runner.project import load_project

    if not reads:
        steps.register(replace(NOTE, inputs=lambda i: {"version": 1, **i.fields(i.spec, exclude=("after",))}))
    build(notes)
    notes.write_text(PROJECT.replace(*edit))
    planned = dict((sid, r) for sid, _, r in build(notes, dry_run=True)[1].planned)
    said = [] if reads else ["up to date: the output of note:first is not among its inputs"]
    assert planned["note:second"] == ["upstream note:first stale", *said]
    result = executor.build(load_project(notes), executor.BuildOptions(), Recorder())
    second = next(ev for ev in result.steps if ev.id == "note:second")
    assert (second.status, second.reasons) == ("fresh", [reason])
