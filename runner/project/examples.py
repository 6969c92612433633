"""Example values for the fixes of project-file problems: `e.g. steps = 800`, a value each field's own
checks accept, and how a wrong value reads (`got the string 'many'`)."""

from __future__ import annotations

import datetime
import math
from dataclasses import MISSING
from typing import Any

from runner.project import schema


def describe(raw: Any) -> str:
    """How a value of the wrong kind reads in a problem: `the string 'many'`, `a list of strings and
    integers`, `the date 2024-01-02`."""
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, str):
        if len(raw) > _LONGEST:  # a pasted paragraph: its start tells which value it is
            return f"the string {raw[:_LONGEST]!r}... ({len(raw)} characters)"
        return f"the string {raw!r}"
    if isinstance(raw, dict):
        return "a table"
    if isinstance(raw, list):
        # "a list" alone, where a list of another kind is expected, does not tell what is wrong with it
        kinds = list(dict.fromkeys(_kind(item) for item in raw))
        if not kinds:
            return "an empty list"
        return (
            f"a list of {', '.join(kinds[:-1])} and {kinds[-1]}"
            if len(kinds) > 1
            else f"a list of {kinds[0]}"
        )
    if isinstance(raw, (datetime.date, datetime.time)):  # TOML's dates and times (datetime is a date)
        what = "the date and time" if isinstance(raw, datetime.datetime) else f"the {type(raw).__name__}"
        return f"{what} {raw.isoformat()}"
    return f"{type(raw).__name__} {raw!r}"


_LONGEST = 60


def _kind(item: Any) -> str:
    """The kind of a list's item, in the plural: strings, integers, lists ..."""
    if isinstance(item, bool):
        return "booleans"
    if isinstance(item, (datetime.date, datetime.time)):
        return "dates and times"
    return {str: "strings", int: "integers", float: "floats", list: "lists", dict: "tables"}.get(
        type(item), type(item).__name__
    )


def example_list(f) -> str:
    """The field's default list as TOML, else a placeholder."""
    default = schema.default_of(f)
    names = default if isinstance(default, list) else ["..."]
    return "[" + ", ".join(f'"{n}"' for n in names) + "]"


# A placeholder of each kind, for a field with no default and no choices.
_PLACEHOLDERS = {
    "str": '"..."',
    "int": "64",
    "float": "1.0",
    "bool": "true",
    "list[str]": '["..."]',
    "list[int]": "[0, 1]",
    "weights": "{ dog = 1.0 }",
    "targets": '"attention"',
    "switch": '"auto"',
    "prompts": '"a photo of dog"',
}


def example(f, raw: Any = None) -> str:
    """A value of field `f`, as TOML, that the field's own checks accept: the number a string `raw`
    spells ("512" for an integer), else the field's default (not for a bool), else the example it
    declares, else its first choice, else a placeholder of its kind moved into its range."""
    kind, meta = f.metadata["type"].rstrip("?"), f.metadata
    # A switch's default is rarely what a user who wrote one meant: `use_dora = 1` means true.
    default = None if kind == "bool" else schema.default_of(f)
    for value in (_spelled(kind, raw), default, meta.get("example"), *(meta.get("choices") or ())):
        if _fits(kind, meta, value):
            return _toml(value)
    if kind == "int":
        return _toml(_into_range(64, meta))
    if kind == "float":
        return _toml(float(_into_range(1.0, meta)))
    if kind == "list[int]":
        first = _into_range(0, meta)
        return _toml([first, _into_range(first + (meta.get("multiple") or 1), meta)])
    return _PLACEHOLDERS[kind]


def _spelled(kind: str, raw: Any) -> Any:
    """What a value of the wrong kind most likely meant: the number (or boolean) a string spells, a whole
    float as an integer, one value for a list of them, a list's one string for a string; else None."""
    if kind == "list[int]" and not isinstance(raw, list):
        one = _spelled("int", raw) if not isinstance(raw, int) or isinstance(raw, bool) else raw
        return None if one is None else [one]
    if kind == "list[str]" and isinstance(raw, str):
        return [raw]
    if kind == "str" and isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
        return raw[0]
    if kind == "int" and isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if not isinstance(raw, str):
        return None
    text = raw.strip()
    if kind == "bool":
        return {"true": True, "false": False}.get(text.lower())
    if kind in ("int", "float"):
        try:
            return int(text) if kind == "int" else float(text)
        except ValueError:
            return None
    return None


def _fits(kind: str, meta: dict, value: Any) -> bool:
    """Whether `value` passes the checks of a field of this kind and metadata (scalars and int lists)."""
    if value is None or value is MISSING:
        return False
    numeric = (int,) if kind in ("int", "list[int]") else (int, float)
    if kind in ("int", "float"):
        ok = isinstance(value, numeric) and not isinstance(value, bool) and math.isfinite(value)
        # `rank = 1e300` spells a whole number, but none that a lockfile can hold
        ok = ok and (not isinstance(value, int) or schema.INT64[0] <= value <= schema.INT64[1])
    elif kind == "list[int]":
        ok = isinstance(value, list) and bool(value)
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    elif kind == "list[str]":
        ok = isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "str":
        ok = isinstance(value, str)
    elif kind == "switch":
        ok = isinstance(value, bool) or value == "auto"
    else:
        return False
    if not ok or (meta.get("choices") and value not in meta["choices"]):
        return False
    return all(_into_range(v, meta) == v for v in (value if isinstance(value, list) else [value]))


def nearest(value, meta: dict) -> str:
    """`value` (a number, or a list of them) moved into the field's range, as TOML: the fix to suggest."""
    if isinstance(value, list):
        return _toml([_into_range(v, meta) for v in value])
    return _toml(_into_range(value, meta))


def _into_range(number, meta: dict):
    """`number` moved to the nearest value within the field's minimum, maximum and multiple."""
    if not isinstance(number, (int, float)) or isinstance(number, bool):
        return number
    low, high, multiple = meta.get("minimum"), meta.get("maximum"), meta.get("multiple")
    if low is not None:
        number = max(number, low)
    if multiple:
        number = -(-number // multiple) * multiple
    if high is not None:
        number = min(number, high)
    return number


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)
