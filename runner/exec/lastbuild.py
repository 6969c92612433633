"""`.dbl/last-build-<stem>.json`: what the last build did, step by step (`dbl report` draws its timeline).

The lockfile says what each step's outputs are and when they were made; it cannot say whether the last
build ran a step or restored it from the run-cache, where it ran, or which steps failed. This record
does. The build's own process writes it (the one writer), atomically, when a build that had work to do
ends; a build with nothing stale, and a dry run, leave it as it was. It is in no fingerprint and not in
the lockfile: it describes one build on one machine, not what was built.

    {"version": 1, "dbl": "0.1.0", "host": "gpu-3", "backend": "inline", "jobs": 1,
     "started": "2025-05-01T10:00:00.123Z", "seconds": 81.2, "exit_code": 0,
     "steps": [{"id": "train:dog", "outcome": "ran", "started": "...", "offset_s": 0.4,
                "seconds": 75.1, "on": "cuda:0", "reasons": ["lora.rank 16 -> 8"]}, ...]}

`outcome` is ran, restored (from the run-cache), fresh (nothing to do), skipped, failed or interrupted;
`on` is the device or node a worker ran the step on (empty when it ran in the build's own process).
`remade` (a step that ran, only when true): it made again the very outputs the lockfile records.
`output_hash` (a step it ran or restored): the output hash it recorded in the lockfile; a lockfile checked
out since may record other outputs of the step, which this build did not make. A record written before it
was kept lacks it.
"""

from __future__ import annotations

import contextlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from runner import __version__, events, tempnames

VERSION = 1

OUTCOMES = {
    events.DONE: "ran",
    events.CACHED: "restored",
    events.FRESH: "fresh",
    events.SKIPPED: "skipped",
    events.FAILED: "failed",
    events.INTERRUPTED: "interrupted",
    events.PENDING: "skipped",
}


def path(project) -> Path:
    """Where the record of `project`'s last build lives (projects sharing `.dbl/` each have their own)."""
    return project.state_dir / f"last-build-{project.path.stem}.json"


def _iso(when: float) -> str:
    return (
        datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def record(steps: list[events.StepEvent], started: float, seconds: float, exit_code: int, backend: str, jobs):
    """The record of a build that began at `started` (time.time()) and took `seconds`."""
    rows = []
    for ev in steps:
        row = {"id": ev.id, "outcome": OUTCOMES.get(ev.status, ev.status)}
        if ev.started:
            row.update(started=_iso(ev.started), offset_s=round(ev.started - started, 3))
            row["seconds"] = round(ev.duration_s, 3)
        if ev.remade:
            row["remade"] = True
        if ev.output_hash:
            row["output_hash"] = ev.output_hash
        if ev.device:
            row["on"] = ev.device
        if ev.reasons:
            row["reasons"] = list(ev.reasons)
        if ev.error:
            row["error"] = ev.error.splitlines()[0] if ev.error.strip() else ev.error
        rows.append(row)
    return {
        "version": VERSION,
        "dbl": __version__,
        "host": tempnames.host(),
        "backend": backend,
        "jobs": jobs,
        "started": _iso(started),
        "seconds": round(seconds, 3),
        "exit_code": exit_code,
        "steps": rows,
    }


def write(project, data: dict) -> str | None:
    """Write the record atomically (aside, then os.replace). It is only a record: a failure returns the
    problem to show instead of failing the build."""
    target = path(project)
    tmp = target.with_name(f".{target.name}.tmp-{tempnames.suffix()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return f"cannot write the record of this build {target} ({exc.strerror or exc}); `dbl report` will lack it"
    return None


def read(project) -> dict | None:
    """The record of the project's last build, or None when there is none (or it does not read)."""
    try:
        data = json.loads(path(project).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        not isinstance(data, dict)
        or data.get("version") != VERSION
        or not isinstance(data.get("steps"), list)
    ):
        return None
    return data
