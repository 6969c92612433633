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
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith(".") or not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            found.append(Path(root) / name)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def ignored_files(folder: Path) -> list[Path]:
    """Visible files under `folder` that list_images skips because of their suffix."""
    skipped = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        skipped += [
            Path(root) / n for n in files if not n.startswith(".") and not n.lower().endswith(IMAGE_SUFFIXES)
        ]
    return sorted(skipped)
