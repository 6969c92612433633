"""`dbl init`: the starter project files of templates/, and a new project made from one."""

from __future__ import annotations

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
    .gitignore of dbl's own folders; the project file and those image folders."""
    names = sorted(available())
    if name not in names:
        raise UsageError(f"no template '{name}'; templates: {', '.join(names)}")
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
    # Every folder first: a path taken by a file stops init before it has written anything.
    for path in [target_dir] + [target_dir / images for images in made]:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            # the file in the way: `path` itself, or a folder on the way to it (`dbl init notes.txt/new`)
            blocking = next(
                (p for p in reversed([path, *path.parents]) if p.exists() and not p.is_dir()), path
            )
            raise UsageError(
                f"{blocking} is a file, where the project needs a folder; choose another folder"
            ) from None
        except OSError as exc:  # a folder above that is missing and cannot be made, or one not writable
            raise UsageError(
                f"cannot make the folder {path} ({exc.strerror or exc}); choose a folder you can write"
            ) from None
    try:
        target.write_text(text)  # its first line, `# dbl build <name>.toml`, runs it from its folder
        _ignore(target_dir / ".gitignore", (".dbl/", "build/"))
    except OSError as exc:
        raise UsageError(
            f"cannot write {exc.filename or target} ({exc.strerror or exc}); choose a folder you can write"
        ) from None
    return target, made


def _ignore(path: Path, folders: tuple[str, ...]) -> None:
    """Make the .gitignore at `path` ignore `folders`: written when missing, else the folders it does not
    name yet are added at its end (the run-cache and the outputs do not belong in git)."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    named = {line.strip().strip("/") for line in text.splitlines()}
    missing = [f for f in folders if f.strip("/") not in named]
    if missing:
        lead = "" if not text or text.endswith("\n") else "\n"
        with path.open("a", encoding="utf-8") as out:
            out.write(lead + "".join(f"{f}\n" for f in missing))
