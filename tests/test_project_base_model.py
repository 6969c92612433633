"""Project files and their base model: `base_model`, `base_model_config` and `revision`, checked as the file
is loaded."""

from __future__ import annotations

import pytest

from runner.project import load_project
from tests.project_fixtures import GOOD, folder, problems  # noqa: F401 (a fixture)
from tests.single_file import keys_only_file

SD1_KEYS = ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.x"]


@pytest.mark.parametrize(
    "base, config, index, expected",
    [
        (
            "tiny-sd",
            "cfg",
            {"_class_name": "StableDiffusionPipeline"},
            "project.base_model_config: applies to a single-file base_model only; 'tiny-sd' is a built-in "
            "model, which has its own configs (line 4) - remove base_model_config",
        ),
        (
            "model.safetensors",
            "./nope",
            None,
            "project.base_model_config: no such folder: {folder}/nope (line 4) - give the diffusers folder that "
            "holds model_index.json, unet/, text_encoder/ ..., or a hub id",
        ),
        (
            "model.safetensors",
            "cfg",
            None,
            "project.base_model_config: {folder}/cfg is not a diffusers folder (it has no model_index.json) "
            "(line 4) - give the diffusers folder that holds model_index.json, unet/, text_encoder/ ..., or a hub id",
        ),
        (
            "model.safetensors",
            "cfg",
            {"_class_name": "StableDiffusionXLPipeline"},
            "project.base_model_config: {folder}/cfg describes a sdxl model, but base_model "
            "{folder}/model.safetensors is sd1 (line 4) - give the diffusers folder of a sd1 model",
        ),
    ],
    ids=["not a single file", "no such folder", "not a diffusers folder", "another family"],
)
def test_base_model_config_problems(folder, base, config, index, expected):  # noqa: F811
    import json

    keys_only_file(folder / "model.safetensors", SD1_KEYS)
    (folder / "cfg").mkdir()
    if index is not None:
        (folder / "cfg" / "model_index.json").write_text(json.dumps(index))
    text = GOOD.replace('base_model = "tiny-sd"', f'base_model = "{base}"\nbase_model_config = "{config}"')
    assert problems(folder, text) == [expected.format(folder=folder)]


@pytest.mark.parametrize(
    "base, kind", [("tiny-sd", "a built-in model"), ("model.safetensors", "a single-file checkpoint")]
)
def test_a_revision_of_a_base_model_not_on_the_hub_loads_with_a_warning_naming_its_line(folder, base, kind):  # noqa: F811
    # Was ignored without a word: the revision names a commit of a hub model, and no other has one.
    keys_only_file(folder / "model.safetensors", SD1_KEYS)
    path = folder / "p.toml"
    path.write_text(GOOD.replace('base_model = "tiny-sd"', f'base_model = "{base}"\nrevision = "v2"'))
    with pytest.warns(UserWarning) as warned:
        project = load_project(path)  # a project built with it must still load
    assert [str(w.message) for w in warned] == [
        f"{path}: project.revision: applies to a hub base_model only; '{base}' is {kind}: it is ignored "
        "(line 4) - remove revision (nothing rebuilds)"
    ]
    assert project.settings.revision == "v2"


def test_a_revision_of_a_hub_model_loads_without_a_word(folder):  # noqa: F811
    import warnings

    path = folder / "p.toml"
    path.write_text(GOOD.replace('base_model = "tiny-sd"', 'base_model = "owner/model"\nrevision = "v2"'))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_project(path).settings.revision == "v2"


def test_base_model_config_of_a_single_file_resolves_to_its_folder(folder):  # noqa: F811
    import json

    from runner.models import BaseModel

    keys_only_file(folder / "model.safetensors", SD1_KEYS)
    (folder / "cfg").mkdir()
    (folder / "cfg" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    path = folder / "p.toml"
    path.write_text(GOOD.replace('"tiny-sd"', '"model.safetensors"\nbase_model_config = "cfg"'))
    project = load_project(path)
    base = BaseModel.of(project.settings, project.dir)
    assert (base.kind, base.config) == ("file", str(folder / "cfg"))
    path.write_text(
        GOOD.replace('"tiny-sd"', '"model.safetensors"\nbase_model_config = "owner/sd15-configs"')
    )
    assert BaseModel.of(load_project(path).settings, folder).config == "owner/sd15-configs"


@pytest.mark.parametrize(
    "keys, kind",
    [
        (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "text_encoders.clip_l.x"], "SD3"),
        (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "Flux"),
    ],
)
def test_a_single_file_of_another_family_is_a_project_file_error(folder, keys, kind):  # noqa: F811
    keys_only_file(folder / "model.safetensors", keys)
    found = problems(folder, GOOD.replace('"tiny-sd"', '"model.safetensors"'))
    assert found == [
        f"project.base_model: base model {folder}/model.safetensors is a {kind} checkpoint; this model family "
        "is not supported yet (supported: sd1, sdxl, i.e. Stable Diffusion 1.x, 2.x and SDXL) (line 3) - use a "
        "Stable Diffusion 1.x, 2.x or SDXL model"
    ]


def test_a_hub_id_longer_than_the_hub_allows_is_no_hub_id(folder):  # noqa: F811
    # Each part under the file system's limit, but its cache folder (models--owner--name) over it.
    hub_id = f"{'o' * 127}/{'n' * 127}"
    found = problems(folder, GOOD.replace('base_model = "tiny-sd"', f'base_model = "{hub_id}"'))
    assert found == [
        f"project.base_model: '{hub_id}' is neither a folder nor a hub id (owner/name) (line 3) - check the path or id"
    ]


