"""Before any step runs: what would fail a step to run, found without loading a model.

A broken photo was found by the step that reads it: after a prior step had loaded the model and spent
minutes generating class images, or after another subject had trained. Here every image such a step will
decode is decoded once, before any model is loaded, and each broken one is named. So is a caption it
cannot read, an optimizer or scheduler this machine cannot run, more denoising steps than a scheduler
takes, and a `target_modules` list that names no module of the model (a typo, `to_kk`), found from the
model's configs alone: its modules are made on torch's meta device, which holds no weights. Of those
modules, the warnings of a target name that matches nothing and of a rank as wide as every targeted
layer.

Decoding costs tens of times the hash of a file (a JPEG is decoded at an eighth of its size, which finds
the same damage: runner.images.decodes), so an image whose content a build decoded before
is not decoded again: the lockfile's records hold the hashes of the images that their steps read
successfully (a record is written only when its step succeeded).
"""

from __future__ import annotations

import functools
import json
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runner import families, steps
from runner.errors import ImageError, ModelError
from runner.fingerprint import FileHasher
from runner.imagefiles import list_images, unreadable


def decoded_before(lock: dict) -> set[str]:
    """The sha256 of each image that a recorded step decoded: its `images` input, of which a step with a
    `num_images` (a prior's given class images) read the first that many by name, and an eval's `subject`
    (the subject's photos)."""
    found: set[str] = set()
    for record in lock.values():
        inputs = record.get("inputs", {}) if isinstance(record, dict) else {}
        if not isinstance(inputs, dict):
            continue
        for key in ("images", "subject"):
            images = inputs.get(key)
            files = images.get("files") if isinstance(images, dict) else None
            if not isinstance(files, dict):
                continue
            count = inputs.get("num_images") if key == "images" else None
            names = sorted(files)[:count] if isinstance(count, int) else files
            found.update(files[name] for name in names if isinstance(files[name], str))
    return found


def images_of(project, step) -> list[Path]:
    """The user's image files that `step` (a planner.Step) decodes, in the order it reads them."""
    files = []
    for folder, count in steps.get(step.kind).decodes(project, step.spec):
        found = list_images(Path(folder))
        files += found if count is None else found[:count]
    return files


def broken_images(
    hasher: FileHasher, files: list[Path], known: set[str], sizes: dict | None = None
) -> dict[Path, str]:
    """{file: what is wrong with it} of the `files` that cannot be read or do not decode. A file whose
    sha256 is in `known` decoded before and is not decoded again; each file decoded now puts its upright
    (width, height) in `sizes`."""
    from runner.images import decodes
    from runner.training.data import DECODE_THREADS  # as many at once as the train step decodes

    broken, todo = {}, []
    for path in dict.fromkeys(files):
        try:
            if hasher.input_hash(path) not in known:
                todo.append(path)
        except ImageError as exc:  # a link that leads nowhere, a named pipe ...
            broken[path] = str(exc)

    def decode(path: Path) -> tuple[int, int] | str:
        try:
            return decodes(path)
        except ImageError as exc:
            return str(exc)

    # What Pillow warns of a file is said by the step that reads it, not twice. Pillow decodes without
    # the GIL: a few images at a time.
    with warnings.catch_warnings(), ThreadPoolExecutor(min(DECODE_THREADS, max(1, len(todo)))) as pool:
        warnings.simplefilter("ignore")
        for path, found in zip(todo, pool.map(decode, todo), strict=True):
            if isinstance(found, str):
                broken[path] = found
            elif sizes is not None:
                sizes[path] = found
    return broken


def failing_steps(hasher: FileHasher, lock: dict, project, to_run: list) -> dict[str, str]:
    """{step id: its error} of the steps of `to_run` (planner.Steps) that would fail on an image: each
    error names every broken image the step reads, as the step would say it. Of an image decoded here, a
    train step's error also names a size it cannot be resized to (an extreme aspect ratio)."""
    files = {step.id: images_of(project, step) for step in to_run}
    sizes: dict[Path, tuple[int, int]] = {}
    all_files = [f for found in files.values() for f in found]
    broken = broken_images(hasher, all_files, decoded_before(lock), sizes)
    errors = {}
    for step in to_run:
        subject = steps.get(step.kind).trains(step.spec)
        said = []
        for path in files[step.id]:
            if path in broken:
                said.append(broken[path])
            elif (
                subject is not None
                and path in sizes
                and (why := _too_large(path, sizes[path], subject.train))
            ):
                said.append(why)
        if said:
            errors[step.id] = unreadable(said)
    return errors


