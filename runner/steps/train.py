"""train:<subject> - DreamBooth with LoRA on the base model's components, with prior preservation.

The recipe lives in runner.training (the loop in runner/training/loop.py); several processes are
started by runner.exec.launcher.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from runner import families
from runner.project import checks
from runner.project.schema import Subject
from runner.steps import KOHYA_STEM, Inputs, StepKind, register


def run(ctx) -> dict:
    """Train one subject's LoRA adapter into ctx.out."""
    from runner.training import Hooks, job_from_context, train

    job = job_from_context(ctx)
    hooks = Hooks(progress=ctx.progress, log=ctx.log, should_stop=ctx.should_stop)
    if ctx.num_processes > 1:
        from runner.exec.launcher import run_processes

        metrics = run_processes(job, ctx.num_processes, hooks)
    else:
        metrics = train(job, hooks, models=ctx.models)
    # The snapshots kept on the way, for the run-cache (a resumed run kept the earlier ones before).
    for step, folder in job.snapshots.items():
        if (folder / "dbl.json").is_file():
            ctx.extras[f"snapshot:{ctx.name}@{step}"] = (folder, snapshot_metrics(folder))
    return metrics


def snapshot_metrics(folder) -> dict:
    """What the lockfile records of a snapshot, from its dbl.json."""
    import json

    info = json.loads((folder / "dbl.json").read_text())
    return {
        "loss_first": info["loss"]["loss_first"],
        "loss_last": info["loss"]["loss_last"],
        "steps": info.get("snapshot_at") or info["steps"],
        "resumed_from": None,
    }


# --- the kind ------------------------------------------------------------------------------------------


BUCKET_KEYS = ("buckets", "bucket_min_side", "bucket_max_side", "bucket_step")


def _deps(project, spec) -> list[str]:
    return [f"prior:{spec.prior}"] if spec.prior else []


def _inputs(i: Inputs) -> dict:
    spec, settings = i.spec, i.settings
    inputs = {
        "version": KIND.version,
        "base_model": i.base_model(),
        "mixed_precision": settings.mixed_precision,
        "seed": settings.seed,
        # The processes it really runs with: the effective batch is num_processes x batch_size.
        "num_processes": i.num_processes,
        "instance_prompt": spec.instance_prompt,
        # Bucket keys only with buckets on: a subject without them keeps the fingerprint it had before.
        "train": i.fields(spec.train, exclude=() if spec.train.buckets else BUCKET_KEYS),
        "lora": i.fields(spec.lora),
        "images": i.images(spec.images),
    }
    family = inputs["base_model"].get("family")  # set for families other than the default
    if family is not None and families.get(family).training_version > 1:
        inputs["family_training"] = families.get(family).training_version
    # Only when caption files exist: a subject without them keeps the fingerprint it had before captions.
    captions = i.captions(spec.images, spec.caption_extension) if spec.caption_extension else {}
    if captions:
        captions["extension"] = spec.caption_extension
        if spec.trigger is not None:
            captions["trigger"] = spec.trigger
        inputs["captions"] = captions
    if spec.prior:
        prior = i.project.priors[spec.prior]
        inputs["prior"] = {
            "_name": spec.prior,
            "output": i.output(f"prior:{spec.prior}"),
            "loss_weight": prior.loss_weight,
        }
        if _reads_unheld_prompt(i, prior):  # display-only: a project built before keeps its fingerprint
            inputs["prior"]["_class_prompt"] = prior.prompts[0]
    return inputs


def _reads_unheld_prompt(i: Inputs, prior) -> bool:
    """Whether training reads the prior's first class prompt, which it gives class images without a
    caption (or with an empty one), where the prior's outputs do not hold it: no class image is generated
    from it and no caption written of it. Then it is in neither the prior's output hash nor the train
    step's fingerprint."""
    count, ext = len(prior.prompts), prior.caption_extension
    given = sorted(i.facts.images(prior.images))[: prior.num_images] if prior.images else []
    captions = i.facts.captions(prior.images, ext) if ext and given else {}
    blank = i.blank_captions(prior.images, ext) if captions else set()
    reads = held = False
    for index in range(prior.num_images):
        caption = (
            PurePosixPath(given[index]).with_suffix(ext).as_posix() if index < len(given) and ext else None
        )
        if index >= len(given) or caption not in captions:
            # Generated (its image records its prompt), or given without a caption: with several prompts,
            # the prior writes its prompt beside it; with one, training reads the prompt for it.
            held |= (index >= len(given) or count > 1) and index % count == 0
            reads |= count == 1
        else:
            reads |= caption in blank
    return reads and not held


def _unhashed(inputs: dict) -> dict:
    """The class prompt training read for class images without captions, where only the train step's
    inputs hold it (see _reads_unheld_prompt)."""
    prior = inputs.get("prior")
    prompt = prior.get("_class_prompt") if isinstance(prior, dict) else None
    return {"prior's class prompt": prompt} if prompt is not None else {}


UNHASHED_USE = "which training reads for class images without captions"

KIND = register(
    StepKind(
        name="train",
        table="subjects",
        spec=Subject,
        output_dir="adapters",
        version=1,
        run=run,
        inputs=_inputs,
        deps=_deps,
        doc="trains one subject's LoRA (UNet, and text encoder if asked)",
        produces_adapter=True,
        read=checks.read_subject,
        check=checks.check_subjects,
        folders=lambda spec: [spec.images],
        layout=lambda name: {f"{KOHYA_STEM}.safetensors": f"{name}.safetensors"},
        unit=("step", "it/s"),
        unhashed=_unhashed,
        unhashed_use=UNHASHED_USE,
    )
)
