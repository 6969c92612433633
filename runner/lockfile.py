"""The lockfile `<stem>.lock`: what was built, from which inputs, with which outputs.

TOML, deterministic (sorted keys, relative paths), one table per step, schema version at the top,
written atomically (temp file, fsync, rename) after every step.

Each step record carries its own `digest`: the sha256 of the record's canonical JSON without the
digest. A text merge of two lockfiles (git's union merge, a hand edit) that mixes the lines of two
records leaves a record whose digest does not match; such a record is reported and treated as
absent, so the build restores or reruns its step instead of trusting it. Records without a digest
(written before digests existed) are read as they are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import marshal
import math
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any, TypedDict

from runner import lockmemo, tempnames
from runner.errors import DblError
from runner.project.lines import conflict_marker

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LOCK_VERSION = 1
HEADER = "# Written by dbl build. Commit it: it records what was built, from what.\n"


class LockfileError(DblError):
    """A lockfile that cannot be read; the message says how to recover."""


class NewerLockfileError(LockfileError):
    """A lockfile of a later version than this dbl reads: a teammate's newer dbl wrote it, and moving it
    aside and building would replace their records."""

    def __init__(self, shown: str, version: int):
        super().__init__(
            f"{shown}: written by a newer dbl (lockfile version {version}; this dbl reads version "
            f"{LOCK_VERSION}): upgrade dbl to the version that wrote it"
        )


class LockfileWarning(UserWarning):
    """Step records of a lockfile that were set aside (their digest does not match)."""

    def __init__(self, message: str, steps: list[str] | None = None):
        super().__init__(message)
        self.steps = steps or []  # their ids


class OutputFile(TypedDict):
    sha256: str
    size: int


class Record(TypedDict, total=False):
    """One step's table in the lockfile: its keys, named here once (`record()` makes one)."""

    kind: str  # the step kind ("train")
    fingerprint: str  # hash of `inputs`, display-only keys left out
    output_hash: str  # hash of the step's outputs as the run-cache holds them: what downstream keys on
    inputs: dict  # the inputs that made it, readable (a diff in review explains a rebuild)
    outputs: dict[str, OutputFile]  # path relative to the project file -> sha256 and size
    metrics: dict  # what the step reported (losses, relative errors ...)
    built: str  # when it ran, UTC, ISO 8601
    duration_s: float  # how long it ran
    digest: str  # sha256 of the record without this key (see record_digest)


def record(
    kind: str,
    fingerprint: str,
    output_hash: str,
    inputs: dict,
    outputs: dict[str, OutputFile],
    metrics: dict,
    built: str,
    duration_s: float,
) -> Record:
    """A step record as the lockfile holds it (its digest is added when the lockfile is written)."""
    return Record(
        kind=kind,
        fingerprint=fingerprint,
        output_hash=output_hash,
        inputs=inputs,
        outputs=outputs,
        metrics=metrics,
        built=built,
        duration_s=duration_s,
    )


# The top-level keys of a lockfile; uv.lock and Cargo.lock, TOML too, hold others.
_KEYS = {"version", "steps"}


def foreign(path: Path) -> bool:
    """Whether the .lock file at `path` is another tool's (uv.lock, Cargo.lock, poetry.lock, yarn.lock, a
    folder some tools make as a lock), which may lie beside a project file, or reach the merge driver
    through `*.lock merge=dbl`. One that cannot be read is not: reading it as a lockfile says why."""
    if not path.is_file():
        return True
    try:
        return foreign_text(path.read_text(encoding="utf-8-sig", errors="replace"))
    except OSError:
        return False


def foreign_text(text: str) -> bool:
    """Whether a .lock file's text is another tool's: TOML with other top-level keys, or text that is not
    TOML and does not hold dbl's header. An empty file (git's stand-in for a side without the file) is not."""
    if not text.strip() or HEADER in text:
        return False
    try:
        return not set(tomllib.loads(text)) <= _KEYS
    except tomllib.TOMLDecodeError:
        return True


def lock_path(project_path: Path) -> Path:
    return project_path.with_suffix(".lock")


RECOVER = (
    "move it aside (or delete it) and run `dbl build`: steps whose outputs are in the run-cache "
    "are restored, not rerun"
)


