"""Declaring project-file keys, and reading the declarations back: defaults, fingerprints, records.

`opt` declares one key of a schema dataclass (runner.project.schema). A field's metadata holds:

- `doc`: one line for the README and for error messages;
- `type`: what the TOML value must be (see `schema.TYPES`);
- `choices`: the allowed values, if the set is closed;
- `minimum`, `maximum`: the allowed range of a number (of every item, for a list), if bounded;
- `multiple`: what a number must be a multiple of (a size in pixels: 8, the VAE's factor), if anything;
- `example`: a value to suggest in a fix, for a key whose default (None, off) suggests nothing;
- `fingerprint`: False for settings that do not change a step's result (display, checkpointing);
- `omit_default`: True for keys added after the first release: they are fingerprinted only when set
  away from their default, so that the steps of existing projects keep their fingerprints (and their
  dbl.json records) and are not rebuilt.
"""

from __future__ import annotations

from dataclasses import MISSING, field, fields, is_dataclass
from typing import Any


def opt(
    default: Any = MISSING,
    doc: str = "",
    type: str = "str",
    choices=None,
    minimum=None,
    fingerprint=True,
    maximum=None,
    omit_default=False,
    multiple=None,
    empty_is_none=False,
    off=None,
    example=None,
):
    """Declare a project-file key. Without a default the key is required. `empty_is_none`: an empty list
    reads as the key's default, None (how a subject turns off a list [train] gives it); so does the
    value `off` (0, "none") of a key whose default is None."""
    meta = {
        "doc": doc,
        "type": type,
        "choices": choices,
        "minimum": minimum,
        "maximum": maximum,
        "multiple": multiple,
        "fingerprint": fingerprint,
        "omit_default": omit_default,
        "empty_is_none": empty_is_none,
        "off": off,
        "example": example,
    }
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


def keys_of(cls) -> list:
    """The user-facing fields of a schema dataclass (those that carry docs)."""
    return [f for f in fields(cls) if "doc" in f.metadata]


def is_required(f) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def default_of(f):
    """The default value of a schema field (MISSING for a required one)."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


def at_default(f, value) -> bool:
    """Whether `value` is the field's default and the field is left out of fingerprints there."""
    return bool(f.metadata.get("omit_default")) and value == default_of(f)


def fingerprinted_fields(obj) -> dict:
    """The fingerprinted settings of a schema dataclass, as plain data; unset (None) ones left out,
    as the lockfile's TOML cannot hold them, and so are keys added later while at their default."""
    result = {}
    for f in keys_of(type(obj)):
        value = getattr(obj, f.name)
        if f.metadata.get("fingerprint", True) and value is not None and not at_default(f, value):
            result[f.name] = _plain(value)
    return result


def record(obj) -> dict:
    """Every setting of a schema dataclass as plain data (for dbl.json), less the keys added later
    while at their default: an adapter trained with the old settings gets the same record."""
    return {
        f.name: _plain(getattr(obj, f.name)) for f in fields(obj) if not at_default(f, getattr(obj, f.name))
    }


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if is_dataclass(value):
        return fingerprinted_fields(value)
    return value
