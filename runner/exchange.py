"""Swap two folders in one step, where the system can: what lets a commit replace a step's outputs with
no moment at which neither the old nor the new ones are in place."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

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
