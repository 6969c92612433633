"""train:<subject> - DreamBooth with LoRA on the base model's components, with prior preservation.

The recipe lives in runner.training (the loop in runner/training/loop.py); several processes are
started by runner.exec.launcher.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from runner import families
from runner.project import checks
from runner.project.checks import TRIGGER
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


def optimizer_missing(subject, device, source) -> str | None:
    """Why the optimizer of the subject's [train] settings cannot run here (see StepKind.missing), at the
    key of the project file that asks for it."""
    from runner.training.job import train_key
    from runner.training.optimizers import asked_key, unavailable

    found = unavailable(subject.train, device)
    if found is None:
        return None
    return source.problem(train_key(subject, source, asked_key(subject.train)), *found)


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
    if _lora_beside_level(families.get(family or families.DEFAULT), spec):
        # 2: such a LoRA's kohya name no longer carries the text_model_ level it is beside (loaders drop it)
        inputs["kohya_names"] = 2
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
        # Display-only (out of the fingerprint): a project built before keeps its fingerprint.
        inputs["prior"].update(_unheld(i, prior, None if "trigger" in captions else spec.trigger))
    return inputs


def _lora_beside_level(family, spec) -> bool:
    """Whether the subject trains a LoRA on a text encoder module beside its text_model level (SDXL's
    text_projection), whose kohya name changed: the train steps of those only are fingerprinted anew."""
    for c in family.trained_components(spec.train):
        targets = c.value(spec.lora, "target_modules")
        if c.beside_level and not isinstance(targets, str) and set(targets) & set(c.beside_level):
            return True
    return False


def _unheld(i: Inputs, prior, trigger: str | None) -> dict:
    """What training reads for the class images that neither the prior's outputs nor the train step's
    fingerprint hold. The prior's first class prompt, which images without a caption (or with an empty
    one) train on, where no class image is generated from it and no caption written of it; and the
    subject's `trigger` (where its fingerprint lacks it), which replaces [trigger] in class captions."""
    count, ext = len(prior.prompts), prior.caption_extension
    given = sorted(i.facts.images(prior.images))[: prior.num_images] if prior.images else []
    texts = i.caption_texts(prior.images, ext) if ext and given else {}
    reads = held = triggered = False
    for index in range(prior.num_images):
        caption = (
            PurePosixPath(given[index]).with_suffix(ext).as_posix() if index < len(given) and ext else None
        )
        if index >= len(given) or caption not in texts:
            # Generated (its image records its prompt), or given without a caption: with several prompts,
            # the prior writes its prompt beside it; with one, training reads the prompt for it.
            held |= (index >= len(given) or count > 1) and index % count == 0
            reads |= count == 1
            triggered |= count > 1 and TRIGGER in prior.prompt_of(index)
        else:
            reads |= texts[caption] == ""
            triggered |= TRIGGER in (texts[caption] or "")
    found = {"_class_prompt": prior.prompts[0]} if reads and not held else {}
    if triggered and trigger is not None:
        found["_trigger"] = trigger
    return found


USES = {
    "prior's class prompt": "which training reads for class images without captions",
    "trigger": f"which replaces {TRIGGER} in class captions",
}


def _unhashed(inputs: dict) -> dict:
    """The values of _unheld that the train step's inputs hold."""
    prior = inputs.get("prior") if isinstance(inputs.get("prior"), dict) else {}
    found = {"prior's class prompt": prior.get("_class_prompt"), "trigger": prior.get("_trigger")}
    return {what: value for what, value in found.items() if value is not None}


def resumable(work, spec, project) -> str | None:
    """The newest complete checkpoint an interrupted run left in `work`, which the next run resumes from."""
    from runner.training.checkpoints import STATE, checkpoint_dirs

    saved = [step for step, folder in checkpoint_dirs(work) if (folder / STATE).is_file()]
    return f"resumes from its checkpoint at step {saved[-1]}" if saved else None


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
        decodes=lambda project, spec: [(spec.images, None)],
        trains=lambda spec: spec,
        missing=optimizer_missing,
        layout=lambda name: {f"{KOHYA_STEM}.safetensors": f"{name}.safetensors"},
        unit=("step", "it/s"),
        unhashed=_unhashed,
        unhashed_use=USES.__getitem__,
        resumable=resumable,
    )
)
