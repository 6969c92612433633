"""A project file's problems: where each is, what is wrong, how to fix it, and the report of them all."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from runner.project.lines import LineIndex


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a project file: where, what, and how to fix it."""

    key: str  # dotted key, e.g. "subjects.rex.lora"
    message: str
    line: int | None = None
    fix: str = ""

    def __str__(self) -> str:
        where = f" (line {self.line})" if self.line else ""
        fix = f" - {self.fix}" if self.fix else ""
        key = f"{self.key}: " if self.key else ""
        return visible(f"{key}{self.message}{where}{fix}")


def visible(text: str) -> str:
    """`text` with each character a terminal would not show as itself written as its escape (\\n, \\x1b,
    \\u2028): a name or value quoted from the file may hold a line break, which would split a problem
    over lines, or a terminal's colour code, which would recolour the report."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class ProjectError(Exception):
    """A project file that cannot be used; str() is the full report, one problem a line."""

    def __init__(self, path: Path | str, problems: list[Problem]):
        self.path = Path(path)
        self.problems = problems
        super().__init__(self.report())

    def report(self) -> str:
        count = len(self.problems)
        head = visible(f"{display(self.path)}: {count} problem{'s' if count != 1 else ''}")
        return "\n".join([head] + [f"  {p}" for p in self.problems])


def display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class Source:
    """A loaded project file as its warnings name it: the file as it was shown when it loaded, and the
    lines of its keys then. A project carries it (schema.Project.source), so that a step that warns about
    a key while it runs, in a worker process or on another machine, names the file and line as the
    build's own process would, without reading the file again."""

    shown: str
    lines: LineIndex

    @classmethod
    def of(cls, project) -> Source:
        """The source of `project`; of one made by hand, not loaded, its file (if it has one) without lines."""
        found = getattr(project, "source", None)
        if found is not None:
            return found
        path = getattr(project, "path", None)
        return cls(display(path) if path is not None else "", LineIndex(""))

    def line(self, key: str) -> int | None:
        """The line of the dotted `key`; of an item of a list (`prompts[1]`), the line of the list's key."""
        return self.lines.line(re.sub(r"\[\d+\]", "", key))

    def warning(self, key: str, what: str, fix: str = "", *, at: str | None = None) -> str:
        """A warning about the project file's `key`, said as those of loading it are: `warning: file:
        key: what (line N) - fix`; the line is that of `at` where given."""
        return f"warning: {self.problem(key, what, fix, at=at)}"

    def problem(self, key: str, what: str, fix: str = "", *, at: str | None = None) -> str:
        """A step's error about the project file's `key`, said as the file's own problems are: `file: key:
        what (line N) - fix`; the line is that of `at` where given."""
        where = f"{visible(self.shown)}: " if self.shown else ""
        return f"{where}{Problem(key, what, self.line(at or key), fix)}"
