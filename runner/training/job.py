"""What a training run is given: the job (plain data that pickles, for worker processes) and its hooks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.errors import StepError


@dataclass
class Job:
    """What a training run needs, picklable so that worker processes can receive it."""

    subject: Any  # schema.Subject (resolved: absolute image folder, merged train and lora settings)
    prior: Any  # schema.Prior or None
    class_dir: Path | None  # the prior step's output folder
    base: Any  # runner.models.BaseModel
    family: Any  # runner.families.Family of the base model
    device: str
    mixed_precision: str
    seed: int
    work: Path  # the step's work folder: checkpoints live here
    out: Path  # where the adapter is written
    fingerprint: str = ""
    stop_at: int | None = None  # stop after this step (a snapshot of a schedule of more steps)
    # The project's [lora]: a key of the subject's whose value differs is written in its own table.
    lora_defaults: Any = None
    snapshots: dict = field(default_factory=dict)  # step -> folder: keep the adapter there on the way
    log_dir: Path | None = None  # TensorBoard event files go here when given
    # The step this run builds, as its messages name it: "train:dog", or "snapshot:dog@400" for a snapshot
    # that trains by itself.
    step_id: str = ""
    # The project file as warnings about its keys name it, with their lines (runner.project.problems.Source)
    source: Any = None

    def lora_key(self, field: str) -> str:
        return lora_key(self.subject, self.lora_defaults, field)

    def problem(self, key: str, what: str, fix: str) -> str:
        """The run's error about the project file's `key`, with the file and the key's line."""
        from runner.project.problems import Source

        return Source.of(self).problem(key, what, fix)

    def train_problem(self, field: str, what: str, fix: str) -> str:
        """The run's error about the subject's train setting `field`, with the project file's key and line."""
        from runner.project.problems import Source

        source = Source.of(self)
        return source.problem(train_key(self.subject, source, field), what, fix)


@dataclass
class Hooks:
    """How a run reports back; in a worker process these send messages to the parent."""

    progress: Callable[..., None] = lambda done, total, **metrics: None
    log: Callable[[str], None] = lambda message: None
    should_stop: Callable[[], bool] = lambda: False


def job_from_context(ctx) -> Job:
    """The Job of a train step's context (runner.steps.StepContext)."""
    from runner.models import BaseModel, ModelCache
    from runner.project.problems import Source

    spec, project = ctx.spec, ctx.project
    settings = project.settings
    prior = class_dir = None
    if spec.prior:
        prior = project.priors[spec.prior]
        class_dir = ctx.inputs.get(f"prior:{spec.prior}")
        if class_dir is None:
            raise StepError(
                f"train:{spec.name} uses prior '{spec.prior}' but its class images were not given"
            )
    models = ctx.models
    if models is None:
        base = BaseModel.of(settings, project.dir)
        models = ctx.models = ModelCache(base, settings.device, settings.mixed_precision)
    return Job(
        subject=spec,
        prior=prior,
        class_dir=Path(class_dir) if class_dir else None,
        base=models.base,
        family=models.family,
        device=models.device,
        mixed_precision=models.mixed_precision,
        seed=settings.seed,
        work=Path(ctx.work),
        out=Path(ctx.out),
        fingerprint=ctx.fingerprint,
        stop_at=ctx.extra.get("stop_at"),
        snapshots={
            step: Path(ctx.work) / "snapshots" / str(step)
            for step in sorted(set(spec.train.save_steps or ()))
            if step < spec.train.steps
        },
        log_dir=project.out / "logs" / ctx.name if spec.train.log == "tensorboard" else None,
        step_id=ctx.step_id,
        lora_defaults=getattr(project, "lora", None),
        source=Source.of(project),
    )


def lora_key(subject, defaults, field: str) -> str:
    """Where a problem of the subject's LoRA setting `field` points: its own [subjects.<name>.lora] table
    where its value is not the project-wide [lora]'s `defaults` (so it is written there), else [lora]."""
    own = defaults is not None and getattr(subject.lora, field) != getattr(defaults, field)
    return f"subjects.{subject.name}.lora.{field}" if own else f"lora.{field}"


def train_key(subject, source, field: str) -> str:
    """Where a problem of the subject's train setting `field` points: its own [subjects.<name>.train] table
    where the project file (`source`, a problems.Source) writes it there, else [train]."""
    own = ("subjects", subject.name, "train", field)
    return ".".join(own) if source.lines.has(own) else f"train.{field}"
