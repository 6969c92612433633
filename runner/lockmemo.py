"""The parsed step records of a lockfile, kept in `.dbl/` under the sha256 of the lockfile's text.

Python's TOML parser reads about 3 MB a second: the lockfile of a project of a few hundred steps (every
image and every rendered picture with its sha256) took longer to parse than the rest of `dbl plan`. The
records are kept as JSON, which holds exactly what the TOML does (floats round-trip, NaN included; tables
keep their order), beside the sha256 of the text they were parsed from: a lockfile edited, pulled or
merged since, whatever its size and times, has another sha256 and is parsed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from runner import tempnames

VERSION = 1


def memo_path(state_dir: Path, lock_path: Path) -> Path:
    """Where the parse of the lockfile `lock_path` is kept, in the project's `.dbl/` folder."""
    return state_dir / f"parsed-{lock_path.name}.json"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def recall(memo: Path, text: str) -> dict | None:
    """What was kept of `text` before, or None when no parse of this very text is kept (none yet, another
    text's, or a memo that does not read): {"steps": records, "rejected": ids of the records set aside,
    "referenced": every fingerprint the records name, those set aside included}."""
    try:
        kept = json.loads(memo.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (
        isinstance(kept, dict) and kept.get("version") == VERSION and kept.get("sha256") == _digest(text)
    ):
        return None
    fields = {"steps": dict, "rejected": list, "referenced": list}
    if not all(isinstance(kept.get(key), kind) for key, kind in fields.items()):
        return None
    return kept


def remember(memo: Path, text: str, steps: dict, rejected: list[str], referenced: set[str]) -> None:
    """Keep the parse of `text` for the next `recall`. Only speed is at stake: a folder that is not there
    (no build made `.dbl/` yet, which would then lack its .gitignore), a full disk, or records JSON cannot
    hold (a date a hand edit left unquoted) keep nothing."""
    if not memo.parent.is_dir():
        return
    kept = {"steps": steps, "rejected": rejected, "referenced": sorted(referenced)}
    try:
        body = json.dumps({"version": VERSION, "sha256": _digest(text), **kept})
    except (TypeError, ValueError):
        return
    tmp = memo.with_name(f"{memo.name}.tmp-{tempnames.suffix()}")
    try:
        tmp.write_text(body, encoding="utf-8")
        os.replace(tmp, memo)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
