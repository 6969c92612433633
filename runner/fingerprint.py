"""Canonical JSON, content hashes, and the stat cache that keeps unchanged files from being re-read."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from runner import tempnames
from runner.errors import ImageError
from runner.imagefiles import list_images, unreadable

CHUNK = 1 << 20
# Files hashed at once (FileHasher.read_ahead): enough to keep an SSD busy, each thread reading in order.
HASH_THREADS = min(4, os.cpu_count() or 1)


class StateCacheWarning(UserWarning):
    """The file-hash cache could not be saved; nothing is wrong but speed."""


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the same data always gives the same text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def fingerprinted(value: Any) -> Any:
    """`value` without its display-only parts: dict keys starting with '_' (names, folders)."""
    if isinstance(value, dict):
        return {k: fingerprinted(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [fingerprinted(v) for v in value]
    return value


def fingerprint(inputs: dict) -> str:
    """The sha256 of a step's inputs, names and other display-only keys left out."""
    return hashlib.sha256(canonical_json(fingerprinted(inputs)).encode()).hexdigest()


def manifest_hash(manifest: dict[str, str]) -> str:
    """One hash for a set of files given as {relative path: sha256}."""
    return hashlib.sha256(canonical_json(manifest).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def copy_hashed(src: Path, dst: Path) -> tuple[str, os.stat_result]:
    """Copy the file `src` to a new file `dst`, hashing each chunk as it is written: the sha256 of the bytes
    `dst` holds (whatever `src` holds before or after), and the stat of `dst` once they are written. One read
    where a copy and a hash of the copy are two."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(src, "rb", buffering=0) as fin, open(dst, "xb") as fout:
        while n := fin.readinto(buffer):
            digest.update(view[:n])
            fout.write(view[:n])
        fout.flush()
        return digest.hexdigest(), os.fstat(fout.fileno())


class FileHasher:
    """sha256 of files, cached by (path, size, mtime_ns, inode, ctime_ns) in a JSON state file.

    A cache miss reads the file once; a hit costs one stat. The change time is in the key because a
    tool can write a file and then set its old mtime back (os.utime, `touch -r`, rsync -t, a backup
    restore); the kernel moves ctime on any write or utime, and nobody can set it back. `dbl check`
    re-reads everything for file systems whose ctime cannot be trusted either. The state is saved
    atomically, so two processes can share it: the last writer wins and the loser only loses cache
    entries. Entries of an older key shape simply miss, which costs one re-read.
    """

    def __init__(self, state_path: Path | None = None, *, reread: bool = False):
        """reread: trust no cached hash; read each file once (`dbl check`), and store what was read."""
        self.state_path = state_path
        self.reread = reread
        self._read_now: set[str] = set()
        self._cache: dict[str, list] = {}
        self._dirty = False
        self.reads = 0  # files actually read, for tests and benchmarks
        self._save_failed = False
        self._saved_at = time.monotonic()  # when the state file was last written (or read)
        if state_path is not None and state_path.is_file():
            try:
                loaded = json.loads(state_path.read_text())
                if isinstance(loaded, dict) and loaded.get("version") == 1:
                    self._cache = loaded.get("files", {})
            except (OSError, ValueError):
                self._cache = {}  # a broken cache is only a slower start

    def hash(self, path: Path, st: os.stat_result | None = None) -> str:
        """The file's sha256; `st`, its stat when the caller has just taken it (one stat a file)."""
        st = st or os.stat(path)
        return self._known(path, st) or self.rehash(path, st)

    def _known(self, path: Path, st: os.stat_result) -> str | None:
        """The hash the cache holds for the file whose stat is `st`, where it may answer (None: read it)."""
        key = str(path)
        cached = self._cache.get(key)
        trusted = key in self._read_now or not self.reread
        if trusted and isinstance(cached, list) and len(cached) == 5 and cached[:4] == _stamp(st):
            return cached[4]
        return None

    def read_ahead(self, paths: list[Path]) -> dict[Path, os.stat_result]:
        """Hash at once, on threads, the files of `paths` that `hash` would read (regular files the cache
        has no current entry for): sha256 and the reads let go of the interpreter, so a model folder's
        files take about as long as the largest of them, not as all of them one after another. What
        cannot be hashed here is left as it is, for `hash` to read and say why. The stats taken, by path:
        handed to `hash`, no file is stat'ed twice."""
        stats, todo = {}, []
        for path in paths:
            try:
                st = stats[path] = os.stat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and self._known(path, st) is None:
                todo.append((path, st))
        if len(todo) < 2:
            return stats

        def read(item):
            try:
                return sha256_file(item[0])
            except OSError:
                return None

        with ThreadPoolExecutor(min(HASH_THREADS, len(todo))) as pool:
            for (path, st), digest in zip(todo, pool.map(read, todo), strict=True):
                if digest is not None:
                    self.reads += 1
                    self._store(path, st, digest)
        return stats

    def matches(self, path: Path, item: dict, st: os.stat_result | None = None) -> bool:
        """Whether the file at `path` holds the bytes a lockfile output entry ({"sha256", "size"}) records:
        its size first, then its hash (a stat in all where the cache knows the file). `st`, its stat when
        the caller has just taken it. OSError where the file cannot be read."""
        st = st or os.stat(path)
        return st.st_size == item.get("size") and self.hash(path, st) == item.get("sha256")

    def cached(self, path: Path) -> str | None:
        """The hash the cache would answer for `path` without reading it (None: it would read it)."""
        entry = self._cache.get(str(path))
        try:
            current = isinstance(entry, list) and len(entry) == 5 and entry[:4] == _stamp(os.stat(path))
        except OSError:
            return None
        return entry[4] if current else None

    def rehash(self, path: Path, st: os.stat_result | None = None) -> str:
        """Read the file whatever the cache says, and remember what was read."""
        st = st or os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            # Reading a named pipe waits for a writer, and a device may never end.
            raise OSError(f"{path}: not a regular file")
        digest = sha256_file(path)
        self.reads += 1
        self._store(path, st, digest)
        return digest

    def _store(self, path: Path, st: os.stat_result, digest: str) -> None:
        """Remember `digest` as what the file at `path` held when its stat was `st` (taken before it was
        read: a file written since then misses, and is read again)."""
        self._cache[str(path)] = _stamp(st) + [digest]
        self._read_now.add(str(path))
        self._dirty = True

    def wrote(self, path: Path, st: os.stat_result, digest: str) -> None:
        """Remember `digest` as the hash of `path`, a file this process has just written and hashed the bytes
        of as it wrote them (copy_hashed), `st` its stat after the last write: no later hash re-reads it."""
        self._store(path, st, digest)

    def moved(self, old: Path, new: Path) -> None:
        """Carry the hash of `old` over to `new`, the same file renamed with its folder (which keeps its
        inode, size and times), without reading it; a file the stat shows to be another is read."""
        entry = self._cache.pop(str(old), None)
        if isinstance(entry, list) and len(entry) == 5 and entry[:4] == _stamp(os.stat(new)):
            self._cache[str(new)] = entry
            self._dirty = True
            if str(old) in self._read_now:
                self._read_now.add(str(new))
        else:
            self.hash(new)

    def forget(self, paths) -> None:
        """Drop the hashes of files that are gone (a step's outputs its new ones replaced), so that the
        state file holds the files there are, not every file a project ever had."""
        for path in paths:
            if self._cache.pop(str(path), None) is not None:
                self._dirty = True

    def take(self, other: FileHasher, roots: list[Path]) -> bool:
        """Copy the entries of `other` for the files under `roots` (files, or folders) that differ from this
        cache's; whether any did. Each stays keyed by its file's stat: one of a file changed since misses."""
        names, prefixes = {str(r) for r in roots}, tuple(str(r) + os.sep for r in roots)
        changed = False
        for key, entry in other._cache.items():
            if (key in names or key.startswith(prefixes)) and self._cache.get(key) != entry:
                self._cache[key] = entry
                changed = True
        self._dirty |= changed
        return changed

    def manifest(self, folder: Path, files: list[Path] | None = None) -> dict[str, str]:
        """{relative posix path: sha256} of `files` (default: the images of `folder`)."""
        files = list_images(folder) if files is None else files
        stats = self.read_ahead(files)
        result, errors = {}, []
        for path in files:
            try:
                result[recorded_name(path, folder)] = self.input_hash(path, st=stats.get(path))
            except ImageError as exc:  # each file said, not the first alone
                errors.append(str(exc))
        if errors:
            raise ImageError(unreadable(errors), errors)
        return result

    def input_hash(self, path: Path, what: str = "an image", st: os.stat_result | None = None) -> str:
        """The hash of an input file (`what` it must be; `st`, its stat when just taken); one that cannot
        be read is an error naming it."""
        try:
            return self.hash(path, st)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a.png -> b.png -> a.png: it exists, and leads nowhere
                raise ImageError(
                    f"{path}: a symbolic link to {os.readlink(path)}, which leads back to it; fix the link or "
                    "remove it"
                ) from None
            if path.is_symlink() and not path.exists():
                raise ImageError(
                    f"{path}: a symbolic link to {os.readlink(path)}, which does not exist; fix the link or "
                    "remove it"
                ) from None
            if path.exists() and not path.is_file():
                kind = "a named pipe" if path.is_fifo() else "a device or socket"
                raise ImageError(f"{path}: {kind}, not a file; {what} must be a file: remove it") from None
            raise ImageError(f"{path}: cannot be read ({exc.strerror or exc})") from None

    def tree(self, folder: Path, what: str = "a file") -> dict[str, str]:
        """{relative posix path: sha256} of every file under `folder`, hidden ones included. One that
        cannot be read (a link to a file that is gone, as an interrupted download leaves) is an error
        naming it and the fix; `what` says what each must be."""
        files = []
        for root, dirs, names in os.walk(folder):
            dirs.sort()
            files += [Path(root) / name for name in sorted(names)]
        stats = self.read_ahead(files)
        return {recorded_name(path, folder): self.input_hash(path, what, stats.get(path)) for path in files}

    def save(self, max_age_s: float | None = None) -> None:
        """Write the cache. It is only a cache: a full disk or a read-only folder costs a warning
        (once) and re-reads next time, never the command that was hashing.

        max_age_s: write only when the last write is older than this; otherwise what was hashed since
        waits for a later save (the file holds every hash, so writing it after each of many quick steps
        cost more than the steps)."""
        if not self._dirty or self.state_path is None:
            return
        if max_age_s is not None and time.monotonic() - self._saved_at < max_age_s:
            return
        tmp = self.state_path.with_name(f"{self.state_path.name}.tmp-{tempnames.suffix()}")
        try:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"version": 1, "files": self._cache}, separators=(",", ":")))
            os.replace(tmp, self.state_path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if not self._save_failed:
                self._save_failed = True
                warnings.warn(
                    StateCacheWarning(
                        f"cannot save the file-hash cache {self.state_path} ({exc.strerror or exc}); "
                        "going on without it: unchanged files are re-read next time"
                    ),
                    stacklevel=2,
                )
            return
        self._dirty = False
        self._saved_at = time.monotonic()


def recorded_name(path: Path, folder: Path) -> str:
    """`path` relative to `folder`, as the lockfile records it; a name that is not UTF-8 cannot be."""
    rel = path.relative_to(folder).as_posix()
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raise ImageError(
            f"{folder}: the file name {os.fsencode(rel)!r} is not valid UTF-8 (it came from another "
            "system's encoding); rename it to a UTF-8 name: dbl records file names in the lockfile, "
            "which is UTF-8 text"
        ) from None
    return rel


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def hub_revision(repo_id: str, revision: str | None) -> str:
    """Resolve a hub revision to a commit from the local Hugging Face cache, without the network.

    A 40-hex revision is a commit already. Otherwise the cache's refs/<revision> file names the
    commit last downloaded; when the model is not cached yet the revision name itself is used.
    """
    rev = revision or "main"
    if len(rev) == 40 and all(c in "0123456789abcdef" for c in rev):
        return rev
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(Path.home(), ".cache", "huggingface")), "hub"
    )
    ref = Path(cache) / f"models--{repo_id.replace('/', '--')}" / "refs" / rev
    try:
        return ref.read_text().strip() or rev
    except OSError:
        return rev


