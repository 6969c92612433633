"""The lockfile `<stem>.lock`: what was built, from which inputs, with which outputs.

TOML, deterministic (sorted keys, relative paths), one table per step, schema version at the top,
written atomically (temp file, fsync, rename) after every step.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LOCK_VERSION = 1
HEADER = "# Written by dbl build. Commit it: it records what was built, from what.\n"


class LockfileError(Exception):
    """A lockfile that cannot be read; the message says how to recover."""


def lock_path(project_path: Path) -> Path:
    return project_path.with_suffix(".lock")


def read(path: Path) -> dict[str, dict]:
    """The step records of a lockfile, {step id: record}; empty when there is none yet."""
    if not path.exists():
        return {}
    recover = (
        "move it aside (or delete it) and run `dbl build`: steps whose outputs are in the run-cache "
        "are restored, not rerun"
    )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise LockfileError(f"{path}: cannot read the lockfile ({exc}); {recover}") from None
    version = data.get("version")
    if version != LOCK_VERSION:
        raise LockfileError(
            f"{path}: lockfile version {version!r}, this dbl reads version {LOCK_VERSION}; {recover}"
        )
    steps = data.get("steps", {})
    if not isinstance(steps, dict) or not all(_valid_record(r) for r in steps.values()):
        raise LockfileError(f"{path}: malformed step records; {recover}")
    return steps


def read_text_records(text: str) -> dict[str, dict]:
    """The step records of lockfile text (for tools and tests comparing two versions)."""
    return tomllib.loads(text).get("steps", {})


def _valid_record(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("fingerprint"), str)
        and isinstance(record.get("output_hash"), str)
        and isinstance(record.get("outputs", {}), dict)
        and all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str)
            for v in record.get("outputs", {}).values()
        )
    )


def write(path: Path, steps: dict[str, dict]) -> None:
    """Write the lockfile atomically: a crash leaves the old file or the new one, never half of one."""
    text = HEADER + dumps({"version": LOCK_VERSION, "steps": steps})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- a small deterministic TOML writer for the lockfile's data --------------------------------------


def _key(key: str) -> str:
    if key and all(c.isalnum() or c in "_-" for c in key):
        return key
    return json.dumps(key, ensure_ascii=False)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in sorted(value.items())) + " }"
            if value
            else "{}"
        )
    if value is None:
        raise TypeError("TOML has no null: leave the key out")
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _is_leaf_table(value: dict) -> bool:
    # Small flat tables (one output file's sha256 and size) read best inline, one per line.
    return all(not isinstance(v, dict) for v in value.values()) and len(value) <= 3


def dumps(data: dict, prefix: tuple[str, ...] = ()) -> str:
    """TOML text for nested dicts of strings, numbers, booleans and lists; None values are dropped."""
    lines, tables = [], []
    for key in sorted(data):
        value = data[key]
        if value is None:
            continue
        if isinstance(value, dict) and not (prefix and _is_leaf_table(value) and value):
            tables.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    out = "\n".join(lines)
    for key, value in tables:
        path = prefix + (key,)
        body = dumps(value, path)
        header = "[" + ".".join(_key(k) for k in path) + "]"
        out += ("\n\n" if out else "") + header + ("\n" + body.rstrip("\n") if body.strip() else "")
    return out + ("\n" if not prefix else "")
