"""`dbl build -j 3` with real tiny-sd steps: the bytes of `-j 1`, and a worker killed mid-training."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import textwrap
import threading
import time

import pytest

from runner import lockfile
from tests.conftest import write_image
from tests.folders import folder_bytes
from tests.real_builds import build_here, dbl

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
    files = folder_bytes(out)
    records = lockfile.read(folder / "p.lock")
    for record in records.values():
        del record["built"], record["duration_s"]
    return files, records


def test_j3_builds_the_bytes_and_lockfile_of_j1(tmp_path):
    one, three = tmp_path / "one", tmp_path / "three"
    build_here(project(one))  # -j 1: every step in this process
    done = dbl("build", project(three), "--no-progress", "-j", "3", cwd=three)
    assert done.returncode == 0, done.stdout + done.stderr
    # The worker processes hide the libraries' notices of their future changes, as the build does.
    assert "FutureWarning" not in done.stdout + done.stderr, done.stderr
    # Workers end by themselves at the end of the build, releasing what they hold (a worker terminated
    # instead leaves the resource tracker its semaphores to clean up, and a warning).
    assert "resource_tracker" not in done.stderr, done.stderr
    files, records = built(three)
    assert len(records) == 7 and len(files) > 10
    assert built(one) == (files, records)


@pytest.mark.slow
def test_a_train_worker_killed_after_its_checkpoint_resumes_to_the_bytes_of_an_uninterrupted_build(tmp_path):
    """-j 2: SIGKILL train:dog's worker process once its first checkpoint is written; the build fails that
    step and keeps a valid lockfile, and the next build resumes it to the bytes of an uninterrupted one."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = dbl("build", project(reference, dog_steps=20), "--no-progress", "-j", "2", cwd=reference)
    assert done.returncode == 0, done.stdout + done.stderr

    path = project(killed, dog_steps=20)
    build = dbl("build", path, "--no-progress", "-v", "-j", "2", cwd=killed, wait=False)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(build.stdout), daemon=True)
    reader.start()
    work = killed / ".dbl" / "tmp" / "p" / "train-dog"
    deadline = time.monotonic() + 600
    while not list(work.glob("checkpoint-*")):  # its first checkpoint is written: kill its worker
        assert build.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.02)
    pid = next(
        int(m[1]) for line in list(lines) if (m := re.search(r"train:dog .*worker process (\d+)", line))
    )
    os.kill(pid, signal.SIGKILL)
    assert build.wait(timeout=600) == 1
    reader.join(10)
    output = "".join(lines)
    assert "train:dog" in output and "its worker process died (exit code -9)" in output, output

    records = lockfile.read(killed / "p.lock")  # still a valid lockfile, its outputs intact
    assert "train:dog" not in records and records, output
    for record in records.values():
        for rel, item in record["outputs"].items():
            assert hashlib.sha256((killed / rel).read_bytes()).hexdigest() == item["sha256"], rel

    again = dbl("build", path, "--no-progress", "-v", "-j", "2", cwd=killed)
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.search(r"train:dog .*resuming from checkpoint-\d+", again.stdout), again.stdout
    files, records = built(killed)
    assert records["train:dog"]["metrics"].pop("resumed_from") >= 5  # the one thing that says so
    assert (files, records) == built(reference)
