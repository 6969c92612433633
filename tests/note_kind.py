"""A step kind of the tests' own, which nothing under runner/ knows: [notes.<name>] writes a text file. Register
it for a test with `steps.register(NOTE)`, and unregister it after.

Import by name (`from tests.note_kind import NOTE`)."""

from __future__ import annotations

from dataclasses import dataclass

from runner import steps
from runner.project.schema import opt


@dataclass(frozen=True)
class Note:
    """[notes.<name>]: a text file, written `times` times, after another note if asked."""

    name: str
    text: str = opt(doc="what the note says")
    times: int = opt(1, "how many times to write it", "int", minimum=1)
    after: str | None = opt(None, "a note whose text comes first", "str?")
    colour: str = opt("plain", "how it looks", fingerprint=False)


def run_note(ctx) -> dict:
    before = ""
    if ctx.spec.after:
        before = (ctx.inputs[f"note:{ctx.spec.after}"] / "note.txt").read_text()
    (ctx.out / "note.txt").write_text(before + ctx.spec.text * ctx.spec.times)
    ctx.progress(1, 1)
    ctx.log(f"wrote {ctx.spec.times} times")
    return {"chars": len(ctx.spec.text) * ctx.spec.times}


def run_note_with_pid(ctx) -> dict:
    """A note's text followed by the pid of the process that wrote it (a worker's, in a build with workers)."""
    import os

    (ctx.out / "note.txt").write_text(f"{ctx.spec.text} {os.getpid()}")
    return {}


def note_inputs(i: steps.Inputs) -> dict:
    inputs = {"version": 1, **i.fields(i.spec, exclude=("after",))}
    if i.spec.after:
        inputs["after"] = {"_name": i.spec.after, "output": i.output(f"note:{i.spec.after}")}
    return inputs


def check_notes(check, tables) -> None:
    for name, note in tables.get("note", {}).items():
        if note.after is not None and note.after not in tables["note"]:
            check.problem(("notes", name, "after"), f"'{note.after}' is not a note", "name another note")


NOTE = steps.StepKind(
    name="note",
    table="notes",
    spec=Note,
    output_dir="notes",
    version=1,
    run=run_note,
    inputs=note_inputs,
    deps=lambda project, spec: [f"note:{spec.after}"] if spec.after else [],
    doc="writes a note",
    check=check_notes,
    unit=("notes", "notes/s"),
)
