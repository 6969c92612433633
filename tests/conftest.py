"""Shared fixtures: small project folders, fake steps for engine tests, a recording reporter."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from tests.folders import folder_bytes

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED_DATA = ROOT.parent / "shared" / "data" / "dreambench"


@pytest.fixture(autouse=True)
def _dbl_home(tmp_path_factory, monkeypatch):
    # Built-in models are made once per test session, never in the user's home.
    home = os.environ.get("DBL_TEST_HOME") or str(tmp_path_factory.getbasetemp() / "dbl-home")
    os.environ["DBL_TEST_HOME"] = home
    monkeypatch.setenv("DBL_HOME", home)


def step_ends(rec) -> dict:
    """{step id: (status, error)} of each step's end a recorded build said."""
    return {event[1]: event[2:] for event in rec.events if event[0] == "end"}


def write_image(path: Path, seed: int = 0, size: int = 16) -> Path:
    """A small deterministic PNG (no Pillow needed: written by hand)."""
    import struct
    import zlib

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = b"".join(
        b"\x00" + bytes(((x * 7 + y * 13 + seed * 31) % 256) for x in range(size * 3)) for y in range(size)
    )

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(png)
    return path


PETS = """
[project]
base_model = "tiny-sd"

[train]
resolution = 64
steps = 4

[lora]
rank = 4
alpha = 8

[priors.dog]
class_prompt = "a photo of dog"
num_images = 2

[subjects.dog]
images = "data/dog"
instance_prompt = "a photo of sks dog"
prior = "dog"

[subjects.toy]
images = "data/toy"
instance_prompt = "a toy in the style of <1>"

[blends.mix]
adapters = { toy = 1.0, dog = 1.05 }

[renders.park]
adapter = "dog"
prompts = ["sks dog in a park", "sks dog on a beach"]
seeds = [0, 1]

[renders.mixed]
adapter = "mix"
prompts = ["a sks dog toy"]

[renders.base]
adapter = "none"
prompts = ["a dog"]
"""


class Proj:
    """A project folder in tmp_path with helpers to edit it."""

    def __init__(self, root: Path, text: str):
        self.root = root
        self.path = root / "pets.toml"
        self.path.write_text(textwrap.dedent(text))
        for sub, n in (("dog", 3), ("toy", 2)):
            for i in range(n):
                write_image(root / "data" / sub / f"{i:02d}.png", seed=i + (10 if sub == "toy" else 0))

    def edit(self, old: str, new: str) -> None:
        text = self.path.read_text()
        assert old in text, old
        self.path.write_text(text.replace(old, new, 1))

    def load(self):
        from runner.project import load_project

        return load_project(self.path)

    @property
    def lock(self) -> Path:
        return self.path.with_suffix(".lock")


def output_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root`/build, by its path there: what a build made, to compare builds with."""
    return folder_bytes(root / "build")


@pytest.fixture
def proj(tmp_path):
    return Proj(tmp_path, PETS)


@pytest.fixture
def pid_notes(tmp_path):
    """A project of one note, `n.toml`, whose step writes the pid of its worker after its text "one"."""
    import dataclasses

    from runner import steps
    from tests.note_kind import NOTE, run_note_with_pid

    steps.register(dataclasses.replace(NOTE, run=run_note_with_pid))
    path = tmp_path / "n.toml"
    path.write_text('[project]\nbase_model = "tiny-sd"\n\n[notes.a]\ntext = "one"\n')
    yield path
    steps.unregister("note")


class FakeSteps:
    """Stand-ins for the four step kinds: fast, deterministic, and they record what ran.

    A train step's output depends on its settings and images but NOT on train.steps, so that a test can
    rebuild a step with identical output bytes.
    """

    def __init__(self):
        self.ran: list[str] = []
        self.fail: set[str] = set()
        self.earlier: dict[str, Path | None] = {}  # step id -> the ctx.earlier it ran with

    def __call__(self, kind: str):
        def run(ctx):
            self.ran.append(ctx.step_id)
            self.earlier[ctx.step_id] = ctx.earlier
            if ctx.step_id in self.fail:
                from runner.steps import StepError

                raise StepError(f"{ctx.step_id} failed on purpose")
            spec = ctx.spec
            if kind == "prior":
                for i in range(spec.num_images):
                    (ctx.out / f"{i:04d}.txt").write_text(f"{spec.class_prompt} {i}")
            elif kind == "train":
                images = sorted(p.name for p in Path(spec.images).iterdir())
                prior = sorted(p.name for d in ctx.inputs.values() for p in d.iterdir())
                body = {
                    "rank": spec.lora.rank,
                    "prompt": spec.instance_prompt,
                    "images": images,
                    "prior": prior,
                }
                (ctx.out / "unet").mkdir()
                (ctx.out / "unet" / "adapter.json").write_text(json.dumps(body, sort_keys=True))
                (ctx.out / "dbl.json").write_text("{}")
            elif kind == "blend":
                parts = [(d.name, (d / "unet" / "adapter.json").read_text()) for d in ctx.inputs.values()]
                (ctx.out / "unet").mkdir()
                (ctx.out / "unet" / "adapter.json").write_text(json.dumps([parts, list(spec.adapters)]))
            elif kind == "eval":
                (ctx.out / "scores.json").write_text(json.dumps({"identifier": spec.identifier}))
            else:
                for i, prompt in enumerate(spec.prompts):
                    for seed in spec.seeds:
                        (ctx.out / f"{i}-{seed}.png").write_text(f"{prompt} {seed} {ctx.fingerprint}")
            return {"fake": True}

        return run


class FakeBackend:
    """An executor backend that runs FakeSteps in place of the real step functions."""

    name = "fake"

    def __init__(self, fake: FakeSteps, wrap=None):
        self.fake = fake
        self.wrap = wrap or (lambda run: run)

    def run(self, job, hooks):
        from runner.exec.job import run_job

        return run_job(job, hooks, models=None, run=self.wrap(self.fake(job.kind)))

    def close(self) -> None:
        pass


def use_backend(factory):
    """Make `factory` the default (inline) backend of every build until the returned undo is called."""
    from runner.exec import backends

    previous = backends._BACKENDS["inline"]
    backends.register("inline", lambda project, options=None: factory(project))
    return lambda: backends.register("inline", previous)


@pytest.fixture
def fake_steps():
    fake = FakeSteps()
    undo = use_backend(lambda project: FakeBackend(fake))
    yield fake
    undo()


class Recorder:
    """A Reporter that keeps every event."""

    def __init__(self):
        self.events: list[tuple] = []
        self.planned = []
        self.final = []

    def plan(self, name, steps):
        self.planned = [(s.id, s.status, list(s.reasons)) for s in steps]

    def step_start(self, step):
        self.events.append(("start", step.id))

    def step_progress(self, step):
        pass

    def log(self, step, message):
        self.events.append(("log", step.id if step else None, message))

    def step_end(self, step):
        self.events.append(("end", step.id, step.status, step.error))

    def finish(self, steps, duration_s):
        self.final = [(s.id, s.status) for s in steps]

    def close(self):
        pass


@pytest.fixture
def build(fake_steps):
    """build(proj, **options) -> (result, recorder), with the fake steps."""
    from runner import executor

    def run(p: Proj, **options):
        rec = Recorder()
        fake_steps.ran.clear()
        result = executor.build(p.load(), executor.BuildOptions(**options), rec)
        return result, rec

    return run
