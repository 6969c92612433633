"""Caption files whose bytes are not what they seem: UTF-16 saved without its byte-order mark, and
control characters (a terminal's colour codes) that no editor shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.errors import StepError
from runner.training.captions import image_prompts
from tests.conftest import write_image


def _folder(tmp_path: Path, captions: dict[str, bytes]) -> list[Path]:
    files = [write_image(tmp_path / f"{i:02d}.png", seed=i) for i in range(2)]
    for name, data in captions.items():
        (tmp_path / name).write_bytes(data)
    return files


@pytest.mark.parametrize("order", ["utf-16-le", "utf-16-be"])
def test_utf16_without_a_byte_order_mark_is_named_as_such(tmp_path, order):
    """It was called a binary file, which sent the user looking for the wrong problem."""
    files = _folder(tmp_path, {"01.txt": "a photo of sks dog, café\r\n".encode(order)})
    with pytest.raises(StepError) as info:
        image_prompts(files, ".txt", "p", None, print)
    assert str(info.value) == (
        f"caption {tmp_path / '01.txt'} looks like UTF-16 text without a byte-order mark, not UTF-8; save it "
        "as UTF-8"
    )


@pytest.mark.parametrize(
    "data", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"\x00\x01\x02\x03", b"\x00\x00", b"a\x00b"]
)
def test_a_binary_caption_is_still_a_binary_file(tmp_path, data):
    files = _folder(tmp_path, {"01.txt": data})
    with pytest.raises(StepError, match="is a binary file, not text"):
        image_prompts(files, ".txt", "p", None, print)


def test_control_characters_in_a_caption_are_a_warning_and_train_as_written(tmp_path):
    """ESC and BEL trained without a word said."""
    files = _folder(
        tmp_path, {"00.txt": b"\x1b[31ma photo of sks dog\x1b[0m\x07", "01.txt": b"a dog\tasleep"}
    )
    said = []
    prompts = image_prompts(files, ".txt", "p", None, said.append)
    assert prompts == ["\x1b[31ma photo of sks dog\x1b[0m\x07", "a dog asleep"]
    assert said == [
        f"warning: caption {tmp_path / '00.txt'} holds control characters (BEL, ESC), which train as written: "
        "remove them if they are not meant"
    ]


def test_many_captions_with_control_characters_are_said_in_a_few_lines(tmp_path):
    files = [write_image(tmp_path / f"{i:02d}.png", seed=i) for i in range(12)]
    for image in files:
        image.with_suffix(".txt").write_bytes(b"a dog\x1b")
    said = []
    image_prompts(files, ".txt", "p", None, said.append)
    assert len(said) < 12
    assert said[-1].startswith(
        f"warning: {12 - len(said) + 1} more captions in {tmp_path} hold control characters"
    )


@pytest.mark.torch
def test_a_prior_names_the_users_caption_file_that_holds_control_characters(tmp_path):
    from runner.steps import prior as prior_step
    from tests.steps_fixtures import draw_images, make_prior, prior_context

    given = draw_images(tmp_path / "given", 2, size=(64, 64))
    (given / "00.txt").write_bytes(b"a photo of dog\x07")
    (given / "01.txt").write_text("a photo of dog")
    logs = []
    spec = make_prior(num_images=2, images=str(given), caption_extension=".txt")
    prior_step.run(prior_context(tmp_path, spec, log=logs.append))
    assert [line for line in logs if "control" in line] == [
        f"warning: caption {given / '00.txt'} holds control characters (BEL), which train as written: remove "
        "them if they are not meant"
    ]
