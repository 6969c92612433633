"""`dbl build` from a single-file SDXL checkpoint, offline: base_model_config names a diffusers folder whose
configs and tokenizers describe the file's components."""

from __future__ import annotations

import os

import pytest

from runner import lockfile
from tests.conftest import write_image

pytestmark = pytest.mark.torch

PROJECT = """
[project]
base_model = "model.safetensors"
base_model_config = "configs"

[train]
resolution = 64
steps = 2
checkpoint_every = 0

[lora]
rank = 2
alpha = 2
text_encoder_rank = 2
text_encoder_alpha = 2

[subjects.dog]
images = "dog"
instance_prompt = "a photo of sks dog"

[renders.park]
adapter = "dog"
prompts = ["sks dog in a park"]
steps = 2
"""


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    """A tiny SDXL model as a diffusers folder, and the same model as a single file in the original layout."""
    from diffusers import StableDiffusionXLPipeline

    from tests.single_file import build_wide_tiny_sdxl, save_single_file

    root = tmp_path_factory.mktemp("sdxl-file")
    build_wide_tiny_sdxl(root / "configs")
    save_single_file(StableDiffusionXLPipeline.from_pretrained(root / "configs"), root / "model.safetensors")
    return root


def _project(folder, single_file, text=PROJECT):
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(single_file / "configs", folder / "configs")
    shutil.copyfile(single_file / "model.safetensors", folder / "model.safetensors")
    (folder / "p.toml").write_text(text)
    for i in range(2):
        write_image(folder / "dog" / f"{i}.png", seed=i, size=64)
    return folder


def _dbl(*args, cwd):
    from tests.real_builds import dbl

    os.environ["HF_HUB_OFFLINE"] = "1"  # the subprocess inherits it: nothing may come from the hub
    try:
        return dbl(*args, cwd=cwd)
    finally:
        del os.environ["HF_HUB_OFFLINE"]


def test_a_single_file_sdxl_checkpoint_builds_offline_with_its_configs(tmp_path, single_file):
    folder = _project(tmp_path / "p", single_file)
    done = _dbl("build", "p.toml", "--no-progress", cwd=folder)
    assert done.returncode == 0, done.stdout + done.stderr
    out = folder / "build" / "p"
    adapter = out / "adapters" / "dog"
    assert {p.name for p in adapter.iterdir() if p.is_dir()} == {"unet", "text_encoder", "text_encoder_2"}
    assert (adapter / "dog.safetensors").is_file() and (out / "renders" / "park" / "0-0.png").is_file()
    base = lockfile.read(folder / "p.lock")["train:dog"]["inputs"]["base_model"]
    assert base["family"] == "sdxl" and "file_sha256" in base
    assert set(base["config"]) == {"folder_sha256"}

    again = _dbl("plan", "p.toml", cwd=folder)
    assert again.returncode == 0 and "stale" not in again.stdout, again.stdout
    config = folder / "configs" / "scheduler" / "scheduler_config.json"
    config.touch()  # same content: still fresh
    assert "stale" not in _dbl("plan", "p.toml", cwd=folder).stdout
    config.write_text(config.read_text() + "\n")  # the configs are part of the base model's identity
    plan = _dbl("plan", "p.toml", cwd=folder).stdout
    assert "train:dog" in plan and "render:park" in plan and "stale" in plan, plan


def test_the_api_loads_a_single_file_with_its_configs(single_file):
    from runner import api

    pipe = api.load_pipeline(
        str(single_file / "model.safetensors"), device="cpu", base_model_config=single_file / "configs"
    )
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.text_encoder_2.config.hidden_size == 48


def test_without_its_configs_the_error_names_the_key(tmp_path, single_file):
    folder = _project(tmp_path / "p", single_file, PROJECT.replace('base_model_config = "configs"\n', ""))
    done = _dbl("build", "p.toml", "--no-progress", cwd=folder)
    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert "FAILED" in output and "set base_model_config in [project]" in output, output
