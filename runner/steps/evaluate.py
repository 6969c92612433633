"""eval:<name> - fidelity scores of a render of the shapes world (runner.fidelity).

    [evals.ring]
    render = "ring"        # the render whose images are scored
    subject = "ring"       # whose photos "sks" stands for (default: the render's adapter, a subject)

Outputs `scores.json`: the scores, and per image its prompt, what the prompt asks for, what the image
shows and whether it counted as a hit. The lockfile records the scores among the step's metrics; a
render of several adapters (`adapters`) is scored per adapter. The scores mean something for renders of
the built-in `tiny-shapes` model, whose world the measurement knows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from runner.project import checks
from runner.project.adapter_checks import subjects_of
from runner.project.schema import Eval
from runner.steps import Inputs, StepContext, StepKind, register


def _subject(tables: dict, spec):
    """The subject table the identifier stands for, or None; `tables` are a project's (Project.tables)."""
    subjects = tables.get("train", {})
    if spec.subject is not None:
        return subjects.get(spec.subject)
    render = tables.get("render", {}).get(spec.render)
    if render is not None and render.adapters is None and render.adapter in subjects:
        return subjects[render.adapter]
    return None


def run(ctx: StepContext) -> dict:
    from PIL import Image

    from runner import fidelity
    from runner.imagefiles import list_images
    from runner.images import named_errors

    spec = ctx.spec
    render = ctx.project.tables["render"][spec.render]
    folder = Path(ctx.inputs[f"render:{spec.render}"])
    subject = _subject(ctx.project.tables, spec)
    traits = {}
    if subject is not None:
        photos = []
        for path in list_images(Path(subject.images)):
            # decoded as Pillow gives it, not made upright as training makes it: the scores stay as they
            # were; a photo broken since the build checked it names its file
            with named_errors(path), Image.open(path) as image:
                photos.append(image.convert("RGB"))
        traits = fidelity.subject_traits(photos)
        ctx.log(
            f"subject {subject.name}: {traits.get('colour') or '?'} {traits.get('shape') or '?'} in its photos"
        )
    adapters = render.adapter_names
    several = render.adapters is not None
    report, metrics = {"subject": traits, "adapters": {}}, {}
    total, done = len(adapters) * len(render.prompts) * len(render.seeds), 0
    for adapter in adapters:
        items = []
        for index, prompt in enumerate(render.prompts):
            for seed in render.seeds:
                path = (folder / adapter if several else folder) / f"{index}-{seed}.png"
                with named_errors(path), Image.open(path) as image:
                    items.append((prompt, image.convert("RGB")))
                done += 1
                ctx.progress(done, total)
        result = fidelity.score(items, traits, spec.identifier)
        for record, (index, seed) in zip(
            result["images"], [(i, s) for i in range(len(render.prompts)) for s in render.seeds], strict=True
        ):
            record["file"] = f"{adapter}/{index}-{seed}.png" if several else f"{index}-{seed}.png"
        report["adapters"][adapter] = result
        if several:
            metrics[adapter] = result["scores"]
        else:
            metrics.update(result["scores"])
        shown = ", ".join(f"{k} {v:.2f}" for k, v in result["scores"].items()) or "nothing to score"
        ctx.log(f"{adapter}: {shown}" if several else shown)
    (ctx.out / "scores.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    return metrics


# The fix of a warning that the eval has no subject whose fidelity it could score
_SET_SUBJECT = "set subject = {} to score subject fidelity and class drift"


def _warnings(tables: dict, spec) -> list[tuple[str, str, str]]:
    """What the eval cannot score as its settings suggest (subject fidelity and class drift, unsaid), as
    (the key whose line it is, what, fix). Said as the file loads: it needs no model."""
    said = []
    if not re.fullmatch(r"[a-z]+", spec.identifier.lower()):
        said.append(
            (
                "identifier",
                f"identifier {spec.identifier!r} is not a word of letters, and prompts are read as such "
                "words: no prompt names it, so subject fidelity is not counted",
                "",
            )
        )
    subject = _subject(tables, spec)
    render = tables.get("render", {}).get(spec.render)
    named = render is not None and any(
        spec.identifier.lower() in re.findall(r"[a-z]+", prompt.lower()) for prompt in render.prompts
    )
    if subject is not None and render is not None and not said and not named:
        said.append(
            (
                "identifier",
                f"no prompt of renders.{spec.render} names the identifier {spec.identifier!r}, so subject "
                "fidelity is not counted",
                f"set identifier to the word that stands for {subject.name} "
                f"(its instance prompt: {subject.instance_prompt!r})",
            )
        )
    if subject is not None or spec.subject is not None or render is None:
        return said
    subjects = tables.get("train", {})
    if render.adapters is None:
        trained, at, _ = render.adapter.partition("@")
        if at and trained in subjects:
            said.append(
                (
                    "render",
                    f"the render's adapter {render.adapter} is a snapshot of {trained}, not a subject",
                    _SET_SUBJECT.format(f'"{trained}"'),
                )
            )
        elif named and subjects:  # the base model or a blend drawn for prompts that name the subject
            blended = subjects_of(render.adapter, subjects, tables.get("blend", {}))
            what = "the base model ('none')" if render.adapter == "none" else f"blend {render.adapter}"
            choice = " or ".join(f'"{name}"' for name in blended or subjects)
            said.append(
                (
                    "render",
                    f"the render draws {what}, not a subject, for prompts that name {spec.identifier!r}",
                    _SET_SUBJECT.format(choice),
                )
            )
        return said
    # Several adapters give no default subject: which of them the identifier stands for is not said.
    named = [name.partition("@")[0] for name in render.adapters]
    trained = list(dict.fromkeys(name for name in named if name in subjects))
    if trained:
        choice = " or ".join(f'"{name}"' for name in trained)
        said.append(
            (
                "render",
                "the render has several adapters, so none is the subject by default",
                _SET_SUBJECT.format(choice),
            )
        )
    return said


def _deps(project, spec) -> list[str]:
    return [f"render:{spec.render}"]


def _inputs(i: Inputs) -> dict:
    from runner import fidelity

    spec = i.spec
    inputs = {
        "version": [KIND.version, fidelity.VERSION],
        "render": {"_name": spec.render, "output": i.output(f"render:{spec.render}")},
        "identifier": spec.identifier,
    }
    subject = _subject(i.project.tables, spec)
    if subject is not None:
        inputs["subject"] = i.images(subject.images)
    return inputs


def _check(check, tables: dict) -> None:
    renders, subjects = tables.get("render", {}), tables.get("train", {})
    for name, render in checks.unread_references(check, "evals", "render"):
        if render not in renders and not checks.unread(check, render, ("renders",)):
            known = (
                ", ".join(checks.listed(check, "renders", renders)) or "none; add a [renders.<name>] table"
            )
            check.problem(("evals", name, "render"), f"'{render}' is not a render", f"renders: {known}")
    for name, subject in checks.unread_references(check, "evals", "subject"):
        if subject not in subjects and not checks.unread(check, subject, ("subjects",)):
            known = ", ".join(checks.listed(check, "subjects", subjects)) or "none"
            check.problem(("evals", name, "subject"), f"'{subject}' is not a subject", f"subjects: {known}")
    for name, spec in tables.get("eval", {}).items():
        if spec.render not in renders and not checks.unread(check, spec.render, ("renders",)):
            check.problem(
                ("evals", name, "render"),
                f"'{spec.render}' is not a render",
                "renders: "
                + (
                    ", ".join(checks.listed(check, "renders", renders))
                    or "none; add a [renders.<name>] table"
                ),
            )
        if (
            spec.subject is not None
            and spec.subject not in subjects
            and not checks.unread(check, spec.subject, ("subjects",))
        ):
            check.problem(
                ("evals", name, "subject"),
                f"'{spec.subject}' is not a subject",
                "subjects: " + (", ".join(checks.listed(check, "subjects", subjects)) or "none"),
            )
        for at, what, fix in _warnings(tables, spec):
            check.note(("evals", name), what, fix, at=("evals", name, at))
    evals = list(tables.get("eval", {}))
    if evals and check.base_model is not None and check.base_model != SHAPES_MODEL:
        check.note(
            ("evals", evals[0]),
            f"evals score renders of the built-in {SHAPES_MODEL} model, whose world of coloured shapes they "
            f"know; base_model '{check.base_model}' draws other pictures, which they cannot tell apart",
            f'remove the [evals] tables, or use base_model = "{SHAPES_MODEL}"',
        )


SHAPES_MODEL = "tiny-shapes"  # the model whose world runner.fidelity knows


KIND = register(
    StepKind(
        name="eval",
        table="evals",
        spec=Eval,
        output_dir="evals",
        version=1,
        run=run,
        inputs=_inputs,
        deps=_deps,
        doc="scores a render of the shapes world: subject fidelity, prompt fidelity, class drift",
        check=_check,
        # the subject's photos, which it reads to find the subject's traits
        decodes=lambda project, spec: (
            [(subject.images, None)] if (subject := _subject(project.tables, spec)) else []
        ),
        unit=("images", "img/s"),
        loads_model=False,  # it scores image files
    )
)
