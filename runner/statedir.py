"""The `.dbl/` folder beside the run-cache (runner.store): the build lock, the step work folders, and the
facts of a project's files that the planner reads.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING

from runner.fingerprint import FileHasher, base_model_identity
from runner.imagefiles import list_images
from runner.models import BaseModel
from runner.project.schema import Project
from runner.reasons import naming

if TYPE_CHECKING:
    from runner.store import RunCache

# What Path.is_file takes for "not there" rather than an error: a missing file or folder, a loop of links.
_NOT_THERE = (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP)


class LockHeld(Exception):
    """Another build of the same project is running."""


def keep_out_of_git(state_dir: Path) -> None:
    """Give .dbl/ a .gitignore that ignores all of it, as DVC does its own folder: in a project made without
    `dbl init` (whose .gitignore names .dbl/), `git add -A` would commit the run-cache, gigabytes of
    adapters. Never fails a command: a folder it cannot write to is left as it is."""
    ignore = state_dir / ".gitignore"
    if state_dir.is_dir() and not ignore.exists():
        with contextlib.suppress(OSError):
            ignore.write_text(
                "# Written by dbl: the run-cache and build state, not for version control.\n*\n"
            )


def has_files(folder: Path) -> bool:
    """Whether `folder` holds anything; False where it is not there, or is no folder."""
    try:
        return any(folder.iterdir())
    except OSError:
        return False


class BuildLock:
    """An exclusive lock on one project's builds: a flock on `.dbl/build-<stem>.lock`.

    The kernel drops a flock when its process dies, so a lock left by a killed build never blocks.
    The file also says who holds it, for the message the second build prints.
    """

    def __init__(self, project: Project):
        self.path = project.state_dir / f"build-{project.path.stem}.lock"
        self._fd: int | None = None

    def __enter__(self) -> BuildLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise LockHeld(
                f"another build of this project is running ({self.holder()}); wait for it or stop it"
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        self._fd = fd
        return self

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            return f"pid {info['pid']} on {info['host']} since {info['since']}"
        except (OSError, ValueError, KeyError):
            return "holder unknown"

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Snapshot(dict):
    """{path: (size, mtime_ns, ctime_ns, inode)} of every file under some paths, to tell whether any of
    them changed in between. The change time moves on every write and cannot be set back, so even an
    edit that restores a file's bytes, size and mtime shows."""

    def changed_since(self, before: Snapshot) -> list[Path]:
        return sorted(Path(p) for p in set(self) | set(before) if self.get(p) != before.get(p))


def stat_snapshot(paths: list[Path], hidden: bool = True) -> Snapshot:
    """The Snapshot of every file under `paths`; `hidden=False` leaves out hidden files and folders
    (those whose name starts with '.'), which no step reads from an image folder."""
    snap = Snapshot()

    def add(path: str) -> None:
        try:
            st = os.stat(path)
        except OSError:
            snap[path] = None
            return
        snap[path] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)

    for path in paths:
        path = Path(path)
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if hidden or not d.startswith("."))
                for name in names:
                    if hidden or not name.startswith("."):
                        add(os.path.join(root, name))
        else:
            add(str(path))
    return snap


def work_root(project) -> Path:
    """Where a project's steps keep their work folders (a train step's checkpoints to resume from)."""
    return project.state_dir / "tmp" / project.path.stem


def work_folder(project, kind: str, name: str) -> Path:
    """The work folder of step `kind:name` of `project`."""
    return work_root(project) / f"{kind}-{name}"


COMMIT_PREFIXES = (".staged-", ".trash-")  # beside the work folders, while a step's outputs are committed


def commit_folders(project, kind: str, name: str) -> tuple[Path, Path]:
    """Where committing step `kind:name` copies its new outputs, and where it puts the old ones aside."""
    staged, trash = COMMIT_PREFIXES
    return work_root(project) / f"{staged}{kind}-{name}", work_root(project) / f"{trash}{kind}-{name}"


