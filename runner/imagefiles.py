"""Which files of a folder are images. Pure: no decoding, no heavy imports."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from runner.errors import ImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively, following no symlinked folders), sorted by relative path.

    Hidden files and folders (".DS_Store", ".git/") are skipped, and so are files whose suffix is not
    an image suffix (notes, captions); an image-suffixed file that does not decode is an error later,
    when it is read.
    """
    return [path for _, path in sorted(_images(folder))]


def has_images(folder: Path) -> bool:
    """Whether list_images would find any (it stops at the first)."""
    return next(_images(folder), None) is not None


def _images(folder: Path):
    """(relative posix path, path) of each image file under `folder`, in no particular order."""
    for prefix, root, _, files in _walk(folder):
        for name in files:
            if name.lower().endswith(IMAGE_SUFFIXES):
                yield prefix + name, Path(root) / name


def _walk(folder: Path):
    """(relative posix prefix, path, visible folders, visible files) of `folder` and each visible folder
    under it, following no symlinked folder. Hidden ones (".DS_Store", ".git/") are left out."""
    for root, dirs, files in os.walk(folder, followlinks=False, onerror=_unlistable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        # One relative path per folder, not per file: planning a project of many images spent its time here.
        below = Path(root).relative_to(folder).as_posix()
        yield "" if below == "." else below + "/", root, dirs, [n for n in files if not n.startswith(".")]


def _unlistable(exc: OSError) -> None:
    """A folder the walk cannot list: an error naming it, never images left out without a word."""
    raise ImageError(
        f"{exc.filename}: the folder cannot be read ({exc.strerror or exc}); give read access to it "
        f"(chmod u+rx), or move it out of the images folder"
    )


# Suffixes of pictures that list_images does not read: other names of JPEG (Windows saves web images as
# .jfif), and formats a phone, a camera or an editor writes. Such a file is skipped, with a warning.
OTHER_IMAGE_SUFFIXES = (
    ".jfif", ".jpe", ".avif", ".heic", ".heif", ".jxl", ".jp2", ".tga", ".psd", ".ppm", ".pgm", ".pbm",
    ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2",
)  # fmt: skip


@dataclass(frozen=True)
class Scan:
    """What one walk of an image folder finds: the images, and what a step says it does not read."""

    folder: Path
    images: list[Path]  # as list_images gives them
    skipped: list[str]  # pictures in formats dbl does not read (.jfif, .heic, ...), relative posix paths
    linked: list[str]  # symlinked folders, which are not followed, relative posix paths


def scan(folder: Path) -> Scan:
    """The images of `folder` and the pictures and folders it skips, found in one walk (a step reads all
    three, and walking a folder of thousands of images three times cost more than the rest)."""
    images, skipped, linked = [], [], []
    for prefix, root, dirs, files in _walk(folder):
        linked += [prefix + d for d in dirs if os.path.islink(os.path.join(root, d))]
        for name in files:
            lower = name.lower()
            if lower.endswith(IMAGE_SUFFIXES):
                images.append((prefix + name, Path(root) / name))
            elif lower.endswith(OTHER_IMAGE_SUFFIXES):
                skipped.append(prefix + name)
    # Sorted as paths are, part by part ("a/b" before "a-c").
    skipped.sort(key=lambda name: name.split("/"))
    return Scan(folder, [path for _, path in sorted(images)], skipped, sorted(linked))


def few(names: list[str], shown: int = 3) -> str:
    """The first `shown` of `names`, and how many more: "a.heic, b.heic, c.heic and 4 more"."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{', '.join(names[:shown])}{more}"


def unreadable(errors: list[str], shown: int = 5, what: str = "images cannot be read") -> str:
    """One error for the images of a folder that cannot be read (or the files `what` says), from what each
    one's error says (its file first): all of them, so that one build names every broken photo rather than
    one a build, each build loading the model first. Past `shown`, how many more, as `few` says it."""
    if len(errors) == 1:
        return errors[0]
    more = [f"and {len(errors) - shown} more"] if len(errors) > shown else []
    return f"{len(errors)} {what}; fix or remove each:\n  " + "\n  ".join(errors[:shown] + more)


def skipped_images(found: Scan) -> str | None:
    """A warning naming the pictures that list_images skips (.jfif, .heic, ...), or None: they are not
    trained on, and a folder of them must not shrink the training set unsaid."""
    skipped, folder = found.skipped, found.folder
    if not skipped:
        return None
    return (
        f"{folder}: not read, as dbl reads {' '.join(IMAGE_SUFFIXES)} only: {few(skipped, 5)}; "
        "convert them to .jpg or .png to train on them"
    )


def linked_folders(found: Scan) -> str | None:
    """A warning naming the symlinked folders, which list_images does not follow, or None: the photos in
    them are not trained on, and must not be left out unsaid."""
    if not found.linked:
        return None
    return (
        f"{found.folder}: not read, as dbl follows no symbolic link to a folder: {', '.join(found.linked)}; "
        "copy their images in to train on them"
    )


# A warning that many images share is said in full for this many, then in one line for the rest: a prior's
# 200 class images, all cropped, would otherwise say 200 lines and bury everything else.
SAID_IN_FULL = 3


def said_of_many(found: list[tuple[Path, str, str]], more) -> list[str]:
    """The warnings of one kind: `found` holds (file, warning, detail) of each file, in order. The first
    SAID_IN_FULL are said as they are; then one line, `more(count, folder)` followed by the path in
    `folder` of each other file and its detail, so that every file can still be found."""
    if len(found) <= SAID_IN_FULL + 1:  # a line for one more file is no shorter than its warning
        return [warning for _, warning, _ in found]
    rest = found[SAID_IN_FULL:]
    folder = Path(os.path.commonpath([path.parent for path, _, _ in rest]))
    names = ", ".join(
        path.relative_to(folder).as_posix() + (f" ({detail})" if detail else "") for path, _, detail in rest
    )
    return [warning for _, warning, _ in found[:SAID_IN_FULL]] + [f"{more(len(rest), folder)}: {names}"]


def said_by_kind(found: list[tuple[str, Path, str, str]], more) -> list[str]:
    """said_of_many of each kind of warning in `found`, (kind, file, warning, detail) each, in the order
    the kinds first come; `more(kind, count, folder)` begins the line for a kind's other files."""
    kinds: dict[str, list[tuple[Path, str, str]]] = {}
    for kind, *warning in found:
        kinds.setdefault(kind, []).append(tuple(warning))
    return [line for kind, files in kinds.items() for line in said_of_many(files, partial(more, kind))]


def more_images(what: str, count: int, folder: Path) -> str:
    """How the line for the other images that a warning of their own (what Pillow says) names begins."""
    return f"{count} more images in {folder}: {what}"
