"""`dbl ls`: the project's steps, fresh or stale, with where their outputs are and how training went."""

from __future__ import annotations

import math
from pathlib import Path

from runner import lockfile
from runner.ui.plain import fmt_path


def rows(project, num_processes: int | None = None) -> list[dict]:
    """One row a step, in build order: id, kind, status, output folder, files, when built, metrics
    (JSON-safe: a diverged loss, NaN, is None), and for a step the lockfile has no record of, the output
    folder where files are there all the same (else None). A status is that of a build with
    `num_processes`; the steps the lockfile records that the project no longer has come last, "removed",
    with the folder the next build removes (None where it removes none, only the record)."""
    from runner import executor
    from runner.exec.scheduler import removed_steps

    ws = executor.Workspace(project)
    lock, planned = ws.plan(num_processes=num_processes)
    found = []
    for p in planned:
        record = lock.get(p.id)
        found.append(
            {
                "id": p.id,
                "kind": p.step.kind,
                "status": "stale" if p.stale else "fresh",
                "path": _built_in(record.get("outputs", {}), p.id) or ws.rel(ws.output_dir(p.step))
                if record
                else None,
                "files": sorted(record["outputs"]) if record else [],
                "built": record.get("built") if record else None,
                "metrics": _finite(record.get("metrics", {})) if record else {},
                "unrecorded_path": None if record else unrecorded_outputs(project, p.id),
            }
        )
    for sid, folder in removed_steps(ws, lock, {p.id for p in planned}):
        record = lock[sid]
        found.append(
            {
                "id": sid,
                "kind": lockfile.record_kind(sid, record),
                "status": "removed",  # no longer in the project: the next build removes `path`
                "path": ws.rel(folder) if folder is not None else None,
                "files": sorted(record.get("outputs", {})),
                "built": record.get("built"),
                "metrics": _finite(record.get("metrics", {})),
                "unrecorded_path": None,
            }
        )
    return found


def _built_in(outputs: dict, step_id: str) -> str | None:
    """The folder the last build put the step's outputs in, from their recorded paths: not the step's
    output folder now when `out` or `name` changed since."""
    from runner import steps

    own = "/" + Path(steps.output_dir(step_id)).as_posix() + "/"
    for rel in outputs:
        at = ("/" + rel).find(own)
        if at >= 0:
            return rel[: at + len(own) - 2]
    return None


def table(rows: list[dict], project) -> list[str]:
    """The rows as aligned lines: id, status, folder, and the loss where a step trained."""
    width = max((len(r["id"]) for r in rows), default=0)
    where = [_where(project, r) for r in rows]
    where_width = max((len(w) for w in where), default=0)
    status_width = max((len(r["status"]) for r in rows), default=0)
    lines = []
    for r, w in zip(rows, where, strict=True):
        columns = [f"{r['id']:<{width}}", f"{r['status']:<{status_width}}", w]
        loss = _loss(r["metrics"])
        if loss:  # a fourth column, lined up, on the rows that have one
            columns[-1:] = [f"{w:<{where_width}}", loss]
        lines.append("  ".join(columns))
    return lines


def _where(project, row: dict) -> str:
    """The row's folder as typed here (relative to the current folder when below it; a row's `path` is
    relative to the project file), said to be missing where it is not there (a fresh clone); or, for a
    step the lockfile has no record of, its folder said not to be in the lockfile where files are there,
    else "(not built)"."""
    if row["status"] == "removed":
        folder = project.dir / row["path"] if row["path"] is not None else None
        return (
            f"{fmt_path(folder)} (the next build removes it)"
            if folder
            else "(the next build drops its record)"
        )
    if row["path"] is None:
        found = row["unrecorded_path"]
        return f"{fmt_path(project.dir / found)} (not in the lockfile)" if found else "(not built)"
    folder = project.dir / row["path"]
    return fmt_path(folder) if folder.is_dir() else f"{fmt_path(folder)} (missing)"


def unrecorded_outputs(project, step_id: str) -> str | None:
    """The output folder, relative to the project file, of a step the lockfile has no record of, when files
    are there (a merge left its record out, another lockfile was checked out); None when there are none."""
    from runner import steps
    from runner.store import has_files

    folder = project.out / steps.output_dir(step_id)
    return steps.relative(project, folder) if has_files(folder) else None


def loss_number(value) -> str:
    """A loss to four significant digits, kept where they are zeros (2.200, not 2.2); a hand-edited record
    of a lockfile without digests as written; none as nan."""
    if value is None:
        return "nan"
    return f"{value:#.4g}" if isinstance(value, int | float) and not isinstance(value, bool) else str(value)


def _loss(metrics: dict) -> str:
    """'loss 0.4123 -> 0.08712 in 800 steps' for a step that trained (its metrics have loss_last): the
    mean loss over the first and the last tenth of its steps."""
    if "loss_last" not in metrics:
        return ""
    text = f"loss {loss_number(metrics.get('loss_first'))} -> {loss_number(metrics['loss_last'])}"
    steps = metrics.get("steps")
    if isinstance(steps, int):
        text += f" in {steps} step{'' if steps == 1 else 's'}"
    return text


def _finite(value):
    """`value` with NaN and infinite numbers as None, which JSON can hold (a diverged loss is NaN)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
