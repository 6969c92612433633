"""Model families: a family registered by a test runs every step, and other families are refused by name."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from runner import families
from runner.errors import ModelError
from runner.families.sd1 import SD1
from runner.fingerprint import FileHasher, base_model_identity, fingerprint
from runner.models import BaseModel
from tests.conftest import write_image


class Alias(SD1):
    """sd1 under another name, with its own built-in model (the tiny-sd recipe) and a kohya marker."""

    name = "alias"
    folder_classes = ()
    builtins = {"tiny-alias": {"prediction_type": "epsilon"}}
    calls: dict = {}

    def predict(self, modules, noisy, timesteps, prompts, batch, dtype, conditions=None):
        Alias.calls["predict"] = Alias.calls.get("predict", 0) + 1
        return super().predict(modules, noisy, timesteps, prompts, batch, dtype, conditions)

    def native_size(self, pipe) -> int:
        Alias.calls["native_size"] = Alias.calls.get("native_size", 0) + 1
        return super().native_size(pipe)

    def kohya_metadata(self, configs, denoiser_base):
        return {**super().kohya_metadata(configs, denoiser_base), "ss_base_model_version": "alias_v1"}


@pytest.fixture
def alias():
    family = families.register(Alias())
    Alias.calls.clear()
    yield family
    families.unregister("alias")


# --- the registry, without torch ---------------------------------------------------------------------


def test_importing_the_registry_loads_no_heavy_library():
    code = (
        "import sys, runner.families as f, runner.project, runner.fingerprint; "
        "assert f.builtin_names() == ('tiny-sd', 'tiny-sd-v', 'tiny-shapes', 'tiny-sdxl'), f.builtin_names(); "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_sd1_describes_its_components_for_project_validation():
    sd1 = families.get("sd1")
    assert [c.name for c in sd1.components] == ["unet", "text_encoder"]
    assert sd1.denoiser.name == "unet"
    assert families.lora_components("sd1") == [
        {"name": "unet", "rank_field": "rank", "gate": None},
        {"name": "text_encoder", "rank_field": "text_encoder_rank", "gate": "train_text_encoder"},
    ]
    assert sd1.kohya_name("text_encoder", "encoder.layers.0.self_attn.q_proj") == (
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    )


def test_an_unknown_family_is_checked_with_every_familys_components():
    """A hub model not in the cache: the equal-rank blend check compares every component any family has."""
    names = [c["name"] for c in families.lora_components(None)]
    assert names == ["unet", "text_encoder", "text_encoder_2"]
    assert families.lora_components(None)[2]["rank_fallback"] == "text_encoder_rank"


def test_sd1_identity_keeps_its_fingerprint_and_another_family_changes_it(tmp_path, alias):
    hasher = FileHasher()
    sd = base_model_identity(BaseModel.parse("tiny-sd", tmp_path), hasher)
    assert sd == {"builtin": "tiny-sd", "version": 1, "_family": "sd1"}
    assert fingerprint({"base_model": sd}) == fingerprint(
        {"base_model": {"builtin": "tiny-sd", "version": 1}}
    )
    other = base_model_identity(BaseModel.parse("tiny-alias", tmp_path), hasher)
    assert other == {"builtin": "tiny-alias", "version": 1, "family": "alias"}


def test_a_registered_family_makes_its_builtin_a_valid_base_model(tmp_path, alias):
    from runner.project.load import load_project
    from tests.conftest import write_image

    write_image(tmp_path / "dog" / "0.png")
    (tmp_path / "p.toml").write_text(
        '[project]\nbase_model = "tiny-alias"\n[subjects.dog]\nimages = "dog"\ninstance_prompt = "sks dog"\n'
    )
    assert load_project(tmp_path / "p.toml").settings.base_model == "tiny-alias"
    assert BaseModel.parse("tiny-alias", tmp_path).kind == "builtin"
    assert families.detect(BaseModel.parse("tiny-alias", tmp_path)) is alias


# --- detection and refusal ---------------------------------------------------------------------------


def _header_only_safetensors(path: Path, keys: list[str]) -> Path:
    """A .safetensors file whose header names `keys` (one float each): what detection reads."""
    header = {
        k: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, k in enumerate(keys)
    }
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * (4 * len(keys)))
    return path


@pytest.mark.parametrize(
    "cls, family",
    [
        ("StableDiffusion3Pipeline", "SD3"),
        ("FluxPipeline", "Flux"),
        ("StableDiffusionXLInpaintPipeline", "XL"),
    ],
)
def test_a_folder_of_another_family_is_refused_by_name(tmp_path, cls, family):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    base = BaseModel.parse(str(tmp_path), tmp_path)
    with pytest.raises(ModelError, match=f"{cls} \\({family}\\); this model family is not supported yet"):
        families.detect(base)
    from runner.models import load_pipeline

    with pytest.raises(ModelError, match="not supported yet"):
        load_pipeline(base)


@pytest.mark.parametrize(
    "index",
    [
        {"_class_name": "KandinskyPipeline", "unet": ["diffusers", "UNet2DConditionModel"], "movq": ["", ""]},
        {"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]},
    ],
)
def test_a_folder_of_a_pipeline_dbl_does_not_know_is_refused_by_name(tmp_path, index):
    """It planned as sd1, and the build failed in diffusers ("expected [...] but only {...} were passed")."""
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=f"is a {index['_class_name']}, without the .*not supported yet"):
        families.detect(BaseModel.parse(str(tmp_path), tmp_path))


def test_a_model_index_that_is_not_a_json_object_is_a_clear_error(tmp_path):
    (tmp_path / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="model_index.json is not a diffusers model index .* a JSON list"):
        families.detect(BaseModel.parse(str(tmp_path), tmp_path))


@pytest.mark.parametrize(
    "keys, family",
    [
        (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "text_encoders.clip_l.x"], "SD3"),
        (["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"], "Flux"),
        (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "Flux"),
    ],
)
def test_a_single_file_of_another_family_is_refused_by_name(tmp_path, keys, family):
    path = _header_only_safetensors(tmp_path / "model.safetensors", keys)
    with pytest.raises(ModelError, match=f"is a {family} checkpoint; this model family is not supported yet"):
        families.detect(BaseModel.parse(str(path), tmp_path))


def test_an_sdxl_refiner_is_refused_by_name(tmp_path):
    """It has no first text encoder: it planned as SDXL, and a train step failed with an AttributeError."""
    index = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline",
        "text_encoder": [None, None],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "requires_aesthetics_score": True,
    }
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="is an SDXL refiner .*; dbl trains on SDXL base models"):
        families.detect(BaseModel.parse(str(tmp_path), tmp_path))
    refiner_file = [
        "model.diffusion_model.label_emb.0.0.weight",
        "conditioner.embedders.0.model.ln_final.weight",
    ]
    path = _header_only_safetensors(tmp_path / "refiner.safetensors", refiner_file)
    with pytest.raises(ModelError, match="is an SDXL refiner"):
        families.detect(BaseModel.parse(str(path), tmp_path))
    base_file = [*refiner_file, "conditioner.embedders.1.model.ln_final.weight"]
    path = _header_only_safetensors(tmp_path / "base.safetensors", base_file)
    assert families.detect(BaseModel.parse(str(path), tmp_path)).name == "sdxl"


@pytest.mark.parametrize(
    "keys",
    [
        ["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight", "lora_te_x.alpha"],  # kohya
        ["unet.mid_block.attentions.0.to_q.lora_A.weight", "text_encoder.x.lora_B.weight"],  # diffusers
    ],
)
def test_a_lora_file_given_as_the_base_model_is_refused_by_name(tmp_path, keys):
    """CivitAI serves checkpoints and LoRAs alike as .safetensors; a LoRA failed only once a build ran."""
    path = _header_only_safetensors(tmp_path / "style.safetensors", keys)
    with pytest.raises(ModelError, match="style.safetensors is a LoRA adapter file .*not a model checkpoint"):
        families.detect(BaseModel.parse(str(path), tmp_path))


def test_a_folder_without_model_index_is_a_project_file_error(tmp_path):
    from runner.project import ProjectError, load_project

    (tmp_path / "img").mkdir()
    write_image(tmp_path / "img" / "0.png")
    (tmp_path / "adapters" / "dog" / "unet").mkdir(parents=True)
    (tmp_path / "adapters" / "dog" / "unet" / "adapter_config.json").write_text("{}")
    (tmp_path / "peft").mkdir()  # one module's PEFT folder, as PeftModel.save_pretrained writes it
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    for base, what in (
        ("img", "not a diffusers folder"),
        ("adapters/dog", "a LoRA adapter folder"),
        ("peft", "a LoRA adapter folder"),
    ):
        path = tmp_path / "p.toml"
        path.write_text(
            f'[project]\nbase_model = "./{base}"\n[subjects.dog]\nimages = "img"\ninstance_prompt = "sks"\n'
        )
        with pytest.raises(
            ProjectError, match=f"project.base_model: .*{base} is {what} \\(it has no model_index"
        ):
            load_project(path)


def test_sd1_files_and_folders_are_sd1(tmp_path):
    path = _header_only_safetensors(
        tmp_path / "v15.safetensors",
        ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.x"],
    )
    assert families.detect(BaseModel.parse(str(path), tmp_path)).name == "sd1"
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert families.detect(BaseModel.parse(str(tmp_path / "folder"), tmp_path)).name == "sd1"


def test_sdxl_files_and_folders_are_sdxl(tmp_path):
    path = _header_only_safetensors(
        tmp_path / "xl.safetensors",
        ["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.1.model.ln_final.weight"],
    )
    assert families.detect(BaseModel.parse(str(path), tmp_path)).name == "sdxl"
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    assert families.detect(BaseModel.parse(str(tmp_path / "folder"), tmp_path)).name == "sdxl"


@pytest.mark.parametrize(
    "cls, addition, said",
    [
        ("StableDiffusionPipeline", "text_time", "'text_time', as sdxl models have; fix _class_name in"),
        ("StableDiffusionXLPipeline", None, "None, as sd1 models have; fix _class_name in"),
    ],
)
def test_a_folder_whose_index_names_another_family_than_its_unet_is_refused(tmp_path, cls, addition, said):
    """An SDXL UNet under a StableDiffusionPipeline index trained as sd1 and failed in diffusers
    ("argument of type 'NoneType' is not iterable"); the index is what to fix."""
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": addition}))
    with pytest.raises(ModelError, match="has addition_embed_type ") as err:
        families.detect(BaseModel.parse(str(tmp_path), tmp_path))
    assert said in str(err.value)
    (tmp_path / "unet" / "config.json").write_text("{not json")  # left to the loading, which names it
    assert families.detect(BaseModel.parse(str(tmp_path), tmp_path)).pipeline_class == cls


def test_a_cached_hub_model_of_another_family_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    for name, cls in (("sd3", "StableDiffusion3Pipeline"), ("xl", "StableDiffusionXLPipeline")):
        repo = tmp_path / f"models--owner--{name}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("a" * 40)
        (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
        (repo / "snapshots" / ("a" * 40) / "model_index.json").write_text(f'{{"_class_name": "{cls}"}}')
    with pytest.raises(ModelError, match="owner/sd3 is a StableDiffusion3Pipeline"):
        families.detect(BaseModel.parse("owner/sd3", tmp_path))
    assert families.detect(BaseModel.parse("owner/xl", tmp_path)).name == "sdxl"
    assert families.detect(BaseModel.parse("owner/not-cached", tmp_path)).name == "sd1"


@pytest.mark.torch
def test_an_adapter_with_a_component_the_model_lacks_is_refused(tmp_path):
    from runner.adapters import AdapterError
    from runner.pipeline_adapters import load_adapter_into
    from tests.steps_fixtures import model_cache

    for component in ("unet", "text_encoder_2"):
        (tmp_path / component).mkdir()
        (tmp_path / component / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterError, match="has text_encoder_2, which a sd1 base model does not have"):
        load_adapter_into(model_cache().pipeline(), tmp_path, "xl")


# --- a test family through the steps ------------------------------------------------------------------


@pytest.mark.torch
def test_a_family_registered_by_a_test_trains_blends_and_renders(tmp_path, alias):
    from runner.adapters import read_safetensors
    from runner.models import ModelCache
    from runner.steps import train
    from tests.blend_fixtures import run_blend, run_render
    from tests.steps_fixtures import draw_images, make_subject, train_context

    models = ModelCache(BaseModel.parse("tiny-alias", tmp_path), "cpu", "no")
    assert models.family is alias
    instance = draw_images(tmp_path / "dog", 2, size=(64, 64))
    outs = {}
    for name, seed in (("dog", 0), ("cat", 1)):
        ctx = train_context(tmp_path / name, make_subject(instance, train=dict(steps=2)), seed=seed)
        ctx.models = models
        train.run(ctx)
        outs[f"train:{name}"] = ctx.out
    assert alias.calls["predict"] == 4
    assert type(models.pipeline()).__name__ == "StableDiffusionPipeline"

    blend = run_blend(tmp_path, "mix", {"dog": 1.0, "cat": 0.5}, outs, models=models)
    for folder in (outs["train:dog"], blend):
        _, metadata = read_safetensors(
            next(p for p in folder.glob("*.safetensors") if p.name != "pytorch_lora_weights.safetensors")
        )
        assert metadata["ss_base_model_version"] == "alias_v1"
    assert sorted(json.loads((blend / "dbl.json").read_text())["rank"]) == ["text_encoder", "unet"]

    render = run_render(tmp_path, "r", "mix", {"blend:mix": blend}, models=models)
    assert (render / "0-0.png").is_file() and (render / "grid.png").is_file()
    assert alias.calls["native_size"] == 1


ALIAS_PROJECT = """
[project]
base_model = "tiny-alias"
device = "cpu"

