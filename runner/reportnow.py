"""Whether what `dbl report` shows is what the project asks for now: the page shows the lockfile's record,
and after an edit of the project file, a rename or a checkout, that record is not the project's any more.
`ctx` is the report's context: the project, its lockfile, the steps it has now and the stale ones."""

from __future__ import annotations

from datetime import timedelta
from html import escape

from runner import listing
from runner.errors import DblError
from runner.htmlpage import parse_time


def stale(project) -> dict[str, list[str]] | str:
    """{step id: reasons} of the steps `dbl plan` calls stale: the page shows what the lockfile records
    of them, which is no longer what the project file asks for. A string says why no plan could be made."""
    from runner.exec.workspace import Workspace

    try:
        _, planned = Workspace(project).plan()
    except (DblError, OSError) as exc:
        return str(exc)
    return {p.id: list(p.reasons) for p in planned if p.stale}


def line(ctx, sid: str) -> str:
    """A line that says so when what the page shows of step `sid` is not what the project asks for now."""
    if sid not in ctx.current:
        text = (
            f"{sid} is no longer in the project file (removed or renamed): this is what was last built under "
            "that name, and the next <code>dbl build</code> removes it."
        )
    elif isinstance(ctx.stale, dict) and sid in ctx.stale:
        text = (
            f"Stale: {escape('; '.join(ctx.stale[sid]))}. Shown as the lockfile records it; "
            "<code>dbl build</code> brings it up to date."
        )
    else:
        return ""
    return f'<p class="stale">{text}</p>'


def summary(ctx) -> str:
    """Whether the lockfile's record, which the page shows, is what the project file asks for now."""
    if isinstance(ctx.stale, str):
        return f"not known which steps are stale ({ctx.stale})"
    stale = [sid for sid in ctx.stale if sid in ctx.lock]
    said = [f"{len(stale)} of {len(ctx.current)} steps stale (marked where shown)"] if stale else []
    unrecorded = [sid for sid in ctx.current if sid not in ctx.lock]
    if left_out := [sid for sid in unrecorded if listing.unrecorded_outputs(ctx.project, sid)]:
        one = len(left_out) == 1
        said.append(
            f"{len(left_out)} not in the lockfile ({'its' if one else 'their'} outputs are there: a merge "
            f"left {'its record' if one else 'their records'} out)"
        )
    if unbuilt := [sid for sid in unrecorded if sid not in left_out]:
        said.append(f"{len(unbuilt)} not built")
    if gone := [sid for sid in ctx.lock if sid not in ctx.current]:
        said.append(f"{len(gone)} no longer in the project file")
    if not said:
        return "up to date with the project file"
    return ", ".join(said) + ": `dbl build` brings them up to date"


def state(ctx, sid: str) -> str:
    """The provenance table's word for step `sid`: up to date, stale, or not in the project file."""
    if sid not in ctx.current:
        return "not in the project file"
    if isinstance(ctx.stale, str):
        return ""
    return "stale" if sid in ctx.stale else "up to date"


def built_after(lock: dict, last: dict | None) -> set[str]:
    """The steps the lockfile records as built after the last recorded build ended: by a build that has
    not recorded itself, still running or killed before it ended (the record is written at the end)."""
    try:
        ended = parse_time(last["started"]) + timedelta(seconds=float(last.get("seconds", 0)))
    except (KeyError, TypeError, ValueError):
        return set()
    later = set()
    for sid, record in lock.items():
        try:  # `built` is when the step began, to the second: after the end, by another build
            if parse_time(record["built"]) > ended:
                later.add(sid)
        except (KeyError, TypeError, ValueError):
            continue
    return later
