"""`dbl build -j 3` with real tiny-sd steps: the bytes of `-j 1`, and a worker killed mid-training."""

from __future__ import annotations

import textwrap

import pytest

from runner import lockfile
from tests.conftest import write_image
from tests.test_build_real import dbl

pytestmark = pytest.mark.torch

SUBJECTS = ("dog", "toy", "cat", "car")

PROJECT = """
[project]
base_model = "tiny-sd"

[train]
resolution = 64
steps = 6
checkpoint_every = 2

[lora]
rank = 4
alpha = 8

[blends.pair]
adapters = { toy = 1.0, cat = 0.5 }
method = "cat"

[renders.pair]
adapter = "pair"
prompts = ["a toy cat"]
steps = 2
seeds = [0, 1]

[renders.car]
adapter = "car"
prompts = ["a car"]
steps = 2
"""


def project(folder, dog_steps: int = 6):
    folder.mkdir(parents=True, exist_ok=True)
    text = textwrap.dedent(PROJECT)
    for n, name in enumerate(SUBJECTS):
        text += f'\n[subjects.{name}]\nimages = "{name}"\ninstance_prompt = "a photo of sks {name}"\n'
        if name == "dog":
            text += f"[subjects.dog.train]\nsteps = {dog_steps}\ncheckpoint_every = 5\n"
        for i in range(2):
            write_image(folder / name / f"{i}.png", seed=10 * n + i, size=64)
    (folder / "p.toml").write_text(text)
    return folder / "p.toml"


def built(folder):
    out = folder / "build" / "p"
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    records = lockfile.read(folder / "p.lock")
    for record in records.values():
        del record["built"], record["duration_s"]
    return files, records


def test_j3_builds_the_bytes_and_lockfile_of_j1(tmp_path):
    one, three = tmp_path / "one", tmp_path / "three"
    for folder, jobs in ((one, "1"), (three, "3")):
        done = dbl("build", project(folder), "--no-progress", "-j", jobs, cwd=folder)
        assert done.returncode == 0, done.stdout + done.stderr
    files, records = built(three)
    assert len(records) == 7 and len(files) > 10
    assert built(one) == (files, records)
