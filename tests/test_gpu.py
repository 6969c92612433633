"""On a CUDA device: the tiny-sd flow (projects/flow.toml) in fp16, end to end. Skipped without a GPU."""

from __future__ import annotations

import shutil

import pytest

from runner import executor
from runner.events import FRESH
from runner.project import load_project
from tests.conftest import ROOT, Recorder

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_the_flow_builds_in_fp16_on_cuda(tmp_path):
    shutil.copytree(ROOT / "projects" / "flow", tmp_path / "flow")
    text = (ROOT / "projects" / "flow.toml").read_text()
    text = text.replace(
        'base_model = "tiny-sd"', 'base_model = "tiny-sd"\ndevice = "cuda"\nmixed_precision = "fp16"'
    )
    (tmp_path / "flow.toml").write_text(text)
    project = load_project(tmp_path / "flow.toml")
    result = executor.build(project, executor.BuildOptions(), Recorder())
    assert result.ok, [(s.id, s.error) for s in result.steps if s.error]
    out = tmp_path / "build" / "flow"
    from safetensors import safe_open

    with safe_open(str(out / "adapters" / "dog" / "unet" / "adapter_model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    assert dtypes == {torch.float32}, "LoRA weights are trained and saved in fp32"
    assert len(list((out / "renders" / "dog").glob("*-*.png"))) == 4
    blend = (out / "blends" / "toy_dog" / "dbl.json").read_text()
    assert "relative_error" in blend
    again = executor.build(load_project(tmp_path / "flow.toml"), executor.BuildOptions(), Recorder())
    assert all(s.status == FRESH for s in again.steps)