def read(
    path: Path, label: str | None = None, recover: str | None = None, memo: Path | None = None
) -> dict[str, Record]:
    """The step records of a lockfile, {step id: record}; empty when there is none yet.

    Messages name the file `label` (default: its path) and end an error with `recover` (default: how to
    resolve a merge conflict git left in it, or else RECOVER). `memo`: where the parse of its text is kept
    (runner.lockmemo), so that an unchanged lockfile is not parsed again."""
    if not path.exists():
        return {}
    shown = label or str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
        known = lockmemo.recall(memo, text) if memo is not None else None
        if known is not None:
            _warn_rejected(shown, known["rejected"])
            return known["steps"]
        data = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        conflict = _conflict(text) if isinstance(exc, tomllib.TOMLDecodeError) else None
        if conflict is None:
            raise LockfileError(f"{shown}: cannot read the lockfile ({exc}); {recover or RECOVER}") from None
        raise LockfileError(
            f"{shown}: cannot read the lockfile: {conflict}; {recover or _resolve(shown, path)}"
        ) from None
    recover = recover or RECOVER
    version = data.get("version")
    if type(version) is int and version > LOCK_VERSION:
        raise NewerLockfileError(shown, version)
    if version != LOCK_VERSION:
        raise LockfileError(
            f"{shown}: lockfile version {version!r}, this dbl reads version {LOCK_VERSION}; {recover}"
        )
    steps = data.get("steps", {})
    if not isinstance(steps, dict):
        raise LockfileError(f"{shown}: malformed step records; {recover}")
    referenced = _fingerprints(steps)
    steps, rejected = checked_records(steps)
    if not all(_valid_record(r) for r in steps.values()):
        raise LockfileError(f"{shown}: malformed step records; {recover}")
    if memo is not None:
        lockmemo.remember(memo, text, steps, rejected, referenced)
    _warn_rejected(shown, rejected)
    return steps


def _warn_rejected(shown: str, rejected: list[str]) -> None:
    if rejected:
        warnings.warn(
            LockfileWarning(
                f"{shown}: the record of {', '.join(rejected)} does not match its digest (a text merge "
                f"or a hand edit mixed it up); treated as not built: `dbl build` restores or reruns "
                f"{'it' if len(rejected) == 1 else 'them'}",
                rejected,
            ),
            stacklevel=3,
        )


def _conflict(text: str) -> str | None:
    """'unresolved merge conflict (line 57: `<<<<<<< HEAD`)' where git left one in a lockfile's text."""
    if (found := conflict_marker(text)) is None:
        return None
    line, marker = found
    return f"unresolved merge conflict (line {line}: `{marker}`)"


def _resolve(path: str, file: Path) -> str:
    """How to resolve a merge conflict in the lockfile `file` (shown as `path`): record by record, with what
    dbl's merge driver still lacks here, or by taking one side."""
    from runner.merge import driver_setup

    setup = driver_setup(file)
    if setup is None:
        merge = f"merge it record by record with dbl's merge driver, set up here: `git checkout -m {path}`"
    elif setup[0]:  # half set up: what is missing, and the command that adds it
        merge = f"{setup[0]}; to merge it record by record, run {setup[1]}, then `git checkout -m {path}`"
    else:
        merge = f"merge it record by record: {setup[1]} and run `git checkout -m {path}`"
    return (
        f"{merge}; or take one side: `git checkout --ours {path}`; then `dbl build` restores or reruns "
        "what the merged project file needs"
    )


def record_kind(sid: str, record: dict) -> str:
    """The step kind of the record of step `sid`: its `kind`, else the id's prefix (`render:park`)."""
    return record.get("kind") or sid.partition(":")[0]


def take_names(record: dict, inputs: dict) -> bool:
    """Give a record of these very inputs (the same fingerprint) their current names (display keys:
    `_folder`, `_name`), where a name it holds has changed; whether it did. A display key the record
    lacks, one added since it was written, rewrites nothing: a previous version's lockfile stays as it is."""
    if not _names_changed(record.get("inputs", {}), inputs):
        return False
    record["inputs"] = inputs
    return True


def _names_changed(old, new) -> bool:
    if isinstance(old, dict) and isinstance(new, dict):
        return any(
            k in new and ((k.startswith("_") and old[k] != new[k]) or _names_changed(old[k], new[k]))
            for k in old
        )
    if isinstance(old, list) and isinstance(new, (list, tuple)):
        return any(_names_changed(o, n) for o, n in zip(old, new, strict=False))
    return False


def record_digest(record: dict) -> str:
    """The sha256 of a step record's canonical JSON, its own digest left out.

    Canonical as `fingerprint.canonical_json` writes it, except that NaN is allowed: a train step
    whose loss diverged records it among its metrics.
    """
    body = _without_none({k: v for k, v in record.items() if k != "digest"})
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def checked_records(steps: dict) -> tuple[dict[str, dict], list[str]]:
    """(records whose digest matches or that have none, ids of those whose digest does not match).

    The digests are taken off the records returned: `write` puts fresh ones on.
    """
    kept, rejected = {}, []
    for sid, record in steps.items():
        if not _written_by_dbl(record):  # a hand edit's bare date (`built = 2026-12-04T02:01:57Z`)
            rejected.append(sid)
            continue
        if isinstance(record, dict) and "digest" in record:
            record = dict(record)
            if record.pop("digest") != record_digest(record):
                rejected.append(sid)
                continue
        kept[sid] = record
    return kept, sorted(rejected)


def _written_by_dbl(value: Any) -> bool:
    """Whether `value` holds only what dbl writes: tables, arrays, strings, numbers and booleans (no TOML
    date or time, which no record has and JSON cannot hold)."""
    if isinstance(value, dict):
        return all(_written_by_dbl(v) for v in value.values())
    if isinstance(value, list):
        return all(_written_by_dbl(v) for v in value)
    return isinstance(value, (str, int, float, bool))


