"""Reading a project file's text: its encoding, and its TOML syntax errors as located problems."""

from __future__ import annotations

import codecs
import re
import unicodedata
import warnings
from pathlib import Path

from runner.project.lines import conflict_marker, duplicate_keys
from runner.project.problems import Problem, ProjectError, display


def read_text(path: Path) -> str:
    """The file's text. TOML is UTF-8; a file in another encoding (Latin-1, Windows-1252) still loads as it
    always has, each byte that is not UTF-8 read as U+FFFD, with a warning: its prompts are not the text
    the user sees in the editor."""
    # utf-8-sig: a byte-order mark (Windows editors, PowerShell) is not TOML, and not the user's text.
    # read_text, not bytes.decode: its universal newlines are what every project file was read with.
    try:
        data = path.read_bytes()
    except OSError as exc:  # no read permission: a problem of the file, as a missing one is
        unread = f"cannot be read ({exc.strerror or exc})"
        raise ProjectError(path, [Problem("", unread, None, "give read access to it (chmod u+r)")]) from None
    if name := wide_unicode(data):  # Windows PowerShell's `>` writes UTF-16: every other byte reads as junk
        raise ProjectError(path, [Problem("", f"the file is {name} text, not UTF-8", 1, "save it as UTF-8")])
    if b"\x00" in data and utf16_without_mark(data):  # the same, its byte-order mark left off
        wide = "the file looks like UTF-16 text without a byte-order mark, not UTF-8"
        raise ProjectError(path, [Problem("", wide, 1, "save it as UTF-8")])
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        warnings.warn(
            f"{display(path)} is not UTF-8 (line {line}): what it holds there reads as \ufffd; "
            "save the file as UTF-8",
            stacklevel=3,
        )
        return path.read_text(encoding="utf-8-sig", errors="replace")
    return path.read_text(encoding="utf-8-sig")


def wide_unicode(data: bytes) -> str | None:
    """ "UTF-32" or "UTF-16" where `data` begins with that encoding's byte-order mark, else None: the
    "Unicode" of Notepad and of Windows PowerShell, text that is not UTF-8. UTF-32's marks are looked for
    first: the little-endian one begins with UTF-16's."""
    for name, marks in (
        ("UTF-32", (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)),
        ("UTF-16", (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)),
    ):
        if data.startswith(marks):
            return name
    return None


def utf16_without_mark(data: bytes) -> bool:
    """Whether `data` reads as printable UTF-16 text in either byte order, each of its zero bytes the high
    byte of a character (Latin text: every other byte); a binary file does not."""
    if len(data) % 2:
        return False
    zeros = {i % 2 for i, byte in enumerate(data) if byte == 0}
    for order, high in (("utf-16-le", 1), ("utf-16-be", 0)):
        if zeros != {high}:
            continue
        try:
            text = data.decode(order)
        except UnicodeDecodeError:
            continue
        if text.strip() and all(c.isprintable() or c.isspace() for c in text):
            return True
    return False


def syntax_problems(text: str, exc: Exception) -> list[Problem]:
    """A TOML syntax error as located problems: a merge conflict that git left in the file (whose two
    sides often set one key twice), else each key set twice with both of its lines, else tomllib's error."""
    conflict = conflict_marker(text)
    if conflict:
        line, marker = conflict
        fix = "keep the lines you want, then delete git's marker lines (<<<<<<<, =======, >>>>>>>)"
        return [Problem("", f"unresolved merge conflict: `{marker}`", line, fix)]
    twice = duplicate_keys(text)
    if twice:
        return [
            Problem(".".join(key), f"set twice, first on line {first}", second, "keep one of them")
            for key, first, second in twice
        ]
    found = re.search(r"^(.*?)\s*\(at line (\d+), column (\d+)\)$", str(exc))
    fix = "fix the syntax"
    if found:
        message, line = f"{found.group(1)} at column {found.group(3)}", int(found.group(2))
        fix = _odd_character(text, line, int(found.group(3))) or fix
    else:  # "(at end of document)"
        message = re.sub(r"\s*\(at end of document\)$", " at the end of the file", str(exc))
        line = max(1, text.count("\n") + (not text.endswith("\n")))  # as TOML counts lines
    return [Problem("", f"invalid TOML: {message}", line, fix)]


def _odd_character(text: str, line: int, column: int) -> str | None:
    """The fix for a syntax error at a character that is not ASCII: a look-alike letter in a key (a Cyrillic
    'а'), a no-break space pasted from a web page, a byte-order mark where two files were joined. Each
    looks right in an editor, so "fix the syntax" does not say what to fix."""
    lines = text.split("\n")
    if not (1 <= line <= len(lines) and 1 <= column <= len(lines[line - 1])):
        return None
    char = lines[line - 1][column - 1]
    if char.isascii() or char == "\ufffd":  # bytes that are not UTF-8: said with the file's encoding
        return None
    what = f"U+{ord(char):04X} ({unicodedata.name(char, 'unnamed')})"
    if not char.isprintable():
        return f"column {column} holds {what}, which an editor does not show: delete it"
    return f"column {column} holds {what}, which TOML does not take there: type it again in plain ASCII"
