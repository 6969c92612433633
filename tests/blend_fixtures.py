"""Random LoRA adapters on tiny-sd, and hand-made step contexts, for the blend, render and api tests.

Import the fixtures into a test module by name (`from tests.blend_fixtures import adapters, ...`).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from runner.project.schema import Blend, ProjectSettings, Render
from runner.steps import StepContext

BASE = "tiny-sd"


def make_adapter(
    folder: Path,
    seed: int,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    text_encoder: bool = True,
    te_rank: int = 4,
    te_alpha: float = 4.0,
    unet_targets=("to_q", "to_v"),
    te_targets=("q_proj", "v_proj"),
) -> Path:
    """Save a LoRA adapter of random A and B (so its delta is not zero) in dbl's adapter layout."""
    import torch
    from peft import LoraConfig, get_peft_model

    from runner.adapters import save_adapter

    pipe = fresh_pipeline()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = get_peft_model(
            pipe.unet,
            LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(unet_targets), init_lora_weights=False),
        )
        te = None
        if text_encoder:
            te = get_peft_model(
                pipe.text_encoder,
                LoraConfig(
                    r=te_rank, lora_alpha=te_alpha, target_modules=list(te_targets), init_lora_weights=False
                ),
            )
    save_adapter(
        folder, {"unet": unet, "text_encoder": te}, base_model=BASE, info={"kind": "test", "seed": seed}
    )
    return folder


def fresh_pipeline():
    from runner.models import BaseModel, load_pipeline

    return load_pipeline(BaseModel.parse(BASE, Path.cwd()))


class Models:
    """A stand-in for runner.models.ModelCache that counts pipeline loads."""

    def __init__(self):
        import torch

        from runner import families
        from runner.models import BaseModel

        self.base = BaseModel.parse(BASE, Path.cwd())
        self.family = families.detect(self.base)
        self.device = "cpu"
        self.dtype = torch.float32
        self.loads = 0
        self._pipe = None

    def pipeline(self, dtype=None):
        if self._pipe is None:
            self.loads += 1
            self._pipe = fresh_pipeline()
        return self._pipe


def project(seed: int = 0, source=None):
    """A project's settings; with `source` (runner.project.problems.Source), its file as warnings name it."""
    return SimpleNamespace(settings=ProjectSettings(base_model=BASE, seed=seed), seed=seed, source=source)


def context(
    kind: str, spec, out: Path, inputs: dict, models=None, seed: int = 0, progress=None, log=None, source=None
) -> StepContext:
    out.mkdir(parents=True, exist_ok=True)
    return StepContext(
        step_id=f"{kind}:{spec.name}",
        kind=kind,
        name=spec.name,
        spec=spec,
        project=project(seed, source),
        work=out.parent / f"{out.name}-work",  # a render's own, as each fingerprint has its own
        out=out,
        inputs=dict(inputs),
        models=models or Models(),
        progress=progress or (lambda done, total, **metrics: None),
        log=log or (lambda message: None),
    )


def run_blend(
    tmp: Path,
    name: str,
    parents: dict,
    inputs: dict,
    models=None,
    seed: int = 0,
    log=None,
    source=None,
    **settings,
) -> Path:
    """Run the blend step; `parents` name -> weight, `inputs` step id -> folder. Returns the output folder."""
    from runner.steps import blend

    spec = Blend(name=name, adapters=tuple(parents.items()), **settings)
    out = tmp / f"blend-{name}"
    blend.run(context("blend", spec, out, inputs, models, seed, log=log, source=source))
    return out


def run_render(tmp: Path, name: str, adapter: str, inputs: dict, models=None, log=None, **settings) -> Path:
    from runner.steps import render

    settings.setdefault("prompts", ["a photo of sks dog"])
    settings.setdefault("steps", 3)
    spec = Render(name=name, adapter=adapter, **settings)
    out = tmp / f"render-{name}"
    render.run(context("render", spec, out, inputs, models, log=log))
    return out


@pytest.fixture(scope="session")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Random adapters on tiny-sd: `a` and `b` (rank 4, text encoder), `c` (rank 6, UNet only)."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(root / "a", seed=1),
        "b": make_adapter(root / "b", seed=2, alpha=4.0),
        "c": make_adapter(root / "c", seed=3, rank=6, text_encoder=False),
    }


@pytest.fixture(scope="session")
def models():
    """One shared tiny-sd pipeline for the session, as a build shares one."""
    return Models()