def _too_large(path: Path, size: tuple[int, int], ts) -> str | None:
    """What a train step of [train] settings `ts` says of an upright image of `size` whose resized copy
    would be too large to train on (runner.training.data.read_images resizes it so), or None."""
    from runner.images import check_resized, shorter_side_size
    from runner.training import buckets

    if ts.buckets:
        sizes = buckets.bucket_sizes(ts.resolution, ts.bucket_min_side, ts.bucket_max_side, ts.bucket_step)
        resized, _ = buckets.fill(size, buckets.assign(size, sizes))
    else:
        resized = shorter_side_size(size, ts.resolution)
    try:
        check_resized(path, size, resized, ts.resolution)
    except ImageError as exc:
        return str(exc)
    return None


def caption_errors(project, to_run: list) -> dict[str, str]:
    """{step id: its error} of the steps of `to_run` (planner.Steps) that train on a caption file that
    cannot be read as a caption (binary, not UTF-8, [trigger] without a trigger), as the train step says
    it. Caption files are small: each is read, as the plan reads only their hashes."""
    from runner.errors import StepError
    from runner.training.captions import image_prompts

    errors = {}
    for step in to_run:
        subject = steps.get(step.kind).trains(step.spec)
        if subject is None or not subject.caption_extension:
            continue
        try:
            image_prompts(
                images_of(project, step),
                subject.caption_extension,
                subject.instance_prompt,
                subject.trigger,
                _quiet,
            )
        except StepError as exc:
            errors[step.id] = str(exc)
    return errors


def _quiet(message: str) -> None:
    """What reading captions warns of is said by the train step that reads them, not twice."""


def every_broken_image(
    hasher: FileHasher, lock: dict, project, project_steps: list, found: ImageError
) -> ImageError:
    """The error that names every broken image the project's steps read, where planning stopped at
    `found` (the files of one folder that cannot be read): a build that named only those had the user
    fix them, build again, and only then learn of a photo that does not decode."""
    broken = broken_images(
        hasher, [f for step in project_steps for f in images_of(project, step)], decoded_before(lock)
    )
    said = list(dict.fromkeys([*found.each, *broken.values()]))
    return ImageError(unreadable(said), said)


def target_errors(project, to_run: list, notes: list[str] | None = None) -> dict[str, str]:
    """{step id: its error} of the steps of `to_run` (planner.Steps) whose `target_modules` names no module
    of a component they train, as the train step would say it. Only lists written in the project file are
    checked (a preset names the modules of its family); where the model's configs cannot be read here (a
    single file, a hub model not downloaded yet), nothing is said and the train step checks. A name of a
    list that matches nothing beside one that does is allowed (PEFT allows it), but it is most often a typo
    (`["to_q", "to_kk"]` trains to_q alone): `notes` gets a warning for each such key, once; and one for
    a rank at least as wide as every layer the list names (see _full_rank)."""
    subjects = {}
    for step in to_run:
        subject = steps.get(step.kind).trains(step.spec)
        if subject is not None:
            subjects[step.id] = subject
    if not subjects:  # no step trains: the base model's family is not looked up
        return {}
    from runner.models import BaseModel

    base = BaseModel.of(project.settings, project.dir)
    family = families.detect(base)
    if not any(_written(c, s) for s in subjects.values() for c in family.trained_components(s.train)):
        return {}  # nothing to check: torch is not imported
    modules = _skeletons(base, family)
    if modules is None:
        return {}
    from runner.errors import StepError
    from runner.project.problems import Source
    from runner.training import lora
    from runner.training.job import lora_key

    errors, source = {}, Source.of(project)
    for sid, subject in subjects.items():
        for c in family.trained_components(subject.train):
            if not _written(c, subject):
                continue
            model = modules[c.attr]
            targets = lora.target_modules(c, c.value(subject.lora, "target_modules"), model)
            key_of = functools.partial(lora_key, subject, getattr(project, "lora", None))
            try:
                lora.check_targets(c, subject.lora, sorted(set(targets)), model, key_of, source.problem)
            except StepError as exc:
                errors[sid] = str(exc)
                break
            if notes is None:
                continue
            for note in (
                _unmatched(project, c, subject, targets, model, key_of),
                _full_rank(project, c, subject, targets, model, key_of),
            ):
                if note and note not in notes:  # a [lora] key that every subject (and snapshot) reads: once
                    notes.append(note)
    return errors


