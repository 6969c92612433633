"""The train step on tiny-sd with the optional loss and noise keys: min-SNR weighting and offset noise."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.steps import StepInterrupted
from tests.steps_fixtures import draw_images, make_prior, make_subject, train_context

pytestmark = pytest.mark.torch


def _run(ctx):
    from runner.steps import train

    return train.run(ctx)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return draw_images(root / "dog", 3, size=(80, 64)), draw_images(root / "class", 4, size=(64, 64), seed=7)


def test_min_snr_and_offset_noise_resume_to_the_same_bytes(tmp_path, images):
    instance, classes = images
    prior = make_prior(num_images=4)
    train = dict(
        steps=5, batch_size=2, center_crop=False, checkpoint_every=2, snr_gamma=5.0, noise_offset=0.1
    )
    subject = make_subject(instance, prior="dog", train=train)
    whole = train_context(tmp_path, subject, prior=prior, class_dir=classes, work=tmp_path / "w1")
    _run(whole)
    calls = []

    def stop_after_three():
        calls.append(1)
        return len(calls) == 3

    first = train_context(
        tmp_path, subject, prior=prior, class_dir=classes, work=tmp_path / "w2", should_stop=stop_after_three
    )
    with pytest.raises(StepInterrupted, match="after step 3"):
        _run(first)
    again = train_context(tmp_path, subject, prior=prior, class_dir=classes, work=tmp_path / "w2")
    assert _run(again)["resumed_from"] == 3
    assert _files(again.out) == _files(whole.out)


def test_min_snr_and_offset_noise_change_what_is_learned(tmp_path, images):
    from runner.adapters import read_adapter_weights

    instance, _ = images
    outs = {}
    for label, train in (
        ("plain", {}),
        ("snr", dict(snr_gamma=1.0)),
        ("offset", dict(noise_offset=0.5)),
        ("explicit defaults", dict(noise_offset=0.0)),
    ):
        # Two examples a step: min-SNR weights them against each other (Adam undoes a common factor).
        train = dict(steps=2, batch_size=2, train_text_encoder=False, **train)
        subject = make_subject(instance, train=train)
        ctx = train_context(tmp_path / label, subject)
        _run(ctx)
        outs[label] = read_adapter_weights(ctx.out, "unet")
    for label in ("snr", "offset"):
        assert any(not v.equal(outs["plain"][k]) for k, v in outs[label].items()), label
    assert all(v.equal(outs["plain"][k]) for k, v in outs["explicit defaults"].items())
