"""What `dbl watch` looks at: the project file and the input folders a project names, and which
changes there can make a step stale (never the build's own writes, nor an editor's temporary files).
Pure: no watchdog, no heavy imports."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from runner import lockfile, planner, steps

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class Targets:
    """What a project's watch looks at. All paths absolute and resolved."""

    project_file: str
    folders: tuple[str, ...]  # input folders; missing ones too
    # Outputs, .dbl/ and the lockfile: the build's own writes, never a reason to rebuild (they can lie in
    # an input folder: photos beside the project file, images = ".").
    ignored: tuple[str, ...]
    # The lockfile: changed by other hands (`git checkout main -- pets.lock`, a merge conflict resolved
    # or moved aside), it can make steps stale; the watch tells its own builds' writes by their content.
    lockfile: str = ""
    # The symbolic links on the way to the project file and the input folders, each named in its folder
    # with that folder's links resolved: retargeting one (`ln -sfn dog-2025 photos/dog`) changes what
    # the build reads, and shows only in the link's folder.
    links: tuple[str, ...] = ()
    # The files that links among the inputs lead to (a training set linked from a photo library): an
    # edit of one shows only in its own folder, where a step reads it through the link.
    linked: frozenset[str] = frozenset()
    # A local base model (a folder, or a single file) and a local base_model_config folder: every file
    # of theirs, hidden ones too, is part of the model's identity. Missing ones too.
    models: tuple[str, ...] = ()
    out: str = ""  # the project's outputs folder (a loaded project's)
    # Each step's output folder (a loaded project's): one removed by hand (`rm -rf build/pets/renders/park`)
    # leaves its step stale. A build's commits remove them too, for an instant (swapped with the new
    # outputs): the watch tells those by the folder being back once the build has ended (see outputs_gone).
    outputs: tuple[str, ...] = ()

    def relevant(self, path: str, directory: bool = False) -> bool:
        """Whether a change at `path` can make a step stale. Hidden files and folders in an input folder
        are never read (an editor's swap file beside a caption), so they cannot; nor can an editor's other
        temporary files (see _editors_file). A folder above an input folder counts: creating it
        (`mkdir -p new/dog`) is the first step to a missing input folder."""
        path = os.path.normpath(path)
        if path in (self.project_file, self.lockfile, *self.links) or path in self.linked:
            return True
        if any(within(f, path) for f in self.folders + self.models):
            return True
        if any(within(path, m) for m in self.models):
            return True
        # a folder the build makes to hold its outputs (build/ of build/pets) is no input either
        if any(within(path, i) or within(i, path) for i in self.ignored):
            return False
        if not directory and _editors_file(os.path.basename(path)):
            return False
        return any(within(path, f) and not _hidden(os.path.relpath(path, f)) for f in self.folders)

    def holds_outputs(self, folder: str) -> bool:
        """Whether `folder` is the outputs' folder or one above it, but not the project's own folder."""
        return bool(self.out) and within(self.out, folder) and not within(self.project_file, folder)

    def holds_step_outputs(self, folder: str) -> bool:
        """Whether `folder` is a step's output folder or one above it inside the outputs' folder
        (`renders/`)."""
        return within(folder, self.out) and any(within(o, folder) for o in self.outputs)

    def outputs_gone(self, folder: str) -> bool:
        """Whether a step's output folder at or below `folder` is missing now."""
        return any(within(o, folder) and not os.path.isdir(o) for o in self.outputs)

    def watches(self) -> set[tuple[str, bool]]:
        """(folder, recursive) pairs to schedule: an input folder, and its parent, where its own removal,
        renaming or replacement shows; a missing one through its nearest existing parent, so that its
        creation is seen."""
        found = {(os.path.dirname(self.project_file), False)}
        found |= {(os.path.dirname(link), False) for link in self.links}
        found |= {
            (folder, False) for folder in {os.path.dirname(f) for f in self.linked} if os.path.isdir(folder)
        }
        for model in self.models:
            if os.path.isdir(model):
                found |= {(model, True), (os.path.dirname(model), False)}
            elif parent := _existing_parent(model):
                found.add((parent, False))
        found |= {(folder, False) for folder in self._above_outputs()}
        for folder in self.folders:
            if os.path.isdir(folder):
                found |= self._below(folder) | {(os.path.dirname(folder), False)}
            else:
                parent = _existing_parent(folder)
                if parent:
                    found.add((parent, False))
        return found

    def _above_outputs(self) -> set[str]:
        """The existing folders where a step's output folder, or a folder above it, removed shows: from the
        outputs folder's parent down to each output folder's parent. Never one of the output folders, which
        each build's commits swap: no watch follows them."""
        found: set[str] = set()
        top = os.path.dirname(self.out)
        for output in self.outputs:
            folder = os.path.dirname(output)
            while within(folder, top) and folder not in found:
                if os.path.isdir(folder):
                    found.add(folder)
                folder = os.path.dirname(folder)
        return found

    def _below(self, folder: str) -> set[tuple[str, bool]]:
        """The watches that cover an existing input folder: one recursive watch, unless the build writes
        inside it (photos beside the project file: outputs and .dbl/ below them). Then the folder alone,
        and each subfolder that holds inputs, so that no watch follows the build's own folders as they
        are made, moved and removed (watchdog warns of those, in the middle of the display); a subfolder
        created later wakes the watch, which then watches it too."""
        if not any(within(i, folder) for i in self.ignored):
            return {(folder, True)}
        found = {(folder, False)}
        with contextlib.suppress(OSError):  # removed meanwhile; the next reload looks again
            for entry in os.scandir(folder):
                path = os.path.join(folder, entry.name)
                if (
                    entry.is_dir(follow_symlinks=False)
                    and not entry.name.startswith(".")
                    and path not in self.ignored
                ):
                    found |= self._below(path)
        return found


