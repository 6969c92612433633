"""The `.dbl/` folder: the build lock, the run-cache, step work folders, and the file facts of a project.

Every write here is atomic (write aside, then rename), so a build killed at any point leaves either the
old state or the new one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import stat
import time
from pathlib import Path

from runner import tempnames
from runner.fingerprint import FileHasher, base_model_identity, manifest_hash, sha256_file
from runner.imagefiles import list_images
from runner.models import BaseModel
from runner.project.schema import Project

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


def made_under(meta: dict, unhashed: dict | None) -> bool:
    """Whether a run-cache entry (its manifest) was made under `unhashed`, the values out of the
    fingerprint its outputs depend on (StepKind.unhashed); None, for a kind whose outputs depend on none,
    fits every entry."""
    return unhashed is None or meta.get("unhashed") == unhashed


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


FSYNC_THREADS = 8  # files fsync_tree flushes at once


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` to disk, several at once: each fsync waits for the journal to commit,
    and fsyncs that wait together share a commit (a render's 50 images: 0.18 s one by one, 0.01 s eight at a
    time, on ext4). An error is raised once every fsync has ended."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [Path(root) / name for root, _, files in os.walk(folder) for name in files]
    with ThreadPoolExecutor(max(1, min(FSYNC_THREADS, len(paths))), thread_name_prefix="dbl-fsync") as pool:
        list(pool.map(_fsync_file, paths))


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def copy_tree(src: Path, dst: Path, names: dict[str, str] | None = None) -> None:
    """Copy a folder's files (content only: no metadata to carry between cache and outputs), renaming
    the files that `names` maps ({relative path in src: relative path in dst}).

    The first error is raised as it is (shutil.copytree would try every file and raise them all as one
    list), and what was copied is removed: on a full disk, a step fails with one OS error and no
    half-copied folder takes space.
    """
    try:
        for root, dirs, files in os.walk(src, onerror=_raise):  # a missing src is an error, as in copytree
            dirs.sort()
            folder = dst / Path(root).relative_to(src)
            folder.mkdir(parents=True, exist_ok=True)
            for name in sorted(files):
                shutil.copyfile(Path(root) / name, folder / name)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise
    for old, new in (names or {}).items():
        if old != new and (dst / old).is_file():
            (dst / new).parent.mkdir(parents=True, exist_ok=True)
            os.replace(dst / old, dst / new)


def _raise(error: OSError) -> None:
    raise error


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


def file_manifest(folder: Path, hasher: FileHasher) -> dict[str, dict]:
    """{relative path: {sha256, size}} of every file under `folder`."""
    result = {}
    for rel, digest in hasher.tree(folder).items():
        result[rel] = {"sha256": digest, "size": (folder / rel).stat().st_size}
    return result


def output_hash(manifest: dict[str, dict]) -> str:
    return manifest_hash({rel: item["sha256"] for rel, item in manifest.items()})


# 2: files named after a step are kept under their kind's cache names (see StepKind.layout).
MANIFEST_VERSION = 2


class RunCache:
    """Content kept by fingerprint in `.dbl/cache/<fp>/`: `files/` and `manifest.json`.

    Restoring an entry is a verified copy, so reverting an edit brings outputs back without running.
    Entries are written to a temp folder and renamed into place, so concurrent builds (two projects in
    one folder) can share the cache safely: whoever renames first wins, and both entries are identical.
    """

    # What `store` says of the entry a forced rerun replaced.
    HELD_SAME = "it held the same bytes"
    HELD_DIFFERENT = "it held different bytes"

    def __init__(self, root: Path):
        self.root = root

    def entry(self, fingerprint: str) -> Path:
        return self.root / fingerprint

    def has(self, fingerprint: str) -> bool:
        return (self.entry(fingerprint) / "manifest.json").is_file()

    def manifest(self, fingerprint: str) -> dict | None:
        """The entry's manifest.json, or None when there is none or it is not a well-formed manifest."""
        try:
            meta = json.loads((self.entry(fingerprint) / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        return meta if _well_formed(meta) else None

    def store(
        self,
        fingerprint: str,
        files: Path,
        manifest: dict,
        metrics: dict,
        replace: bool = False,
        unhashed: dict | None = None,
    ) -> str:
        """Move the folder `files` into the cache under `fingerprint`. An intact entry that is there
        already is kept, unless `replace` (a forced rerun): then it is replaced, and what the old one
        held is described in the returned text ("" when nothing was replaced). `unhashed`: the values out
        of the fingerprint the files depend on (StepKind.unhashed), kept with them; an entry made under
        other values is replaced."""
        entry = self.entry(fingerprint)
        old = self.manifest(fingerprint)
        intact = old is not None and self.verify(fingerprint) is not None  # a damaged one is dropped
        other = intact and not made_under(old, unhashed)
        if intact and not replace and not other:
            shutil.rmtree(files, ignore_errors=True)
            return ""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{fingerprint}.tmp-{_tag()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        meta = {
            "version": MANIFEST_VERSION,
            "outputs": manifest,
            "output_hash": output_hash(manifest),
            "metrics": metrics,
        }
        if unhashed is not None:
            meta["unhashed"] = unhashed
        try:
            shutil.move(str(files), str(tmp / "files"))
            (tmp / "manifest.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            fsync_tree(tmp)
        except BaseException:
            # A full disk: free what was moved or written at once, rather than keep it in a hidden folder
            # until `dbl gc` (the step fails; it reruns next time).
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replaced = ""
        if intact:  # and replace, or made under other values
            same = old["output_hash"] == meta["output_hash"]
            replaced = (self.HELD_SAME if same else self.HELD_DIFFERENT) if replace else ""
            self.drop(fingerprint)
        try:
            os.rename(tmp, entry)
        except OSError:
            # Something is there: another build's entry, stored since we looked (keep it: a build that
            # restores it may be copying it now), or a damaged one (verify drops those; so do we when
            # its manifest is unreadable).
            if self.verify(fingerprint) is None:
                self.drop(fingerprint)
                try:
                    os.rename(tmp, entry)
                    return replaced
                except OSError:
                    pass
            shutil.rmtree(tmp, ignore_errors=True)
        return replaced

    def verify(
        self,
        fingerprint: str,
        layout: dict[str, str] | None = None,
        warn=lambda message: None,
        unhashed: dict | None = None,
    ) -> dict | None:
        """The entry's manifest if every file is there with its hash, else None. A damaged entry is
        reported through `warn`, with its path, and dropped. With `unhashed` (the values out of the
        fingerprint a step's outputs depend on), an entry made under others, or under unrecorded ones, is
        None too (and kept).

        `layout` maps output files named after a step (cache name -> output name); an entry written
        before such names were kept out of the cache holds the output names, and only fits a step of
        the same name.
        """
        entry = self.entry(fingerprint)
        if not entry.exists():
            return None
        meta = self.manifest(fingerprint)
        if meta is None:
            warn(f"run-cache entry {entry} is damaged (manifest.json unreadable); dropped it")
            self.drop(fingerprint)
            return None
        if not made_under(meta, unhashed):
            return None  # before its files are read: an entry of other values is not restored, whole or not
        files = entry / "files"
        for rel, item in meta["outputs"].items():
            path = files / rel
            if (
                not path.is_file()
                or path.stat().st_size != item["size"]
                or sha256_file(path) != item["sha256"]
            ):
                warn(f"run-cache entry {entry} is damaged ({rel} missing or altered); dropped it")
                self.drop(fingerprint)
                return None
        old_layout = meta.get("version", 1) < MANIFEST_VERSION
        if old_layout and layout and not all(v in meta["outputs"] for v in layout.values()):
            return None  # an older entry whose files carry another step's name
        return meta

    def drop(self, fingerprint: str) -> None:
        trash = self.root / f".{fingerprint}.trash-{_tag()}"
        try:
            os.rename(self.entry(fingerprint), trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def leftovers(self) -> list[Path]:
        """Temp and trash folders of builds of this host that died while writing the cache (their process
        is gone). Another host's are left alone: whether their process lives, only that host can tell."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            if path.name.startswith(".") and tempnames.left_by_dead_process(path.name):
                found.append(path)
        return sorted(found)

    def entries(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith("."))


def _well_formed(meta) -> bool:
    return (
        isinstance(meta, dict)
        and isinstance(meta.get("outputs"), dict)
        and isinstance(meta.get("output_hash"), str)
        and all(
            isinstance(item, dict)
            and isinstance(item.get("sha256"), str)
            and isinstance(item.get("size"), int)
            for item in meta["outputs"].values()
        )
    )


def _tag() -> str:
    """A temp-name suffix unique to this process on every host; `leftovers` reads its host and pid."""
    return tempnames.suffix()


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
        if elsewhere:  # [project] out or name changed: the folder the outputs belong in is another
            return f"outputs in {os.path.commonpath([os.path.dirname(r) for r in elsewhere])}, not {folder}"
        for rel, item in sorted(outputs.items()):
            path = self.project.dir / rel
            try:
                # One stat a file, which the hasher's cache reuses: a plan of many outputs did three.
                st = os.stat(path)
            except OSError as exc:
                return f"output {rel} {'missing' if exc.errno in _NOT_THERE else 'unreadable'}"
            if not stat.S_ISREG(st.st_mode):
                return f"output {rel} missing"
            try:
                if st.st_size != item.get("size") or self.hasher.hash(path, st) != item["sha256"]:
                    # not necessarily edited: after a pull or a checkout, another build's outputs
                    return f"output {rel} differs from the lockfile's: another build's, or edited"
            except OSError:
                return f"output {rel} unreadable"
        return None

    def has_outputs(self, output_dir: str) -> bool:
        return has_files(self.project.out / output_dir)

    def restores(self, fingerprint: str, unhashed: dict | None = None) -> str | None:
        """The output hash a restore of this fingerprint gives (as the lockfile records it), or None when
        the run-cache holds no well-formed entry with every file at its size (not re-hashed: a restore
        verifies the bytes), or, with `unhashed`, none made under these values."""
        meta = self.cache.manifest(fingerprint)
        if meta is None or not made_under(meta, unhashed):
            return None
        files = self.cache.entry(fingerprint) / "files"
        try:
            intact = all(
                (files / rel).stat().st_size == item["size"] for rel, item in meta["outputs"].items()
            )
        except OSError:
            return None
        return output_hash(meta["outputs"]) if intact else None