@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_base_model_is_said_to_be_empty(folder, value):  # noqa: F811
    # Read as a path, it named the project's own folder: "<folder> is not a diffusers folder".
    found = problems(folder, GOOD.replace('base_model = "tiny-sd"', f'base_model = "{value}"'))
    assert found == [
        "project.base_model: is empty (line 3) - name the model the adapters train on: a hub id, a local diffusers "
        "folder, a single-file checkpoint or a built-in (tiny-sd, tiny-sd-v, tiny-shapes, tiny-sdxl)"
    ]


GIVE = "give the base model the adapters train on: a single-file checkpoint, a diffusers folder or a hub id"


@pytest.mark.parametrize("name", ["p.toml", "data/dog/00.png", "model"])
def test_a_file_that_is_no_checkpoint_is_said_to_be_none(folder, name):  # noqa: F811
    """The project file, a photo, a file of text: each passed the plan, and the train step failed with
    diffusers' words about configs on the hub."""
    if name == "model":
        (folder / "model").write_text("not weights")
    found = problems(folder, GOOD.replace('base_model = "tiny-sd"', f'base_model = "{name}"'))
    assert found == [
        f"project.base_model: {folder / name} is not a model checkpoint (.safetensors, .ckpt ...) (line 3) - {GIVE}"
    ]


def test_a_checkpoint_named_without_its_suffix_still_loads(folder):  # noqa: F811
    """A file whose bytes begin as a checkpoint does (a safetensors header, torch.save's zip, a pickle)
    names a single-file model, as it always has."""
    from tests.project_fixtures import write_project

    for head in (b"\x10\x00\x00\x00\x00\x00\x00\x00{}", b"PK\x03\x04", b"\x80\x02"):
        (folder / "model").write_bytes(head + b"\0" * 16)
        project = load_project(
            write_project(folder, GOOD.replace('base_model = "tiny-sd"', 'base_model = "model"'))
        )
        assert project.settings.base_model == "model"


def test_a_base_model_that_is_no_regular_file_is_said_to_be_none(folder):  # noqa: F811
    found = problems(folder, GOOD.replace('base_model = "tiny-sd"', 'base_model = "/dev/null"'))
    assert found == [f"project.base_model: /dev/null is not a regular file (line 3) - {GIVE}"]


@pytest.mark.parametrize("value", ["tiny-sd ", " runwayml/stable-diffusion-v1-5"])
def test_a_name_with_spaces_around_it_says_the_name_without(folder, value):  # noqa: F811
    # It failed in the train step: `HFValidationError: Repo id must use alphanumeric chars ...: 'tiny-sd '`.
    found = problems(folder, GOOD.replace('base_model = "tiny-sd"', f'base_model = "{value}"'))
    assert found == [
        f"project.base_model: '{value}' has spaces around the name (line 3) - base_model = \"{value.strip()}\""
    ]


@pytest.mark.parametrize("value", ["my org/my model", "owner/name?rev=1", "a/b/c"])
def test_a_name_no_hub_id_can_be_is_no_hub_id(folder, value):  # noqa: F811
    found = problems(folder, GOOD.replace('base_model = "tiny-sd"', f'base_model = "{value}"'))
    assert found == [
        f"project.base_model: '{value}' is neither a folder nor a hub id (owner/name) (line 3) - check the path or id"
    ]


@pytest.mark.parametrize(
    "value, meant", [("tiny_sdxl", "tiny-sdxl"), ("Tiny-SD", "tiny-sd"), ("tiny-shape", "tiny-shapes")]
)
def test_a_mistyped_built_in_name_says_which_it_looks_like(folder, value, meant, monkeypatch, tmp_path):  # noqa: F811
    """It planned as a hub id without an owner, and the build failed: not in the Hugging Face cache. A model
    of that name in the cache is one, and plans."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    found = problems(folder, GOOD.replace('base_model = "tiny-sd"', f'base_model = "{value}"'))
    assert found == [
        f"project.base_model: '{value}' is not a built-in model, nor a hub model in the local cache (a hub id has "
        f'an owner: owner/name) (line 3) - did you mean base_model = "{meant}"?'
    ]
    snapshot = tmp_path / "hub" / f"models--{value}" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (tmp_path / "hub" / f"models--{value}" / "refs").mkdir()
    (tmp_path / "hub" / f"models--{value}" / "refs" / "main").write_text("abc")
    from tests.project_fixtures import write_project

    project = load_project(
        write_project(folder, GOOD.replace('base_model = "tiny-sd"', f'base_model = "{value}"'))
    )
    assert project.settings.base_model == value


def test_a_built_in_name_as_a_single_file_s_config_is_refused_at_plan_time(folder):  # noqa: F811
    """It planned, and the build tried the hub for 'tiny-sdxl'."""
    keys_only_file(folder / "model.safetensors", ["model.diffusion_model.input_blocks.0.0.weight"])
    found = problems(
        folder, GOOD.replace('"tiny-sd"', '"model.safetensors"\nbase_model_config = "tiny-sdxl"')
    )
    assert found == [
        "project.base_model_config: 'tiny-sdxl' is a built-in model, which describes only itself: a single file's "
        "config is read from a diffusers folder or a hub model (line 4) - give the diffusers folder that holds "
        "model_index.json, unet/, text_encoder/ ..., or a hub id"
    ]