def targets_of(project_path: Path, project=None) -> Targets:
    """The watch targets of a loaded project, or, for an invalid one, of whatever its TOML names.
    `project_path` as the user named it: a link on the way to it is watched."""
    given = Path(os.path.abspath(project_path))
    project_path = given.resolve()
    base = project_path.parent
    data = _raw_toml(project_path)
    raw = _raw_image_folders(data)
    if project is not None:
        named = [
            folder
            for kind in steps.kinds()
            for spec in project.tables.get(kind.name, {}).values()
            for folder in kind.folders(spec)
        ]
        ignored = [project.out, project.state_dir, lockfile.lock_path(project_path)]
    else:
        named = raw
        ignored = [base / ".dbl", lockfile.lock_path(project_path)]
    ignored_s = tuple(norm(p) for p in ignored)
    folders = []
    for f in named:
        p = norm(base / Path(f).expanduser())
        if not any(within(p, i) for i in ignored_s) and p not in folders:
            folders.append(p)
    # a loaded project's folders are resolved: their links are found on the way its TOML names them
    links = {link for named in [given, *(base / Path(f).expanduser() for f in raw)] for link in _links(named)}
    linked = frozenset(f for folder in folders for f in _linked_files(folder, ignored_s))
    return Targets(
        norm(project_path),
        tuple(sorted(folders)),
        ignored_s,
        lockfile=norm(lockfile.lock_path(project_path)),
        links=tuple(sorted(links)),
        linked=linked,
        models=_local_models(data, base),
        out=norm(project.out) if project is not None else "",
        outputs=_output_folders(project),
    )


def _output_folders(project) -> tuple[str, ...]:
    if project is None:
        return ()
    return tuple(sorted({norm(project.out / step.output_dir) for step in planner.graph(project)}))


def _local_models(data: dict, base: Path) -> tuple[str, ...]:
    """The local base model and base_model_config a project file names, as the loader tells a local one
    from a hub id or a built-in name; read from the TOML, so that an invalid project's (a model folder
    not copied in yet) are watched too."""
    from runner import families
    from runner.models import SINGLE_FILE_SUFFIXES, local_path, looks_local

    table = data.get("project")
    found = []
    for key in ("base_model", "base_model_config"):
        value = table.get(key) if isinstance(table, dict) else None
        if not isinstance(value, str) or not value or value in families.builtin_names():
            continue
        path = local_path(value, base)
        if path.exists() or looks_local(value) or value.endswith(SINGLE_FILE_SUFFIXES):
            found.append(norm(path))
    return tuple(found)


def _linked_files(folder: str, ignored: tuple[str, ...]) -> set[str]:
    """Where the links to files in `folder` and its visible subfolders lead (resolved), as a step reads
    them: it follows a link to a file, not one to a folder. A dangling link counts: creating the file
    it names adds an image."""
    found, pending = set(), [folder]
    while pending:
        with contextlib.suppress(OSError):  # removed meanwhile; the next reload looks again
            for entry in os.scandir(pending.pop()):
                if entry.name.startswith(".") or entry.path in ignored:
                    continue
                if entry.is_symlink():
                    if not entry.is_dir():
                        found.add(os.path.realpath(entry.path))
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
    return found


def _links(path: Path) -> list[str]:
    """The symbolic links on the way to absolute `path` (itself included), each named in its folder with
    that folder's links resolved, as the observer of that folder names it. A link in the root folder
    (macOS's /tmp and /var) is left out: watching / for it would watch the whole disk."""
    found = []
    current = Path(path.anchor)
    for part in path.parts[1:]:
        step = current / part
        if os.path.islink(step) and current.parent != current:
            found.append(str(step))
        try:
            current = step.resolve()
        except (OSError, RuntimeError):  # a loop of links (RuntimeError before Python 3.13)
            break
    return found


def _raw_toml(project_path: Path) -> dict:
    """The project file's TOML, not validated; empty where it does not read."""
    try:
        return tomllib.loads(project_path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}


def _raw_image_folders(data: dict) -> list[str]:
    """The `images` folders a project file's step tables name, read without validating it (best
    effort: an input folder is an `images` key by convention)."""
    found = []
    for kind in steps.kinds():
        tables = data.get(kind.table)
        if isinstance(tables, dict):
            for table in tables.values():
                if isinstance(table, dict) and isinstance(table.get("images"), str):
                    found.append(table["images"])
    return found


def norm(path) -> str:
    """`path` absolute, its links resolved: as the observer names the files it reports."""
    return os.path.normpath(str(Path(path).resolve()))


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") and part not in (".", "..") for part in relative.split(os.sep))


def _editors_file(name: str) -> bool:
    """A backup (`05.txt~`), an Emacs autosave (`#05.txt#`) or vim's test of the folder (`4913`): names
    that no image or caption file has, as both end in their extension."""
    return name.endswith(("~", "#")) or "." not in name


def within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies below it (both normalised, as norm gives them)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _existing_parent(path: str) -> str | None:
    parent = os.path.dirname(path)
    while parent and not os.path.isdir(parent):
        if os.path.dirname(parent) == parent:
            return None
        parent = os.path.dirname(parent)
    return parent or None
