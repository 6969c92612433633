"""Fidelity scores of renders of the shapes world (runner.shapes): DreamBench's questions, answered by
measurement on pictures whose truth is known.

Each render's prompt says what it should show: the words of the world ("a red circle on a blue
background"), and, for a subject, its identifier ("a sks shape on a blue background"), which stands
for what the subject's photos show (their shape and colour, as measured). Each rendered image is
measured (runner.shapes.measure) and compared with its prompt:

- prompt fidelity: the share of images, among those whose prompt names a shape, a colour or a
  background in words, that show every one of them (the subject's own attributes aside);
- subject fidelity: the share of images whose prompt has the identifier that show the subject's
  shape in the subject's colour (or the colour the prompt names instead);
- class drift: the share of images whose prompt names the class ("a shape ...") without the
  identifier that show the subject's shape: what prior preservation is meant to keep low, since the
  base model draws the subject's shape for no prompt.

All three are shares in [0, 1]; a score whose images are absent from a render is left out.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass

from runner import shapes

VERSION = 1  # bump when a score's definition or the measurement changes


@dataclass(frozen=True)
class Expected:
    shape: str = ""
    colour: str = ""
    background: str = ""
    subject: bool = False  # the prompt has the identifier
    class_only: bool = False  # the prompt names the class word without the identifier


def expected(prompt: str, identifier: str = "sks") -> Expected:
    """What `prompt` asks for, by its words."""
    words = re.findall(r"[a-z]+", prompt.lower())
    background = ""
    for i, word in enumerate(words[:-1]):
        if word in shapes.PALETTE and words[i + 1] == "background":
            background = word
    shape = next((w for w in words if w in shapes.SHAPES + shapes.RARE_SHAPES), "")
    colours = [
        w for i, w in enumerate(words) if w in shapes.PALETTE and words[i + 1 : i + 2] != ["background"]
    ]
    subject = identifier.lower() in words
    return Expected(
        shape=shape,
        colour=colours[0] if colours else "",
        background=background,
        subject=subject,
        class_only=not subject and shapes.CLASS_WORD in words,
    )


def subject_traits(images) -> dict[str, str]:
    """The shape and colour most of a subject's photos show (PIL images), as measured."""
    measured = [shapes.measure(image) for image in images]
    traits = {}
    for key in ("shape", "colour"):
        votes = Counter(getattr(m, key) for m in measured if getattr(m, key))
        traits[key] = votes.most_common(1)[0][0] if votes else ""
    return traits


def score(items, subject: dict[str, str] | None = None, identifier: str = "sks") -> dict:
    """Scores of `items`, (prompt, PIL image) pairs, with `subject` the traits of the subject the
    identifier stands for. Returns {"scores": {name: share}, "images": [per image: prompt, what it asked
    for, what it shows, and whether each score counted it as a hit]}."""
    subject = subject or {}
    hits: dict[str, list[bool]] = {"prompt_fidelity": [], "subject_fidelity": [], "class_drift": []}
    records = []
    for prompt, image in items:
        want = expected(prompt, identifier)
        got = shapes.measure(image)
        record = {"prompt": prompt, "expected": asdict(want), "measured": asdict(got)}
        worded = {
            "shape": "" if want.subject else want.shape,
            "colour": "" if want.subject else want.colour,
            "background": want.background,
        }
        if any(worded.values()):
            record["prompt_fidelity"] = got.matches(**worded)
            hits["prompt_fidelity"].append(record["prompt_fidelity"])
        if want.subject and subject.get("shape"):
            colour = want.colour or subject.get("colour", "")
            record["subject_fidelity"] = got.matches(shape=subject["shape"], colour=colour)
            hits["subject_fidelity"].append(record["subject_fidelity"])
        if want.class_only and subject.get("shape"):
            record["class_drift"] = got.shape == subject["shape"]
            hits["class_drift"].append(record["class_drift"])
        records.append(record)
    scores = {name: round(sum(h) / len(h), 4) for name, h in hits.items() if h}
    return {"scores": scores, "counts": {name: len(h) for name, h in hits.items() if h}, "images": records}