def _full_rank(project, component, subject, targets: list[str], model, key_of) -> str | None:
    """The warning for a rank at least the smaller side of every layer that `targets` names in `model`,
    or None. A LoRA of rank r on a d_in x d_out layer updates it at rank min(r, d_in, d_out): from
    min(d_in, d_out) on, the update is full rank, and its r * (d_in + d_out) parameters are more than the
    layer's own. Said where it holds for every layer: where a wider one is named, the rank still bounds
    that layer's update."""
    import torch

    from runner.training.lora import names_module

    widths = []
    for path, module in model.named_modules():
        if not any(names_module(t, path) for t in targets):
            continue
        if isinstance(module, torch.nn.Linear):
            widths.append(min(module.in_features, module.out_features))
        elif isinstance(module, torch.nn.Conv2d):  # PEFT's update: out x (in * kernel height * width)
            kernel = module.kernel_size[0] * module.kernel_size[1]
            widths.append(min(module.in_channels * kernel, module.out_channels))
    rank = component.value(subject.lora, "rank")
    if not widths or rank < max(widths):
        return None
    widest = max(widths)
    return _warning(
        project,
        key_of(component.field_of(subject.lora, "rank")),
        f"{rank} is at least the smaller side of every layer of the {component.name} that target_modules "
        f"names (at most {widest}): each update is full rank, with more parameters than the layer it adapts",
        f"use a rank below {widest}, or target wider layers",
    )


def _unmatched(project, component, subject, targets: list[str], model, key_of) -> str | None:
    """The warning for the names of `targets` that match no module of `model`, where others do; or None."""
    from runner.training.lora import matched_targets

    matched = matched_targets(targets, model)
    missing = [t for t in dict.fromkeys(targets) if t not in matched]
    if not missing:
        return None
    one = len(missing) == 1
    return _warning(
        project,
        key_of(component.field_of(subject.lora, "target_modules")),
        f"{', '.join(map(repr, missing))} names no module of the {component.name}, so "
        f"{'it trains' if one else 'they train'} nothing (the other names do)",
        f"check the spelling, or remove {'it' if one else 'them'}",
    )


def _warning(project, key: str, what: str, fix: str) -> str:
    """A warning about the project file's `key`, said as those of loading it are: file, key, line, fix."""
    from runner.project.problems import Source

    return Source.of(project).warning(key, what, fix)


def device_problem(project, to_run: list) -> str | None:
    """Why this machine lacks the project's `device` ("cuda" or "mps"), where a step of `to_run`
    (planner.Steps) loads the model on it; else None. Each such step failed on it after the build had
    begun, one by one, and none named the project file: it is the project's setting, said once. For steps
    run on this machine only: a cluster's workers may have the device."""
    device = project.settings.device
    if device in ("auto", "cpu") or not any(steps.get(step.kind).loads_model for step in to_run):
        return None  # torch is not imported
    from runner.models import resolve_device
    from runner.project.problems import Source

    try:
        resolve_device(device)
    except ModelError:
        pass
    else:
        return None
    what = f'device = "{device}", but this machine has no {"CUDA" if device == "cuda" else "MPS"} device'
    fix = 'set device = "cpu", or "auto" (the GPU where there is one, else the CPU), in [project]'
    return Source.of(project).problem("project.device", what, fix)


