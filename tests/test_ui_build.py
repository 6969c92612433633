"""`dbl build` through the real executor, shown on a fixed-width (200 columns) recording console and
as plain lines."""

from __future__ import annotations

import re

from rich.console import Console

from runner import executor
from runner.cli import main
from runner.ui import make_reporter


def build_on_console(proj, **options) -> str:
    console = Console(record=True, width=200, force_terminal=True, color_system=None)
    reporter = make_reporter("live", 0, console=console)
    try:
        executor.build(proj.load(), executor.BuildOptions(**options), reporter)
    finally:
        reporter.close()
    return console.export_text()


def test_live_display_of_a_build(proj, fake_steps):
    text = build_on_console(proj)
    summary = text[text.rindex("step ") :]
    for step in (
        "prior:dog",
        "train:dog",
        "train:toy",
        "blend:mix",
        "render:park",
        "render:mixed",
        "render:base",
    ):
        assert re.search(rf"{re.escape(step)}\s+done\s", summary), step
    assert "build/pets/adapters/dog" in summary
    assert "pets: built in" in text and "7 ran" in text

    proj.edit("dog = 1.05", "dog = 1.1")
    fake_steps.fail = {"render:mixed"}
    text = build_on_console(proj)
    assert "adapters.dog 1.05 -> 1.1" in text
    assert "render:mixed failed on purpose" in text
    assert re.search(r"train:dog\s+fresh", text[text.rindex("step ") :])


def test_live_display_of_a_build_with_nothing_to_do(proj, fake_steps):
    build_on_console(proj)
    text = build_on_console(proj).strip()
    assert text.splitlines() == ["all 7 steps are up to date"]


def test_plain_lines_of_a_build_off_a_terminal(proj, fake_steps, capsys):
    assert main(["build", str(proj.path)]) == 0  # captured output is no terminal: plain lines
    lines = capsys.readouterr().out.strip().splitlines()
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in lines)
    assert any(re.search(r"train:dog\s+start \(upstream prior:dog stale\)", line) for line in lines)
    assert any(re.search(r"render:park\s+done in .* -> .*build/pets/renders/park", line) for line in lines)
    assert "\x1b[" not in "".join(lines)
