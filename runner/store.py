"""The run-cache in `.dbl/cache/`: entries of step outputs kept by fingerprint, their manifests, and the rules
by which an entry restores. (The rest of `.dbl/`, the build lock and work folders, is runner.statedir.)

Every write here is atomic (write aside, then rename), so a build killed at any point leaves either the
old state or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from runner import tempnames
from runner.fingerprint import FileHasher, copy_hashed, manifest_hash, recorded_name, sha256_file

# The build lock, work folders and file facts live in runner.statedir; their names are kept here too, where
# the rest of dbl (and scripts) have always imported them from.
from runner.statedir import (  # noqa: F401
    COMMIT_PREFIXES,
    BuildLock,
    DiskFacts,
    LockHeld,
    Snapshot,
    commit_folders,
    has_files,
    keep_out_of_git,
    stat_snapshot,
    work_folder,
    work_root,
)


def made_under(meta: dict, unhashed: dict | None, since: int = 0) -> bool:
    """Whether a run-cache entry (its manifest) fits a step: made under `unhashed`, the values out of the
    fingerprint its outputs depend on (StepKind.unhashed; None, for a kind whose outputs depend on none,
    fits every entry), and in epoch `since` or later (see EPOCH; 0 fits every entry)."""
    return (unhashed is None or meta.get("unhashed") == unhashed) and epoch_of(meta) >= since


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


def stage(src: Path, dst: Path, names: dict[str, str], hasher: FileHasher) -> dict[str, dict]:
    """Copy a folder's files into the new folder `dst` (content only: no metadata to carry between cache and
    outputs), renaming those that `names` maps ({relative path in src: relative path in dst}), and hash each
    as it is written: {relative path in src: {sha256, size}} of the bytes `dst` holds now. `hasher` keeps
    each hash by its copy's stat, so that no plan re-reads them: every byte is read once.

    The first error is raised as it is, and what was copied is removed: on a full disk, a step fails with
    one OS error and no half-copied folder takes space. A file that is not a regular one (a named pipe, a
    link to nothing) is an error that names it.
    """
    manifest, written = {}, []
    try:
        for root, dirs, files in os.walk(src, onerror=_raise):  # a missing src is an error
            dirs.sort()
            (dst / Path(root).relative_to(src)).mkdir(parents=True, exist_ok=True)
            for name in sorted(files):
                path = Path(root) / name
                rel = recorded_name(path, src)
                _regular(path, hasher)
                target = dst / names.get(rel, rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                written.append(target)
                digest, st = copy_hashed(path, target)
                hasher.wrote(target, st, digest)
                manifest[rel] = {"sha256": digest, "size": st.st_size}
    except BaseException:
        hasher.forget(written)
        shutil.rmtree(dst, ignore_errors=True)
        raise
    return manifest


def _regular(path: Path, hasher: FileHasher) -> None:
    """Raise the hasher's error naming `path` and the fix unless it is a regular file (opening a named pipe
    waits for a writer)."""
    try:
        if stat.S_ISREG(os.stat(path).st_mode):
            return
    except OSError:
        pass
    hasher.input_hash(path, "a file")  # raises
    raise OSError(f"{path}: not a regular file")


def _raise(error: OSError) -> None:
    raise error


def file_manifest(folder: Path, hasher: FileHasher) -> dict[str, dict]:
    """{relative path: {sha256, size}} of every file under `folder`."""
    result = {}
    for rel, digest in hasher.tree(folder).items():
        result[rel] = {"sha256": digest, "size": (folder / rel).stat().st_size}
    return result


def output_hash(manifest: dict[str, dict]) -> str:
    return manifest_hash({rel: item["sha256"] for rel, item in manifest.items()})


# The layout of an entry. 2: files named after a step are kept under their kind's cache names (see
# StepKind.layout). Optional keys added since (`made_by`) leave it as it is: every version of dbl reads a
# manifest's keys by name and passes over the others, and one that met a higher number would take the entry
# for its own layout all the same.
MANIFEST_VERSION = 2

# What made an entry, in its manifest as `"made_by": {"dbl": "<version>", "epoch": EPOCH}`, so that a fix can
# tell the entries made before it from those made after.
#
# EPOCH goes up by one with each fix after which some entries made before it may hold wrong bytes (outputs
# made from other weights than their fingerprint names, say), and only then: such a fix bumps EPOCH and adds
# to DISTRUSTED the new number and which steps it affects. An entry of an earlier epoch is then not restored
# for those steps (they run again, and their entry is replaced); every other entry restores as before.
# An entry with no stamp was made before stamps were written, and counts as epoch 0.
#
# 1: the first stamp. Every entry of epoch 1 or later was made after the fixes that load a cached hub model
# at the commit its identity names, and a local base model saved anew since a process loaded it; entries of
# epoch 0 may hold outputs of other weights, and a rule (1, <steps on such base models>) would skip them.
EPOCH = 1

# (epoch, applies): a step for which `applies(kind, inputs)` (its kind and fingerprint inputs) holds restores
# no entry of an epoch below `epoch`. Empty: every entry restores.
DISTRUSTED: tuple[tuple[int, Callable[[str, dict], bool]], ...] = ()


def trusted_since(kind: str, inputs: dict) -> int:
    """The earliest epoch whose run-cache entries a step (`kind`, its fingerprint `inputs`) restores."""
    return max((epoch for epoch, applies in DISTRUSTED if applies(kind, inputs)), default=0)


def distrusted(meta: dict, kind: str, inputs: dict) -> bool:
    """Whether a run-cache entry (its manifest) is of an epoch before the earliest its step (`kind`, its
    fingerprint `inputs`, as its lockfile record holds them) trusts: it never restores for that step."""
    return epoch_of(meta) < trusted_since(kind, inputs)


def epoch_of(meta: dict) -> int:
    """The epoch a run-cache entry (its manifest) was made in; 0 for one with no stamp."""
    stamp = meta.get("made_by")
    epoch = stamp.get("epoch") if isinstance(stamp, dict) else None
    return epoch if type(epoch) is int else 0


def maker(stamp: object) -> str:
    """What made a run-cache entry, said from its manifest's `made_by`: "made by dbl 0.1.0, epoch 1"."""
    epoch = epoch_of({"made_by": stamp})
    if isinstance(stamp, dict) and isinstance(stamp.get("dbl"), str):
        return f"made by dbl {stamp['dbl']}, epoch {epoch}"
    return f"made in epoch {epoch}" if epoch else "made before entries were stamped, epoch 0"


