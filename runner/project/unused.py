"""Settings that another setting of the file leaves without effect: the project builds as if they were
left out, which a user who wrote them rarely means. Each is a warning, not an error, so that a project
built so still loads and stays fresh. Called by the checks of the tables they belong to."""

from __future__ import annotations

from runner.project import schema

# The blend methods whose sign election majority_sign_method chooses (PEFT reads it for these only).
SIGN_METHODS = tuple(m for m in schema.BLEND_METHODS if "ties" in m)

BUCKET_KEYS = ("bucket_min_side", "bucket_max_side", "bucket_step")


def note_unguided_negative(check, key: tuple[str, ...], spec) -> None:
    """A negative prompt acts only through classifier-free guidance, which diffusers turns off at a
    guidance_scale of 1 or less: the images come out as without it (a render, or a prior's generation)."""
    if spec.negative_prompt and spec.guidance_scale <= 1:
        check.note(
            key + ("negative_prompt",),
            f"has no effect: guidance_scale = {spec.guidance_scale:g} turns classifier-free guidance off, "
            "and the negative prompt acts only through it",
            "raise guidance_scale above 1 (7.5 is usual), or remove negative_prompt",
        )


def note_render(check, key: tuple[str, ...], render) -> None:
    """A render's lora_scale where it draws the base model alone, and its unguided negative prompt."""
    adapters = render.adapters or [render.adapter]
    if check.written(key + ("lora_scale",)) and all(a == "none" for a in adapters):
        check.note(
            key + ("lora_scale",),
            "has no effect: the render draws the base model alone ('none'), with no adapter to scale",
            "name an adapter, or remove lora_scale",
        )
    note_unguided_negative(check, key, render)


def note_blend(check, key: tuple[str, ...], blend) -> None:
    """A parent of weight 0, and majority_sign_method written for a method without TIES' sign election."""
    for parent, weight in blend.adapters:
        if weight == 0:
            check.note(
                key + ("adapters", parent),
                f"'{parent}' has weight 0, which leaves it out of the blend",
                f"give it a weight, or remove '{parent}' from the blend's adapters",
            )
    if check.written(key + ("majority_sign_method",)) and blend.method not in SIGN_METHODS:
        check.note(
            key + ("majority_sign_method",),
            f"has no effect: method '{blend.method}' elects no signs",
            f"methods that use it: {', '.join(SIGN_METHODS)}; or remove it",
        )


def note_subjects(check, subjects: dict) -> None:
    """Bucket bounds where buckets are off, text-encoder LoRA settings (and text_encoder_learning_rate)
    where the text encoder is not trained, and an alpha or a learning rate of 0 that leaves the adapter
    untrained (DoRA's magnitudes train at an alpha of 0), and a caption_dropout of 1 that drops every
    prompt. A key of [train] or [lora] that every subject inherits is unused only where no subject that
    reads it uses it: said once, at the key the file writes."""
    used: dict[tuple[str, ...], bool] = {}  # each written key: whether a subject that reads it uses it
    frozen: dict[tuple[str, ...], None] = {}  # learning rates of 0 where nothing else trains
    scaled_out: dict[tuple[str, ...], None] = {}  # alphas of 0 where they scale a trained LoRA, in order
    all_dropped: dict[tuple[str, ...], None] = {}  # caption_dropout = 1: no example keeps its prompt
    for name, subject in subjects.items():
        train, lora = subject.train, subject.lora
        if check.did_not_read(("subjects", name, "train"), ("train",), ("subjects", name, "lora"), ("lora",)):
            continue  # its settings are not the file's: that problem is said
        for field in BUCKET_KEYS:
            where = _written(check, name, "train", field)
            if where is not None:
                used[where] = used.get(where, False) or train.buckets
        for table, field in [("train", "text_encoder_learning_rate")] + [
            ("lora", f.name)
            for f in schema.keys_of(schema.LoraSettings)
            if f.name.startswith("text_encoder_")
        ]:
            if where := _written(check, name, table, field):
                used[where] = used.get(where, False) or train.train_text_encoder
        for field, dora, trained in (
            ("alpha", lora.use_dora, True),
            ("text_encoder_alpha", lora.text_encoder_use_dora, train.train_text_encoder),
            (
                "text_encoder_2_alpha",
                _or(lora.text_encoder_2_use_dora, lora.text_encoder_use_dora),
                train.train_text_encoder,
            ),
        ):
            # A text_encoder_2_alpha of 0 that is not written is text_encoder_alpha's: said there.
            if (
                getattr(lora, field) == 0
                and trained
                and not dora
                and (at := _written(check, name, "lora", field))
            ):
                scaled_out[at] = None
        if train.caption_dropout == 1 and (at := _written(check, name, "train", "caption_dropout")):
            all_dropped[at] = None
        te_rate = (
            train.learning_rate
            if train.text_encoder_learning_rate is None
            else train.text_encoder_learning_rate
        )
        if train.learning_rate == 0 and not (train.train_text_encoder and te_rate):
            at = _written(check, name, "train", "learning_rate")
            frozen[at] = None
    for where in frozen:
        check.note(
            where,
            "is 0, and no text_encoder_learning_rate trains the text encoder: nothing learns, and the adapter "
            "changes no image",
            "1e-4 is the recipe's (1.0 for Prodigy)",
        )
    for where in scaled_out:
        check.note(
            where,
            "is 0, which scales the LoRA by 0 (alpha / rank): it learns nothing and changes no image",
            "use alpha = rank for a scale of 1 (the recipe: rank 16, alpha 27)",
        )
    for where in all_dropped:
        check.note(
            where,
            "is 1: every example trains on the empty prompt, so no word of the instance prompt (or a caption) "
            "learns to call up the subject",
            "0.1 is usual; remove caption_dropout to keep every prompt",
        )
    unused: dict[tuple[tuple[str, ...], bool], list[tuple[str, ...]]] = {}  # (table, bucket key?): keys
    for where, is_used in used.items():
        if not is_used:
            unused.setdefault((where[:-1], where[-1] in BUCKET_KEYS), []).append(where)
    for (table, bucket), keys in unused.items():
        if bucket:
            why, fix = "buckets are off", "set buckets = true, or remove"
        else:
            why = "train_text_encoder = false, so no text-encoder LoRA is trained"
            fix = "set train_text_encoder = true, or remove"
        _note_keys(check, table, keys, f"{'has' if len(keys) == 1 else 'have'} no effect: {why}", fix)


