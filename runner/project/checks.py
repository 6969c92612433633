"""The built-in step kinds' table readers and cross-table checks of subjects, priors, their train
settings and the output folder (see runner.steps); those of blends and renders are in
runner.project.adapter_checks.

Pure like the rest of the project package: a reader turns one raw TOML table into its dataclass, a check
looks across the tables of a whole file ({kind: {name: table}}) and adds problems to the checker.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import replace
from functools import partial
from pathlib import Path

from runner.imagefiles import IMAGE_SUFFIXES, few, has_images, scan
from runner.project import schema, unused

RESERVED_ADAPTERS = ("none",)
TRIGGER = "[trigger]"  # in a caption or an instance prompt: the subject's trigger words
# An adapter's kohya file is `<name>.safetensors` beside the diffusers file: this name would overwrite it
# (on macOS and Windows, whose file names ignore case, in any case). runner.adapters.DIFFUSERS_WEIGHTS.
DIFFUSERS_STEM = "pytorch_lora_weights"


def check_adapter_name(check, group: str, name: str) -> None:
    """A subject's or blend's name that cannot name an adapter: "none" (the base model in a render), or one
    whose kohya file would be named like its folder's diffusers file."""
    if name in RESERVED_ADAPTERS:
        check.problem((group, name), f"'{name}' is reserved for rendering the base model", "rename it")
    if name.lower() == DIFFUSERS_STEM:
        check.problem(
            (group, name),
            f"'{name}' would name the kohya file {name}.safetensors, which replaces the diffusers file "
            f"{DIFFUSERS_STEM}.safetensors in the same folder",
            "rename it",
        )


# --- readers -----------------------------------------------------------------------------------------


def read_prior(check, key, name, raw, defaults):
    item = check.table(key, raw, schema.Prior, extra={"name": name})
    return _resolve_images(check, defaults.project_dir, key, item, raw, required=False)


def read_subject(check, key, name, raw, defaults):
    """A subject, with its [subjects.<name>.train] and [.lora] overrides on top of [train] and [lora]."""
    if not isinstance(raw, dict):
        return check.table(key, raw, schema.Subject)
    sub_train, sub_lora = defaults.train, defaults.lora
    if "train" in raw:
        sub_train = check.table(key + ("train",), raw["train"], schema.TrainSettings, base=defaults.train)
        if sub_train is None:  # the subject reads with [train]'s settings: its snapshots are not known
            check.unread.add(key + ("train",))
    if "lora" in raw:
        sub_lora = check.table(key + ("lora",), raw["lora"], schema.LoraSettings, base=defaults.lora)
        if sub_lora is None:  # the subject reads with [lora]'s settings, not its own
            check.unread.add(key + ("lora",))
    extra = {"name": name, "train": sub_train or defaults.train, "lora": sub_lora or defaults.lora}
    item = check.table(key, raw, schema.Subject, extra=extra, nested=("train", "lora"))
    if item is not None and item.trigger is not None and TRIGGER in item.instance_prompt:
        # The prompt of every image without a caption: [trigger] stands for the same words as in captions.
        # Without a trigger it stays as written (projects that trained so still load and stay fresh), and
        # the train step says so.
        item = replace(item, instance_prompt=item.instance_prompt.replace(TRIGGER, item.trigger))
    return _resolve_images(check, defaults.project_dir, key, item, raw, required=True)


def _resolve_images(check, project_dir: Path, key: tuple[str, ...], item, raw: dict, required: bool):
    """Make an images folder absolute and check it holds images. The folder of a table that did not read (a
    typo in another of its keys) is checked too, so that one run says every problem of the file."""
    if item is None:
        folder = raw.get("images")
        said = ".".join(key + ("images",)) in {problem.key for problem in check.problems}
        if isinstance(folder, str) and not said:
            _check_folder(check, project_dir, key, folder, required)
        return None
    if item.images is None:
        return item
    return replace(item, images=str(_check_folder(check, project_dir, key, item.images, required)))


