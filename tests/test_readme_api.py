"""The README's "Python API" section: its example runs as written, and what it sends users to exists."""

from __future__ import annotations

import re
import shutil
import warnings

import pytest

from runner.cli import main
from tests.blend_fixtures import adapters  # noqa: F401
from tests.conftest import ROOT


def _section() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]


def test_the_command_said_to_tell_why_an_adapter_is_stale_tells_why(proj, build, capsys):
    said = re.search(r"`dbl (\w+)` says why", _section())
    assert said, "the Python API section no longer names the command that says why an adapter is stale"
    build(proj)
    proj.edit(
        'instance_prompt = "a toy in the style of <1>"', 'instance_prompt = "a toy in the style of <2>"'
    )
    capsys.readouterr()
    assert main([said[1], str(proj.path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "train:toy" in x)
    assert "instance_prompt" in line and "<2>" in line, f"dbl {said[1]}: {line}"


@pytest.mark.torch
def test_the_example_runs_as_written(tmp_path, monkeypatch, adapters):  # noqa: F811
    """The example, from the repository root after `dbl build projects/flow.toml`: here with random
    adapters put where that build writes them (so they load with a warning that they are stale)."""
    block = re.search(r"```python\n(.*?)```", _section(), re.S)[1]
    shutil.copytree(ROOT / "projects" / "flow", tmp_path / "projects" / "flow")
    shutil.copy(ROOT / "projects" / "flow.toml", tmp_path / "projects" / "flow.toml")
    for name, adapter in (("dog", adapters["a"]), ("toy", adapters["b"])):
        shutil.copytree(adapter, tmp_path / "projects" / "build" / "flow" / "adapters" / name)
    monkeypatch.chdir(tmp_path)
    done: dict = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="train:toy of projects/flow.toml is stale")
        exec(compile(block, "README.md (Python API)", "exec"), done)

    pipe, api = done["pipe"], done["api"]
    assert api.loaded_adapters(pipe) == ["dog", "toy", "toy_dog"]
    assert pipe.unet.active_adapters == ["toy_dog"] and pipe.text_encoder.active_adapters == ["toy_dog"]
    assert set(done["errors"]) == {"unet", "text_encoder"} and max(done["errors"].values()) < 1e-6
    assert done["image"].size == (64, 64)