# The schedules that read a key of the schedule; lr_warmup_steps is read by every schedule but "constant"
_SCHEDULE_KEYS = {"lr_num_cycles": "cosine_with_restarts", "lr_power": "polynomial"}
_TRAIN_KEYS = {f.name: f for f in schema.keys_of(schema.TrainSettings)}


def note_schedules(check, subjects: dict) -> None:
    """Keys of the learning-rate schedule that the schedule a subject trains with does not take (diffusers'
    schedules drop them unsaid), a warm-up not shorter than the run, and Prodigy with a learning rate far
    below its usual 1.0. They need no model, so they are said as the file loads, at the key the subject
    reads: a [train] key that every subject inherits once, and unused only where no subject uses it."""
    schedules: dict[tuple[str, ...], dict[str, None]] = {}  # each written key: the schedules that read it
    used: dict[tuple[str, ...], bool] = {}
    said: dict[tuple[tuple[str, ...], str, str], None] = {}  # (key, what, fix), in order
    for name, subject in subjects.items():
        train = subject.train
        if check.did_not_read(("subjects", name, "train"), ("train",)):
            continue  # its settings are not the file's: that problem is said
        for field in ("lr_warmup_steps", *_SCHEDULE_KEYS):
            where = _written(check, name, "train", field)
            if where is None:
                continue
            value = getattr(train, field)
            if field == "lr_warmup_steps":
                uses = value == 0 or train.lr_scheduler != "constant"
            else:
                uses = (
                    value == schema.default_of(_TRAIN_KEYS[field])
                    or train.lr_scheduler == _SCHEDULE_KEYS[field]
                )
            used[where] = used.get(where, False) or uses
            schedules.setdefault(where, {})[train.lr_scheduler] = None
        warmup = _written(check, name, "train", "lr_warmup_steps")
        if warmup and train.lr_scheduler != "constant" and train.lr_warmup_steps >= train.steps:
            said[
                (
                    warmup,
                    f"{train.lr_warmup_steps} is not below the {train.steps} steps of the run: the rate never "
                    "reaches learning_rate",
                    "use fewer warm-up steps than steps",
                )
            ] = None
        if train.optimizer == "prodigy" and train.learning_rate < 0.1:
            rate = _written(check, name, "train", "learning_rate")
            where = rate or _written(check, name, "train", "optimizer")
            what = "Prodigy finds the step size itself and learning_rate multiplies it"
            if rate is None:
                what = f"Prodigy with learning_rate {train.learning_rate:g} (the default): {what}"
            else:
                what = f'is {train.learning_rate:g} with optimizer = "prodigy": {what}'
            said[(where, what, "1.0 is the usual value")] = None
    for where, is_used in used.items():
        if is_used:
            continue
        named = " and ".join(f'"{s}"' for s in schedules[where])
        schedule = f"the schedule is {named}" if len(schedules[where]) == 1 else f"the schedules are {named}"
        if where[-1] == "lr_warmup_steps":
            what = (
                'has no effect with lr_scheduler = "constant": the rate is learning_rate from the first step'
            )
            fix = 'lr_scheduler = "constant_with_warmup" warms up; or remove lr_warmup_steps'
        else:
            wanted = _SCHEDULE_KEYS[where[-1]]
            what = f'has no effect: it applies to lr_scheduler = "{wanted}" only, and {schedule}'
            fix = f'set lr_scheduler = "{wanted}", or remove {where[-1]}'
        said[(where, what, fix)] = None
    for where, what, fix in said:
        check.note(where, what, fix)


def _note_keys(check, table: tuple[str, ...], keys: list[tuple[str, ...]], message: str, fix: str) -> None:
    """One warning for keys of `table` that are unused for one reason: a line per key was a wall of
    repeats for a user who wrote several text_encoder_* settings. Each key is named with its line."""
    if len(keys) == 1:
        check.note(keys[0], message, f"{fix} it")
        return
    named = [f"{key[-1]} (line {check.line(key)})" for key in keys]
    listed = f"{', '.join(named[:-1])} and {named[-1]}"
    check.note(table, f"{listed} {message}", f"{fix} them", at_line=False)


def _or(value, fallback):
    """A text_encoder_2_* setting: its own value, or the text_encoder_* one it defaults to."""
    return fallback if value is None else value


def _written(check, subject: str, table: str, field: str) -> tuple[str, ...] | None:
    """The key a subject reads `field` of [<table>] from, where the file writes it: its own table's, else
    the project-wide one; None where neither is written."""
    for where in (("subjects", subject, table, field), (table, field)):
        if check.written(where):
            return where
    return None