[train]
resolution = 64
steps = 2
checkpoint_every = 0

[lora]
rank = 4
alpha = 8
text_encoder_rank = 2
text_encoder_alpha = 3

[subjects.dog]
images = "dog"
instance_prompt = "a photo of sks dog"

[subjects.toy]
images = "dog"
instance_prompt = "a toy in the style of <1>"

[blends.toy_dog]
adapters = { toy = 1.0, dog = 0.5 }

[renders.dog]
adapter = "toy_dog"
prompts = ["sks dog"]
steps = 2
seeds = [0]
"""


@pytest.mark.torch
def test_a_family_registered_by_a_test_builds_a_project(tmp_path, alias):
    from runner import executor
    from runner.events import FRESH
    from runner.project import load_project
    from tests.conftest import Recorder, write_image

    for i in range(2):
        write_image(tmp_path / "dog" / f"{i}.png", seed=i, size=64)
    (tmp_path / "p.toml").write_text(ALIAS_PROJECT)
    result = executor.build(load_project(tmp_path / "p.toml"), executor.BuildOptions(), Recorder())
    assert result.ok, [(s.id, s.error) for s in result.steps if s.error]
    out = tmp_path / "build" / "p"
    assert (out / "blends" / "toy_dog" / "text_encoder" / "adapter_model.safetensors").is_file()
    assert (out / "renders" / "dog" / "grid.png").is_file()
    assert alias.calls["predict"] == 4 and alias.calls["native_size"] == 1
    assert 'family = "alias"' in (tmp_path / "p.lock").read_text()  # part of the identity, unlike sd1's
    again = executor.build(load_project(tmp_path / "p.toml"), executor.BuildOptions(), Recorder())
    assert all(s.status == FRESH for s in again.steps)
