"""Keys added after the first release (LoRA variants and targets, loss and noise, optimizers): left out
of fingerprints at their default, so existing projects stay fresh; set, they rerun what uses them."""

from __future__ import annotations

import pytest

from runner.project import schema

# (table, key, a value away from its default as TOML, the reason the plan gives)
CHANGES = [
    ("lora", "use_dora", "true", "lora.use_dora set to true"),
    ("lora", "use_rslora", "true", "lora.use_rslora set to true"),
    ("lora", "text_encoder_use_dora", "true", "lora.text_encoder_use_dora set to true"),
    ("lora", "text_encoder_use_rslora", "true", "lora.text_encoder_use_rslora set to true"),
    (
        "lora",
        "target_modules",
        '"attention"',
        "lora.target_modules ['to_q', 'to_v', 'query', 'value'] -> 'attention'",
    ),
    (
        "lora",
        "text_encoder_target_modules",
        '"all-linear"',
        "lora.text_encoder_target_modules ['q_proj', 'v_proj'] -> 'all-linear'",
    ),
    ("train", "snr_gamma", "5.0", "train.snr_gamma set to 5.0"),
    ("train", "noise_offset", "0.05", "train.noise_offset set to 0.05"),
    ("train", "optimizer", '"prodigy"', "train.optimizer set to 'prodigy'"),
]
ADDED = {
    "train": [
        "optimizer",
        "prodigy_d_coef",
        "prodigy_beta3",
        "prodigy_use_bias_correction",
        "prodigy_safeguard_warmup",
        "snr_gamma",
        "noise_offset",
    ],
    "lora": [
        "use_dora",
        "use_rslora",
        "text_encoder_use_dora",
        "text_encoder_use_rslora",
        "text_encoder_2_use_dora",
        "text_encoder_2_use_rslora",
    ],
}


def test_added_keys_are_left_out_of_fingerprints_at_their_default():
    for cls, names in ((schema.TrainSettings, ADDED["train"]), (schema.LoraSettings, ADDED["lora"])):
        declared = {f.name: f for f in schema.keys_of(cls)}
        for name in names:
            f = declared[name]
            assert f.metadata["omit_default"], name
        fields = schema.fingerprinted_fields(cls())
        assert not set(names) & set(fields)
        assert not set(names) & set(schema.record(cls()))


def test_an_added_key_set_to_its_default_changes_no_fingerprint():
    import dataclasses

    defaults = schema.TrainSettings()
    same = dataclasses.replace(defaults, optimizer="adamw", noise_offset=0.0, prodigy_d_coef=1.0)
    assert schema.fingerprinted_fields(same) == schema.fingerprinted_fields(defaults)
    moved = dataclasses.replace(defaults, noise_offset=0.1)
    assert schema.fingerprinted_fields(moved)["noise_offset"] == 0.1
    assert schema.record(moved)["noise_offset"] == 0.1


@pytest.mark.parametrize("table, key, value, reason", CHANGES, ids=[c[1] for c in CHANGES])
def test_setting_an_added_key_reruns_that_subject(proj, build, fake_steps, table, key, value, reason):
    old = 'instance_prompt = "a toy in the style of <1>"'
    build(proj)
    proj.edit(old, f"{old}\n[subjects.toy.{table}]\n{key} = {value}")
    if key == "optimizer":
        proj.edit(f"{key} = {value}", f"{key} = {value}\nlearning_rate = 1.0")
        reason_lr = "train.learning_rate 0.0001 -> 1.0"
    if key in ("use_dora", "text_encoder_use_dora"):  # a DoRA subject cannot be blended
        proj.edit("adapters = { toy = 1.0, dog = 1.05 }", "adapters = { dog = 1.05 }")
    result, rec = build(proj)
    assert result.ok
    reasons = dict((sid, r) for sid, _, r in rec.planned)
    expected = [reason] if key != "optimizer" else sorted([reason, reason_lr])
    assert sorted(reasons["train:toy"]) == expected
    assert "train:toy" in fake_steps.ran and "train:dog" not in fake_steps.ran
    # Back to the default, spelled out: the earlier fingerprint, restored from the cache, nothing runs.
    default = _default_toml(table, key)
    proj.edit(f"{key} = {value}", f"{key} = {default}" if default is not None else "")
    if key == "optimizer":
        proj.edit("learning_rate = 1.0", "")
    if key in ("use_dora", "text_encoder_use_dora"):
        proj.edit("adapters = { dog = 1.05 }", "adapters = { toy = 1.0, dog = 1.05 }")
    result, rec = build(proj)
    assert result.ok and fake_steps.ran == []


def _default_toml(table: str, key: str) -> str | None:
    cls = schema.TrainSettings if table == "train" else schema.LoraSettings
    value = schema.default_of(next(f for f in schema.keys_of(cls) if f.name == key))
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return f'"{value}"' if isinstance(value, str) else str(value)


def test_every_family_component_names_every_target_preset():
    from runner import families

    for family in families.all():
        for component in family.components:
            for preset in schema.TARGET_PRESETS:
                assert component.preset(preset), (family.name, component.name, preset)
            assert component.preset("qv") == component.default_targets


def test_the_optimizer_registry_is_the_schema_s_choices():
    from runner.training.optimizers import OPTIMIZERS

    assert tuple(OPTIMIZERS) == schema.OPTIMIZERS


def test_a_subject_turns_off_the_snr_gamma_and_log_train_gives_it(proj, build, fake_steps):
    """[train] snr_gamma = 5.0 and log = "tensorboard" reached every subject, with no way for one to leave
    them: snr_gamma = 0 was refused, and log knew no other value."""
    build(proj)
    old = 'instance_prompt = "a toy in the style of <1>"'
    proj.edit("[train]\n", '[train]\nsnr_gamma = 5.0\nlog = "tensorboard"\n')
    proj.edit(old, f'{old}\n[subjects.toy.train]\nsnr_gamma = 0\nlog = "none"')
    project = proj.load()
    toy, dog = project.subjects["toy"].train, project.subjects["dog"].train
    assert (toy.snr_gamma, toy.log) == (None, None) and (dog.snr_gamma, dog.log) == (5.0, "tensorboard")
    result, rec = build(proj)
    assert result.ok and "train:dog" in fake_steps.ran and "train:toy" not in fake_steps.ran  # as before
    assert dict((sid, r) for sid, _, r in rec.planned)["train:dog"] == ["train.snr_gamma set to 5.0"]
