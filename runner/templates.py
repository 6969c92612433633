"""`dbl init`: the starter project files of templates/, and a new project made from one."""

from __future__ import annotations

import contextlib
import difflib
import os
from pathlib import Path

from runner import steps
from runner.errors import UsageError

# Where an installed (not editable) dbl has templates/: pyproject.toml makes it the package runner.<this>.
INSTALLED = "template_files"


def folder() -> Path:
    """templates/ of this checkout, or of the installed package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "templates", here / INSTALLED):
        if candidate.is_dir():
            return candidate
    raise UsageError("the templates folder is missing from this installation")


def available() -> dict[str, str]:
    """Each template's name and the first sentence of the comment under its command line (which may
    wrap over several lines)."""
    found = {}
    for path in sorted(folder().glob("*.toml"), key=lambda p: p.stem):
        words = []
        for line in path.read_text().splitlines()[1:]:
            if not line.startswith("#"):
                break
            words += line.lstrip("# ").split()
        text = " ".join(words)
        end = text.find(". ")
        found[path.stem] = text if end < 0 else text[: end + 1]
    return found


def create(name: str, target_dir: Path) -> tuple[Path, list[str]]:
    """Write template `name` into `target_dir` as `<name>.toml`, with the image folders it names and a
    .gitignore of dbl's own folders; the project file and those image folders. All or nothing: where
    something cannot be written, what init made is taken away again and UsageError says why."""
    names = sorted(available())
    name = name.removesuffix(".toml") if name.removesuffix(".toml") in names else name
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ";"
        raise UsageError(f"no template '{name}'{hint} templates: {', '.join(names)}")
    if target_dir.suffix == ".toml" and not target_dir.is_dir():  # `dbl init pets.toml` meant a file
        meant = target_dir.with_suffix("")
        raise UsageError(
            f"{target_dir}: `dbl init` takes the folder for the new project, not a project file (named after "
            f"its template: {name}.toml); `dbl init {meant}` makes {meant / f'{name}.toml'}"
        )
    target = target_dir / f"{name}.toml"
    if target.exists():
        raise UsageError(f"{target} exists already; choose another folder")
    text = (folder() / f"{name}.toml").read_text()
    from runner.project.load import tomllib

    data = tomllib.loads(text)
    made = [
        table["images"]
        for kind in steps.kinds()
        for table in data.get(kind.table, {}).values()
        if table.get("images")
    ]
    ignore = target_dir / ".gitignore"
    try:
        ignored = _unignored(ignore, (".dbl/", "build/"))
    except OSError as exc:
        raise UsageError(
            f"cannot read {ignore} ({exc.strerror or exc}); make it a file you can read, or remove it"
        ) from None
    created: list[Path] = []  # folders init made, taken away again if it fails
    try:
        # Every folder first: a path taken by a file stops init before it has written a file.
        for path in [target_dir] + [target_dir / images for images in made]:
            created += _make_folder(path)
        try:
            target.write_text(text)  # its first line, `# dbl build <name>.toml`, runs it from its folder
            if ignored:
                with ignore.open("ab") as out:
                    out.write(ignored.encode())
        except OSError as exc:
            target.unlink(missing_ok=True)
            raise UsageError(
                f"cannot write {exc.filename or target} ({exc.strerror or exc}); choose a folder you can write"
            ) from None
    except UsageError:
        for path in reversed(created):
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    return target, made


def _make_folder(path: Path) -> list[Path]:
    """Make folder `path` and those above it that are missing; the folders made, the outermost first."""
    missing = [
        p
        for p in reversed([path, *path.parents])
        if p.name not in ("", ".", "..") and not p.exists() and not p.is_symlink()
    ]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        # the file in the way: `path` itself, or a folder on the way to it (`dbl init notes.txt/new`)
        on_the_way = [p for p in reversed([path, *path.parents]) if p.is_symlink() or p.exists()]
        blocking = next((p for p in on_the_way if not p.is_dir()), path)
        if blocking.is_symlink() and not blocking.exists():
            raise UsageError(
                f"{blocking} is a link to {os.readlink(blocking)}, which does not exist; choose another folder"
            ) from None
        raise UsageError(
            f"{blocking} is a file, where the project needs a folder; choose another folder"
        ) from None
    except OSError as exc:  # a folder above that is missing and cannot be made, or one not writable
        raise UsageError(
            f"cannot make the folder {path} ({exc.strerror or exc}); choose a folder you can write"
        ) from None
    return [p for p in missing if p.is_dir()]


def _unignored(path: Path, folders: tuple[str, ...]) -> str:
    """The lines that make the .gitignore at `path` ignore `folders` (the run-cache and the outputs do not
    belong in git), to add at its end: those it does not name yet ("" when it names them all). Its bytes
    need not be UTF-8 (a name in another encoding, which git takes as it is)."""
    text = path.read_bytes().decode("utf-8", "surrogateescape") if path.exists() else ""
    named = {line.strip().strip("/") for line in text.splitlines()}
    missing = [f for f in folders if f.strip("/") not in named]
    if not missing:
        return ""
    lead = "" if not text or text.endswith("\n") else "\n"
    return lead + "".join(f"{f}\n" for f in missing)
