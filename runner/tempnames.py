"""Names of temp files and folders that no other process, on this host or another, can pick.

When steps run on several machines (`--executor ray`), the `.dbl/` folder and the step work folders are
on a shared file system, and process ids repeat from host to host. A temp name therefore carries a random
part, the host and the pid: `<random>-<host>-<pid>`. `dbl gc` reads the host and the pid back to tell a
leftover of a dead process from the work of a live one, and judges only what its own host left.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
from pathlib import Path

# `.tmp-` or `.trash-`, then `<random>-<host>-<pid>`; older names lack the host (`<random>-<pid>`, `<pid>`).
_SUFFIX = re.compile(r"\.(?:tmp|trash)-(?:[0-9a-f]{6}-)?(?:(?P<host>[A-Za-z0-9._-]+?)-)?(?P<pid>\d+)$")


def host() -> str:
    """This machine's name, as it appears in temp names (only letters, digits, '.', '_' and '-')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def suffix() -> str:
    """`<random>-<host>-<pid>`: unique to this process across the hosts sharing a folder."""
    return f"{os.urandom(3).hex()}-{host()}-{os.getpid()}"


def owner(name: str) -> tuple[str | None, int] | None:
    """(host, pid) of the process that made a temp name (`<anything>.tmp-<suffix()>` or `.trash-`); the
    host is None in names made before hosts were part of them; None for a name that is no temp name."""
    match = _SUFFIX.search(name)
    if match is None:
        return None
    return match["host"], int(match["pid"])


def left_by_dead_process(name: str) -> bool:
    """Whether `name` is a temp name of a process of this host that is gone. A name from another host
    is never judged here: its process may be alive there."""
    made_by = owner(name)
    if made_by is None:
        return False
    made_on, pid = made_by
    if made_on is not None and made_on != host():
        return False
    return not _alive(pid)


def drop_left_files(folder: Path, prefix: str = "") -> None:
    """Remove the temp files directly in `folder` (those whose name starts with `prefix`) that processes of
    this host left when they were killed while writing them (the file-hash cache, a lockfile, the parse of
    one): an atomic write that never reached its rename. A live process's temp file, and another host's,
    are left alone."""
    try:
        names = [entry for entry in os.scandir(folder) if entry.name.startswith(prefix)]
    except OSError:
        return
    for entry in names:
        if ".tmp-" in entry.name and left_by_dead_process(entry.name):
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)


def drop_left_folders(folder: Path, prefix: str = ".") -> list[Path]:
    """Remove the temp and trash folders directly in `folder` (those whose name starts with `prefix`) that
    processes of this host left when they were killed while writing them (a run-cache entry, a checkpoint,
    a built-in model), and return them. A live process's folder, and another host's, are left alone."""
    try:
        found = [entry for entry in os.scandir(folder) if entry.name.startswith(prefix)]
    except OSError:
        return []
    dropped = []
    for entry in found:
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False) and left_by_dead_process(entry.name):
                shutil.rmtree(entry.path, ignore_errors=True)
                dropped.append(Path(entry.path))
    return dropped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