def _made_by() -> dict:
    import runner

    return {"dbl": runner.__version__, "epoch": EPOCH}


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
        self._swept = False  # whether `store` removed what killed stores left (once: they were before it)

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
        since: int = 0,
    ) -> str:
        """Move the folder `files` into the cache under `fingerprint`. An intact entry that is there
        already is kept, unless `replace` (a forced rerun): then it is replaced, and what the old one
        held is described in the returned text ("" when nothing was replaced). `unhashed`: the values out
        of the fingerprint the files depend on (StepKind.unhashed), kept with them; an entry made under
        other values, or before epoch `since` (see EPOCH), is replaced. The manifest says what made it."""
        entry = self.entry(fingerprint)
        old = self.manifest(fingerprint)
        intact = old is not None and self.verify(fingerprint) is not None  # a damaged one is dropped
        other = intact and not made_under(old, unhashed, since)
        if intact and not replace and not other:
            shutil.rmtree(files, ignore_errors=True)
            return ""
        self.root.mkdir(parents=True, exist_ok=True)
        if not self._swept:
            # What builds of this host killed while storing left (an entry's size each) goes now, not at
            # `dbl gc`: once, at the first store (a scan of the cache folder, 16 ms for 10,000 entries).
            tempnames.drop_left_folders(self.root)
            self._swept = True
        tmp = self.root / f".{fingerprint}.tmp-{_tag()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        meta = {
            "version": MANIFEST_VERSION,
            "outputs": manifest,
            "output_hash": output_hash(manifest),
            "metrics": metrics,
            "made_by": _made_by(),
        }
        if unhashed is not None:
            meta["unhashed"] = unhashed
        try:
            shutil.move(str(files), str(tmp / "files"))
            (tmp / "manifest.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            fsync_tree(tmp)
        except BaseException as exc:
            # A full disk: free what was moved or written at once, rather than keep it in a hidden folder
            # until `dbl gc` (the step fails; it reruns next time).
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.strerror and not exc.filename:  # a write names no file
                raise OSError(exc.errno, exc.strerror, str(self.root)) from None
            raise
        replaced = ""
        if intact:  # and replace, or made under other values or before `since`
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
        since: int = 0,
        read: bool = True,
    ) -> dict | None:
        """The entry's manifest if every file is there with its hash, else None. A damaged entry is reported
        through `warn`, with its path, and dropped. `read=False` checks each file's size, not its hash: for
        a caller that hashes the bytes as it copies them (a restore, see `stage`). With `unhashed` (the
        values out of the fingerprint a step's outputs depend on), an entry made under others, or under
        unrecorded ones, is None too (and kept); so is one made before epoch `since` (see EPOCH).

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
        if not made_under(meta, unhashed, since):
            return None  # before its files are read: an entry of other values is not restored, whole or not
        files = entry / "files"
        for rel, item in meta["outputs"].items():
            path = files / rel
            if (
                not path.is_file()
                or path.stat().st_size != item["size"]
                or (read and sha256_file(path) != item["sha256"])
            ):
                warn(f"run-cache entry {entry} is damaged ({rel} missing or altered); dropped it")
                self.drop(fingerprint)
                return None
        old_layout = meta.get("version", 1) < MANIFEST_VERSION
        if old_layout and layout and not all(v in meta["outputs"] for v in layout.values()):
            return None  # an older entry whose files carry another step's name
        return meta

    def restores(
        self,
        fingerprint: str,
        unhashed: dict | None = None,
        since: int = 0,
        known: Callable[[Path], str | None] | None = None,
    ) -> str | None:
        """The output hash a restore of this fingerprint gives (as the lockfile records it), or None when
        the run-cache holds no well-formed entry with every file at its size (not re-hashed: a restore
        verifies the bytes), or, with `unhashed`, none made under these values, or none made in epoch
        `since` or later. `known(path)`: the hash a file is known to have without reading it, or None (a
        file `dbl check` found altered is known not to restore)."""
        meta = self.manifest(fingerprint)
        if meta is None or not made_under(meta, unhashed, since):
            return None
        files = self.entry(fingerprint) / "files"
        try:
            intact = all(
                (files / rel).stat().st_size == item["size"]
                and (known is None or known(files / rel) in (None, item["sha256"]))
                for rel, item in meta["outputs"].items()
            )
        except OSError:
            return None
        return output_hash(meta["outputs"]) if intact else None

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
