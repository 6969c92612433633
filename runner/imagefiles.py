"""Which files of a folder are images. Pure: no decoding, no heavy imports."""

from __future__ import annotations

import os
from pathlib import Path

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
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        # One relative path per folder, not per file: planning a project of many images spent its time here.
        below = Path(root).relative_to(folder).as_posix()
        prefix = "" if below == "." else below + "/"
        for name in files:
            if name.startswith(".") or not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            yield prefix + name, Path(root) / name


# Suffixes of pictures that list_images does not read: other names of JPEG (Windows saves web images as
# .jfif), and formats a phone, a camera or an editor writes. Such a file is skipped, with a warning.
OTHER_IMAGE_SUFFIXES = (
    ".jfif", ".jpe", ".avif", ".heic", ".heif", ".jxl", ".jp2", ".tga", ".psd", ".ppm", ".pgm", ".pbm",
    ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2",
)  # fmt: skip


def ignored_files(folder: Path) -> list[Path]:
    """Visible files under `folder` that list_images skips because of their suffix."""
    skipped = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        skipped += [
            Path(root) / n for n in files if not n.startswith(".") and not n.lower().endswith(IMAGE_SUFFIXES)
        ]
    return sorted(skipped)


def skipped_images(folder: Path) -> str | None:
    """A warning naming the pictures under `folder` that list_images skips (.jfif, .heic, ...), or None:
    they are not trained on, and a folder of them must not shrink the training set unsaid."""
    skipped = [p.relative_to(folder).as_posix() for p in ignored_files(folder)]
    skipped = [name for name in skipped if name.lower().endswith(OTHER_IMAGE_SUFFIXES)]
    if not skipped:
        return None
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    return (
        f"{folder}: not read, as dbl reads {' '.join(IMAGE_SUFFIXES)} only: {', '.join(skipped[:5])}{more}; "
        "convert them to .jpg or .png to train on them"
    )


def linked_folders(folder: Path) -> str | None:
    """A warning naming the symlinked folders under `folder`, which list_images does not follow, or None:
    the photos in them are not trained on, and must not be left out unsaid."""
    linked = []
    for root, dirs, _ in os.walk(folder, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        linked += [
            (Path(root) / d).relative_to(folder).as_posix() for d in dirs if (Path(root) / d).is_symlink()
        ]
    if not linked:
        return None
    return (
        f"{folder}: not read, as dbl follows no symbolic link to a folder: {', '.join(sorted(linked))}; "
        "copy their images in to train on them"
    )
