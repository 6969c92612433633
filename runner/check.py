"""`dbl check`: read every file the lockfile vouches for again, trusting no cached hash.

The stat cache makes `dbl plan` fast by believing that a file whose size and times have not changed
has not changed. `dbl check` does not believe it: it re-reads the inputs the lockfile records (the
subjects' images, the user's class images, a local base model), every recorded output, and the
run-cache entries the lockfile refers to, and compares each with its recorded sha256. What it reads
goes into the stat cache, so that the next `dbl plan` or `dbl build` sees any change it found.
"""

from __future__ import annotations

import posixpath
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from runner import lockfile, lockmemo, store
from runner.fingerprint import FileHasher, base_model_identity, sha256_file
from runner.project.schema import Project
from runner.ui.plain import fmt_path

REBUILD = "run `dbl build`: it restores the recorded outputs from the run-cache or reruns the step"


@dataclass(frozen=True)
class Mismatch:
    """A file that is not what the lockfile (or the run-cache's manifest) says it is."""

    path: str  # as typed here: relative to the current folder where it lies below it (`fmt_path`)
    problem: str
    fix: str
    read: bool = True  # False: missing or unreadable (or the lockfile's own record), so among no files read
    files: int = 1  # the files it stands for: all of a step's outputs when their folder is missing

    def __str__(self) -> str:
        return f"{self.path}: {self.problem} - {self.fix}"


@dataclass
class Report:
    mismatches: list[Mismatch]
    files: int  # files checked: those read, and those found missing or unreadable
    # (step id, its run-cache entry's made_by) of the entries the lockfile refers to that no build restores:
    # made in an epoch before the one their step trusts (see runner.store.EPOCH)
    distrusted: list[tuple[str, dict | None]] = field(default_factory=list)