def _check_folder(check, project_dir: Path, key: tuple[str, ...], folder: str, required: bool) -> Path:
    """The images folder `folder` of table `key`, absolute; a problem where it is no folder of images."""
    path = (project_dir / Path(folder).expanduser()).resolve()
    if not folder:  # reads as the project file's folder, which a user who wrote it rarely means
        check.note(
            key + ("images",),
            "is empty, which names the project file's folder and every image below it",
            'write images = "." if that is meant, or name the folder of the images',
        )
        folder = "."
    if path.exists() and not path.is_dir():  # one photo named instead of its folder
        check.problem(
            key + ("images",),
            f"{folder} is a file, not a folder",
            f'name the folder of the images, e.g. images = "{Path(folder).parent.as_posix()}"',
        )
    elif not path.is_dir():
        check.problem(key + ("images",), f"folder {folder} does not exist", f"put the images in {path}")
    elif not os.access(path, os.R_OK | os.X_OK):
        check.problem(
            key + ("images",),
            f"folder {folder} cannot be read (permission denied)",
            f"give read access to it (chmod u+rx {folder})",
        )
    elif required and not has_images(path):
        found = scan(path)
        unread, fix = "", "add a few photos of the subject"
        if found.skipped:  # a phone's .heic photos, say: the folder is not empty, only unread
            unread, fix = f", only {few(found.skipped)}", "convert them to .jpg or .png"
        elif found.linked:
            unread = f", only symbolic links to folders, which dbl does not follow: {', '.join(found.linked)}"
            fix = "copy their images in, or name the folder they link to"
        check.problem(
            key + ("images",), f"folder {folder} holds no images (.jpg, .png, .webp ...){unread}", fix
        )
    return path


# --- checks across tables --------------------------------------------------------------------------------


def check_out(check, project_dir: Path, settings, tables: dict) -> None:
    """The output folder must not be inside an input image folder where steps write images into it: the
    next build would read them (a render's PNGs, a prior's class images) as training images, and retrain
    forever. Without such steps (adapters only) nothing there is read: that stays valid, as it built."""
    from runner import steps

    name = settings.name or check.path.stem
    out_text = settings.out or f"build/{name}"
    build = (project_dir / "build").resolve()
    if not settings.out and settings.name and (problem := _unusable_folder(build, settings.name)):
        # name = "../../x" wrote the outputs two folders above the project's
        check.problem(
            ("project", "name"), f"'{settings.name}' {problem}", 'rename the project, or set out = "..."'
        )
        return
    out = (project_dir / Path(out_text).expanduser()).resolve()
    _out_can_be_made(check, project_dir, settings, out, out_text)
    _inputs_outside_outputs(check, project_dir, out, tables)
    writers = [k.table for k in steps.kinds() if k.writes_images and tables.get(k.name)]
    if not writers:
        return
    for kind in steps.kinds():
        if not kind.table:
            continue  # its steps read the folders of another kind's tables
        for table, spec in tables.get(kind.name, {}).items():
            for folder in kind.folders(spec):
                images = Path(folder).resolve()
                if not out.is_relative_to(images):
                    continue
                usual = project_dir / "build" / name
                elsewhere = (
                    usual if not usual.resolve().is_relative_to(images) else images.parent / "build" / name
                )
                outside = Path(os.path.relpath(elsewhere, project_dir)).as_posix()
                check.problem(
                    ("project", "out") if settings.out else (kind.table, table, "images"),
                    f"the output folder {out_text} is inside the image folder of {kind.table}.{table}",
                    f"the next build would train on the images of its {' and '.join(writers)}; put the outputs "
                    "elsewhere, "
                    f'e.g. out = "{outside}"',
                )


def check_name_lengths(check, tables: dict) -> None:
    """A step's name ends up in the name of its work folder and, while its outputs are committed, of a
    folder `.staged-<kind>-<name>` (runner.store): one over the 255 bytes a file name holds stopped the step,
    the longest names only once its work was done."""
    from runner import steps
    from runner.store import COMMIT_PREFIXES

    prefix = max(COMMIT_PREFIXES, key=len)
    for kind in steps.kinds():
        for name, spec in tables.get(kind.name, {}).items() if kind.table else ():
            save_steps = getattr(getattr(spec, "train", None), "save_steps", None) or ()
            named = [(kind.name, "")] + [("snapshot", f"@{step}") for step in save_steps]  # dog@400
            for step_kind, suffix in named:
                length = len(f"{prefix}{step_kind}-{name}{suffix}".encode())
                if length > NAME_MAX:
                    check.problem(
                        (kind.table, name),
                        f"a name of {len(name)} characters is too long: the folder {prefix}{step_kind}-<name>{suffix} "
                        f"that a build makes would be {length} bytes, over the {NAME_MAX} a file name holds",
                        f"shorten it to {len(name) - (length - NAME_MAX)} characters at most",
                    )
                    break


# The longest name of a file or folder, and path, that file systems allow (UTF-8 bytes).
NAME_MAX, PATH_MAX = 255, 4096