def machine_errors(project, to_run: list) -> dict[str, str]:
    """{step id: its error} of the steps of `to_run` (planner.Steps) that cannot run on this machine (an
    optimizer or a scheduler whose package is not installed, no CUDA device), as each step would say it
    (StepKind.missing). For steps run on this machine only: a cluster's workers may have what it lacks."""
    device: list[str] = []

    def resolved() -> str:  # torch is imported only for a step that needs to know the device
        from runner.models import resolve_device

        if not device:
            device.append(resolve_device(project.settings.device))
        return device[0]

    from runner.project.problems import Source

    errors, source = {}, Source.of(project)
    for step in to_run:
        try:
            why = steps.get(step.kind).missing(step.spec, resolved, source)
        except ModelError:  # a device that is not there: device_problem says so, for the steps that load
            continue  # the model; a step that loads none would not ask
        if why:
            errors[step.id] = why
    return errors


def _written(component, subject) -> bool:
    """Whether the subject's `target_modules` of `component` is a list other than the default."""
    value = component.value(subject.lora, "target_modules")
    return not isinstance(value, str) and list(value) != list(component.default_targets)


def _skeletons(base, family) -> dict | None:
    """{pipeline attribute: module} of the family's LoRA components, made from their configs on the meta
    device (no weights); None where the configs are not at hand, or do not make the modules."""
    folder = _model_folder(base)
    if folder is None:  # a single file: its modules depend on how diffusers reads it
        return None
    try:
        index = json.loads((folder / "model_index.json").read_text())
        import diffusers
        import torch
        import transformers

        from runner.models import quiet_libraries

        quiet_libraries()
        modules = {}
        for c in family.components:
            library, name = index[c.attr]
            config = folder / c.attr
            if not (config / "config.json").is_file():  # a hub model not downloaded: never ask the hub
                return None
            with torch.device("meta"):
                if library == "diffusers":
                    cls = getattr(diffusers, name)
                    modules[c.attr] = cls.from_config(cls.load_config(config))
                elif library == "transformers":
                    modules[c.attr] = getattr(transformers, name)(
                        transformers.AutoConfig.from_pretrained(config)
                    )
                else:
                    return None
        return modules
    except Exception:  # noqa: BLE001 - not known here: the train step checks, as it always did
        return None


def _model_folder(base) -> Path | None:
    """The folder of the base model's configs: a built-in model's, a local folder, a hub model's cached
    snapshot; None for a single file."""
    from runner.models import ensure_builtin

    if base.kind == "builtin":
        return ensure_builtin(base.ref)  # made once, as the first step to load it would
    if base.kind == "folder":
        return Path(base.ref)
    if base.kind == "hub":
        return families.cached_hub_index(base.ref, base.revision).parent
    return None


def step_count_errors(project, to_run: list) -> dict[str, str]:
    """{step id: its error} of the prior and render steps of `to_run` whose `steps` their scheduler cannot
    take (DDIM and DDPM: at most the model's training timesteps, 1000 for Stable Diffusion), found from
    the base model's scheduler config, as the step would say it once it had loaded the model. Every
    scheduler takes as many steps as the model's training timesteps: only more are looked at."""
    from runner.models import BaseModel
    from runner.project.problems import Source

    asking = [s for s in to_run if s.kind in ("prior", "render")]
    if not asking:
        return {}
    try:
        folder = _model_folder(BaseModel.of(project.settings, project.dir))
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text()) if folder else None
    except (OSError, ValueError, ModelError):  # not at hand: the step checks, as it always did
        return {}
    limit = config.get("num_train_timesteps") if isinstance(config, dict) else None
    if not isinstance(limit, int) or all(s.spec.steps <= limit for s in asking):
        return {}
    from runner.schedulers import make_scheduler, too_many_steps

    errors, source = {}, Source.of(project)
    for step in (s for s in asking if s.spec.steps > limit):
        try:
            found = too_many_steps(make_scheduler(step.spec.scheduler, config), step.spec.steps)
        except Exception:  # noqa: BLE001 - a scheduler it cannot make or try here: the step says why
            continue
        if found:
            table = "priors" if step.kind == "prior" else "renders"
            errors[step.id] = source.problem(f"{table}.{step.spec.name}.steps", *found)
    return errors
