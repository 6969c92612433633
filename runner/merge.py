"""`dbl merge-lockfile BASE OURS THEIRS`: a git merge driver for lockfiles.

A lockfile is one record per step, so two branches merge record by record, the way git merges lines:
a step changed on one side only takes that side's record; a step changed on both sides the same way
(same fingerprint and outputs) takes ours; a step changed on both sides differently is left out, and
the next `dbl build` restores it from the run-cache or reruns it for the merged project file. A step
removed on one side and unchanged on the other is removed; one removed on one side and changed on the
other is left out. The result replaces OURS, as git expects.
Another tool's lockfile that the pattern below matches (uv.lock) is merged line by line, as git would.

    .gitattributes:  *.lock merge=dbl
    git config merge.dbl.driver "dbl merge-lockfile %O %A %B"
"""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

from runner import lockfile

DRIVER = "dbl merge-lockfile %O %A %B"


def driver_setup(lock: Path) -> tuple[str, str] | None:
    """(what went wrong, the command that fixes it) where dbl's merge driver is half set up for the
    lockfile `lock`; ("", how to set it up) where it is not, or git cannot tell; None where it is. Half of
    it is the trap: git merges a file whose attribute names an undefined driver line by line, without a
    word, and a driver no attribute names is never run. Two git calls, made only for a lockfile git left
    a conflict in."""
    attribute = _git(lock.parent, "check-attr", "merge", "--", lock.name)
    named = attribute is not None and attribute.rstrip().endswith(": merge: dbl")
    defined = attribute is not None and bool(
        (_git(lock.parent, "config", "--get", "merge.dbl.driver") or "").strip()
    )
    if named and defined:
        return None
    if named:  # git config is not cloned: every clone sets it up once
        return (
            f"git merged it line by line: .gitattributes gives {lock.name} merge=dbl, but this clone's git "
            "config has no such driver",
            f'`git config merge.dbl.driver "{DRIVER}"`',
        )
    if defined:
        return (
            "git merged it line by line: this clone's git config has dbl's merge driver, but no "
            f".gitattributes line gives {lock.name} merge=dbl",
            "`echo '*.lock merge=dbl' >> .gitattributes` (and commit it)",
        )
    return "", "set up dbl's merge driver (README: 'Lockfiles in git')"


def run_git(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """`git ARGS` run in `folder`, its output as text and its messages in git's own words (untranslated,
    so that callers can tell them apart). Raises OSError where git cannot be run."""
    return subprocess.run(
        ["git", *args],
        cwd=folder,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        env={**os.environ, "LC_ALL": "C"},
    )


def _git(folder: Path, *args: str) -> str | None:
    """What a git command prints, run in `folder`; None where it fails (no git, no repository)."""
    try:
        done = run_git(folder, *args)
    except OSError:
        return None
    return done.stdout if done.returncode == 0 else None


def same(a: dict | None, b: dict | None) -> bool:
    """Whether two records (or absences) stand for the same build result; when and how long it took aside."""
    if a is None or b is None:
        return a is b
    keys = ("kind", "fingerprint", "output_hash", "outputs")
    return all(a.get(k) == b.get(k) for k in keys)


def merge_records(base: dict, ours: dict, theirs: dict) -> tuple[dict[str, dict], list[str]]:
    """(merged records, ids of steps changed differently on both sides and therefore left out)."""
    merged, conflicts = {}, []
    for sid in sorted(set(base) | set(ours) | set(theirs)):
        o, a, b = base.get(sid), ours.get(sid), theirs.get(sid)
        if same(a, b) or same(b, o):
            chosen = a
        elif same(a, o):
            chosen = b
        else:
            conflicts.append(sid)
            continue
        if chosen is not None:
            merged[sid] = chosen
    return merged, conflicts


def _records(path: Path, side: str) -> tuple[dict[str, dict], list[str]]:
    """A side's records, without those whose digest does not match; and the messages about those.

    Messages name the side (base, ours, theirs), not the temporary file git hands over."""
    if not path.exists() or not path.read_bytes().strip():
        return {}, []  # git passes an empty file for a side that has no lockfile
    # git's --ours and --theirs name the same sides as the driver's %A and %B, in a rebase too.
    other = {"ours": "theirs", "theirs": "ours"}.get(side)
    recover = (
        "git leaves the lockfile in conflict: "
        + (f"take {other} (`git checkout --{other} PATH`), " if other else "take either side, ")
        + "then `dbl build` rebuilds what the merged project file needs, restoring from the run-cache "
        "what it holds"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", lockfile.LockfileWarning)
        records = lockfile.read(path, label=side, recover=recover)
    return records, [str(w.message) for w in caught if issubclass(w.category, lockfile.LockfileWarning)]


def merge_files(base: Path, ours: Path, theirs: Path) -> tuple[list[str], list[str]]:
    """Merge three lockfiles into `ours`; (steps changed on both sides and left out, notes about records
    set aside and about steps removed on one side and changed on the other, left out too).

    Raises LockfileError when a side cannot be read (git then reports a conflict).
    """
    notes: list[str] = []
    sides = []
    for path, side in ((base, "base"), (ours, "ours"), (theirs, "theirs")):
        records, messages = _records(path, side)
        sides.append(records)
        notes += messages
    merged, conflicts = merge_records(*sides)
    lockfile.write(ours, merged)
    removed = [sid for sid in conflicts if sid not in sides[1] or sid not in sides[2]]
    if removed:
        notes.append(f"{', '.join(removed)} removed on one side and changed on the other: left out")
    return [sid for sid in conflicts if sid not in removed], notes


def merge_lines(base: Path, ours: Path, theirs: Path) -> int:
    """Merge three versions of a file line by line into `ours`, as git does without a driver; how many
    conflicts it left, marked as git marks them."""
    labels = ["-L", "ours", "-L", "base", "-L", "theirs"]
    return subprocess.run(["git", "merge-file", *labels, str(ours), str(base), str(theirs)]).returncode
