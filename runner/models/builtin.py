"""The built-in models (see runner.families): made in code on first use, kept in a per-user folder."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from runner import families, tempnames
from runner.errors import ModelError


def dbl_home() -> Path:
    """Per-user folder for things dbl makes once and reuses (the built-in models)."""
    return Path(os.environ.get("DBL_HOME", Path.home() / ".cache" / "dbl"))


_tiny_lock = threading.Lock()
_swept: set[Path] = set()  # the models folders this process removed killed processes' leftovers from


def ensure_builtin(name: str) -> Path:
    """Return the folder of a built-in model, making it on first use (atomically)."""
    family = families.for_builtin(name)
    folder = dbl_home() / "models" / family.builtin_folder_name(name)
    if (folder / "model_index.json").is_file():
        if folder.parent not in _swept:
            # Models a process of this host was killed while making: gone at the first load of a process,
            # not only when a model is next made, which may be never (a scan of a folder of a few entries).
            _swept.add(folder.parent)
            tempnames.drop_left_folders(folder.parent)
        return folder
    with _tiny_lock:
        if (folder / "model_index.json").is_file():
            return folder
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _unwritable(name, folder, exc) from None
        # Models a process of this host was killed while making (nothing else would ever remove them).
        tempnames.drop_left_folders(folder.parent)
        tmp = folder.parent / f".{folder.name}.tmp-{tempnames.suffix()}"
        from runner.models.loading import quiet_libraries

        quiet_libraries()  # what the libraries print as the model is made and saved: progress bars, notices
        try:
            family.build_builtin(name, tmp)
            os.replace(tmp, folder)
        except OSError as exc:
            # Another process finished first; its copy is identical. (Or the making failed: raised below.)
            shutil.rmtree(tmp, ignore_errors=True)
            if not (folder / "model_index.json").is_file():
                raise _unwritable(name, folder, exc) from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def _unwritable(name: str, folder: Path, exc: OSError) -> ModelError:
    """The built-in model cannot be written where dbl keeps it: say where, why, and how to move it."""
    home = os.environ.get("DBL_HOME")
    now = f"DBL_HOME is {home}" if home else "DBL_HOME is not set, so it is ~/.cache/dbl"
    return ModelError(
        f"cannot write the built-in model {name} to {folder} ({exc.strerror or exc}); set DBL_HOME to a "
        f"folder you can write ({now})"
    )