def _without_none(value: Any) -> Any:
    # What the TOML writer leaves out must be left out of the digest too.
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_without_none(v) for v in value]
    return value


def referenced_fingerprints(path: Path, memo: Path | None = None) -> set[str]:
    """Every fingerprint a lockfile's records name, those whose digest does not match included (the
    run-cache entry of such a record is what restores it). Raises LockfileError like `read`. `memo`: as
    for `read`."""
    if not path.exists():
        return set()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LockfileError(f"{path}: cannot read the lockfile ({exc})") from None
    return fingerprints_in(text, str(path), memo)


def fingerprints_in(text: str, shown: str, memo: Path | None = None) -> set[str]:
    """`referenced_fingerprints` of a lockfile's text; errors name it `shown`. A text `read` kept the parse
    of in `memo` is not parsed again (one that parsed has no error to name)."""
    if memo is not None and (known := lockmemo.recall(memo, text.removeprefix("\ufeff"))) is not None:
        return set(known["referenced"])
    try:
        data = tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as exc:
        if (conflict := _conflict(text)) is not None:
            raise LockfileError(f"{shown}: cannot read the lockfile: {conflict}") from None
        raise LockfileError(f"{shown}: cannot read the lockfile ({exc})") from None
    steps = data.get("steps", {})
    if type(data.get("version")) is int and data["version"] > LOCK_VERSION:
        raise NewerLockfileError(shown, data["version"])
    if data.get("version") != LOCK_VERSION or not isinstance(steps, dict):
        raise LockfileError(f"{shown}: not a lockfile of version {LOCK_VERSION}")
    return _fingerprints(steps)


def _fingerprints(steps: dict) -> set[str]:
    return {
        r["fingerprint"]
        for r in steps.values()
        if isinstance(r, dict) and isinstance(r.get("fingerprint"), str)
    }


def read_text_records(text: str) -> dict[str, dict]:
    """The step records of lockfile text (for tools and tests comparing two versions), as `read`
    gives them: without their digests, and without the records whose digest does not match."""
    return checked_records(tomllib.loads(text).get("steps", {}))[0]


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


def drop_leftover_temps(path: Path) -> None:
    """Remove the temp files of the lockfile `path` that builds killed while writing it left beside it
    (only this host's, of processes that are gone): `git add -A` would commit them. Called by a build
    under its lock."""
    tempnames.drop_left_files(path.parent, f".{path.name}.tmp-")  # not a glob: pets[1].toml is a name


def write(path: Path, steps: dict[str, dict]) -> None:
    """Write the lockfile atomically: a crash leaves the old file or the new one, never half of one."""
    text = HEADER + _text(steps)
    tmp = path.with_name(f".{path.name}.tmp-{tempnames.suffix()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A full disk or an interrupt: leave no half-written temp file beside the project file.
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


# Each record's TOML text as the last write made it, by the record's content: a build writes the lockfile
# after every step, and all records but that step's are as they were, so a write formats one record, not
# all of them (formatting them all made a build of many steps quadratic).
_made: dict[bytes, tuple[str, bool]] = {}


def _text(steps: dict[str, dict]) -> str:
    """The lockfile's text: `dumps` of the version and the records, each with its digest (computed afresh:
    a stale one is never carried over); what the last write formatted is reused."""
    global _made
    made, inline, tables = {}, [], []
    for sid in sorted(steps):
        key = _record_key(sid, steps[sid])
        made[key] = _made.get(key) or _format_record(sid, steps[sid])
        text, is_inline = made[key]
        (inline if is_inline else tables).append(text)
    _made = made
    body = "\n\n".join(["\n".join(inline)] * bool(inline) + tables)
    return (
        dumps({"version": LOCK_VERSION})
        + "\n[steps]"
        + ("\n" + body.rstrip("\n") if body.strip() else "")
        + "\n"
    )


def _record_key(sid: str, record: dict) -> bytes:
    """Bytes that tell any two different records apart, 1, 1.0 and True too, at a fraction of the cost of
    canonical JSON: marshal's (a third of pickle's, which a write of a large lockfile spent half its time
    on), or pickle's for what marshal cannot hold. Two equal records may give different bytes, which only
    costs formatting one again."""
    try:
        return b"m" + marshal.dumps((sid, record))
    except ValueError:
        return b"p" + pickle.dumps((sid, record))


def _format_record(sid: str, record: dict) -> tuple[str, bool]:
    """One record's text as `dumps` writes it among the steps, and whether it is inline (a small one)."""
    body = {k: v for k, v in record.items() if k != "digest"}
    record = {**body, "digest": record_digest(body)}
    return dumps({sid: record}, ("steps",)), _is_leaf_table(record)


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


BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _key(key: str) -> str:
    # TOML bare keys are ASCII letters, digits, '_' and '-' only ('ü' is a letter to Python, not to TOML).
    if key and all(c in BARE_KEY for c in key):
        return key
    return _string(key)


def _string(text: str) -> str:
    """A TOML basic string. JSON's escapes are TOML's, except that TOML also forbids a raw DEL."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


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
        return _string(value)
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
