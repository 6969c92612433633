"""Per-image captions: `photo.txt` beside `photo.jpg` is that image's prompt, and caption dropout.

A caption replaces the instance prompt for its image; `[trigger]` in it is replaced by the subject's
`trigger`, as it is in the instance prompt when the project is read. Images without a caption file use
the instance prompt. Dropout trains an example on the empty prompt with probability `caption_dropout`,
decided by the example's own generator (seed, position), so a resumed run drops the same examples.

torch is imported inside functions.
"""

from __future__ import annotations

import re
from pathlib import Path

from runner.errors import StepError
from runner.events import WARNING
from runner.imagefiles import Scan, linked_folders, said_of_many, skipped_images, unreadable
from runner.project.checks import TRIGGER
from runner.project.source import utf16_without_mark, wide_unicode


def caption_file(image: Path, extension: str) -> Path:
    """Where an image's caption lives: beside it, with the extension in place of the image's suffix."""
    return image.with_suffix(extension)


def read_caption(path: Path, log, fallback: str = "the instance prompt", odd=None) -> str | None:
    """The caption in `path`, stripped; None (with a warning that `fallback` is used) when it is empty. A
    binary or non-UTF-8 file, or one that cannot be read, is an error naming it. Control characters in
    it are said to `odd` (default: `log`), and kept."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise StepError(f"caption {path} cannot be read: {e.strerror or e}") from None
    if name := wide_unicode(data):  # Notepad's "Unicode": text, not binary
        raise StepError(f"caption {path} is {name} text, not UTF-8; save it as UTF-8")
    if b"\x00" in data:
        if utf16_without_mark(data):  # Windows tools' "Unicode" with its mark left off
            raise StepError(
                f"caption {path} looks like UTF-16 text without a byte-order mark, not UTF-8; save it as UTF-8"
            )
        raise StepError(
            f"caption {path} is a binary file, not text; write the caption as UTF-8 text, or remove it"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise StepError(f"caption {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    text = " ".join(text.split())
    if not text:
        log(f"warning: caption {path} is empty; {fallback} is used")
        return None
    if controls := sorted(set(_CONTROLS.findall(text))):
        # A terminal's colour codes (ESC[31m) or a stray keystroke, which the file shows no sign of.
        names = ", ".join(_control_name(c) for c in controls)
        (odd or log)(
            f"warning: caption {path} holds control characters ({names}), which train as written: remove "
            "them if they are not meant"
        )
    return text


_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode's Cc: C0, DEL and C1
_C0 = "NUL SOH STX ETX EOT ENQ ACK BEL BS HT LF VT FF CR SO SI DLE DC1 DC2 DC3 DC4 NAK SYN ETB CAN EM SUB ESC"


def _control_name(char: str) -> str:
    names = _C0.split()
    return names[ord(char)] if ord(char) < len(names) else "DEL" if char == "\x7f" else f"U+{ord(char):04X}"


def image_prompts(
    files: list[Path],
    extension: str | None,
    fallback: str,
    trigger: str | None,
    log,
    fallback_name: str = "the instance prompt",
):
    """The prompt of each image in `files`: its caption (with [trigger] replaced), else `fallback`, which
    warnings call `fallback_name`."""
    if trigger is None and TRIGGER in fallback and files:
        log(
            f"warning: the prompt '{fallback}' uses {TRIGGER} but the subject sets no trigger: it trains as written"
        )
    prompts, empty, odd, errors = [], [], [], []
    for image in files:
        caption = None
        try:
            if extension:
                path = caption_file(image, extension)
                if path.is_file():
                    caption = read_caption(path, kept_in(empty, path), fallback_name, kept_in(odd, path))
            if caption is not None and TRIGGER in caption:
                if trigger is None:
                    raise StepError(
                        f"caption {caption_file(image, extension)} uses {TRIGGER} but no trigger is set; set "
                        f'trigger in the subject\'s table (what {TRIGGER} stands for, e.g. trigger = "sks dog"), or '
                        "write those words in the caption"
                    )
                caption = caption.replace(TRIGGER, trigger)
        except StepError as exc:  # every caption that fails is said in one error, not one a build
            errors.append(str(exc))
        prompts.append(fallback if caption is None else caption)
    # what was found besides the captions that fail is still said
    for warning in empty_captions(empty, fallback_name) + odd_captions(odd):
        log(warning)
    if errors:
        raise StepError(unreadable(errors, what="captions cannot be used"))
    return prompts


def kept_in(found: list, path: Path):
    """A `log` for read_caption of `path` that keeps its warning in `found`, for empty_captions."""
    return lambda warning: found.append((path, warning, ""))


def empty_captions(found: list[tuple[Path, str, str]], fallback: str) -> list[str]:
    """The warnings of read_caption about empty captions, (caption, warning, "") each: many in a few lines."""
    return said_of_many(
        found,
        lambda count, folder: f"warning: {count} more captions in {folder} are empty; {fallback} is used",
    )


def odd_captions(found: list[tuple[Path, str, str]]) -> list[str]:
    """The warnings of read_caption about control characters, (caption, warning, "") each: many in a few
    lines."""
    return said_of_many(
        found, lambda count, folder: f"warning: {count} more captions in {folder} hold control characters"
    )


def long_captions(family, pipe, captions: dict[Path, str]) -> list[str]:
    """A warning for each caption (file -> its prompt) longer than the text encoder reads; many in a few
    lines, which name each file with its token count."""
    found = []
    for path, prompt in captions.items():
        for warning in family.long_prompts(pipe, {f"caption {path}": prompt}):
            found.append((path, warning, family.tokens_said(pipe, prompt)))
    limit = family.token_limit(pipe) if found else 0
    return said_of_many(
        found,
        lambda count, folder: (
            f"warning: {count} more captions in {folder} are longer than the {limit} tokens "
            "the text encoder reads, so their ends are cut off"
        ),
    )


def unnamed_subject(files: list[Path], prompts: list[str], fallback: str, extension: str, trigger: str):
    """Warnings about instance captions without the `trigger` (or [trigger]): such a photo trains on words
    that do not name the subject, teaching them its looks. Compared without case, as CLIP's tokenizer
    reads it."""
    said = [
        f"warning: caption {caption_file(image, extension)} does not hold the trigger '{trigger}' (or "
        f"{TRIGGER}): its photo trains on words that do not name the subject"
        for image, prompt in zip(files, prompts, strict=True)
        if prompt != fallback and trigger.lower() not in prompt.lower()
    ]
    if len(said) > 5:
        said[5:] = [f"warning: {len(said) - 5} more captions do not hold the trigger '{trigger}'"]
    return said


def missing_captions(
    folder: Path, files: list[Path], extension: str, fallback: str = "the instance prompt", key=None
):
    """Warnings about caption files that are not read: one whose name differs from its image's only in
    the case of its extension (`03.TXT` beside `03.jpg`, with ".txt"; a case-sensitive file system does
    not find it), and no caption file at all (a misspelt extension, or captions under another one: the
    key then does nothing). `fallback` names the prompt the images train on instead. `key`, (Source,
    dotted key) of the caption_extension, names the file and its line in the latter."""
    said, found, names = [], False, {}
    for image in files:
        expected = caption_file(image, extension)
        if expected.is_file():
            found = True
            continue
        if image.parent not in names:
            names[image.parent] = [p.name for p in image.parent.iterdir()]
        for name in names[image.parent]:
            if name.lower() == expected.name.lower() and name != expected.name:
                said.append(
                    f"warning: caption {image.parent / name} is not read: its image's caption is {expected.name}"
                )
                found = True
    if len(said) > 5:
        said[5:] = [
            f"warning: {len(said) - 5} more captions differ from their image's caption name only in case"
        ]
    if files and not found:
        what = (
            f"caption_extension = '{extension}', but no image in {folder} has a caption file (such as "
            f"{caption_file(files[0], extension).name} beside {files[0].name}): every image trains on {fallback}"
        )
        if key is None:
            said.append(WARNING + what)
        else:
            source, dotted = key
            said.append(source.warning(dotted, what, "check the extension against the caption files' names"))
    return said


def unread_files(found: Scan, files: list[Path], extension: str | None, fallback: str, key=None) -> list[str]:
    """Warnings about what a step does not read of the image folder `found`, whose images it reads are
    `files`: pictures in formats dbl does not read, symlinked folders, and caption files (`extension`) it
    does not find; `key`, (Source, dotted key) of the caption_extension, names its file and line."""
    said = [WARNING + warning for warning in (skipped_images(found), linked_folders(found)) if warning]
    return said + (missing_captions(found.folder, files, extension, fallback, key) if extension else [])


def dropped(seed: int, kind: str, position: int, probability: float) -> bool:
    """Whether the example at `position` trains on the empty prompt (its own generator: resumable)."""
    if not probability:
        return False
    import torch

    from runner.training.data import generator

    return torch.rand(1, generator=generator(seed, "caption", kind, position)).item() < probability


def prompts_for(
    examples: list[tuple[str, int, int]], prompts: dict[str, list[str]], seed: int, dropout: float
):
    """The prompt of each (kind, image index, position) example: the image's prompt, or '' when dropped."""
    return [
        "" if dropped(seed, kind, position, dropout) else prompts[kind][index]
        for kind, index, position in examples
    ]
