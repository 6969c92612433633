"""Captions on tiny-sd through `dbl build`: a captioned run with caption dropout that is killed resumes to
the bytes of an uninterrupted one; real photos with captions build end to end."""

from __future__ import annotations

import signal
import textwrap

import pytest

from runner import lockfile
from tests.real_builds import adapter_bytes, dbl, project, stop_during_training
from tests.steps_fixtures import DREAMBENCH

pytestmark = pytest.mark.torch

PROJECT = """
[project]
base_model = "tiny-sd"

[train]
resolution = 64
steps = 30
checkpoint_every = 5
caption_dropout = 0.5

[lora]
rank = 4
alpha = 8
text_encoder_rank = 4
text_encoder_alpha = 4

[subjects.dog]
images = "dog"
instance_prompt = "a photo of sks dog"
caption_extension = ".txt"
trigger = "sks dog"
"""


def captioned(folder):
    path = project(folder, PROJECT)
    (folder / "dog" / "0.txt").write_text("a photo of [trigger] on a red sofa")
    (folder / "dog" / "2.txt").write_text("[trigger] in the snow")
    return path


# Slow (about 35 s): killing and resuming a real build is covered by tests/test_build_real.py, and caption
# dropout's draws by tests/test_captions.py; this puts the two together.
@pytest.mark.slow
def test_captions_with_dropout_resume_to_the_same_adapter_after_a_kill(tmp_path):
    reference = tmp_path / "uninterrupted"
    done = dbl("build", captioned(reference), "--no-progress", cwd=reference)
    assert done.returncode == 0, done.stdout + done.stderr

    killed = tmp_path / "killed"
    proc, seen = stop_during_training(captioned(killed), killed, "step 12/30")  # past checkpoint-10
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert "train:dog" not in lockfile.read(killed / "p.lock")

    again = dbl("build", killed / "p.toml", "--no-progress", "-v", cwd=killed)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming from checkpoint-" in again.stdout
    assert "caption dropout 0.5" in again.stdout
    assert adapter_bytes(killed) == adapter_bytes(reference)


@pytest.mark.skipif(not (DREAMBENCH / "dog").is_dir(), reason="no dreambench photos")
def test_real_photos_with_captions_build(tmp_path):
    from PIL import Image

    from runner import executor
    from runner.project import load_project
    from tests.conftest import Recorder

    photos = sorted((DREAMBENCH / "dog").glob("*.jpg"))[:3]
    folder = tmp_path / "dog"
    folder.mkdir()
    # Portrait, landscape and square versions of real photos.
    for photo, size in zip(photos, [(96, 128), (128, 96), (112, 112)], strict=True):
        with Image.open(photo) as image:
            image.convert("RGB").resize(size).save(folder / photo.name)
    (folder / photos[0].with_suffix(".txt").name).write_text("a photo of [trigger] lying on the floor")
    (folder / photos[1].with_suffix(".txt").name).write_text("[trigger], close-up")
    path = tmp_path / "p.toml"
    path.write_text(
        textwrap.dedent(
            """
            [project]
            base_model = "tiny-sd"
            [train]
            resolution = 64
            steps = 3
            train_text_encoder = false
            checkpoint_every = 0
            [lora]
            rank = 4
            alpha = 4
            [subjects.dog]
            images = "dog"
            instance_prompt = "a photo of sks dog"
            caption_extension = ".txt"
            trigger = "sks dog"
            """
        )
    )
    rec = Recorder()
    result = executor.build(load_project(path), executor.BuildOptions(), rec)
    assert result.ok, rec.events
    assert (tmp_path / "build" / "p" / "adapters" / "dog").is_dir()
    logs = [e[2] for e in rec.events if e[0] == "log"]
    assert any("3 distinct prompts" in m for m in logs), logs
    record = lockfile.read(tmp_path / "p.lock")["train:dog"]
    assert record["fingerprint"]
