"""A setting that another setting of the file leaves without effect loads with a warning naming its key,
its line and the fix; the same setting where it acts loads without one."""

from __future__ import annotations

import warnings

import pytest

from runner.project import load_project
from tests.conftest import write_image

BASE = """\
[project]
base_model = "tiny-sd"

[subjects.dog]
images = "data/dog"
instance_prompt = "a photo of sks dog"
"""


@pytest.fixture
def folder(tmp_path):
    write_image(tmp_path / "data/dog/00.png")
    write_image(tmp_path / "data/toy/00.png")
    return tmp_path


def said(folder, text: str) -> list[str]:
    """The warnings that loading the project file `BASE + text` gives, without the file's path."""
    path = folder / "p.toml"
    path.write_text(BASE + text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_project(path)
    return [str(w.message).removeprefix(f"{path}: ") for w in caught]


def line_of(folder, text: str) -> int:
    return (folder / "p.toml").read_text().splitlines().index(text) + 1


RENDER = '[renders.r]\nadapter = "{adapter}"\nprompts = ["sks dog"]\n'


def test_lora_scale_of_a_render_of_the_base_model_alone_is_said(folder):
    text = RENDER.format(adapter="none") + "lora_scale = 0.5\n"
    assert said(folder, text) == [
        f"renders.r.lora_scale: has no effect: the render draws the base model alone ('none'), with no "
        f"adapter to scale (line {line_of(folder, 'lora_scale = 0.5')}) - name an adapter, or remove lora_scale"
    ]
    assert said(folder, RENDER.format(adapter="dog") + "lora_scale = 0.5\n") == []
    assert said(folder, '[renders.r]\nadapters = ["none", "dog"]\nprompts = ["x"]\nlora_scale = 0.5\n') == []


@pytest.mark.parametrize("table", ["renders.r", "priors.dog"])
def test_a_negative_prompt_without_guidance_is_said(folder, table):
    head = RENDER.format(adapter="dog") if table == "renders.r" else '[priors.dog]\nclass_prompt = "a dog"\n'
    if table == "priors.dog":
        head = head.replace("[priors.dog]", 'prior = "dog"\n[priors.dog]')
    text = head + 'negative_prompt = "blurry"\nguidance_scale = 1.0\n'
    found = said(folder, text)
    line = line_of(folder, 'negative_prompt = "blurry"')
    assert found == [
        f"{table}.negative_prompt: has no effect: guidance_scale = 1 turns classifier-free guidance off, "
        f"and the negative prompt acts only through it (line {line})"
        " - raise guidance_scale above 1 (7.5 is usual), or remove negative_prompt"
    ]
    assert said(folder, text.replace("guidance_scale = 1.0", "guidance_scale = 1.5")) == []


def test_majority_sign_method_of_a_method_without_sign_election_is_said(folder):
    blend = (
        '[subjects.toy]\nimages = "data/toy"\ninstance_prompt = "a toy"\n'
        '[blends.mix]\nadapters = {{ dog = 1.0, toy = 1.0 }}\nmethod = "{method}"\n{density}'
        'majority_sign_method = "frequency"\n'
    )
    found = said(folder, blend.format(method="linear", density=""))
    line = line_of(folder, 'majority_sign_method = "frequency"')
    assert found == [
        "blends.mix.majority_sign_method: has no effect: method 'linear' elects no signs "
        f"(line {line}) - methods that use it: ties, "
        "ties_svd, dare_ties, dare_ties_svd; or remove it"
    ]
    assert said(folder, blend.format(method="dare_ties", density="density = 0.5\n")) == []


def test_bucket_bounds_with_buckets_off_are_said_once_where_written(folder):
    two = '[subjects.toy]\nimages = "data/toy"\ninstance_prompt = "a toy"\n'
    text = "[train]\nresolution = 64\nbucket_step = 8\n" + two
    assert said(folder, text) == [
        f"train.bucket_step: has no effect: buckets are off (line {line_of(folder, 'bucket_step = 8')}) - "
        "set buckets = true, or remove it"
    ]
    # One subject with buckets on reads [train]'s bucket_step: it acts.
    assert said(folder, text + "[subjects.toy.train]\nbuckets = true\n") == []


def test_text_encoder_lora_settings_without_text_encoder_training_are_said(folder):
    text = "[train]\ntrain_text_encoder = false\n[lora]\ntext_encoder_rank = 8\n"
    assert said(folder, text) == [
        "lora.text_encoder_rank: has no effect: train_text_encoder = false, so no text-encoder LoRA is "
        f"trained (line {line_of(folder, 'text_encoder_rank = 8')}) - set train_text_encoder = true, or "
        "remove it"
    ]
    own = "[subjects.dog.train]\ntrain_text_encoder = false\n[subjects.dog.lora]\ntext_encoder_use_dora = true\n"
    assert [w.split(":")[0] for w in said(folder, own)] == ["subjects.dog.lora.text_encoder_use_dora"]
    assert said(folder, "[lora]\ntext_encoder_rank = 8\n") == []


def test_several_unused_keys_of_one_table_are_said_in_one_warning(folder):
    """Three text_encoder_* keys with the text encoder off gave three warnings that said the same."""
    text = (
        "[train]\ntrain_text_encoder = false\nbucket_min_side = 256\nbucket_max_side = 1024\n"
        '[lora]\ntext_encoder_rank = 8\ntext_encoder_alpha = 8\ntext_encoder_target_modules = ["q_proj"]\n'
    )
    found = said(folder, text)
    targets = line_of(folder, 'text_encoder_target_modules = ["q_proj"]')
    assert found == [
        f"train: bucket_min_side (line {line_of(folder, 'bucket_min_side = 256')}) and bucket_max_side "
        f"(line {line_of(folder, 'bucket_max_side = 1024')}) have no effect: buckets are off - set buckets = "
        "true, or remove them",
        f"lora: text_encoder_rank (line {line_of(folder, 'text_encoder_rank = 8')}), text_encoder_alpha "
        f"(line {line_of(folder, 'text_encoder_alpha = 8')}) and text_encoder_target_modules (line "
        f"{targets}) have no effect: "
        "train_text_encoder = false, so no text-encoder LoRA is trained - set train_text_encoder = true, "
        "or remove them",
    ]


def test_a_caption_dropout_of_1_that_drops_every_prompt_is_said(folder):
    """caption_dropout = 1.0 is allowed (0 to 1) but trains every example on the empty prompt: the rare
    word never learns the subject, without a word."""
    text = "[train]\ncaption_dropout = 1.0\n"
    assert said(folder, text) == [
        "train.caption_dropout: is 1: every example trains on the empty prompt, so no word of the instance "
        f"prompt (or a caption) learns to call up the subject (line {line_of(folder, 'caption_dropout = 1.0')})"
        " - 0.1 is usual; remove caption_dropout to keep every prompt"
    ]
    assert said(folder, "[train]\ncaption_dropout = 0.99\n") == []
    own = "[subjects.dog.train]\ncaption_dropout = 1\n"
    assert [w.split(":")[0] for w in said(folder, own)] == ["subjects.dog.train.caption_dropout"]


def test_an_alpha_of_0_that_scales_a_trained_lora_is_said(folder):
    """alpha / rank = 0: the LoRA's output is multiplied by 0, its B matrices get no gradient and the
    adapter came out all zeros, without a word."""
    text = "[lora]\nalpha = 0\ntext_encoder_alpha = 0\n"
    assert [w.split(" - ")[0] for w in said(folder, text)] == [
        f"lora.alpha: is 0, which scales the LoRA by 0 (alpha / rank): it learns nothing and changes no "
        f"image (line {line_of(folder, 'alpha = 0')})",
        f"lora.text_encoder_alpha: is 0, which scales the LoRA by 0 (alpha / rank): it learns nothing and "
        f"changes no image (line {line_of(folder, 'text_encoder_alpha = 0')})",
    ]
    # DoRA's magnitudes train at any scale; an untrained text encoder's alpha is said as unused.
    dora = "[train]\ntrain_text_encoder = false\n[lora]\nalpha = 0\nuse_dora = true\ntext_encoder_alpha = 0\n"
    assert [w.split(":")[0] for w in said(folder, dora)] == ["lora.text_encoder_alpha"]
    assert "has no effect" in said(folder, dora)[0]


def test_a_learning_rate_of_0_that_trains_nothing_is_said(folder):
    """learning_rate = 0 is allowed (a text-encoder-only run sets text_encoder_learning_rate), but alone
    it trained an adapter of zeros without a word."""
    assert said(folder, "[train]\nlearning_rate = 0\n") == [
        "train.learning_rate: is 0, and no text_encoder_learning_rate trains the text encoder: nothing "
        f"learns, and the adapter changes no image (line {line_of(folder, 'learning_rate = 0')}) - 1e-4 is "
        "the recipe's (1.0 for Prodigy)"
    ]
    assert said(folder, "[train]\nlearning_rate = 0\ntext_encoder_learning_rate = 1e-4\n") == []


def test_a_blend_parent_of_weight_0_is_said(folder):
    text = '[subjects.toy]\nimages = "data/toy"\ninstance_prompt = "a toy"\n[blends.mix]\nadapters = { dog = 0.0, toy = 1.0 }\n'
    assert said(folder, text) == [
        "blends.mix.adapters.dog: 'dog' has weight 0, which leaves it out of the blend (line "
        f"{line_of(folder, 'adapters = { dog = 0.0, toy = 1.0 }')}) - give it a weight, or remove 'dog' from the "
        "blend's adapters"
    ]
