"""Real builds on tiny-sd: a project of one subject, `dbl` in a process of its own (killed during training
if asked), a build in this process, and the bytes of the adapter a build made, for the tests that build
end to end.

Import by name (`from tests.real_builds import adapter_bytes, build_here, dbl`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from tests.conftest import ROOT, Recorder, write_image
from tests.folders import folder_bytes

PROJECT = """
[project]
base_model = "tiny-sd"

[train]
resolution = 64
steps = 20
checkpoint_every = 5

[lora]
rank = 4
alpha = 8
text_encoder_rank = 4
text_encoder_alpha = 4

[subjects.dog]
images = "dog"
instance_prompt = "a photo of sks dog"
"""


def project(folder, text: str = PROJECT):
    """The project file p.toml in `folder` (`text`, PROJECT unless given) and three pictures of subject dog."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "p.toml").write_text(textwrap.dedent(text))
    for i in range(3):
        write_image(folder / "dog" / f"{i}.png", seed=i, size=64)
    return folder / "p.toml"


def subjects_trained_in_a_step(folder, *names: str) -> str:
    """The start of a project file on tiny-sd whose subjects `names` train for one step at 64 px (no text
    encoder), and two pictures of each, written in a folder of its name in `folder`."""
    text = '[project]\nbase_model = "tiny-sd"\n\n[train]\nresolution = 64\nsteps = 1\ntrain_text_encoder = false\n'
    for n, name in enumerate(names):
        for i in range(2):
            if not (folder / name / f"{i}.png").is_file():
                write_image(folder / name / f"{i}.png", seed=10 * n + i, size=64)
        text += f'\n[subjects.{name}]\nimages = "{name}"\ninstance_prompt = "a photo of sks {name}"\n'
    return text


def dbl(*args, cwd, wait=True):
    """`dbl ARGS` in a process of its own, computing with as many threads as this one: its bytes are then
    those of a build in this process (build_here), whose float sums the thread count orders."""
    import torch

    cmd = [sys.executable, "-m", "runner", *map(str, args)]
    env = dict(
        os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads())
    )
    if not wait:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def stop_during_training(path, cwd, when: str, sig=signal.SIGKILL) -> tuple[subprocess.Popen, list[str]]:
    """`dbl build PATH --no-progress` in a process of its own, sent `sig` once it prints a line with `when`:
    the process, ended, and the lines it printed."""
    proc = dbl("build", path, "--no-progress", cwd=cwd, wait=False)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if when in line:
            proc.send_signal(sig)
            break
    else:
        raise AssertionError("".join(seen))
    seen += proc.stdout.readlines()
    proc.wait(timeout=120)
    return proc, seen


def build_here(path) -> list[str]:
    """`dbl build PATH -v` in this process (no interpreter to start): the log lines; the build must pass."""
    from runner import executor
    from runner.project import load_project

    recorder = Recorder()
    result = executor.build(load_project(path), executor.BuildOptions(), recorder)
    assert result.ok, [(s.id, s.error) for s in result.steps if s.error]
    return [f"{e[1]} {e[2]}" for e in recorder.events if e[0] == "log"]


def adapter_bytes(folder):
    """Every file of subject dog's adapter, built from the project file p.toml in `folder`."""
    return folder_bytes(folder / "build" / "p" / "adapters" / "dog")
