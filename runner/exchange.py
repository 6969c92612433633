"""Replace a step's outputs with its new ones: the two folders are swapped in one step where the system
can, so that there is no moment at which neither the old nor the new ones are in place."""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path

from runner import tempnames

_AT_FDCWD = -100  # from <fcntl.h>: paths relative to the working directory
_RENAME_EXCHANGE = 2  # from <linux/fs.h>
# The system or the file system cannot exchange (an old kernel or C library, NFS, some FUSE file systems):
# the caller falls back to two renames.
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths `a` and `b` (both must exist), with Linux's renameat2(RENAME_EXCHANGE).
    False where that cannot be done, and nothing was changed; an OSError (EXDEV for two file systems)
    otherwise."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library older than glibc 2.28, or not glibc
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def replace_dir(staged: Path, target: Path, trash: Path) -> Path:
    """Put `staged` at `target`, replacing what was there. A `target` on another file system (`out` on
    another disk) gets `staged` moved beside it first (a copy, while the old outputs stay in place), and the
    swap happens there. Returns the folder that holds the old outputs now (it may not exist): the caller
    removes it once the lockfile records the new ones, so that a build killed before then has had the least
    time with outputs the lockfile does not name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _swap(staged, target, trash)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # Beside the outputs no build lock covers these names (another project may write to the same `out`):
        # they carry the host and pid, and what a killed process of this host left here goes now, whatever
        # step it was committing; `dbl gc` removes them too.
        tempnames.drop_left_folders(target.parent)
        for legacy in (".staged", ".trash"):  # an earlier version's names, with no pid
            shutil.rmtree(target.parent / f".{target.name}{legacy}", ignore_errors=True)
        stem = f".{target.name[:NAME_KEPT]}"
        beside = target.parent / f"{stem}.tmp-{tempnames.suffix()}"
        _move_across(staged, beside)
        return _swap(beside, target, target.parent / f"{stem}.trash-{tempnames.suffix()}")


def _move_across(staged: Path, beside: Path) -> None:
    """Copy the folder `staged` to `beside`, on another file system, then remove it. A copy that fails (a
    full disk) leaves nothing at `beside`, and raises the first file's OSError with the folder it was
    copying into (shutil.move collected every file's error into one list, and left the part it copied)."""
    try:
        beside.mkdir()
        for root, dirs, files in os.walk(staged):
            into = beside / Path(root).relative_to(staged)
            for name in dirs:
                (into / name).mkdir()
            for name in files:
                shutil.copy2(Path(root) / name, into / name)
    except BaseException as exc:
        shutil.rmtree(beside, ignore_errors=True)
        if isinstance(exc, OSError) and exc.strerror:
            raise OSError(exc.errno, exc.strerror, str(beside.parent)) from None
        raise
    shutil.rmtree(staged, ignore_errors=True)


# The part of an output folder's name its temp names beside it keep: enough to tell whose they are, and short
# enough that the host and pid after it fit the 255 bytes of a file name.
NAME_KEPT = 100


def _swap(staged: Path, target: Path, trash: Path) -> Path:
    """Exchange `staged` and `target` in one step (the old outputs are then at `staged`): a build killed at
    any moment leaves the old outputs or the new ones. Where the system cannot exchange, rename `target` to
    `trash` and `staged` to `target`; on failure, the old `target` is put back. Returns where the old
    outputs are."""
    shutil.rmtree(trash, ignore_errors=True)
    if target.exists() and exchange(staged, target):
        return staged
    if target.exists():
        os.rename(target, trash)
    try:
        os.rename(staged, target)
    except OSError:
        if trash.exists() and not target.exists():
            os.rename(trash, target)  # put the old outputs back
        raise
    return trash
