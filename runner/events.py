"""What the executor tells a display while it builds. Pure: the displays in runner/ui implement it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# A step's status over a build.
PENDING = "pending"
RUNNING = "running"
DONE = "done"  # ran and succeeded
CACHED = "cached"  # restored from the run-cache, nothing ran
FRESH = "fresh"  # up to date, nothing to do
SKIPPED = "skipped"  # not run: an upstream step failed, or left out by --only
FAILED = "failed"
INTERRUPTED = "interrupted"


@dataclass
class StepEvent:
    """One step of a build, as displays see it."""

    id: str  # "train:dog"
    kind: str
    name: str
    status: str = PENDING
    reasons: list[str] = field(default_factory=list)  # why it is stale; empty when fresh
    done: int = 0  # progress units done (train steps, images)
    total: int = 0
    metrics: dict = field(default_factory=dict)  # loss, it/s ...
    duration_s: float = 0.0
    outputs: Path | None = None  # the step's output folder once committed
    error: str = ""
    device: str = ""  # where it ran when steps run at once: "cuda:0", "cpu", "node-2 cuda:1"
    started: float = 0.0  # time.time() when it began to run or restore; 0 when it did not
    remade: bool = False  # it ran again to the very outputs the lockfile records (its record kept)
    output_hash: str = ""  # the output hash the lockfile recorded for what it ran or restored


# A step's log line that starts so is a warning: the displays show it without -v.
WARNING = "warning: "


def shown(message: str, verbosity: int) -> bool:
    """Whether a step's log line is shown at `verbosity` (-1 quiet, 0 default, 1 verbose)."""
    return verbosity >= 1 or (verbosity == 0 and message.startswith(WARNING))


class Reporter(Protocol):
    """Receives a build's events in order: plan, then per step start/progress/log/end, then finish."""

    def plan(self, project_name: str, steps: list[StepEvent]) -> None:
        """The plan of the build: every step, with status FRESH or PENDING and the reasons."""

    def step_start(self, step: StepEvent) -> None: ...

    def step_progress(self, step: StepEvent) -> None:
        """step.done / step.total / step.metrics were updated (called often; throttle if needed)."""

    def log(self, step: StepEvent | None, message: str) -> None: ...

    def step_end(self, step: StepEvent) -> None:
        """step.status is DONE, CACHED, SKIPPED, FAILED or INTERRUPTED; error set when FAILED."""

    def finish(self, steps: list[StepEvent], duration_s: float) -> None:
        """The build ended (also after a failure or interruption)."""

    def close(self) -> None:
        """Release the terminal."""
