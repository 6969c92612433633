"""The built-in step kinds' table readers and cross-table checks (see runner.steps).

Pure like the rest of the project package: a reader turns one raw TOML table into its dataclass, a check
looks across the tables of a whole file ({kind: {name: table}}) and adds problems to the checker.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import replace
from functools import partial
from pathlib import Path

from runner import families
from runner.imagefiles import IMAGE_SUFFIXES, has_images, scan
from runner.project import schema

RESERVED_ADAPTERS = ("none",)
TRIGGER = "[trigger]"  # in a caption or an instance prompt: the subject's trigger words


# --- readers -----------------------------------------------------------------------------------------


def read_prior(check, key, name, raw, defaults):
    item = check.table(key, raw, schema.Prior, extra={"name": name})
    return _resolve_images(check, defaults.project_dir, key, item, required=False)


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
    return _resolve_images(check, defaults.project_dir, key, item, required=True)


def _resolve_images(check, project_dir: Path, key: tuple[str, ...], item, required: bool):
    """Make an images folder absolute and check it holds images."""
    if item is None or item.images is None:
        return item
    folder = item.images
    path = (project_dir / Path(folder).expanduser()).resolve()
    if path.exists() and not path.is_dir():  # one photo named instead of its folder
        check.problem(
            key + ("images",),
            f"{folder} is a file, not a folder",
            f'name the folder of the images, e.g. images = "{Path(folder).parent.as_posix()}"',
        )
    elif not path.is_dir():
        check.problem(key + ("images",), f"folder {folder} does not exist", f"put the images in {path}")
    elif required and not has_images(path):
        found = scan(path)
        unread, fix = "", "add a few photos of the subject"
        if found.skipped:  # a phone's .heic photos, say: the folder is not empty, only unread
            more = f" and {len(found.skipped) - 3} more" if len(found.skipped) > 3 else ""
            unread, fix = f", only {', '.join(found.skipped[:3])}{more}", "convert them to .jpg or .png"
        elif found.linked:
            unread = f", only symbolic links to folders, which dbl does not follow: {', '.join(found.linked)}"
            fix = "copy their images in, or name the folder they link to"
        check.problem(
            key + ("images",), f"folder {folder} holds no images (.jpg, .png, .webp ...){unread}", fix
        )
    return replace(item, images=str(path))


# --- checks across tables --------------------------------------------------------------------------------


def check_out(check, project_dir: Path, settings, tables: dict) -> None:
    """The output folder must not be inside an input image folder where steps write images into it: the
    next build would read them (a render's PNGs, a prior's class images) as training images, and retrain
    forever. Without such steps (adapters only) nothing there is read: that stays valid, as it built."""
    from runner import steps

    writers = [k.table for k in steps.kinds() if k.writes_images and tables.get(k.name)]
    if not writers:
        return
    name = settings.name or check.path.stem
    out_text = settings.out or f"build/{name}"
    out = (project_dir / Path(out_text).expanduser()).resolve()
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


def _known_adapters(tables: dict) -> str:
    """The parents a blend may name: subjects and blends."""
    return _adapter_listing({"subjects": tables.get("train", {}), "blends": tables.get("blend", {})})


def adapter_tables(tables: dict) -> dict[str, dict]:
    """The tables of every kind that produces an adapter (subjects, blends ...), by their table name
    ("subjects"; "snapshots" for the derived kind), in build order: the names a render may use."""
    from runner import steps  # at call time: runner.steps imports this module

    found = {}
    for kind in steps.kinds():
        if kind.produces_adapter and (kind.table or tables.get(kind.name)):  # derived ones when there are
            found[kind.table or f"{kind.name}s"] = tables.get(kind.name, {})
    return found


def unread(check, name: str, tables: tuple[str, ...]) -> bool:
    """Whether `name`, where it names a table of one of `tables` ("subjects", "blends" ...), names one the
    file writes that did not read, or a snapshot (dog@400) of a subject whose train settings did not: its
    own problems are said already, and a reference to it is not another."""
    subject, at, _ = name.partition("@")
    if at and "snapshots" in tables:
        return check.did_not_read(("subjects", subject, "train"), ("train",))
    return check.did_not_read(*((table, name) for table in tables))


def snapshot_of(name: str, subjects: dict) -> tuple[str, str] | None:
    """The subject and the step, as written, where `name` reads as a snapshot (dog@400) of one of
    `subjects`, whether or not the subject saves one at that step; None for any other name."""
    subject, at, step = name.partition("@")
    if at and step.isascii() and step.isdigit() and subject in subjects:  # not "²": int() refuses it
        return subject, step
    return None


def _adapter_nouns(adapters: dict[str, dict]) -> str:
    """'subject or blend' for the tables {"subjects": ..., "blends": ...}."""
    nouns = [table.removesuffix("s") for table in adapters]
    return " or ".join(nouns) if len(nouns) < 3 else ", ".join(nouns[:-1]) + " or " + nouns[-1]


def _adapter_listing(adapters: dict[str, dict]) -> str:
    parts = [f"{table}: {', '.join(names)}" for table, names in adapters.items() if names]
    return "; ".join(parts) or "no subjects defined"


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
        if name not in used:  # its class images would be generated for nothing
            check.note(
                ("priors", name),
                "no subject uses this prior",
                f'add prior = "{name}" to a subject, or remove it',
            )


def check_subjects(check, tables: dict) -> None:
    priors, blends = tables.get("prior", {}), tables.get("blend", {})
    for name, subject in tables.get("train", {}).items():
        if (
            subject.prior is not None
            and subject.prior not in priors
            and not unread(check, subject.prior, ("priors",))
        ):
            known = ", ".join(priors) or "none defined"
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
        if name in RESERVED_ADAPTERS:
            check.problem(
                ("subjects", name), f"'{name}' is reserved for rendering the base model", "rename it"
            )
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

    for key in ("snr_gamma", "prodigy_d_coef"):
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
                    f'applies to optimizer = "prodigy" only, and the optimizer is "{ts.optimizer}"',
                    f'set optimizer = "prodigy", or remove {key}',
                )
        return
    if ts.use_8bit_adam:
        check.problem(
            where("use_8bit_adam"),
            'asks for 8-bit AdamW, but the optimizer is "prodigy"',
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
    "snr_gamma": "5.0 is usual; leave snr_gamma out to weight every timestep alike",
    "prodigy_d_coef": "1.0 is Prodigy's default; 0.5 to 2 are usual",
}


def _caption_extension(check, key, extension: str | None) -> None:
    if extension is None:
        return
    if not extension.startswith(".") or len(extension) < 2 or "/" in extension or "\\" in extension:
        check.problem(key, f"'{extension}' is not a file extension", "write it with its dot, e.g. '.txt'")
    elif extension.lower().endswith(IMAGE_SUFFIXES):
        check.problem(key, f"'{extension}' is an image extension", "captions are text files, e.g. '.txt'")


def check_blends(check, tables: dict) -> None:
    subjects, blends = tables.get("train", {}), tables.get("blend", {})
    adapters = list(subjects) + list(blends)
    in_cycles = set()
    for name, blend in blends.items():
        if name in RESERVED_ADAPTERS:
            check.problem(("blends", name), f"'{name}' is reserved for rendering the base model", "rename it")
        key = ("blends", name, "adapters")
        for parent, _ in blend.adapters:
            if parent not in adapters and not unread(check, parent, ("subjects", "blends")):
                check.problem(
                    key + (parent,), f"'{parent}' is not a subject or blend", _known_adapters(tables)
                )
        if name not in in_cycles and (cycle := _cycle(name, blends)) is not None:
            in_cycles.update(cycle)  # one cycle is one problem, said at its first blend
            fix = f"remove {name} from its adapters" if len(cycle) == 2 else "remove the cycle between blends"
            check.problem(key, f"blend '{name}' depends on itself: {' -> '.join(cycle)}", fix)
        # A parent whose [lora] did not read has unknown ranks and kind of LoRA: its problem is said.
        unknown = {parent for parent, _ in blend.adapters if _lora_unread(check, parent, blends)}
        _check_blend_method(check, name, blend, subjects, blends, lora_known=not unknown)
        for parent in (parent for parent, _ in blend.adapters if parent not in unknown):
            for setting, flagged, what, why, fix in UNBLENDABLE:
                keys = lora_keys(parent, subjects, blends, setting, flagged)
                if keys:
                    check.problem(
                        key + (parent,),
                        f"'{parent}' is {what} ({', '.join(keys)}), {why}",
                        f"{fix}, or render '{parent}' on its own",
                    )


def _lora_unread(check, name: str, blends: dict, _depth: int = 0) -> bool:
    """Whether the [lora] settings of adapter `name`, or of a parent of it, did not read."""
    if name not in blends:
        return check.did_not_read(("subjects", name, "lora"), ("lora",))
    if _depth > len(blends):  # a cycle, said on its own
        return False
    return any(_lora_unread(check, parent, blends, _depth + 1) for parent, _ in blends[name].adapters)


def check_renders(check, tables: dict) -> None:
    """A render names one adapter (`adapter`) or several (`adapters`) of any kind that produces one."""
    produced = adapter_tables(tables)
    known = {name for names in produced.values() for name in names} | set(RESERVED_ADAPTERS)
    for name, render in tables.get("render", {}).items():
        key = ("renders", name)
        if render.adapter is not None and render.adapters is not None:
            check.problem(
                key + ("adapters",),
                "adapter and adapters are both given",
                "keep adapter for one adapter, or adapters for one grid column per adapter",
            )
        elif render.adapter is None and render.adapters is None:
            check.problem(
                key,
                "missing required key 'adapter' or 'adapters'",
                "add adapter = \"...\" (a subject, a blend, or 'none' for the base model), or "
                'adapters = ["...", "..."] for one grid column per adapter',
            )
        field = "adapter" if render.adapters is None else "adapters"
        seen = set()
        for adapter in render.adapters or [render.adapter]:
            if adapter is None:
                continue
            if adapter not in known and not unread(check, adapter, (*produced, "snapshots")):
                check.problem(
                    key + (field,),
                    f"'{adapter}' is not a {_adapter_nouns(produced)}",
                    _adapter_fix(
                        adapter, tables.get("train", {}), _adapter_listing(produced) + "; or 'none'"
                    ),
                )
            elif adapter in seen:
                check.problem(key + (field,), f"'{adapter}' is listed twice", "list each adapter once")
            seen.add(adapter)
        _render_trigger(check, key, render, tables)


def _render_trigger(check, key, render, tables: dict) -> None:
    """[trigger] in a render's prompt is drawn as written: only captions and instance prompts replace it."""
    if not any(TRIGGER in prompt for prompt in render.prompts):
        return
    subjects, blends = tables.get("train", {}), tables.get("blend", {})
    named = [s for a in render.adapters or [render.adapter] for s in _subjects_of(a, subjects, blends)]
    words = next((subjects[s].trigger for s in named if subjects[s].trigger), None)
    check.note(
        key + ("prompts",),
        f"{TRIGGER} is rendered as written: only captions and instance prompts replace it",
        f"write the words it stands for, e.g. '{words}'" if words else "write the words it stands for",
    )


