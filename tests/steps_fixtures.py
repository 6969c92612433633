"""Hand-made StepContexts for step tests: a tiny project on tiny-sd, images drawn in code."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from runner.project.schema import LoraSettings, Prior, Project, ProjectSettings, Subject, TrainSettings
from runner.steps import StepContext

# The shared real photos sit next to the repository; tests that use them skip without them.
DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench"

# Small and fast: resolution 64 is tiny-sd's native size.
FAST_TRAIN = dict(
    resolution=64,
    steps=4,
    batch_size=1,
    learning_rate=1e-3,
    gradient_checkpointing=False,
    checkpoint_every=0,
    center_crop=True,
)
# What saving a DoRA adapter warns of: its kohya file is for ComfyUI and Forge, not A1111.
DORA_KOHYA_NOTE = "DoRA: the adapter's kohya file holds each magnitude per output row"

FAST_LORA = dict(rank=4, alpha=8, text_encoder_rank=2, text_encoder_alpha=3)


def draw_images(folder: Path, count: int, *, size=(80, 64), seed: int = 0, suffix: str = ".png") -> Path:
    """`count` smooth random RGB images (blobs on a gradient) in `folder`."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(count):
        base = rng.uniform(0, 255, 3)
        img = np.broadcast_to(base, (h, w, 3)).copy()
        for _ in range(3):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(6, 20)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            img[mask] = rng.uniform(0, 255, 3)
        img += (xx / w * 40)[..., None]
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:02d}{suffix}")
    return folder


def make_project(
    tmp_path: Path, base_model: str = "tiny-sd", seed: int = 0, **subjects_and_priors
) -> Project:
    return Project(
        path=tmp_path / "project.toml",
        settings=ProjectSettings(base_model=base_model, seed=seed, device="cpu", mixed_precision="no"),
        train=TrainSettings(),
        lora=LoraSettings(),
        tables={
            "prior": subjects_and_priors.get("priors", {}),
            "train": subjects_and_priors.get("subjects", {}),
        },
    )


def make_subject(
    images: Path, *, prior: str | None = None, train: dict | None = None, lora: dict | None = None
):
    return Subject(
        name="dog",
        images=str(images),
        instance_prompt="a photo of sks dog",
        prior=prior,
        train=TrainSettings(**{**FAST_TRAIN, **(train or {})}),
        lora=LoraSettings(**{**FAST_LORA, **(lora or {})}),
    )


def make_prior(**settings) -> Prior:
    defaults = dict(name="dog", class_prompt="a photo of dog", num_images=3, steps=2, batch_size=2)
    return Prior(**{**defaults, **settings})


_caches: dict = {}


def model_cache(base_model: str = "tiny-sd"):
    """One ModelCache per base model for the whole test session (loading is the slow part)."""
    from runner.models import BaseModel, ModelCache

    if base_model not in _caches:
        _caches[base_model] = ModelCache(BaseModel.parse(base_model, Path.cwd()), "cpu", "no")
    return _caches[base_model]


def train_context(
    tmp_path: Path, subject, *, prior=None, class_dir=None, base_model="tiny-sd", seed=0, work=None, **kw
):
    """A StepContext for train:<subject>; `work` lets two contexts share a work folder (resume)."""
    priors = {prior.name: prior} if prior is not None else {}
    project = make_project(tmp_path, base_model, seed, subjects={subject.name: subject}, priors=priors)
    work = Path(work) if work else tmp_path / "work"
    out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
    out.mkdir(parents=True)
    inputs = {f"prior:{prior.name}": Path(class_dir)} if prior is not None else {}
    return StepContext(
        step_id=f"train:{subject.name}",
        kind="train",
        name=subject.name,
        spec=subject,
        project=project,
        work=work,
        out=out,
        inputs=inputs,
        models=model_cache(base_model),
        fingerprint="test",
        **kw,
    )


def prior_context(tmp_path: Path, prior, *, seed=0, **kw):
    project = make_project(tmp_path, seed=seed, priors={prior.name: prior})
    out = tmp_path / f"prior-out-{len(list(tmp_path.glob('prior-out-*')))}"
    out.mkdir(parents=True)
    return StepContext(
        step_id=f"prior:{prior.name}",
        kind="prior",
        name=prior.name,
        spec=prior,
        project=project,
        work=kw.pop("work", tmp_path / "prior-work"),
        out=out,
        inputs={},
        models=model_cache(),
        fingerprint="test",
        **kw,
    )


def replace(spec, **changes):
    return dataclasses.replace(spec, **changes)


def run_train(ctx) -> dict:
    """The train step on `ctx`: its metrics (the step's module, and torch, are imported here, on first use)."""
    from runner.steps import train

    return train.run(ctx)


def stop_at(n: int):
    """A should_stop for a step context that says stop on its n-th call (the step asks after each step)."""
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) == n

    return should_stop


@pytest.fixture(scope="module")
def train_images(tmp_path_factory):
    """Three instance images (80x64) and four class images (64x64), drawn once per test module."""
    root = tmp_path_factory.mktemp("images")
    return draw_images(root / "dog", 3, size=(80, 64)), draw_images(root / "class", 4, size=(64, 64), seed=7)
