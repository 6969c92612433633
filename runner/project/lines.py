"""Find the line of a dotted key in a TOML file, for error messages.

tomllib gives values, not positions, so this reads the text once more: table headers set the current
table, `key = value` lines (and the keys of an inline table on that line) record their full dotted key.
It is a locator, not a parser: on anything it does not understand it falls back to the nearest table.
"""

from __future__ import annotations

import re

_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEYVAL = re.compile(
    r"""^\s*((?:"[^"]*"|'[^']*'|[A-Za-z0-9_\-]+)(?:\s*\.\s*(?:"[^"]*"|'[^']*'|[A-Za-z0-9_\-]+))*)\s*="""
)
_INLINE_KEY = re.compile(r"""[{,]\s*("[^"]*"|'[^']*'|[A-Za-z0-9_\-]+)\s*=""")


def numbered_lines(text: str):
    """(1-based number, line) of each line as TOML counts them: a line ends at "\n" only. str.splitlines
    also ends one at U+2028, U+0085 and the like, which a TOML string or comment may hold (a prompt
    pasted from a web page): every line after one was named a line too far."""
    return enumerate(text.split("\n"), start=1)


def _split_key(text: str) -> list[str]:
    parts = re.findall(r""""([^"]*)"|'([^']*)'|([A-Za-z0-9_\-]+)""", text)
    return [a or b or c for a, b, c in parts]


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each dotted key (as a tuple) and each table header to its 1-based line number."""
    found: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    for number, line in numbered_lines(text):
        header = _HEADER.match(line)
        if header:
            table = tuple(_split_key(header.group(1)))
            for depth in range(1, len(table) + 1):  # [subjects.dog] also locates "subjects"
                found.setdefault(table[:depth], number)
            continue
        keyval = _KEYVAL.match(line)
        if not keyval:
            continue
        key = table + tuple(_split_key(keyval.group(1)))
        found.setdefault(key, number)
        rest = line[keyval.end() :]
        if rest.lstrip().startswith("{"):
            for inner in _INLINE_KEY.finditer(rest):
                found.setdefault(key + tuple(_split_key(inner.group(1))), number)
    return found


def duplicate_keys(text: str) -> list[tuple[tuple[str, ...], int, int]]:
    """Keys set twice in one table, as (dotted key, first line, second line)."""
    seen: dict[tuple[str, ...], int] = {}
    found = []
    table: tuple[str, ...] = ()
    for number, line in numbered_lines(text):
        header = _HEADER.match(line)
        if header:
            table = tuple(_split_key(header.group(1)))
            if table in seen and not line.lstrip().startswith("[["):
                found.append((table, seen[table], number))
            seen.setdefault(table, number)
            continue
        keyval = _KEYVAL.match(line)
        if keyval:
            key = table + tuple(_split_key(keyval.group(1)))
            if key in seen:
                found.append((key, seen[key], number))
            seen.setdefault(key, number)
    return found


# The lines git writes around the sides of a conflict it leaves to the user: <<<<<<< ours, ||||||| base
# (with diff3), ======= and >>>>>>> theirs, each side's name after a space.
_NAMED_MARKERS = ("<<<<<<<", "|||||||", ">>>>>>>")


def conflict_marker(text: str) -> tuple[int, str] | None:
    """The first line of a merge conflict that git left in `text`, as (line number, line); None if none.
    A ======= line alone (in a multi-line string) is none: the conflict's <<<<<<< or >>>>>>> is missing."""
    found = [
        (number, line.rstrip())
        for number, line in numbered_lines(text)
        if line == "=======" or (line[:7] in _NAMED_MARKERS and line[7:8] in ("", " "))
    ]
    if not any(line != "=======" for _, line in found):
        return None
    return found[0]


class LineIndex:
    """Answers "on which line is this key?" with the nearest enclosing key or table as fallback."""

    def __init__(self, text: str):
        self._lines = key_lines(text)

    def has(self, key: tuple[str, ...]) -> bool:
        """Whether the file writes this very key (not only a table around it)."""
        return tuple(key) in self._lines

    def line(self, key: tuple[str, ...] | str) -> int | None:
        parts = tuple(key.split(".")) if isinstance(key, str) else tuple(key)
        while parts:
            if parts in self._lines:
                return self._lines[parts]
            parts = parts[:-1]
        return None