def _subjects_of(name: str | None, subjects: dict, blends: dict, _depth: int = 0) -> list[str]:
    """The subjects adapter `name` is trained from: itself, or the parents of a blend."""
    if name in subjects:
        return [name]
    if name not in blends or _depth > len(blends):  # a snapshot, 'none', or a cycle (said on its own)
        return []
    return [
        s for parent, _ in blends[name].adapters for s in _subjects_of(parent, subjects, blends, _depth + 1)
    ]


def _adapter_fix(name: str, subjects: dict, listing: str) -> str:
    """The fix of an unknown adapter: the names there are, and for a snapshot (dog@400) of a subject that
    has none at that step, how to have it."""
    snapshot = snapshot_of(name, subjects)
    if snapshot is None:
        return listing
    subject, step = snapshot
    steps = subjects[subject].train.steps
    if int(step) == steps:
        return f"step {step} is the last of {subject}: its adapter is '{subject}'"
    if int(step) < steps:
        return f"add {step} to the save_steps of {subject}; {listing}"
    return listing


def _cycle(start: str, blends: dict) -> list[str] | None:
    """The blends from `start` back to itself through their parents ([a, b, a]), or None."""
    paths, seen = [[start, p] for p, _ in reversed(blends[start].adapters)], set()
    while paths:
        path = paths.pop()
        name = path[-1]
        if name == start:
            return path
        if name in seen or name not in blends:
            continue
        seen.add(name)
        paths += [path + [p] for p, _ in reversed(blends[name].adapters)]
    return None


