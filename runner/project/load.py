"""Read a project file, validate every key, resolve defaults and paths, and report all problems at once."""

from __future__ import annotations

import difflib
import math
import re
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from runner import steps
from runner.project import checks, schema
from runner.project.base_model import check_base_model
from runner.project.checks import NAME_MAX, PATH_MAX
from runner.project.examples import describe, example, example_list, nearest
from runner.project.lines import LineIndex
from runner.project.problems import Problem, ProjectError, Source, display
from runner.project.source import read_text, syntax_problems

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# Names Windows gives its devices, in any case: no file or folder may be called so.
WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"{d}{n}" for d in ("com", "lpt") for n in range(1, 10))}


class _Checker:
    """Collects problems while reading the raw TOML data into schema dataclasses."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.lines = LineIndex(text)
        self.problems: list[Problem] = []
        self.notes: list[Problem] = []  # what loads but is likely a mistake: warnings, once the file loads
        # The base model's family as cheap facts tell it (runner.families.detect); None until known, and
        # when it is not known before a download. Cross-table checks read it.
        self.family: str | None = None
        self.base_model: str | None = None  # [project] base_model as written, once [project] has read
        # Tables the file writes that did not read, by key ([subjects.dog], a whole [subjects], [train]):
        # their own problems are said, so a reference to one (or to a table inside one) is not another.
        self.unread: set[tuple[str, ...]] = set()
        # The raw TOML of each [group.name] table among them: the names it gives are checked all the same.
        self.unread_tables: dict[tuple[str, ...], dict] = {}

    def problem(self, key: tuple[str, ...], message: str, fix: str = "") -> None:
        found = Problem(".".join(key), message, self.lines.line(key), fix)
        if found not in self.problems:  # a [train] value that every subject inherits: said once
            self.problems.append(found)

    def note(
        self,
        key: tuple[str, ...],
        message: str,
        fix: str = "",
        *,
        at_line: bool = True,
        at: tuple[str, ...] | None = None,
    ) -> None:
        """A warning about `key`, at its line or at that of `at` (a key inside it, where the file writes
        it); `at_line` False where the message names the lines itself (several keys of one table)."""
        line = self.lines.line(at or key) if at_line else None
        self.notes.append(Problem(".".join(key), message, line, fix))

    def line(self, key: tuple[str, ...]) -> int | None:
        return self.lines.line(key)

    def did_not_read(self, *keys: tuple[str, ...]) -> bool:
        """Whether any of these tables, or a table that holds it, is written but did not read."""
        return any(key[:n] in self.unread for key in keys for n in range(1, len(key) + 1))

    def written(self, key: tuple[str, ...]) -> bool:
        """Whether the file sets this very key."""
        return self.lines.has(key)

    # -- values -------------------------------------------------------------------------------------

    def value(self, key: tuple[str, ...], raw: Any, f) -> tuple[bool, Any]:
        """Check one value against its field; returns (ok, converted value)."""
        kind: str = f.metadata["type"]
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        expected = schema.TYPES[kind]
        if raw is None and optional:
            return True, None
        off = f.metadata.get("off")
        if off is not None and raw == off and type(raw) is not bool:  # 0 is not false
            return True, None  # how a subject turns off what [train] gives it
        ok = True
        value = raw
        if kind == "str":
            ok = isinstance(raw, str)
        elif kind == "int":
            ok = isinstance(raw, int) and not isinstance(raw, bool)
        elif kind == "float":
            ok = isinstance(raw, (int, float)) and not isinstance(raw, bool)
            value = float(raw) if ok else raw
        elif kind == "bool":
            ok = isinstance(raw, bool)
        elif kind == "prompts":
            if raw == []:
                self.problem(key, "names no prompt", f'give one or more, e.g. {f.name} = "a photo of dog"')
                return False, raw
            ok = isinstance(raw, str) or (isinstance(raw, list) and all(isinstance(x, str) for x in raw))
            value = list(raw) if isinstance(raw, list) else raw
        elif kind == "switch":
            ok = isinstance(raw, bool) or raw == "auto"
        elif kind == "targets" and isinstance(raw, str):
            if raw not in schema.TARGET_PRESETS:
                close = difflib.get_close_matches(raw, schema.TARGET_PRESETS, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                self.problem(
                    key,
                    f"'{raw}' is not a preset ({', '.join(schema.TARGET_PRESETS)})",
                    f"{hint}{'or give' if hint else 'give'} a list of module names, "
                    f"e.g. {f.name} = {example_list(f)}",
                )
                return False, raw
        elif kind in ("list[str]", "list[int]", "targets"):
            item = int if kind == "list[int]" else str
            ok = isinstance(raw, list) and all(isinstance(x, item) and not isinstance(x, bool) for x in raw)
            if ok and not raw and f.metadata.get("empty_is_none"):
                return True, None
            if ok and not raw:
                self.problem(
                    key, "must not be empty", f"give at least one value, e.g. {f.name} = {example(f)}"
                )
                return False, raw
            value = list(raw) if ok else raw
        elif kind == "weights":
            number = lambda w: isinstance(w, (int, float)) and not isinstance(w, bool)  # noqa: E731
            wrong = [(name, w) for name, w in raw.items() if not number(w)] if isinstance(raw, dict) else []
            if wrong:  # the table is right, one weight is not: "got a table" would not tell which
                name, w = wrong[0]
                self.problem(
                    key,
                    f"the weight of {name} must be a number, got {describe(w)}",
                    f"e.g. {f.name} = {example(f)}",
                )
                return False, raw
            ok = isinstance(raw, dict)
            if ok and not raw and f.metadata.get("empty_is_none"):
                return True, None
            if ok and not raw:
                self.problem(key, "names no adapter", "e.g. adapters = { dog = 1.0, toy = 0.8 }")
                return False, raw
            value = tuple((name, float(w)) for name, w in raw.items()) if ok else raw
        if not ok:
            self.problem(
                key, f"expected {expected}, got {describe(raw)}", f"e.g. {f.name} = {example(f, raw)}"
            )
            return False, raw
        texts = value if isinstance(value, list) else [value]
        if any(isinstance(text, str) and "\x00" in text for text in texts):
            # no path can hold one (the OS refuses it), and no prompt or name means one
            self.problem(key, "holds a NUL character (\\u0000)", "remove it")
            return False, value
        if f.name in PATH_KEYS and isinstance(value, str) and (too_long := _too_long(value)):
            # the OS refuses to look such a path up at all (ENAMETOOLONG), where a missing one is said
            self.problem(key, too_long, "shorten it")
            return False, value
        choices = f.metadata.get("choices")
        if choices and isinstance(f.metadata.get("off"), str):
            choices = (*choices, f.metadata["off"])  # log = "none"
        if choices and value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            self.problem(key, f"'{value}' is not one of {', '.join(map(str, choices))}", f"{hint}".strip())
            return False, value
        if not self._in_range(key, value, f):
            return False, value
        if (unusable := _unusable_number(value)) is not None:
            self.problem(key, unusable, f"e.g. {f.name} = {example(f)}")
            return False, value
        return True, value

    def _in_range(self, key, value, f) -> bool:
        """Whether `value` (each number of it) is within field `f`'s minimum, maximum and multiple; a
        problem where it is not, whose fix is the nearest multiple (`width = 104` for 100), or else an example
        (the nearest bound can be a value no one means: `caption_dropout = 1` drops every prompt)."""
        meta = f.metadata
        minimum, maximum, multiple = meta.get("minimum"), meta.get("maximum"), meta.get("multiple")
        for number in value if isinstance(value, list) else [value]:
            if not isinstance(number, (int, float)):
                continue
            if minimum is not None and number < minimum:
                wrong, fix = f"must be at least {minimum}, got {number}", example(f)
            elif maximum is not None and number > maximum:
                wrong, fix = f"must be at most {maximum}, got {number}", example(f)
            elif multiple is not None and number % multiple:
                wrong, fix = f"must be a multiple of {multiple}, got {number}", nearest(value, meta)
            else:
                continue
            self.problem(key, wrong, f"e.g. {f.name} = {fix}")
            return False
        return True

    def table(self, key: tuple[str, ...], raw: Any, cls, base=None, extra: dict | None = None, nested=()):
        """Read a TOML table into dataclass `cls`, on top of `base` (an instance) when given."""
        if not isinstance(raw, dict):
            self.problem(key, f"expected a table, got {describe(raw)}", f"write it as [{'.'.join(key)}]")
            return None
        known = {f.name: f for f in schema.keys_of(cls)}
        values: dict[str, Any] = {}
        ok = True
        meant: set[str] = set()  # the keys an unknown one is taken for (`imagse`: did you mean 'images'?)
        for name, item in raw.items():
            if name in nested:
                continue
            f = known.get(name)
            if f is None:
                meant.add(self._unknown(key, name, list(known) + list(nested)))
                ok = False
                continue
            good, value = self.value(key + (name,), item, f)
            ok &= good
            values[name] = value
        if base is None:
            for name, f in known.items():
                if schema.is_required(f) and name not in raw and name not in meant:  # said once
                    where = f" under [{'.'.join(key)}]" if key and not raw else ""  # an empty file, say
                    self.problem(
                        key,
                        f"missing required key '{name}' ({f.metadata['doc']})",
                        f"add {name} = ...{where}",
                    )
                    ok = False
        if not ok:
            return None
        if base is not None:
            return replace(base, **values)
        return cls(**(extra or {}), **values)

    def _unknown(self, key: tuple[str, ...], name: str, known: list[str]) -> str | None:
        """Report the unknown key `name`; returns the known key it is taken for, if any."""
        close = difflib.get_close_matches(name, known, n=1)
        fix = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
        if (home := schema.home_of(key, name)) is not None:
            fix = f"it belongs in [{'.'.join(home)}]: move it there"
        dotted = tuple(name.split("."))
        if len(dotted) > 1 and dotted[0] in known:  # ["subjects.dog"]: a quoted header is one name
            fix = f"the quotes make it one name; without them it names {dotted[-1]} in [{'.'.join(key + dotted[:-1])}]"
            self.unread.add(key + dotted)  # a reference to subjects.dog is not another problem
        self.problems.append(
            Problem(".".join(key), f"unknown key '{name}'", self.lines.line(key + (name,)), fix)
        )
        return close[0] if fix.startswith("did you mean") else None


# The keys whose value names a file or folder (a hub id, for base_model, names a cache folder) or, for a
# caption extension, ends one.
PATH_KEYS = ("images", "out", "base_model", "base_model_config", "caption_extension")


def _too_long(path: str) -> str | None:
    """What makes `path` longer than any file system allows, or None."""
    if len(path.encode()) > PATH_MAX:
        return f"is {len(path.encode())} bytes long; a path holds {PATH_MAX} at most"
    for name in re.split(r"[/\\]", path):
        if len(name.encode()) > NAME_MAX:
            return f"holds a name of {len(name.encode())} bytes ('{name[:20]}...'); a file or folder name holds {NAME_MAX} at most"
    return None


def _unusable_number(value: Any) -> str | None:
    """What is wrong with the first number in `value` (a number, a list, or (name, weight) pairs) that
    TOML reads but no lockfile or fingerprint can hold: nan, inf, an integer beyond 64 bits."""
    if isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, tuple):  # (adapter, weight)
                if (problem := _unusable_number(item[1])) is not None:
                    return f"the weight of {item[0]} {problem}"
            elif (problem := _unusable_number(item)) is not None:
                return problem
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and not schema.INT64[0] <= value <= schema.INT64[1]:
        return f"must fit in 64 bits, got {value}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    return None


def load_project(path: Path | str) -> schema.Project:
    """Load and validate a project file. Raises ProjectError listing every problem found."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.toml") if p.name != "pyproject.toml")
        fix = f"name one of: {', '.join(inside)}" if inside else "run `dbl init` in it to start one"
        raise ProjectError(path, [Problem("", "a folder, not a project file", None, fix)])
    if not path.is_file():
        if path.exists():  # /dev/null, a named pipe, a socket: nothing a build could read again unchanged
            raise ProjectError(path, [Problem("", "not a regular file", None, "name a project file (.toml)")])
        raise ProjectError(path, [Problem("", "no such project file", None, "run `dbl init` to start one")])
    text = read_text(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProjectError(path, syntax_problems(text, exc)) from None
    return _validate(path.resolve(), text, data)


def _validate(path: Path, text: str, data: dict) -> schema.Project:
    check = _Checker(path, text)
    kinds = steps.kinds()
    top_level = list(schema.TABLES) + [k.table for k in kinds if k.table]
    for key in data:
        if key not in top_level:
            check._unknown((), key, top_level)

    settings = check.table(("project",), data.get("project", {}), schema.ProjectSettings)
    train = check.table(("train",), data.get("train", {}), schema.TrainSettings)
    lora = check.table(("lora",), data.get("lora", {}), schema.LoraSettings)
    check.unread.update((key,) for key, table in (("train", train), ("lora", lora)) if table is None)
    train, lora = train or schema.TrainSettings(), lora or schema.LoraSettings()
    defaults = Defaults(path.parent, train, lora)
    checks.check_settings(check, None, train)

    tables = {}
    for kind in kinds:
        if kind.derive is not None:
            tables[kind.name] = kind.derive(tables)
            continue
        if kind.read is not None:
            read = lambda key, name, raw, kind=kind: kind.read(check, key, name, raw, defaults)  # noqa: E731
        else:
            read = lambda key, name, raw, kind=kind: check.table(key, raw, kind.spec, extra={"name": name})  # noqa: E731
        tables[kind.name] = _named(check, data, kind.table, read)
    if settings is not None:
        check.base_model = settings.base_model
        check_base_model(check, path.parent, settings, data)
        checks.check_out(check, path.parent, settings, tables)
    checks.check_name_lengths(check, tables)
    for kind in kinds:
        if kind.check is not None:
            kind.check(check, tables)

    if check.problems or settings is None:
        raise ProjectError(path, check.problems)
    for note in check.notes:
        warnings.warn(f"{display(path)}: {note}", stacklevel=3)
    return schema.Project(path, settings, train, lora, tables, Source(display(path), check.lines))


@dataclass(frozen=True)
class Defaults:
    """What a table reader may need besides its own table: the project folder and the [train] and
    [lora] defaults."""

    project_dir: Path
    train: schema.TrainSettings
    lora: schema.LoraSettings


def _named(check: _Checker, data: dict, group: str, read) -> dict:
    """Read the tables of one group ([subjects.*] ...), checking their names."""
    raw = data.get(group, {})
    if not isinstance(raw, dict):
        fix = (
            f"name each in its header, e.g. [{group}.dog] in place of [[{group}]]"
            if _tables_array(raw)
            else ""
        )
        check.problem((group,), f"expected tables [{group}.<name>], got {describe(raw)}", fix)
        check.unread.add((group,))
        return {}
    result, loose = {}, []
    for name, table in raw.items():
        key = (group, name)
        if not NAME.match(name):
            check.problem(
                key, f"name '{name}' may only hold letters, digits, '_' and '-'", "rename the table"
            )
            check.unread.add(key)
            continue
        if _tables_array(table):  # [[subjects.dog]], as pyproject.toml's [[tool...]]: a list of tables
            check.problem(key, f"expected a table, got {describe(table)}", f"write it as [{group}.{name}]")
            check.unread.add(key)
            continue
        if not isinstance(table, dict):  # `[priors]` then `class_prompt = ...`: the table's name left out
            loose.append(name)
            check.unread.add(key)
            continue
        item = read(key, name, table)
        if item is not None:
            result[name] = item
        else:
            check.unread.add(key)
            check.unread_tables[key] = table
    _case_twins(check, group, [name for name in raw if NAME.match(name)])
    for name in raw:
        if name.lower() in WINDOWS_RESERVED:
            check.note(
                (group, name),
                f"'{name}' is a device name on Windows, where no folder can have it: its outputs could not "
                "be written there",
                "rename it",
            )
    if loose:
        check.problem(
            (group, loose[0]),
            f"[{group}] holds one table per name, not keys: {', '.join(loose)}",
            f"name the table in its header, e.g. [{group}.dog] in place of [{group}]",
        )
        # the table whose name was left out is unread: a reference to it (prior = "dog") is no other problem
        check.unread.add((group,))
    return result


def _tables_array(raw: Any) -> bool:
    """Whether `raw` is what a [[header]] makes: a list of tables."""
    return isinstance(raw, list) and bool(raw) and all(isinstance(item, dict) for item in raw)


def _case_twins(check: _Checker, group: str, names: list[str]) -> None:
    """Warn of names that differ only in case: valid, and built apart where file names keep case (a
    lockfile may hold them), but their steps write one output folder on macOS and Windows."""
    first: dict[str, str] = {}
    for name in names:
        twin = first.setdefault(name.lower(), name)
        if twin != name:
            check.note(
                (group, name),
                f"'{name}' differs only in case from {group}.{twin}, whose table is at line "
                f"{check.lines.line((group, twin))}: "
                "on macOS and Windows, whose file names ignore case, both would write one output folder",
                "rename one of them",
            )