def _unusable_folder(build: Path, name: str) -> str | None:
    """Why the default output folder build/<name> cannot be made of the project's name, or None."""
    if any(len(part.encode()) > NAME_MAX for part in Path(name).parts):
        return f"names the output folder build/<name>, and holds a name over the {NAME_MAX} bytes a file name holds"
    if not (build / name).resolve().is_relative_to(build):
        return "names the output folder build/<name>, which would be outside build/"
    return None


def _out_can_be_made(check, project_dir: Path, settings, out: Path, out_text: str) -> None:
    """The output folder, or the folder it would be made in, must not be a file (a script named `build`
    beside the project): the build ran its first step, for hours maybe, then could not store its outputs."""
    try:
        existing = next((p for p in (out, *out.parents) if p.exists()), None)
        if existing is None or existing.is_dir():
            return
    except OSError:  # a folder that cannot be looked into: the build says what it finds there
        return
    shown = Path(os.path.relpath(existing, project_dir)).as_posix()
    check.problem(
        ("project", "out") if settings.out else ("project",),
        f"the output folder {out_text} cannot be made: {shown} is a file",
        'name a folder in out = "..."'
        if settings.out
        else f'move {shown} away, or set out = "..." in [project]',
    )


def _inputs_outside_outputs(check, project_dir: Path, out: Path, tables: dict) -> None:
    """No input image folder may lie in the output folder of a step (`out = "."` beside photos kept in
    adapters/dog/): the step's outputs replace that folder, and the photos in it were deleted."""
    from runner import steps

    written = {}  # a step's output folder -> its step id
    for kind in steps.kinds():
        for table_name, spec in tables.get(kind.name, {}).items() if kind.table else ():
            written[out / kind.output_dir / table_name] = f"{kind.name}:{table_name}"
            for step in getattr(getattr(spec, "train", None), "save_steps", None) or ():
                written[out / kind.output_dir / f"{table_name}@{step}"] = f"snapshot:{table_name}@{step}"
    for kind in steps.kinds():
        for table_name, spec in tables.get(kind.name, {}).items() if kind.table else ():
            for folder in kind.folders(spec):
                images = Path(folder).resolve()
                for output, step_id in written.items():
                    if images.is_relative_to(output):
                        shown = Path(os.path.relpath(images, project_dir)).as_posix()
                        check.problem(
                            (kind.table, table_name, "images"),
                            f"folder {shown} lies in the output folder of {step_id}, which its outputs replace: "
                            "a build deletes the images in it",
                            "move the images to a folder of their own, or set out in [project] to another folder",
                        )
                        break


def unread(check, name: str, tables: tuple[str, ...]) -> bool:
    """Whether `name`, where it names a table of one of `tables` ("subjects", "blends" ...), names one the
    file writes that did not read, or a snapshot (dog@400) of a subject whose train settings did not: its
    own problems are said already, and a reference to it is not another."""
    subject, at, _ = name.partition("@")
    if at and "snapshots" in tables:
        return check.did_not_read(("subjects", subject, "train"), ("train",))
    return check.did_not_read(*((table, name) for table in tables))


def listed(check, group: str, names) -> list[str]:
    """`names` of `group`'s tables ("priors") with those the file writes that did not read, in the file's
    order: the names a reference may give, as a fix lists them (a table with a problem of its own is still
    there: its problem is said)."""
    names = list(names)
    others = [key[1] for key in check.unread if len(key) == 2 and key[0] == group and key[1] not in names]
    if not others:
        return names
    return sorted(names + sorted(others), key=lambda name: check.line((group, name)) or 0)


def unread_references(check, group: str, field: str):
    """(table, name) for each name that `field` of a table of `group` gives (a string, a list of them, or the
    keys of a table) where the table did not read for a problem elsewhere in it: one run says that problem
    and those of its references. A `field` with a problem of its own gives none."""
    said = {problem.key for problem in check.problems}
    for (table_group, table), raw in check.unread_tables.items():
        if table_group != group or any(k.startswith(f"{group}.{table}.{field}") for k in said):
            continue
        value = raw.get(field)
        for name in [value] if isinstance(value, str) else value if isinstance(value, (list, dict)) else []:
            if isinstance(name, str):
                yield table, name


