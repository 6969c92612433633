"""What lies in a folder, to compare one build's outputs with another's.

Import by name (`from tests.folders import folder_bytes`)."""

from __future__ import annotations

from pathlib import Path


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (subfolders too), by its path there with `/` between parts, in sorted order."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }
