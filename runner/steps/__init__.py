"""The four step kinds. Each module exposes one function, `run(ctx: StepContext) -> dict`.

The function writes its outputs into `ctx.out` (an empty folder laid out like the step's output
folder, e.g. `adapters/<subject>/`) and returns a small dict of metrics that the executor records.
It raises `StepError` for a failure the user can fix, `StepInterrupted` when `ctx.should_stop()`
asked it to stop early (after saving what lets it resume). Modules import torch inside `run`, so that
importing this package stays cheap for `dbl plan`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from runner.errors import StepError, StepInterrupted  # noqa: F401 - re-exported

KINDS = ("prior", "train", "blend", "render")

# Bump a kind's version when its code changes the bytes it produces: every step of that kind goes stale.
VERSIONS = {"prior": 1, "train": 1, "blend": 1, "render": 1}

# Where each kind's outputs live under the project's `out` folder.
OUTPUT_DIRS = {"prior": "priors", "train": "adapters", "blend": "blends", "render": "renders"}


@dataclass
class StepContext:
    """Everything a step needs; given by the executor."""

    step_id: str  # "train:dog"
    kind: str  # "train"
    name: str  # "dog"
    spec: Any  # the step's resolved settings (runner.project.schema: Prior, Subject, Blend or Render)
    project: Any  # the whole runner.project.schema.Project
    work: Path  # .dbl/tmp/<stem>/<kind>-<name>/: kept across attempts of the same fingerprint (checkpoints)
    out: Path  # empty folder inside `work`; write outputs here
    inputs: dict[str, Path]  # upstream step id -> folder holding its committed outputs
    models: Any  # runner.models.ModelCache, shared by all steps of a build
    fingerprint: str = ""
    num_processes: int = 1
    progress: Callable[..., None] = lambda done, total, **metrics: None
    log: Callable[[str], None] = lambda message: None
    should_stop: Callable[[], bool] = lambda: False
    extra: dict = field(default_factory=dict)


class StepFunction(Protocol):
    def __call__(self, ctx: StepContext) -> dict: ...


def get_runner(kind: str) -> StepFunction:
    """The `run` function of a step kind, imported on demand."""
    if kind not in KINDS:
        raise KeyError(kind)
    return importlib.import_module(f"runner.steps.{kind}").run
