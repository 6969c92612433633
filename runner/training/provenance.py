"""What a trained adapter's dbl.json records: provenance, settings, the loss summary and the per-step log."""

from __future__ import annotations

from runner.project.schema import TrainSettings, keys_of, record


def loss_summary(history: dict, weight) -> dict:
    """Mean losses over the first and the last tenth of the run."""

    def mean(values):
        return float(sum(values) / len(values)) if values else float("nan")

    n = len(history["instance"])
    tenth = max(1, n // 10)
    summary = {
        "instance_loss_first": mean(history["instance"][:tenth]),
        "instance_loss_last": mean(history["instance"][-tenth:]),
    }
    if weight is not None:
        summary["prior_loss_first"] = mean(history["prior"][:tenth])
        summary["prior_loss_last"] = mean(history["prior"][-tenth:])
    w = weight or 0.0
    summary["loss_first"] = summary["instance_loss_first"] + w * summary.get("prior_loss_first", 0.0)
    summary["loss_last"] = summary["instance_loss_last"] + w * summary.get("prior_loss_last", 0.0)
    return summary


def info(run, summary: dict, subject, stop_at) -> dict:
    """dbl.json of a trained adapter: provenance, metrics and the per-step log. `subject` is the table of
    the run it is the result of; `stop_at` the step a snapshot of a longer schedule stopped at."""
    from runner import steps

    job = run.job
    info = {
        "kind": "train",
        "base_model": job.base.recorded,
        "base_revision": job.base.revision,
        "prediction_type": run.noise.config.prediction_type,
        "mixed_precision": job.mixed_precision,
        "seed": job.seed,
        "steps": subject.train.steps,
        "num_processes": run.world,
        "instance_prompt": subject.instance_prompt,
        "instance_images": len(run.images.instance),
        "train": {k: v for k, v in record(subject.train).items() if k not in NOT_IN_INFO},
        "lora": record(subject.lora),
        "loss": summary,
        "step_version": steps.get("train").version,
    }
    if stop_at is not None:
        info["snapshot_at"] = stop_at
    if job.prior is not None:
        info["prior"] = {
            "class_prompt": job.prior.class_prompt,
            "class_images": len(run.images.classes),
            "loss_weight": job.prior.loss_weight,
        }
    info["log"] = step_log(run.history, run.weight)
    return info


# The settings kept out of every fingerprint (how, not what, a run trains: checkpoints, logs, speed):
# left out of the adapter's dbl.json too, so that its bytes do not depend on them, and an adapter that
# the run-cache restores for a project that changed them does not say otherwise.
NOT_IN_INFO = tuple(f.name for f in keys_of(TrainSettings) if not f.metadata.get("fingerprint", True))


def step_log(history: dict, weight) -> dict:
    """The per-step losses and learning rate, 6 significant digits: compact, and the same after a resume."""

    def compact(values):
        return [float(f"{v:.6g}") for v in values]

    log = {"instance_loss": compact(history["instance"])}
    if weight is not None:
        log["prior_loss"] = compact(history["prior"])
    if history.get("lr"):
        log["lr"] = compact(history["lr"])
    return log