MODEL_FILE = "each entry of a model folder"


@contextlib.contextmanager
def _model_hashes(hasher: FileHasher, roots: list[Path]):
    """While open, `hasher` knows the hashes of the files under `roots` that dbl's per-user cache of model
    file hashes holds (`$DBL_HOME/model-hashes`); what it reads meanwhile is kept there. So a project that
    names a model folder another one hashed (a second project, a fresh clone) does not read its gigabytes
    again. A cache that cannot be saved there is only slower: no warning."""
    from runner.models.builtin import dbl_home

    shared = FileHasher(dbl_home() / "model-hashes") if roots else None
    if shared is not None:
        hasher.take(shared, roots)
    before = hasher.reads
    yield
    if shared is not None and hasher.reads > before and shared.take(hasher, roots):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StateCacheWarning)
            shared.save()


def base_model_identity(base, hasher: FileHasher) -> dict:
    """What makes a base model itself: a built-in's name and version, a hub id and revision, or content.

    The model family is display-only (`_family`) for sd1, so that identities made before families
    existed keep their fingerprints; any other family is part of the identity. A single file's
    base_model_config is part of it when set (a folder by its content, a hub id by its revision).
    """
    config = getattr(base, "config", None)
    roots = [Path(base.ref)] if base.kind in ("file", "folder") else []
    roots += [Path(config)] if config is not None and Path(config).is_dir() else []
    with _model_hashes(hasher, roots):
        return _identity(base, hasher, config)


def _identity(base, hasher: FileHasher, config: str | None) -> dict:
    from runner import families  # light: no torch

    try:
        family = families.detect(base)
    except families.ModelError:
        family = None  # an unsupported model: the step that loads it says so
    if base.kind == "builtin":
        identity = {"builtin": base.ref, **family.builtin_identity(base.ref)}
    elif base.kind == "hub":
        identity = {"hub": base.ref, "revision": hub_revision(base.ref, base.revision)}
    elif base.kind == "file":
        identity = {"file_sha256": hasher.hash(Path(base.ref))}
    else:
        identity = {"folder_sha256": manifest_hash(hasher.tree(Path(base.ref), MODEL_FILE))}
    if family is not None:
        identity["_family" if family.name == families.DEFAULT else "family"] = family.name
    if config is not None:
        if Path(config).is_dir():
            identity["config"] = {"folder_sha256": manifest_hash(hasher.tree(Path(config), MODEL_FILE))}
        else:
            identity["config"] = {"hub": config, "revision": hub_revision(config, None)}
    return identity