def check_priors(check, tables: dict) -> None:
    used = {subject.prior for subject in tables.get("train", {}).values()}
    for name, prior in tables.get("prior", {}).items():
        _caption_extension(check, ("priors", name, "caption_extension"), prior.caption_extension)
        if prior.caption_extension and not prior.images:  # generated images have their prompt, not captions
            check.note(
                ("priors", name, "caption_extension"),
                "reads the captions of your own class images, and the prior has none",
                "give them with images = ..., or remove the key",
            )
        for n, prompt in enumerate(prior.prompts):
            if not prompt.strip():  # a warning, not an error: a project built so must still load
                single = isinstance(prior.class_prompt, str)
                check.note(
                    ("priors", name, "class_prompt"),
                    "is empty: the class images would have no prompt"
                    if single
                    else f"prompt {n} is empty: the class images of its turn would have no prompt",
                    f'name the class, e.g. "a photo of {name}"',
                )
        unused.note_unguided_negative(check, ("priors", name), prior)
        if name not in used:  # its class images would be generated for nothing
            check.note(
                ("priors", name),
                "no subject uses this prior",
                f'add prior = "{name}" to a subject, or remove it',
            )


def check_subjects(check, tables: dict) -> None:
    priors, blends = tables.get("prior", {}), tables.get("blend", {})
    for name, prior in unread_references(check, "subjects", "prior"):
        if prior not in priors and not unread(check, prior, ("priors",)):
            known = ", ".join(listed(check, "priors", priors)) or "none defined"
            check.problem(("subjects", name, "prior"), f"'{prior}' is not a prior", f"priors: {known}")
    for name, subject in tables.get("train", {}).items():
        if (
            subject.prior is not None
            and subject.prior not in priors
            and not unread(check, subject.prior, ("priors",))
        ):
            known = ", ".join(listed(check, "priors", priors)) or "none defined"
            check.problem(
                ("subjects", name, "prior"), f"'{subject.prior}' is not a prior", f"priors: {known}"
            )
        if not subject.instance_prompt.strip() and not subject.caption_extension:
            check.note(  # a warning, not an error: a project built so must still load
                ("subjects", name, "instance_prompt"),
                "is empty: the photos would train on no prompt, and no word would call up the subject",
                f'give the subject a rare word, e.g. "a photo of sks {name}"',
            )
        if name in blends:
            check.problem(("blends", name), f"'{name}' is both a subject and a blend", "rename one of them")
        check_adapter_name(check, "subjects", name)
        _caption_extension(check, ("subjects", name, "caption_extension"), subject.caption_extension)
        if check.did_not_read(("subjects", name, "train"), ("train",)):
            continue  # its train settings are [train]'s or the defaults, not the file's: that problem is said
        train_key = partial(_train_key, check, name)
        _buckets(check, train_key, subject.train)
        _save_steps(check, train_key, subject.train)
        if subject.train.log == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            check.problem(
                train_key("log"),
                "TensorBoard logs need the tensorboard package",
                "pip install 'dbl[tensorboard]', or remove the key",
            )
        check_settings(check, name, subject.train)
    unused.note_subjects(check, tables.get("train", {}))
    unused.note_schedules(check, tables.get("train", {}))


def _train_key(check, subject: str, field: str) -> tuple[str, ...]:
    """Where a subject's train setting is written: [subjects.<name>.train], or else [train]."""
    return _where(check, subject, "train", field)


def _where(check, subject: str | None, table: str, key: str) -> tuple[str, ...]:
    """The key a subject's setting comes from: its own [subjects.<name>.<table>] when the file sets it
    there, else the project-wide [<table>]."""
    own = ("subjects", subject, table, key)
    return own if subject is not None and check.written(own) else (table, key)


def _save_steps(check, key, train) -> None:
    steps = train.save_steps or []
    for step in sorted(set(steps)):
        if steps.count(step) > 1:
            check.problem(key("save_steps"), f"step {step} is listed twice", "list each step once")
        if step >= train.steps:
            check.problem(
                key("save_steps"),
                f"step {step} is not before the last step ({_beside(check, key, 'save_steps', 'steps', train.steps)})",
                "the subject's own adapter is the last step's; list earlier steps, or raise steps",
            )


def _beside(check, key, field: str, other: str, value, sep: str = " = ") -> str:
    """`other` and its value, as a problem of `field` names it: by its name where both are set in one
    table or `other` is left at its default, else by its whole key (a subject's own steps against the
    [train] save_steps)."""
    where = key(other)
    if where[:-1] == key(field)[:-1] or not check.written(where):
        return f"{other}{sep}{value}"
    return f"{'.'.join(where)} = {value}"


