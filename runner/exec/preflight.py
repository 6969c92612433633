"""Before any step runs: the user's images that the steps to run decode, each checked to decode.

A broken photo was found by the step that reads it: after a prior step had loaded the model and spent
minutes generating class images, or after another subject had trained. Here every image such a step
will decode is decoded once, before any model is loaded, and each broken one is named.

Decoding costs about a hundred times the hash of a file, so an image whose content a build decoded before
is not decoded again: the lockfile's records hold the hashes of the images that their steps read
successfully (a record is written only when its step succeeded).
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runner import steps
from runner.errors import ImageError
from runner.fingerprint import FileHasher
from runner.imagefiles import list_images, unreadable

DECODE_THREADS = min(8, os.cpu_count() or 1)


def decoded_before(lock: dict) -> set[str]:
    """The sha256 of each image that a recorded step decoded: its `images` input, of which a step with a
    `num_images` (a prior's given class images) read the first that many by name."""
    found: set[str] = set()
    for record in lock.values():
        inputs = record.get("inputs", {}) if isinstance(record, dict) else {}
        images = inputs.get("images") if isinstance(inputs, dict) else None
        files = images.get("files") if isinstance(images, dict) else None
        if not isinstance(files, dict):
            continue
        count = inputs.get("num_images")
        names = sorted(files)[:count] if isinstance(count, int) else files
        found.update(files[name] for name in names if isinstance(files[name], str))
    return found


def images_of(step) -> list[Path]:
    """The user's image files that `step` (a planner.Step) decodes, in the order it reads them."""
    files = []
    for folder, count in steps.get(step.kind).decodes(step.spec):
        found = list_images(Path(folder))
        files += found if count is None else found[:count]
    return files


def broken_images(hasher: FileHasher, files: list[Path], known: set[str]) -> dict[Path, str]:
    """{file: what is wrong with it} of the `files` that cannot be read or do not decode. A file whose
    sha256 is in `known` decoded before and is not decoded again."""
    from runner.images import decodes

    broken, todo = {}, []
    for path in dict.fromkeys(files):
        try:
            if hasher.input_hash(path) not in known:
                todo.append(path)
        except ImageError as exc:  # a link that leads nowhere, a named pipe ...
            broken[path] = str(exc)

    def decode(path: Path) -> str | None:
        try:
            decodes(path)
        except ImageError as exc:
            return str(exc)
        return None

    # What Pillow warns of a file is said by the step that reads it, not twice. Pillow decodes without
    # the GIL: a few images at a time.
    with warnings.catch_warnings(), ThreadPoolExecutor(min(DECODE_THREADS, max(1, len(todo)))) as pool:
        warnings.simplefilter("ignore")
        for path, error in zip(todo, pool.map(decode, todo), strict=True):
            if error is not None:
                broken[path] = error
    return broken


def failing_steps(hasher: FileHasher, lock: dict, to_run: list) -> dict[str, str]:
    """{step id: its error} of the steps of `to_run` (planner.Steps) that would fail on an image: each
    error names every broken image the step reads, as the step would say it."""
    files = {step.id: images_of(step) for step in to_run}
    broken = broken_images(hasher, [f for found in files.values() for f in found], decoded_before(lock))
    errors = {}
    for sid, found in files.items():
        said = [broken[path] for path in found if path in broken]
        if said:
            errors[sid] = unreadable(said)
    return errors


def every_broken_image(hasher: FileHasher, lock: dict, project_steps: list, found: ImageError) -> ImageError:
    """The error that names every broken image the project's steps read, where planning stopped at
    `found` (the files of one folder that cannot be read): a build that named only those had the user
    fix them, build again, and only then learn of a photo that does not decode."""
    broken = broken_images(
        hasher, [f for step in project_steps for f in images_of(step)], decoded_before(lock)
    )
    said = list(dict.fromkeys([*found.each, *broken.values()]))
    return ImageError(unreadable(said), said)
