"""Training a LoRA adapter: the job (job.py), its data (data.py), the LoRA setup (lora.py), the
optimizers (optimizers.py), the loss (losses.py), the loop (loop.py, read it top to bottom),
checkpoints (checkpoints.py), what an adapter's dbl.json records (provenance.py) and what processes
agree on (distributed.py). The train step (runner.steps.train) builds a Job and calls `train`; several
processes are started by runner.exec.launcher."""

from __future__ import annotations

from runner.training.job import Hooks, Job, job_from_context
from runner.training.loop import train
from runner.training.losses import prior_preservation_loss

__all__ = ["Hooks", "Job", "job_from_context", "prior_preservation_loss", "train"]
