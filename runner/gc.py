"""`dbl gc`: drop the run-cache entries that no lockfile beside the project refers to, the work folders
(train checkpoints) no step of the project can resume, and what builds killed while writing the cache or
committing outputs left behind.

Every project file in a folder shares its `.dbl/`, so what any of their lockfiles refers to is kept, as
they are and as committed at the tip of each local git branch (a branch checked out again restores). One
that cannot be read (a merge conflict, a bad edit) could refer to anything: then nothing is collected.
Other tools' lockfiles beside it (poetry.lock, Cargo.lock) are passed over.
A build stores its outputs in the cache before its lockfile names them, so gc holds every project's
build lock while it collects, and no entry is dropped between the two.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from runner import lockfile, lockmemo, store
from runner.errors import DblError
from runner.merge import run_git
from runner.project.schema import Project
from runner.store import COMMIT_PREFIXES, BuildLock, LockHeld, RunCache, work_folder, work_root

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


@dataclass
class Distrusted:
    """A run-cache entry a lockfile refers to, made in an epoch before the one its step trusts."""

    step: str  # the id of a step that names it
    made_by: dict | None  # its manifest's stamp
    since: int  # the earliest epoch whose entries the step restores
    size: int = 0  # bytes


@dataclass(frozen=True)
class Collected:
    """What gc dropped (or, dry, would drop)."""

    dropped: int  # cache entries
    freed: int  # bytes
    kept: int  # cache entries a lockfile refers to
    leftovers: list[Path]  # folders of builds killed while writing the cache or committing outputs
    # work folders (train checkpoints) of steps no longer in the project
    orphans: list[Path] = field(default_factory=list)
    # work folders of steps still in it, made for inputs they no longer have
    abandoned: list[Path] = field(default_factory=list)
    sizes: dict[Path, int] = field(default_factory=dict)  # bytes of each folder above
    # cache entries a lockfile refers to that no longer restore (see runner.store.EPOCH), among `dropped`
    distrusted: dict[str, Distrusted] = field(default_factory=dict)  # by fingerprint
    signals: list[Path] = field(default_factory=list)  # steps' stop and begun files left by killed builds

    @property
    def folders_freed(self) -> int:
        return sum(self.sizes.values())


def collect(project: Project, dry_run: bool = False) -> Collected:
    """Drop (or with `dry_run` only count) the cache entries no lockfile beside `project` refers to.
    Raises DblError for an unreadable lockfile and LockHeld while a build runs."""
    cache = RunCache(project.state_dir / "cache")
    with _all_build_locks(project):
        # Read under the locks: a build that just ended has written its own.
        branches = _branch_lockfiles(project.dir)
        keep = _referenced(project, branches)
        distrusted = _distrusted(project, cache, keep, branches)
        keep -= set(distrusted)
        dropped, freed = 0, 0
        for fp in cache.entries():
            if fp in keep:
                continue
            size = sum(f.stat().st_size for f in cache.entry(fp).rglob("*") if f.is_file())
            if fp in distrusted:
                distrusted[fp].size = size
            freed += size
            dropped += 1
            if not dry_run:
                cache.drop(fp)
        leftovers = cache.leftovers() + unfinished_commits(project) + _left_beside_outputs(project)
        orphans = _orphaned_work(project)
        abandoned = _abandoned_work(project)
        sizes = {path: _size(path) for path in leftovers + orphans + abandoned}
        signals = _step_signals(project)
        if not dry_run:
            for path in sizes:
                shutil.rmtree(path, ignore_errors=True)
            for path in signals:
                path.unlink(missing_ok=True)
        kept = len(keep & set(cache.entries()))
        return Collected(dropped, freed, kept, leftovers, orphans, abandoned, sizes, distrusted, signals)


def _size(folder: Path) -> int:
    """The bytes of the files under `folder` (links not followed)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _step_signals(project: Project) -> list[Path]:
    """The stop and begun files of steps (`.stop-train-dog`: Ctrl-C's request that a step stop at a safe
    point; `.begun-train-dog`: a Ray worker's note that it began one) left beside the work folders by a
    build that was killed: each step's next run removes its own, but a step that never runs again keeps
    them. No build runs while gc does."""
    root = work_root(project)
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.glob(".[sb]*-*") if p.name.startswith((".stop-", ".begun-")) and p.is_file()
    )


