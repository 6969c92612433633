"""What a run writes besides its checkpoints: the adapter in every layout with its dbl.json, the snapshots
of `save_steps`, and the TensorBoard logs. Written by process 0 alone."""

from __future__ import annotations

from typing import TYPE_CHECKING

from runner.errors import StepError
from runner.training import provenance

if TYPE_CHECKING:
    from runner.training.loop import Run


def snapshot(run: Run, folder) -> None:
    """Keep the adapter of this step in `folder`, as the snapshot's own run would write it (written
    beside it and renamed, so a kill leaves no half snapshot). A resumed run keeps the one it has."""
    import shutil

    from runner.steps.snapshot import training

    if folder.is_dir() or run.rank != 0:
        return
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    subject, stop_at = training(run.job.subject, run.step)
    write_adapter(run, partial, subject, stop_at)
    partial.rename(folder)
    run.log(f"kept the adapter of step {run.step}")


def write_adapter(run: Run, out, subject, stop_at) -> dict:
    """Write the adapter as it is now into `out` (process 0), with the dbl.json of `subject`'s run;
    returns the loss summary."""
    from runner.adapters import save_adapter
    from runner.steps import KOHYA_STEM

    summary = provenance.loss_summary(run.history, run.weight)
    if run.rank == 0:
        save_adapter(
            out,
            {c.name: run.modules[c.name] for c in run.components},
            adapter_name="default",
            base_model=run.job.base.recorded,
            info=provenance.info(run, summary, subject, stop_at),
            name=KOHYA_STEM,
            family=run.job.family,
        )
    return summary


def log_writer(run: Run):
    """TensorBoard's writer of the run's logs (process 0, `log = "tensorboard"`), else None."""
    if run.job.log_dir is None or run.rank != 0:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise StepError(
            f"{run.job.step_id}: log = 'tensorboard' needs the tensorboard package: "
            f"pip install 'dbl[tensorboard]' ({exc})"
        ) from None
    run.job.log_dir.mkdir(parents=True, exist_ok=True)
    run.log(f"TensorBoard logs in {run.job.log_dir}")
    return SummaryWriter(log_dir=str(run.job.log_dir), purge_step=run.step + 1 if run.step else None)