class DiskFacts:
    """The planner's view of the file system, through the stat-cached hasher."""

    def __init__(self, project: Project, hasher: FileHasher, cache: RunCache):
        self.project = project
        self.hasher = hasher
        self.cache = cache
        self._base: dict | None = None
        self._images: dict[str, dict] = {}
        # list_images of each folder, which a subject's images and its captions both need
        self._listed: dict[str, list[Path]] = {}

    def _list(self, folder: str) -> list[Path]:
        if folder not in self._listed:
            self._listed[folder] = list_images(Path(folder))
        return self._listed[folder]

    def images(self, folder: str) -> dict[str, str]:
        if folder not in self._images:
            self._images[folder] = self.hasher.manifest(Path(folder), self._list(folder))
        return self._images[folder]

    def captions(self, folder: str, extension: str) -> dict[str, str]:
        """{relative path: sha256} of the caption files beside the images of `folder`."""
        key = f"{folder}\0{extension}"
        if key not in self._images:
            files = [p.with_suffix(extension) for p in self._list(folder)]
            self._images[key] = self.hasher.manifest(Path(folder), [p for p in files if p.is_file()])
        return self._images[key]

    def forget(self) -> None:
        """Drop what was hashed so far: the next questions look at the files as they are now."""
        self._images.clear()
        self._listed.clear()
        self._base = None

    def base_model_paths(self) -> list[Path]:
        """The base model's file or folder when it is local, and its local base_model_config folder: their
        content is an input."""
        base = BaseModel.of(self.project.settings, self.project.dir)
        paths = [Path(base.ref)] if base.kind in ("file", "folder") else []
        if base.config is not None and Path(base.config).is_dir():
            paths.append(Path(base.config))
        return paths

    def base_model(self) -> dict:
        if self._base is None:
            s = self.project.settings
            base = BaseModel.of(s, self.project.dir)
            self._base = base_model_identity(base, self.hasher)
        return self._base

    def outputs_intact(self, record: dict, output_dir: str) -> str | None:
        from runner.steps import relative

        outputs = record.get("outputs", {})
        folder = relative(self.project, self.project.out / output_dir)
        elsewhere = [rel for rel in outputs if not rel.startswith(f"{folder}/")]
        base = self.project.dir
        if elsewhere:  # [project] out or name changed: the folder the outputs belong in is another
            was = os.path.commonpath([os.path.dirname(r) for r in elsewhere])
            return naming("outputs in {}, not {}", was, folder, base=base)
        for rel, item in sorted(outputs.items()):
            path = self.project.dir / rel
            try:
                # One stat a file, which the hasher's cache reuses: a plan of many outputs did three.
                st = os.stat(path)
            except OSError as exc:
                return naming(
                    f"output {{}} {'missing' if exc.errno in _NOT_THERE else 'unreadable'}", rel, base=base
                )
            if not stat.S_ISREG(st.st_mode):
                return naming("output {} missing", rel, base=base)
            try:
                if not self.hasher.matches(path, item, st):
                    # not necessarily edited: after a pull or a checkout, another build's outputs
                    return naming(
                        "output {} differs from the lockfile's: another build's, or edited", rel, base=base
                    )
            except OSError:
                return naming("output {} unreadable", rel, base=base)
        return None

    def resumable(self, step, fingerprint: str) -> str | None:
        from runner import steps

        kind = steps.get(step.kind)
        if kind.resumable is None:
            return None
        work = work_folder(self.project, step.kind, step.name)
        try:  # the marker runner.exec.job.prepare writes: the work folder of another fingerprint is dropped
            if (work / "fingerprint").read_text() != fingerprint:
                return None
        except OSError:
            return None
        return kind.resumable(work, step.spec, self.project)

    def has_outputs(self, output_dir: str) -> bool:
        return has_files(self.project.out / output_dir)

    def restores(self, fingerprint: str, unhashed: dict | None = None, since: int = 0) -> str | None:
        """The output hash a restore of this fingerprint gives (see RunCache.restores); none where a file of the
        entry is known to be altered."""
        return self.cache.restores(fingerprint, unhashed, since, known=self.hasher.cached)