def _orphaned_work(project: Project) -> list[Path]:
    """The work folders of this project's steps that are no longer in it (removed or renamed): a train step
    killed or failed there kept its checkpoints to resume from, and nothing would resume them now. Those
    of steps still in the project are kept, and so are other projects' (a build holds its own lock)."""
    from runner import planner

    root = work_root(project)
    if not root.is_dir():
        return []
    current = {work_folder(project, step.kind, step.name) for step in planner.graph(project)}
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p not in current)


def _abandoned_work(project: Project) -> list[Path]:
    """The work folders of steps still in the project that no build of it would resume: a build killed
    there, then the project changed (or changed back to what the lockfile records, so the step is fresh and
    never runs to replace them). A build resumes a work folder only where the fingerprint it was made for
    (its `fingerprint` file) is the step's now. One whose step's fingerprint cannot be told yet (behind a
    stale step, or an input that does not read) is kept."""
    from runner import planner
    from runner.fingerprint import FileHasher
    from runner.store import DiskFacts

    folders = {}
    for step in planner.graph(project):
        folder = work_folder(project, step.kind, step.name)
        if folder.is_dir():
            folders[step.id] = folder
    if not folders:
        return []
    hasher = FileHasher(project.state_dir / "state")
    facts = DiskFacts(project, hasher, RunCache(project.state_dir / "cache"))
    lock_path = lockfile.lock_path(project.path)
    lock = lockfile.read(lock_path, memo=lockmemo.memo_path(project.state_dir, lock_path))
    plans: dict[int | None, dict[str, str | None]] = {}

    def fingerprint(step_id: str, num_processes: int | None) -> str | None:
        if num_processes not in plans:
            planned = planner.plan(project, lock, facts, num_processes=num_processes)
            plans[num_processes] = {p.id: p.fingerprint for p in planned}
        return plans[num_processes][step_id]

    abandoned = []
    try:
        for step_id, folder in folders.items():
            marker = folder / "fingerprint"
            made_for = marker.read_text() if marker.is_file() else None  # without one, a build starts over
            # A train step built with --num-processes N has N in its fingerprint; its checkpoints say N.
            fps = {fingerprint(step_id, n) for n in {None} | _checkpoint_processes(folder)}
            if made_for not in fps and None not in fps:
                abandoned.append(folder)
    except (DblError, OSError):  # the plan cannot tell (an image that does not read): keep them all
        return []
    finally:
        hasher.save()
    return sorted(abandoned)


