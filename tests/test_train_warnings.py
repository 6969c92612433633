"""Train settings that another setting leaves without effect, or that train badly, need no model: they are
said as the project file loads, with the file, the key the subject reads and its line, once for a [train]
key that every subject inherits, and the train step does not say them again."""

from __future__ import annotations

import warnings

import pytest

from runner.project import load_project
from runner.project.problems import display

HEAD = '[project]\nbase_model = "tiny-sd"\n\n'
SUBJECTS = (
    '[subjects.dog]\nimages = "dog"\ninstance_prompt = "a photo of sks dog"\n\n'
    '[subjects.cat]\nimages = "cat"\ninstance_prompt = "a photo of sks cat"\n'
)


def _said(tmp_path, text: str) -> list[str]:
    """What loading the project file `text` warns of, without the file's name."""
    from PIL import Image

    for name in ("dog", "cat"):
        (tmp_path / name).mkdir(exist_ok=True)
        Image.new("RGB", (64, 64)).save(tmp_path / name / "a.png")
    path = tmp_path / "p.toml"
    path.write_text(text)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        load_project(path)
    head = f"{display(path)}: "
    return [str(w.message).removeprefix(head) for w in said]


def test_schedule_keys_of_train_are_said_once_at_their_line(tmp_path):
    text = HEAD + "[train]\nlr_warmup_steps = 5\nlr_power = 2.0\n\n" + SUBJECTS
    assert _said(tmp_path, text) == [
        'train.lr_warmup_steps: has no effect with lr_scheduler = "constant": the rate is learning_rate from '
        'the first step (line 5) - lr_scheduler = "constant_with_warmup" warms up; or remove lr_warmup_steps',
        'train.lr_power: has no effect: it applies to lr_scheduler = "polynomial" only, and the schedule is '
        '"constant" (line 6) - set lr_scheduler = "polynomial", or remove lr_power',
    ]


def test_a_subject_s_own_schedule_key_is_said_at_its_own_line(tmp_path):
    text = HEAD + SUBJECTS + '[subjects.cat.train]\nlr_scheduler = "cosine"\nlr_num_cycles = 3\n'
    assert _said(tmp_path, text) == [
        "subjects.cat.train.lr_num_cycles: has no effect: it applies to lr_scheduler = "
        '"cosine_with_restarts" only, and the schedule is "cosine" (line 13) - set lr_scheduler = '
        '"cosine_with_restarts", or remove lr_num_cycles'
    ]


def test_a_train_key_that_one_subject_s_schedule_uses_is_not_said(tmp_path):
    """[train] lr_power serves the subject whose own schedule is polynomial: it is meant."""
    text = (
        HEAD
        + "[train]\nlr_power = 2.0\n\n"
        + SUBJECTS
        + '[subjects.cat.train]\nlr_scheduler = "polynomial"\n'
    )
    assert _said(tmp_path, text) == []


@pytest.mark.parametrize(
    "train, expected",
    [
        (
            'lr_scheduler = "linear"\nlr_warmup_steps = 10\nsteps = 10\n',
            "train.lr_warmup_steps: 10 is not below the 10 steps of the run: the rate never reaches "
            "learning_rate (line 6) - use fewer warm-up steps than steps",
        ),
        ('lr_scheduler = "cosine_with_restarts"\nlr_num_cycles = 3\nlr_warmup_steps = 5\n', None),
        ('lr_scheduler = "polynomial"\nlr_power = 2.0\nlr_warmup_steps = 5\n', None),
        ('lr_scheduler = "constant_with_warmup"\nlr_warmup_steps = 5\n', None),
    ],
)
def test_schedule_keys_the_schedule_takes_are_not_said(tmp_path, train, expected):
    assert _said(tmp_path, HEAD + "[train]\n" + train + "\n" + SUBJECTS) == ([expected] if expected else [])


def test_prodigy_with_a_small_learning_rate_is_said_at_the_learning_rate(tmp_path):
    text = HEAD + '[train]\noptimizer = "prodigy"\nlearning_rate = 1e-4\n\n' + SUBJECTS
    assert _said(tmp_path, text) == [
        'train.learning_rate: is 0.0001 with optimizer = "prodigy": Prodigy finds the step size itself and '
        "learning_rate multiplies it (line 6) - 1.0 is the usual value"
    ]
    # the default learning rate: said at the optimizer the subject sets
    text = HEAD + SUBJECTS + '[subjects.cat.train]\noptimizer = "prodigy"\n'
    assert _said(tmp_path, text) == [
        "subjects.cat.train.optimizer: Prodigy with learning_rate 0.0001 (the default): Prodigy finds the "
        "step size itself and learning_rate multiplies it (line 12) - 1.0 is the usual value"
    ]


def test_a_text_encoder_learning_rate_without_text_encoder_training_is_said_at_its_line(tmp_path):
    text = HEAD + "[train]\ntrain_text_encoder = false\ntext_encoder_learning_rate = 5e-5\n\n" + SUBJECTS
    assert _said(tmp_path, text) == [
        "train.text_encoder_learning_rate: has no effect: train_text_encoder = false, so no text-encoder "
        "LoRA is trained (line 6) - set train_text_encoder = true, or remove it"
    ]


@pytest.mark.torch
def test_the_train_step_does_not_say_them_again(tmp_path):
    from runner.steps import train
    from tests.steps_fixtures import draw_images, make_subject, train_context

    instance = draw_images(tmp_path / "dog", 3, size=(64, 64))
    settings = dict(
        steps=1,
        train_text_encoder=False,
        text_encoder_learning_rate=5e-5,
        optimizer="prodigy",
        learning_rate=1e-4,
        lr_warmup_steps=5,
        lr_power=2.0,
        lr_num_cycles=3,
    )
    logs: list[str] = []
    ctx = train_context(tmp_path, make_subject(instance, train=settings), log=logs.append)
    train.run(ctx)
    assert any(ctx.out.rglob("*.safetensors")), "it trained"
    assert logs, "the step logs what it does"
    assert [line for line in logs if "warning" in line] == []