def _rank(lora, component: dict) -> int | None:
    rank = getattr(lora, component["rank_field"])
    if rank is None and component.get("rank_fallback"):
        rank = getattr(lora, component["rank_fallback"])
    return rank


def adapter_ranks(
    name: str, subjects: dict, blends: dict, family: str | None = families.DEFAULT, _depth: int = 0
) -> dict[str, int | None]:
    """The LoRA rank of an adapter per component of its family (None: no LoRA on that component; family
    None: the components of every family)."""
    components = families.lora_components(family)
    if name in subjects:
        s = subjects[name]
        return {
            c["name"]: _rank(s.lora, c) if c["gate"] is None or getattr(s.train, c["gate"]) else None
            for c in components
        }
    blend = blends.get(name)
    if blend is None or _depth > len(blends):
        return {c["name"]: None for c in components}
    parents = [adapter_ranks(p, subjects, blends, family, _depth + 1) for p, _ in blend.adapters]
    result = {}
    for c in components:
        ranks = [r[c["name"]] for r in parents if r[c["name"]] is not None]
        if not ranks:
            result[c["name"]] = None
        elif len(ranks) == 1:  # PEFT combines a lone adapter linearly, whatever the method: its rank stays
            result[c["name"]] = ranks[0]
        elif blend.method == "cat":
            result[c["name"]] = sum(ranks)
        elif blend.method == "svd" or blend.method.endswith("_svd"):
            result[c["name"]] = blend.svd_rank or max(ranks)
        else:
            result[c["name"]] = ranks[0]
    return result


