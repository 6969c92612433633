"""snapshot:<subject>@<step> - a subject's adapter as it was after that many training steps.

`[train] save_steps = [200, 400]` gives subject `dog` the adapters `dog@200` and `dog@400`
(`adapters/dog@400/`, every format of a trained adapter), which a render may name like any
adapter. `save_steps` is not an input of the subject's own train step: its final adapter does not
depend on it.

A snapshot is the adapter that a run of `step` steps writes, when the learning-rate schedule does not
depend on the total step count (`constant`, `constant_with_warmup`): then its inputs are exactly those
of such a run, and a project that trained 400 steps before restores `dog@400` from the run-cache. With
another schedule it is step `step` of the whole run, and `step` is an input of its own.

The train step keeps each snapshot as it passes it and hands it to the run-cache, so a build that trains
the subject restores its snapshots without training again. A snapshot added to a subject that is
already built trains by itself, `step` steps (or up to `step` of the whole schedule).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from runner.steps import KOHYA_STEM, Inputs, StepKind, register
from runner.steps import train as train_kind

# Schedules whose learning rate at a step does not depend on the total step count.
STEP_INDEPENDENT = ("constant", "constant_with_warmup")


@dataclass(frozen=True)
class Snapshot:
    """A subject's adapter after `step` training steps; derived from the subject's `save_steps`."""

    name: str  # "dog@400"
    subject: Any  # the subject's resolved table (schema.Subject)
    step: int


def name_of(subject: str, step: int) -> str:
    return f"{subject}@{step}"


def training(subject, step: int):
    """(the subject's table as a run that ends at the snapshot, the step to stop at or None): a run of
    `step` steps when the schedule allows it, else the whole run stopped after `step`."""
    train = replace(subject.train, save_steps=None)
    if subject.train.lr_scheduler in STEP_INDEPENDENT:
        return replace(subject, train=replace(train, steps=step)), None
    return replace(subject, train=train), step


def run(ctx) -> dict:
    """Train the subject up to the snapshot's step into ctx.out."""
    spec = ctx.spec
    ctx.spec, stop_at = training(spec.subject, spec.step)
    ctx.extra["stop_at"] = stop_at
    return train_kind.run(ctx)


def _derive(tables: dict) -> dict:
    return {
        name_of(subject.name, step): Snapshot(name_of(subject.name, step), subject, step)
        for subject in tables.get("train", {}).values()
        for step in sorted(set(subject.train.save_steps or ()))
        if step < subject.train.steps
    }


def _deps(project, spec) -> list[str]:
    # After the train step: the run that trains the subject hands its snapshots to the run-cache.
    return train_kind.KIND.deps(project, spec.subject) + [f"train:{spec.subject.name}"]


def _inputs(i: Inputs) -> dict:
    subject, stop_at = training(i.spec.subject, i.spec.step)
    view = Inputs(i.project, i.step, i.facts, i.upstream, i._num_processes)
    view.spec = subject
    inputs = train_kind.KIND.inputs(view)
    if stop_at is not None:
        inputs["snapshot"] = stop_at
    return inputs


KIND = register(
    StepKind(
        name="snapshot",
        table="",
        spec=Snapshot,
        output_dir="adapters",
        version=1,
        run=run,
        inputs=_inputs,
        deps=_deps,
        doc="keeps a subject's adapter after a number of training steps (its save_steps)",
        produces_adapter=True,
        folders=lambda spec: [spec.subject.images],
        decodes=lambda project, spec: [(spec.subject.images, None)],
        trains=lambda spec: spec.subject,
        missing=lambda spec, device, source: train_kind.optimizer_missing(spec.subject, device, source),
        layout=lambda name: {f"{KOHYA_STEM}.safetensors": f"{name}.safetensors"},
        unit=("step", "it/s"),
        derive=_derive,
        # A snapshot is trained as its subject is: on the class prompt of the subject's train step.
        unhashed=train_kind.KIND.unhashed,
        unhashed_use=train_kind.KIND.unhashed_use,
        resumable=train_kind.resumable,
    )
)