def check(project: Project) -> Report:
    """Compare every file the project's lockfile records with its content. Raises LockfileError."""
    path = lockfile.lock_path(project.path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", lockfile.LockfileWarning)
        records = lockfile.read(path, memo=lockmemo.memo_path(project.state_dir, path))
    hasher = FileHasher(project.state_dir / "state", reread=True)
    found = [
        Mismatch(
            fmt_path(path),
            f"the record of {sid} does not match its digest (a text merge or a hand edit)",
            f"`dbl build` restores or reruns {sid}",
            read=False,
        )
        for w in caught
        if isinstance(w.message, lockfile.LockfileWarning)
        for sid in w.message.steps
    ]
    for sid, record in sorted(records.items()):
        found += _outputs(project, sid, record, hasher)
        found += _images(project, sid, record.get("inputs", {}), hasher)
    found += _base_model(project, records, hasher)
    cached, cache_files, distrusted = _cache_entries(project, records, hasher)
    hasher.save()
    store.keep_out_of_git(project.state_dir)
    unique = list(dict.fromkeys(found + cached))
    unread = {m.path: m.files for m in unique if not m.read}
    return Report(unique, hasher.reads + cache_files + sum(unread.values()), distrusted)


def _read(hasher: FileHasher, path: Path, st=None) -> str | None:
    try:
        return hasher.hash(path, st)
    except OSError:
        return None


def _read_ahead(hasher: FileHasher, paths: list[Path]) -> tuple[dict[Path, str | None], dict]:
    """What the stat cache vouched for at each of `paths` (for `_blind`), before their files are read at
    once (FileHasher.read_ahead), which then answers for them; and the stats it took."""
    known = {path: hasher.cached(path) for path in paths}
    return known, hasher.read_ahead(paths)


def _blind(before: str | None, recorded: str) -> str:
    # The stat cache still vouched for the recorded content: plan could not have seen this change.
    return "; its size and times are unchanged, so `dbl plan` could not see it" if before == recorded else ""


def _outputs(project: Project, sid: str, record: dict, hasher: FileHasher) -> list[Mismatch]:
    outputs = record.get("outputs", {})
    if outputs and not (project.dir / (folder := _folder(outputs))).is_dir():
        # a fresh clone, or the folder removed: one line says it, not one per file
        problem = f"output folder of {sid} is missing ({len(outputs)} file{'s' * (len(outputs) != 1)})"
        return [Mismatch(fmt_path(project.dir / folder), problem, REBUILD, read=False, files=len(outputs))]
    found = []
    paths = {rel: project.dir / rel for rel in sorted(outputs)}
    known, stats = _read_ahead(hasher, list(paths.values()))
    for rel, item in sorted(outputs.items()):
        path = paths[rel]
        if not path.is_file():
            found.append(Mismatch(fmt_path(path), f"output of {sid} is missing", REBUILD, read=False))
            continue
        before = known[path]
        now = _read(hasher, path, stats.get(path))
        if now is None:
            found.append(
                Mismatch(
                    fmt_path(path), f"output of {sid} cannot be read", "check its permissions", read=False
                )
            )
        elif now != item["sha256"]:
            note = _blind(before, item["sha256"])
            problem = f"output of {sid} differs from the lockfile's sha256{note}"
            found.append(Mismatch(fmt_path(path), problem, REBUILD))
    return found


def _folder(outputs: dict) -> str:
    """The folder that holds all of a step's recorded outputs (their paths relative to the project)."""
    return posixpath.commonpath([posixpath.dirname(rel) for rel in outputs])


def _images(project: Project, sid: str, inputs, hasher: FileHasher) -> list[Mismatch]:
    """Image manifests ({"_folder": ..., "files": {rel: sha256}}) anywhere in a step's recorded inputs."""
    found = []
    if isinstance(inputs, dict):
        files = inputs.get("files")
        if isinstance(inputs.get("_folder"), str) and isinstance(files, dict):
            folder = (project.dir / inputs["_folder"]).resolve()
            known, stats = _read_ahead(hasher, [folder / rel for rel in sorted(files)])
            for rel, recorded in sorted(files.items()):
                path = folder / rel
                if not path.is_file():
                    found.append(
                        Mismatch(
                            fmt_path(path),
                            f"input of {sid} is gone",
                            f"`dbl build` reruns {sid}",
                            read=False,
                        )
                    )
                    continue
                before = known[path]
                now = _read(hasher, path, stats.get(path))
                if now is None:
                    found.append(
                        Mismatch(
                            fmt_path(path),
                            f"input of {sid} cannot be read",
                            "check its permissions",
                            read=False,
                        )
                    )
                elif now != recorded:
                    note = _blind(before, recorded)
                    problem = f"input of {sid} changed since it was built{note}"
                    found.append(Mismatch(fmt_path(path), problem, f"`dbl build` reruns {sid}"))
        for value in inputs.values():
            found += _images(project, sid, value, hasher)
    return found


def _base_model(project: Project, records: dict, hasher: FileHasher) -> list[Mismatch]:
    """A local base model (file or folder) against the identity the records were built with."""
    from runner.models import BaseModel

    s = project.settings
    base = BaseModel.of(s, project.dir)
    if base.kind not in ("file", "folder"):
        return []
    try:
        now = base_model_identity(base, hasher)
    except OSError as exc:
        problem = f"base model cannot be read ({exc.strerror or exc})"
        return [Mismatch(fmt_path(Path(base.ref)), problem, "fix the path", read=False)]
    built_with = sorted(
        sid
        for sid, record in records.items()
        if isinstance(record.get("inputs", {}).get("base_model"), dict)
        and set(record["inputs"]["base_model"]) == set(now)
        and record["inputs"]["base_model"] != now
    )
    if not built_with:
        return []
    steps = ", ".join(built_with)
    return [
        Mismatch(
            fmt_path(Path(base.ref)),
            f"base model content differs from what {steps} {'was' if len(built_with) == 1 else 'were'} built with",
            "`dbl build` reruns the steps that use it",
        )
    ]


def _cache_entries(
    project: Project, records: dict, hasher: FileHasher
) -> tuple[list[Mismatch], int, list[tuple[str, dict | None]]]:
    """The run-cache entries the lockfile refers to: each file there against its manifest's sha256. A file
    found altered goes to `hasher`, so that `dbl plan` knows its entry does not restore.
    Returns the mismatches, the number of files read, and the entries no build restores (Report.distrusted)."""
    cache = store.RunCache(project.state_dir / "cache")
    found, read, distrusted = [], 0, []
    for sid, record in sorted(records.items()):
        fp = record["fingerprint"]
        if not cache.entry(fp).exists():
            continue  # not cached here (collected, or built on another machine): nothing to check
        entry = cache.entry(fp)
        meta = cache.manifest(fp)
        if meta is None:
            problem = f"run-cache entry of {sid} has no manifest"
            found.append(Mismatch(fmt_path(entry), problem, _delete(entry, sid), read=False))
            continue
        inputs = record.get("inputs", {})
        if isinstance(inputs, dict) and store.distrusted(meta, lockfile.record_kind(sid, record), inputs):
            distrusted.append((sid, meta.get("made_by")))
        for rel, item in sorted(meta.get("outputs", {}).items()):
            path = entry / "files" / rel
            try:
                st = path.stat()
                digest = sha256_file(path)
                state = "altered" if digest != item.get("sha256") else None
                read += 1
                if state:  # only these: every file of the cache in the hash cache would slow each plan
                    hasher.wrote(path, st, digest)
            except FileNotFoundError:
                state = "missing"
            except OSError:
                state = "unreadable"
            if state:
                problem = f"run-cache copy of {sid}'s output is {state}"
                fix = _delete(entry, sid)
                found.append(Mismatch(fmt_path(path), problem, fix, read=state == "altered"))
    return found, read, distrusted


def _delete(entry: Path, sid: str) -> str:
    return f"delete the entry (rm -r {fmt_path(entry)}); a later build reruns {sid} when it needs it"
