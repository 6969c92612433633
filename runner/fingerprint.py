"""Canonical JSON, content hashes, and the stat cache that keeps unchanged files from being re-read."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from runner.imagefiles import list_images

CHUNK = 1 << 20


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


class FileHasher:
    """sha256 of files, cached by (path, size, mtime_ns, inode) in a JSON state file.

    A cache miss reads the file once; a hit costs one stat. The state is saved atomically, so two
    processes can share it: the last writer wins and the loser only loses cache entries.
    """

    def __init__(self, state_path: Path | None = None):
        self.state_path = state_path
        self._cache: dict[str, list] = {}
        self._dirty = False
        self.reads = 0  # files actually read, for tests and benchmarks
        if state_path is not None and state_path.is_file():
            try:
                loaded = json.loads(state_path.read_text())
                if isinstance(loaded, dict) and loaded.get("version") == 1:
                    self._cache = loaded.get("files", {})
            except (OSError, ValueError):
                self._cache = {}  # a broken cache is only a slower start

    def hash(self, path: Path) -> str:
        st = os.stat(path)
        key = str(path)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        cached = self._cache.get(key)
        if cached is not None and cached[:3] == stamp:
            return cached[3]
        digest = sha256_file(path)
        self.reads += 1
        self._cache[key] = stamp + [digest]
        self._dirty = True
        return digest

    def manifest(self, folder: Path, files: list[Path] | None = None) -> dict[str, str]:
        """{relative posix path: sha256} of `files` (default: the images of `folder`)."""
        files = list_images(folder) if files is None else files
        return {p.relative_to(folder).as_posix(): self.hash(p) for p in files}

    def tree(self, folder: Path) -> dict[str, str]:
        """{relative posix path: sha256} of every file under `folder`, hidden ones included."""
        result = {}
        for root, dirs, names in os.walk(folder):
            dirs.sort()
            for name in sorted(names):
                path = Path(root) / name
                result[path.relative_to(folder).as_posix()] = self.hash(path)
        return result

    def save(self) -> None:
        if not self._dirty or self.state_path is None:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(f"{self.state_path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"version": 1, "files": self._cache}, separators=(",", ":")))
        os.replace(tmp, self.state_path)
        self._dirty = False


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


def base_model_identity(base, hasher: FileHasher) -> dict:
    """What makes a base model itself: a built-in's name and version, a hub id and revision, or content.

    The model family is display-only (`_family`) for sd1, so that identities made before families
    existed keep their fingerprints; any other family is part of the identity.
    """
    from runner import families  # light: no torch

    try:
        family = families.detect(base)
    except families.ModelError:
        family = None  # an unsupported model: the step that loads it says so
    if base.kind == "builtin":
        identity = {"builtin": base.ref, "version": family.builtin_version}
    elif base.kind == "hub":
        identity = {"hub": base.ref, "revision": hub_revision(base.ref, base.revision)}
    elif base.kind == "file":
        identity = {"file_sha256": hasher.hash(Path(base.ref))}
    else:
        identity = {"folder_sha256": manifest_hash(hasher.tree(Path(base.ref)))}
    if family is not None:
        identity["_family" if family.name == families.DEFAULT else "family"] = family.name
    return identity