def _checkpoint_processes(folder: Path) -> set[int]:
    """The num_processes recorded by the train checkpoints in a work folder."""
    from runner.training.checkpoints import STATE, checkpoint_dirs

    found = set()
    for _, checkpoint in checkpoint_dirs(folder):
        try:
            state = json.loads((checkpoint / STATE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and isinstance(state.get("num_processes"), int):
            found.add(state["num_processes"])
    return found


def unfinished_commits(project: Project) -> list[Path]:
    """What a build killed while committing a step's outputs left beside the work folders: the copy of the
    new outputs, or the old ones put aside (a whole adapter or render each). Only a running commit reads
    them, and gc holds every build lock (a build removes them too, under its own)."""
    root = work_root(project)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(COMMIT_PREFIXES))


def _distrusted(
    project: Project, cache: RunCache, keep: set[str], branches: list[tuple[str, str, str]]
) -> dict[str, Distrusted]:
    """The entries in `keep` that no step naming them restores: made in an epoch before the one their step
    trusts since a fix found such entries made wrong (runner.store.DISTRUSTED), by fingerprint. An entry
    that one record trusts is kept. Nothing is read while no fix distrusts any entry."""
    if not store.DISTRUSTED:
        return {}
    since: dict[str, tuple[int, str]] = {}  # the earliest epoch any record of the entry trusts
    for records in _records(project, branches):
        for sid, record in sorted(records.items()):
            if not isinstance(record, dict):
                continue
            fp, inputs = record.get("fingerprint"), record.get("inputs", {})
            if not isinstance(fp, str) or fp not in keep or not isinstance(inputs, dict):
                continue
            epoch = store.trusted_since(lockfile.record_kind(sid, record), inputs)
            if fp not in since or epoch < since[fp][0]:
                since[fp] = (epoch, sid)
    found = {}
    for fp, (epoch, sid) in sorted(since.items()):
        meta = cache.manifest(fp) if epoch else None
        if meta is not None and store.epoch_of(meta) < epoch:
            found[fp] = Distrusted(sid, meta.get("made_by"), epoch)
    return found


def _records(project: Project, branches: list[tuple[str, str, str]]) -> list[dict[str, dict]]:
    """The step records of every lockfile `_referenced` read (those whose digest does not match left out)."""
    found = []
    for lock_path in _lockfiles(project):
        # A record that does not match its digest is for `dbl build` to report; one that is malformed
        # judges nothing, and what it refers to is kept.
        with warnings.catch_warnings(), contextlib.suppress(lockfile.LockfileError):
            warnings.simplefilter("ignore", lockfile.LockfileWarning)
            found.append(lockfile.read(lock_path, memo=lockmemo.memo_path(project.state_dir, lock_path)))
    for text in dict.fromkeys(text for _, _, text in branches if not lockfile.foreign_text(text)):
        found.append(lockfile.read_text_records(text))
    return found


def _lockfiles(project: Project) -> list[Path]:
    """The .lock files beside the project that are dbl's: its own and those of the other project files
    there, however damaged (zeros a crash left, a file cut off), and any other that reads as dbl's.
    Another tool's (uv.lock, Cargo.lock beside Cargo.toml) are not."""
    own = lockfile.lock_path(project.path)
    return [
        path
        for path in sorted(project.dir.glob("*.lock"))
        if path == own or _a_project_file(path.with_suffix(".toml")) or not lockfile.foreign(path)
    ]


def _a_project_file(path: Path) -> bool:
    """Whether `path` is a dbl project file: TOML whose [project] table names a base model."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data.get("project"), dict) and "base_model" in data["project"]


def _left_beside_outputs(project: Project) -> list[Path]:
    """What builds of this host killed while committing outputs to an `out` on another file system left
    beside them (runner.exchange: the new outputs moved there, or the old ones put aside), where their
    process is gone: no build lock covers that folder."""
    from runner import planner, tempnames

    folders = {(project.out / step.output_dir).parent for step in planner.graph(project)}
    found = []
    for folder in sorted(folders):
        with contextlib.suppress(OSError):
            found += [
                Path(e.path)
                for e in os.scandir(folder)
                if e.name.startswith(".")
                and e.is_dir(follow_symlinks=False)
                and tempnames.left_by_dead_process(e.name)
            ]
    return sorted(found)


def _referenced(project: Project, branches: list[tuple[str, str, str]]) -> set[str]:
    """The fingerprints every lockfile beside the project refers to (other tools' .lock files aside), as
    it is and as committed at the tip of each local git branch (`branches`: `_branch_lockfiles` of its
    folder)."""
    keep: set[str] = set()
    for lock_path in _lockfiles(project):
        try:
            keep |= lockfile.referenced_fingerprints(
                lock_path, lockmemo.memo_path(project.state_dir, lock_path)
            )
        except lockfile.NewerLockfileError as exc:
            raise DblError(
                f"gc refused: {exc}\n"
                f"  gc keeps what every lockfile beside the project refers to, and cannot read what this one does"
            ) from None
        except lockfile.LockfileError as exc:
            raise DblError(
                f"gc refused: {exc}\n"
                f"  gc keeps what every lockfile beside the project refers to, so it cannot run while "
                f"{lock_path} is unreadable: fix it (a merge conflict: see 'Lockfiles in git' in the "
                f"README) or move it out of {project.dir}, then run gc again"
            ) from None
    parsed: set[str] = set()  # texts read already: most branches hold the same lockfile
    for branch, name, text in branches:
        if text in parsed or lockfile.foreign_text(text):
            continue
        parsed.add(text)
        try:
            # the branch's lockfile is often the one beside the project, whose parse `read` kept
            memo = lockmemo.memo_path(project.state_dir, project.dir / name)
            keep |= lockfile.fingerprints_in(text, f"{name} on branch {branch}", memo)
        except lockfile.LockfileError as exc:
            raise DblError(
                f"gc refused: {exc}\n"
                f"  gc keeps what the lockfiles of every local git branch refer to, so it cannot run while "
                f"that one is unreadable: fix it on {branch} (or delete the branch), then run gc again"
            ) from None
    return keep


def _branch_lockfiles(folder: Path) -> list[tuple[str, str, str]]:
    """(branch, file name, text) of each .lock file in `folder` as committed at the tip of each local git
    branch: what switching to that branch brings back, and restores from the run-cache. Nothing outside a
    git work tree, or without git."""
    refs = _branch_refs(folder)
    found, seen, texts = [], set(), {}
    for commit, branch in (line.split(" ", 1) for line in refs.splitlines()):
        if commit in seen:
            continue
        seen.add(commit)
        for entry in _git(folder, branch, "ls-tree", "-z", commit, "--", ".").split("\0"):
            about, _, name = entry.partition("\t")  # "<mode> blob <object id>\t<name>"
            _, kind, blob = (about.split(" ") + ["", ""])[:3]
            if kind != "blob" or not name.endswith(".lock"):
                continue
            if blob not in texts:  # one read of each content, however many branches hold it
                texts[blob] = _git(folder, branch, "cat-file", "blob", blob)
            found.append((branch, name, texts[blob]))
    return found


def _branch_refs(folder: Path) -> str:
    """'<commit> <branch>' lines of the local branches of the repository `folder` is in; none outside a git
    work tree, or without git. A repository git refuses to read (one another user owns, as in a container;
    one a newer git made) hides its branches: gc refuses rather than drop what they need."""
    try:  # in git's own words, untranslated, to tell "no repository"
        done = run_git(folder, "for-each-ref", "--format=%(objectname) %(refname:short)", "refs/heads/")
    except OSError:
        return ""
    if done.returncode == 0:
        return done.stdout
    if "not a git repository" in done.stderr or not any(
        (d / ".git").exists() for d in (folder, *folder.parents)
    ):
        return ""
    said = "\n".join(f"    {line}" for line in done.stderr.strip().splitlines())
    raise DblError(
        f"gc refused: git cannot read the branches of the repository {folder} is in:\n{said}\n"
        "  gc keeps what the lockfiles of every local git branch refer to, so it cannot run while git cannot "
        "read them: do what git says, then run gc again"
    )


def _git(folder: Path, branch: str, *args: str) -> str:
    """What a git command that reads `branch` prints, run in `folder`. Where it fails (a damaged repository,
    a partial clone offline) the branch's lockfiles cannot be read, and what they refer to cannot be told
    from the rest: gc refuses (DblError), as it does for a lockfile that does not read, rather than drop
    entries that checking the branch out would restore."""
    try:
        done = run_git(folder, *args)
        if done.returncode == 0:
            return done.stdout
        why = done.stderr.strip() or f"exit code {done.returncode}"
    except OSError as exc:
        why = exc.strerror or str(exc)
    said = "\n".join(f"    {line}" for line in why.splitlines())
    raise DblError(
        f"gc refused: git cannot read the lockfiles of branch {branch} (git {args[0]}):\n{said}\n"
        "  gc keeps what the lockfiles of every local git branch refer to, so it cannot run while git cannot "
        f"read that branch: repair it (`git fsck` names what is missing) or delete it (git branch -D {branch}), "
        "then run gc again"
    )


@contextlib.contextmanager
def _all_build_locks(project: Project):
    """The build locks of this project and of every project that built beside it (they share .dbl/)."""
    stems = {project.path.stem}
    for held in project.state_dir.glob("build-*.lock"):
        stems.add(held.name[len("build-") : -len(".lock")])
    with contextlib.ExitStack() as stack:
        for stem in sorted(stems):
            if stem == project.path.stem:
                stack.enter_context(BuildLock(project))
                continue
            lock = BuildLock(SimpleNamespace(state_dir=project.state_dir, path=project.dir / f"{stem}.toml"))
            try:
                stack.enter_context(lock)
            except LockHeld:  # said of that project, not as "another build of this project"
                raise LockHeld(
                    f"a build of {stem}.toml is running ({lock.holder()}), which shares .dbl/ with this project "
                    "and may restore from any of its entries; wait for it or stop it"
                ) from None
        yield
