"""PNG files with generation parameters in A1111's `parameters` text chunk, byte-for-byte reproducible."""

from __future__ import annotations

import os
from pathlib import Path

NEGATIVE = "Negative prompt:"  # the line that starts the negative prompt in the parameters text


def model_name(base) -> str:
    """The base model as images name it: a hub id or built-in name, or a local model's folder or file
    name, never its absolute path, so that the same project gives the same bytes on any machine."""
    if base.kind == "file":
        return Path(base.ref).stem
    if base.kind == "folder":
        return Path(base.ref).name
    return base.display


def parameters_text(
    prompt: str,
    negative_prompt: str,
    *,
    steps: int,
    sampler: str,
    guidance_scale: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    lora: str | None = None,
) -> str:
    """The A1111 `parameters` text of one image, which image browsers and A1111's PNG Info read."""
    lines = [readable_prompt(prompt)]
    if negative_prompt:
        lines.append(f"{NEGATIVE} {negative_prompt}")
    fields = [
        f"Steps: {steps}",
        f"Sampler: {sampler}",
        f"CFG scale: {number(guidance_scale)}",
        f"Seed: {seed}",
        f"Size: {width}x{height}",
        f"Model: {model}",
    ]
    if lora:
        fields.append(f"Lora: {lora}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def readable_prompt(prompt: str) -> str:
    """`prompt` as the parameters text holds it. The format has no escape: readers take a line that starts
    with "Negative prompt:" (after its spaces) for the start of the negative prompt. Such a line of the
    prompt is joined to the one before it by a space, which the text encoder reads as it reads the line
    break (CLIP's tokenizer folds any run of whitespace into one space); other prompts stay as they are. A
    prompt whose first line starts so has no line before it, and is written as it is."""
    lines = prompt.split("\n")
    kept = lines[:1]
    for line in lines[1:]:
        if line.strip().startswith(NEGATIVE):
            kept[-1] = f"{kept[-1]} {line}"
        else:
            kept.append(line)
    return "\n".join(kept)


def number(value: float) -> str:
    """A float as the parameters text writes it: short (7.5, 7, 1e-05) and exact: 6 significant digits
    where they give the value back, else every digit it needs (0.123456789, not 0.123457)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def save_png(image, path: Path, parameters: str | None = None, compress_level: int = 6) -> None:
    """Write a PNG whose bytes depend only on the pixels and the text (no time or software chunks),
    atomically: a reader never sees half of it."""
    from PIL.PngImagePlugin import PngInfo

    info = None
    if parameters is not None:
        info = PngInfo()
        info.add_text("parameters", parameters)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info, optimize=False, compress_level=compress_level)
    os.replace(tmp, path)