def lora_keys(name: str, subjects: dict, blends: dict, setting: str, flagged, _depth: int = 0) -> list[str]:
    """The [lora] keys of `setting` ("use_dora", "bias") whose value `flagged` holds, for adapter `name`
    or a parent of it (a blend), e.g. ["lora.use_dora = true"]; empty when none. Any family's components
    count: a key of a component the base model has not is an error of its own."""
    if name in subjects:
        subject = subjects[name]
        seen, found = set(), []
        for family in families.all():
            for c in family.components:
                key = c.setting(setting)
                if key in seen or not c.trains(subject.train):
                    continue
                seen.add(key)
                value = getattr(subject.lora, key)
                if value is not None and flagged(value):  # None falls back to a key counted already
                    found.append(f"lora.{key} = {json.dumps(value)}")
        return found
    blend = blends.get(name)
    if blend is None or _depth > len(blends):
        return []
    parents = [p for p, _ in blend.adapters if lora_keys(p, subjects, blends, setting, flagged, _depth + 1)]
    return [f"a blend of {', '.join(parents)}"] if parents else []


# What rules an adapter out of a blend: the [lora] setting, when it does, and why.
UNBLENDABLE = (
    (
        "use_dora",
        lambda value: value is True,
        "a DoRA adapter",
        "which no blend method combines exactly: DoRA rescales every weight row, so its change is not a "
        "sum of low-rank deltas",
        "blend LoRA or rsLoRA adapters",
    ),
    (
        "bias",
        lambda value: value != "none",
        "trained with biases",
        "which PEFT blends with no other adapter: a trained bias is no low-rank delta",
        'blend adapters trained with bias = "none"',
    ),
)


def _check_blend_method(check, name, blend, subjects, blends, lora_known: bool) -> None:
    key = ("blends", name)
    method = blend.method
    if method in schema.DENSITY_METHODS and blend.density is None:
        check.problem(
            key + ("method",),
            f"method '{method}' needs a density",
            "add density = 0.5 (fraction of weights kept)",
        )
    if blend.density is not None:
        if method not in schema.DENSITY_METHODS:
            check.problem(
                key + ("density",),
                f"density does not apply to method '{method}'",
                f"methods that use it: {', '.join(schema.DENSITY_METHODS)}",
            )
        elif not 0 < blend.density <= 1:
            check.problem(key + ("density",), f"must be in (0, 1], got {blend.density}")
    is_svd = method == "svd" or method.endswith("_svd")
    for option in ("svd_rank", "svd_clamp"):
        if getattr(blend, option) is not None and not is_svd:
            check.problem(
                key + (option,),
                f"{option} applies to svd methods only, not '{method}'",
                'remove it or use method = "svd"',
            )
    if method in schema.EQUAL_RANK_METHODS and lora_known:
        # Every component the base model's family trains (SDXL's text_encoder_2 too); when the family is
        # not known before a download, every family's.
        family = check.family
        parents = [p for p, _ in blend.adapters if p in subjects or p in blends]
        ranks_of = {p: adapter_ranks(p, subjects, blends, family) for p in parents}
        components = families.lora_components(family)
        owner = {c["rank_field"]: c["name"] for c in components}
        for c in components:
            component = c["name"]
            ranks = {p: ranks_of[p][component] for p in parents}
            ranks = {p: r for p, r in ranks.items() if r is not None}
            fallback = owner.get(c.get("rank_fallback"))
            if fallback and ranks == {p: r for p, r in ((p, ranks_of[p][fallback]) for p in parents) if r}:
                continue  # the ranks it falls back to: said (or fine) for that component already
            if len(set(ranks.values())) > 1:
                listed = ", ".join(f"{p} = {r}" for p, r in ranks.items())
                which = c["rank_field"]
                check.problem(
                    key + ("method",),
                    f"method '{method}' needs equal {component} ranks, got {listed}",
                    f'give the subjects the same lora.{which}, or use method = "cat" (exact) or "svd"',
                )