def _buckets(check, key, train) -> None:  # key(field): where that train setting is written
    """Bucket bounds that hold the square bucket, in steps the model's downsampling allows."""
    from runner.training.buckets import bounds

    if train.bucket_step is not None and train.bucket_step % 8:
        check.problem(
            key("bucket_step"),
            f"{train.bucket_step} is not a multiple of 8",
            f"use {max(8, train.bucket_step // 8 * 8)} or {train.bucket_step // 8 * 8 + 8}",
        )
        return
    low, high, step = bounds(
        train.resolution, train.bucket_min_side, train.bucket_max_side, train.bucket_step
    )
    min_above = train.bucket_min_side is not None and train.bucket_min_side > train.resolution
    max_below = train.bucket_max_side is not None and train.bucket_max_side < train.resolution
    if min_above:
        check.problem(
            key("bucket_min_side"),
            f"{train.bucket_min_side} is above {_beside(check, key, 'bucket_min_side', 'resolution', train.resolution, ' ')}",
            f"use at most {train.resolution}",
        )
    if max_below:
        check.problem(
            key("bucket_max_side"),
            f"{train.bucket_max_side} is below {_beside(check, key, 'bucket_max_side', 'resolution', train.resolution, ' ')}",
            f"use at least {train.resolution}",
        )
    resolution = train.resolution
    if not (min_above or max_below) and (low > resolution or high < resolution):  # the step rounds past it
        rounded = (
            f"shortest bucket side up to {low}" if low > resolution else f"longest bucket side down to {high}"
        )
        divisors = [d for d in range(8, min(step, resolution) + 1, 8) if resolution % d == 0]
        check.problem(
            key("bucket_step"),
            f"{step} rounds the {rounded}, past {_beside(check, key, 'bucket_step', 'resolution', resolution, ' ')}",
            f"use a step that divides the resolution, e.g. {divisors[-1]}",
        )


PRODIGY_KEYS = ("prodigy_d_coef", "prodigy_beta3", "prodigy_use_bias_correction", "prodigy_safeguard_warmup")


def check_settings(check, subject: str | None, ts) -> None:
    """Keys of [train] that only make sense together: a subject's resolved settings (or, with `subject`
    None, the project-wide [train] table)."""

    def where(key):
        return _where(check, subject, "train", key)

    def the_optimizer(key) -> str:
        """The optimizer as a problem of `key` names it: by its whole key where the subject sets it in
        another table than `key` (a [train] key that a subject's own optimizer makes wrong)."""
        said, at = f'the optimizer is "{ts.optimizer}"', where("optimizer")
        return f"{said} ({'.'.join(at)})" if at[:-1] != where(key)[:-1] and check.written(at) else said

    for key in ("prodigy_d_coef", "adam_epsilon"):
        if getattr(ts, key) == 0:
            check.problem(where(key), "must be greater than 0, got 0.0", _POSITIVE_FIX[key])
    for key in ("adam_beta1", "adam_beta2"):  # AdamW and Prodigy refuse a beta of 1 or more
        if getattr(ts, key) >= 1:
            check.problem(where(key), f"must be below 1, got {getattr(ts, key)}", "0.9 and 0.999 are usual")
    if ts.optimizer != "prodigy":
        defaults = {f.name: f for f in schema.keys_of(schema.TrainSettings)}
        for key in PRODIGY_KEYS:
            if getattr(ts, key) != schema.default_of(defaults[key]):
                check.problem(
                    where(key),
                    f'applies to optimizer = "prodigy" only, and {the_optimizer(key)}',
                    f'set optimizer = "prodigy", or remove {key}',
                )
        return
    if ts.use_8bit_adam:
        check.problem(
            where("use_8bit_adam"),
            f"asks for 8-bit AdamW, but {the_optimizer('use_8bit_adam')}",
            "remove use_8bit_adam",
        )
    lr = ts.text_encoder_learning_rate
    if lr is not None and lr not in (0, ts.learning_rate):
        check.problem(
            where("text_encoder_learning_rate"),
            f"Prodigy takes one learning rate for every component (or 0, which freezes one); "
            f"got {lr} beside learning_rate {ts.learning_rate}",
            "remove text_encoder_learning_rate: Prodigy finds the step size itself",
        )


_POSITIVE_FIX = {
    "prodigy_d_coef": "1.0 is Prodigy's default; 0.5 to 2 are usual",
    # a LoRA's A matrices have no gradient at the first step (B starts at 0): their update is 0 / 0
    "adam_epsilon": "1e-08 is usual; with 0, the first step divides 0 by 0 and the loss becomes nan",
}


def _caption_extension(check, key, extension: str | None) -> None:
    if extension is None:
        return
    if not extension.startswith(".") or len(extension) < 2 or "/" in extension or "\\" in extension:
        check.problem(key, f"'{extension}' is not a file extension", "write it with its dot, e.g. '.txt'")
    elif extension.lower().endswith(IMAGE_SUFFIXES):
        check.problem(key, f"'{extension}' is an image extension", "captions are text files, e.g. '.txt'")
