"""The notebook API: load adapters by path, switch between them, blend them, and fail loudly."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from runner import api
from tests.blend_fixtures import adapters  # noqa: F401

pytestmark = pytest.mark.torch


def _image(pipe, seed=0):
    import torch

    out = pipe(
        "a photo of sks dog",
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return out.images[0]


def test_two_adapters_switch_and_blend(adapters):  # noqa: F811
    pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"], "b": adapters["b"]}, device="cpu")
    assert api.loaded_adapters(pipe) == ["a", "b"]
    assert pipe.unet.active_adapters == ["b"]  # the last one loaded, as with diffusers

    api.set_adapter(pipe, "a")
    assert pipe.unet.active_adapters == ["a"] and pipe.text_encoder.active_adapters == ["a"]
    image_a = _image(pipe)
    only_a = api.load_pipeline("tiny-sd", {"a": adapters["a"]}, device="cpu")
    assert np.array_equal(image_a, _image(only_a))
    api.set_adapter(pipe, "b")
    assert np.abs(_image(pipe) - image_a).mean() > 1e-3

    errors = api.blend(pipe, {"a": 1.0, "b": 0.5}, "ab")
    assert set(errors) == {"unet", "text_encoder"} and max(errors.values()) < 1e-6
    assert pipe.unet.active_adapters == ["ab"]  # activated, unlike PEFT's add_weighted_adapter
    blended = _image(pipe)
    api.set_adapter(pipe, ["a", "b"], weights=[1.0, 0.5])  # the same sum, in the forward pass
    assert np.abs(_image(pipe) - blended).max() < 1e-4

    lossy = api.blend(pipe, {"a": 1.0, "b": 1.0}, "ab_low", method="svd", svd_rank=1, activate=False)
    assert min(lossy.values()) > 0.01
    assert pipe.unet.active_adapters == ["a", "b"]

    api.set_adapter(pipe, None)
    import torch

    base = api.load_pipeline("tiny-sd", device=torch.device("cpu"))  # a torch.device as well as a name
    assert np.array_equal(_image(pipe), _image(base))


def test_a_blend_is_of_the_adapters_as_trained_whatever_set_adapter_did(adapters):  # noqa: F811
    pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"], "b": adapters["b"]}, device="cpu")
    api.blend(pipe, {"a": 1.0, "b": 0.5}, "clean")
    clean = _image(pipe)
    api.set_adapter(pipe, ["a", "b"], weights=[1.0, 1.5], scale=0.5)
    weighted = _image(pipe)
    errors = api.blend(pipe, {"a": 1.0, "b": 0.5}, "after", activate=False)
    assert max(errors.values()) < 1e-6
    assert np.array_equal(_image(pipe), weighted)  # the activation's weights are back
    api.set_adapter(pipe, "after")
    assert np.abs(_image(pipe) - clean).max() < 1e-5

    api.set_adapter(pipe, "a", scale=0.0)
    api.blend(pipe, {"a": 1.0}, "a_only")
    only_a = api.load_pipeline("tiny-sd", {"a": adapters["a"]}, device="cpu")
    assert np.abs(_image(pipe) - _image(only_a)).max() < 1e-5


def test_names_are_checked(adapters):  # noqa: F811
    pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"], "b": adapters["b"]}, device="cpu")
    with pytest.raises(ValueError, match="no adapter named 'dog' is loaded; loaded: a, b"):
        api.set_adapter(pipe, "dog")
    with pytest.raises(ValueError, match="loaded: a, b"):
        api.blend(pipe, {"a": 1.0, "dog": 1.0}, "mix")
    api.blend(pipe, {"a": 1.0, "b": 1.0}, "mix")
    with pytest.raises(ValueError, match="already loaded"):
        api.blend(pipe, {"a": 1.0, "b": 2.0}, "mix")  # PEFT would silently keep the old one
    with pytest.raises(ValueError, match="already loaded"):
        api.load_adapter(pipe, adapters["b"], "a")
    api.load_adapter(pipe, adapters["c"], "c")
    with pytest.raises(ValueError, match="one rank"):
        api.blend(pipe, {"a": 1.0, "c": 1.0}, "bad", method="linear")
    with pytest.raises(ValueError, match="density"):
        api.blend(pipe, {"a": 1.0, "b": 1.0}, "bad", method="ties")
    assert "bad" not in api.loaded_adapters(pipe)


def test_an_adapter_without_text_encoder_leaves_it_alone(adapters):  # noqa: F811
    pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"], "c": adapters["c"]}, device="cpu")
    api.set_adapter(pipe, "c")
    assert all(layer.disable_adapters for layer in api._lora_layers(pipe.text_encoder))
    base = api.load_pipeline("tiny-sd", device="cpu")
    ids = base.tokenizer("a photo of sks dog", return_tensors="pt").input_ids
    assert np.array_equal(
        pipe.text_encoder(ids)[0].detach().numpy(), base.text_encoder(ids)[0].detach().numpy()
    )


def test_a_mismatched_adapter_raises(tmp_path, adapters):  # noqa: F811
    from runner.adapters import PEFT_WEIGHTS, read_safetensors, write_safetensors

    bad = tmp_path / "bad"
    shutil.copytree(adapters["a"], bad)
    path = bad / "unet" / PEFT_WEIGHTS
    tensors, metadata = read_safetensors(path)
    tensors = {k.replace("down_blocks.1", "down_blocks.7"): v for k, v in tensors.items()}
    write_safetensors(path, tensors, metadata)

    pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"]}, device="cpu")
    with pytest.raises(ValueError, match="match no module"):
        api.load_adapter(pipe, bad, "bad")
    assert api.loaded_adapters(pipe) == ["a"]
    with pytest.raises(ValueError, match="a folder of adapters, not one; name one of them: bad"):
        api.load_adapter(pipe, tmp_path, "nothing")
    kohya = adapters["a"] / "a.safetensors"
    with pytest.raises(
        ValueError, match=re.escape(f"a single file; load the adapter folder that holds it, {adapters['a']}")
    ):
        api.load_adapter(pipe, kohya, "kohya")
    shutil.copy(kohya, tmp_path / "lora.safetensors")
    with pytest.raises(ValueError, match="a single file; the API loads adapter folders"):
        api.load_adapter(pipe, tmp_path / "lora.safetensors", "kohya")
    (tmp_path / "p.toml").write_text("")
    with pytest.raises(ValueError, match="a project file; name one of its adapters, .*p.toml:<subject"):
        api.load_adapter(pipe, tmp_path / "p.toml", "p")


def test_an_sd1_adapter_on_an_sdxl_pipeline_says_which_base_model_it_was_trained_on(adapters):  # noqa: F811
    """It said only "does not fit the unet (size mismatch for ...)"."""
    pipe = api.load_pipeline("tiny-sdxl", device="cpu")
    with pytest.raises(
        ValueError, match="trained on a different base model\\? Its adapter_config.json names tiny-sd$"
    ):
        api.load_adapter(pipe, adapters["c"], "sd1")
    assert api.loaded_adapters(pipe) == []


@pytest.mark.parametrize("where", ["fresh pipeline", "beside another adapter"])
@pytest.mark.parametrize("config", ["target modules of another model", "a JSON list"])
def test_a_config_that_does_not_fit_names_its_file(tmp_path, adapters, where, config):  # noqa: F811
    """PEFT's own ValueError ("Target modules {...} not found in the base model") named no file, and a
    config that is no JSON object failed with an AttributeError."""
    import json

    bad = tmp_path / "bad"
    shutil.copytree(adapters["a"], bad)
    path = bad / "text_encoder" / "adapter_config.json"
    if config.startswith("target"):
        path.write_text(json.dumps(json.loads(path.read_text()) | {"target_modules": ["to_q", "to_k"]}))
        expected = re.escape(f"{bad / 'text_encoder'}: does not fit the text_encoder (Target modules")
    else:
        path.write_text("[]")
        expected = re.escape(f"{path}: not a LoRA config")
    before = {"a": adapters["a"]} if where.startswith("beside") else {}
    pipe = api.load_pipeline("tiny-sd", before, device="cpu")
    with pytest.raises(ValueError, match=expected):
        api.load_adapter(pipe, bad, "bad")
    assert api.loaded_adapters(pipe) == list(before)


def _lora_layer_count(module) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in module.modules())


@pytest.mark.parametrize("where", ["fresh pipeline", "beside another adapter"])
@pytest.mark.parametrize("damage", ["truncated text encoder weights", "unet weights of another shape"])
def test_a_load_that_fails_leaves_the_pipeline_as_it_was(tmp_path, adapters, where, damage):  # noqa: F811
    import torch

    from runner.adapters import PEFT_WEIGHTS, read_safetensors, write_safetensors

    bad = tmp_path / "bad"
    shutil.copytree(adapters["a"], bad)
    if damage.startswith("truncated"):
        path = bad / "text_encoder" / PEFT_WEIGHTS
        path.write_bytes(path.read_bytes()[:100])
        expected = re.escape(f"{path}: not a readable safetensors file")
    else:
        path = bad / "unet" / PEFT_WEIGHTS
        tensors, metadata = read_safetensors(path)
        tensors = {k: torch.cat([v, v]) if "lora_A" in k else v for k, v in tensors.items()}
        write_safetensors(path, tensors, metadata)
        expected = re.escape(f"{bad / 'unet'}: does not fit the unet (") + ".*size mismatch"
    before = {"a": adapters["a"]} if where.startswith("beside") else {}
    pipe = api.load_pipeline("tiny-sd", before, device="cpu")
    layers = (_lora_layer_count(pipe.unet), _lora_layer_count(pipe.text_encoder))
    with pytest.raises(ValueError, match=expected):
        api.load_adapter(pipe, bad, "bad")
    assert api.loaded_adapters(pipe) == list(before)
    assert (_lora_layer_count(pipe.unet), _lora_layer_count(pipe.text_encoder)) == layers
    if not before:  # the plain modules, with no LoRA layer left inside them
        assert type(pipe.unet).__name__ == "UNet2DConditionModel" and layers == (0, 0)
        assert type(pipe.text_encoder).__name__ == "CLIPTextModel"


def test_bad_arguments_raise_value_errors_that_say_what_to_give(tmp_path, adapters):  # noqa: F811
    pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"], "b": adapters["b"]}, device="cpu")
    nan, inf = float("nan"), float("inf")
    calls = [
        (lambda: api.load_adapter(pipe, adapters["a"], "dog.v2"), "cannot name an adapter"),
        (lambda: api.load_adapter(pipe, adapters["a"], ""), "cannot name an adapter"),
        (lambda: api.blend(pipe, {"a": 1.0, "b": 1.0}, None), "cannot name an adapter"),
        (lambda: api.blend(pipe, {"a": 1.0, "b": 1.0}, 3), "cannot name an adapter"),
        (lambda: api.blend(pipe, {"a": nan}, "n"), "blend weights must be finite numbers; got nan"),
        (lambda: api.blend(pipe, ["a", "b"], "n"), "weights maps adapter names to weights"),
        (lambda: api.blend(pipe, {"a": 1.0, "b": 1.0}, "n", method="svd", svd_rank=0), "svd_rank must be"),
        (
            lambda: api.blend(pipe, {"a": 1.0, "b": 1.0}, "n", method="svd", svd_clamp=5),
            "svd_clamp is a quantile, from 0 to 1",
        ),
        (
            lambda: api.blend(pipe, {"a": 1.0, "b": 1.0}, "n", "ties", density=0.5, majority_sign_method="x"),
            "majority_sign_method 'x' is not one of total, frequency",
        ),
        (
            lambda: api.blend(pipe, {"a": 1.0, "b": 1.0}, "n", density=0.5),
            "density does not apply to method 'cat'; methods that use it: ties, ",
        ),
        (
            lambda: api.blend(pipe, {"a": 1.0, "b": 1.0}, "n", "linear", svd_rank=2),
            "svd_rank applies to svd methods only, not 'linear'; svd methods: svd, ties_svd, ",
        ),
        (
            lambda: api.blend(pipe, {"a": 1.0, "b": 1.0}, "n", svd_clamp=0.9),
            "svd_clamp applies to svd methods only, not 'cat'",
        ),
        (lambda: api.set_adapter(pipe, 5), "name the adapters with a string or a list of strings"),
        (lambda: api.set_adapter(pipe, ["a", "a"]), "'a' named twice"),
        (lambda: api.set_adapter(pipe, "a", weights=0.5), "weights must be a list of numbers"),
        (lambda: api.set_adapter(pipe, "a", weights=[inf]), "weights must be finite numbers; got inf"),
        (lambda: api.set_adapter(pipe, "a", scale=nan), "scale must be finite numbers; got nan"),
        (lambda: api.unload_adapter(pipe, "ghost"), "no adapter named 'ghost' is loaded; loaded: a, b"),
        (lambda: api.unload_adapter(pipe, None), "no adapter named None is loaded"),
        (lambda: api.load_adapter(pipe, tmp_path / "nope.toml:dog", "x"), "no such project file"),
        (lambda: api.load_pipeline("tiny-sd", device="tpu"), "unknown device 'tpu'"),
        (
            lambda: api.load_pipeline(f"{tmp_path}/models/sd15"),
            f"no such file or folder: {tmp_path}/models/sd15",
        ),
        (lambda: api.load_pipeline("./no-such-model", device="cpu"), "no such file or folder: "),
        (lambda: api.load_pipeline("tiny-sd", ["a"], device="cpu"), "adapters maps names to adapter paths"),
        (lambda: api.load_pipeline("tiny-sd", device="cpu", dtype="half"), "unknown dtype 'half'; use fp32"),
        (lambda: api.load_pipeline("tiny-sd", device="cpu", dtype=5), "unknown dtype 5; use fp32"),
    ]
    for call, message in calls:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()
    assert api.loaded_adapters(pipe) == ["a", "b"]
    assert set(pipe.unet.peft_config) == {"a", "b"}


def test_a_numbered_cuda_device_is_checked_and_computes_in_fp16(monkeypatch):
    import torch

    from runner import models

    with pytest.raises(
        ValueError, match=re.escape("unknown device 'cuda:x'; use auto, cuda, mps, cpu or cuda:N")
    ):
        api.load_pipeline("tiny-sd", device="cuda:x")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=re.escape("device = 'cuda:0' but no CUDA device is available")):
        api.load_pipeline("tiny-sd", device="cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=re.escape("device = 'cuda:2' but there are 2 CUDA devices")):
        api.load_pipeline("tiny-sd", device="cuda:2")
    assert models.resolve_device("cuda:1") == "cuda:1"
    assert api._dtype(None, "cuda:1") == api._dtype(None, "cuda") == torch.float16
    # a torch.device is taken as its name (it failed with an AttributeError)
    with pytest.raises(ValueError, match=re.escape("device = 'cuda:2' but there are 2 CUDA devices")):
        api.load_pipeline("tiny-sd", device=torch.device("cuda", 2))
    with pytest.raises(ValueError, match=re.escape("unknown device 'xpu'; use auto, cuda, mps, cpu")):
        api.load_pipeline("tiny-sd", device=torch.device("xpu"))


def _dog_project(tmp_path) -> str:
    """A project file, not built, of a subject dog trained 40 steps with a snapshot at step 20."""
    from PIL import Image

    (tmp_path / "data").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "1.png")
    (tmp_path / "p.toml").write_text(
        '[project]\nbase_model = "tiny-sd"\nout = "build"\n'
        '[subjects.dog]\nimages = "data"\ninstance_prompt = "a photo of sks dog"\n'
        "train = { steps = 40, save_steps = [20] }\n"
    )
    return f"{tmp_path}/p.toml"


def test_adapter_by_project_file(tmp_path, adapters):  # noqa: F811
    project = _dog_project(tmp_path)
    with pytest.raises(ValueError, match="not built yet"):
        api.resolve_adapter_path(f"{project}:dog")
    with pytest.raises(ValueError, match=re.escape("snapshot 'dog@20' of " + project + " is not built yet")):
        api.resolve_adapter_path(f"{project}:dog@20")
    with pytest.raises(
        ValueError, match="no subject, snapshot or blend 'cat'; it has subjects: dog; snapshots"
    ):
        api.resolve_adapter_path(f"{project}:cat")
    with pytest.raises(
        ValueError, match=re.escape("keeps no snapshot at step 30 (its save_steps: 20); add 30")
    ):
        api.resolve_adapter_path(f"{project}:dog@30")
    with pytest.raises(ValueError, match="trains 40 steps, so it keeps no snapshot at step 40"):
        api.resolve_adapter_path(f"{project}:dog@40")
    shutil.copytree(adapters["a"], tmp_path / "build" / "adapters" / "dog")
    shutil.copytree(adapters["b"], tmp_path / "build" / "adapters" / "dog@20")
    # put there by hand: no lockfile says they were built, so they load with a warning
    with pytest.warns(UserWarning, match="train:dog of .* is stale"):
        assert api.resolve_adapter_path(f"{project}:dog") == tmp_path / "build" / "adapters" / "dog"
    with pytest.warns(UserWarning, match="is stale") as said:
        pipe = api.load_pipeline(
            "tiny-sd", {"dog": f"{project}:dog", "early": f"{project}:dog@20"}, device="cpu"
        )
    stale = {str(w.message).split(" of ")[0] for w in said if "is stale" in str(w.message)}
    assert stale == {"snapshot:dog@20", "train:dog"}
    assert api.loaded_adapters(pipe) == ["dog", "early"]


def test_blends_on_an_fp16_pipeline_are_computed_in_fp32(adapters):  # noqa: F811
    import torch

    pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"], "b": adapters["b"]}, device="cpu", dtype="fp16")
    assert pipe.unet.dtype == torch.float16
    exact = api.blend(pipe, {"a": 1.0, "b": 1.0}, "ab")
    assert max(exact.values()) < 1e-6  # PEFT alone rounds a cat blend to fp16 here (about 3e-4)
    lossy = api.blend(pipe, {"a": 1.0, "b": 1.0}, "ab_svd", method="svd", svd_rank=2)
    assert 0.01 < min(lossy.values()) < 1
    dtypes = {p.dtype for n, p in pipe.unet.named_parameters() if ".lora_" in n}
    assert dtypes == {torch.float32}


def test_a_stale_or_damaged_adapter_of_a_project_loads_with_a_warning(tmp_path, adapters):  # noqa: F811
    """It loaded silently what the last build left, whatever the project file said since."""
    import warnings

    from runner import executor
    from tests.conftest import FakeBackend, FakeSteps, Recorder, use_backend, write_image

    write_image(tmp_path / "data" / "1.png")
    project = tmp_path / "p.toml"
    project.write_text(
        '[project]\nbase_model = "tiny-sd"\n[subjects.dog]\nimages = "data"\ninstance_prompt = "sks dog"\n'
    )
    copy = lambda inner: lambda ctx: shutil.copytree(adapters["a"], ctx.out, dirs_exist_ok=True) and {}  # noqa: E731
    undo = use_backend(lambda p: FakeBackend(FakeSteps(), copy))
    try:
        from runner.project import load_project

        assert executor.build(load_project(project), executor.BuildOptions(), Recorder()).ok
    finally:
        undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fresh: no warning
        folder = api.resolve_adapter_path(f"{project}:dog")

    project.write_text(project.read_text() + "lora = { rank = 8 }\n")
    with pytest.warns(UserWarning, match=re.escape(f"train:dog of {project} is stale (lora.rank 16 -> 8")):
        assert api.resolve_adapter_path(f"{project}:dog") == folder
    project.write_text(project.read_text().replace("lora = { rank = 8 }\n", ""))
    (folder / "pytorch_lora_weights.safetensors").unlink()
    with pytest.warns(UserWarning, match="is stale \\(output .*/pytorch_lora_weights.safetensors missing"):
        api.resolve_adapter_path(f"{project}:dog")
    project.with_suffix(".lock").write_text("<<<<<<< HEAD\n")
    with pytest.warns(
        UserWarning, match="cannot tell whether train:dog is up to date, loading .* as it is: "
    ):
        api.resolve_adapter_path(f"{project}:dog")


def test_trained_biases_act_only_while_their_adapter_is_active(tmp_path, adapters):  # noqa: F811
    """PEFT keeps them in the base layers: they stayed with another adapter active, or with none."""
    import json
    import warnings

    import torch

    from runner.adapters import PEFT_WEIGHTS, read_safetensors, write_safetensors

    biased = tmp_path / "biased"
    shutil.copytree(adapters["c"], biased)
    config = biased / "unet" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "bias": "all"}))
    tensors, metadata = read_safetensors(biased / "unet" / PEFT_WEIGHTS)
    write_safetensors(
        biased / "unet" / PEFT_WEIGHTS, {**tensors, "base_model.model.conv_out.bias": torch.ones(4)}, metadata
    )
    pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"], "biased": biased}, device="cpu")
    conv_out = pipe.unet.base_model.model.conv_out
    base = api.load_pipeline("tiny-sd", device="cpu").unet.conv_out.bias.detach().clone()
    assert torch.equal(conv_out.bias, torch.ones(4))
    api.set_adapter(pipe, "a")
    assert torch.equal(conv_out.bias, base)
    api.set_adapter(pipe, ["biased", "a"])
    assert torch.equal(conv_out.bias, torch.ones(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not PEFT's: that the biases stay as trained
        api.set_adapter(pipe, None)
    assert torch.equal(conv_out.bias, base)
    api.set_adapter(pipe, "biased")
    api.unload_adapter(pipe, "biased")
    assert torch.equal(pipe.unet.base_model.model.conv_out.bias, base)


def test_a_project_file_as_the_base_model_says_which_base_model_to_give(tmp_path, monkeypatch):
    """diffusers tried it as a single-file checkpoint: "cannot load base model p.toml (diffusers reads a
    single file's component configs from the hub ...)"."""
    (tmp_path / "p.toml").write_text('[project]\nbase_model = "tiny-sd"\n')
    (tmp_path / "bad.toml").write_text("[project\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "p.toml: a project file, not a base model; give its [project] base_model, 'tiny-sd', "
        ),
    ):
        api.load_pipeline("p.toml", device="cpu")
    with pytest.raises(ValueError, match="bad.toml: a project file, not a base model; give the base model"):
        api.load_pipeline("bad.toml", device="cpu")


def test_a_base_model_or_adapter_path_of_another_type_raises_value_error(tmp_path, monkeypatch):
    """A Path that does not exist failed with AttributeError ('PosixPath' object has no attribute
    'endswith'); None, a TypeError from deep in pathlib."""
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ValueError, match=re.escape(f"no such file or folder: {tmp_path / 'models' / 'sd15'}")
    ):
        api.load_pipeline(Path("models/sd15"), device="cpu")  # owner/name as text, but a Path is local
    with pytest.raises(ValueError, match="base is a hub id, a built-in model name or a path; got None"):
        api.load_pipeline(None, device="cpu")
    with pytest.raises(ValueError, match="an adapter path is a folder or <project file>:<name>; got None"):
        api.resolve_adapter_path(None)


@pytest.mark.parametrize("name", ["training", "keys", "update"])
def test_a_name_torch_cannot_hold_raises_value_error(adapters, name):  # noqa: F811
    """torch's ModuleDict refuses its own attribute names: a KeyError ("attribute 'training' already
    exists") from deep inside PEFT."""
    pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"]}, device="cpu")
    with pytest.raises(
        ValueError, match=f"'{name}' cannot name an adapter: torch keeps adapters in a ModuleDict"
    ):
        api.load_adapter(pipe, adapters["b"], name)
    with pytest.raises(ValueError, match=f"'{name}' cannot name an adapter"):
        api.blend(pipe, {"a": 1.0}, name)
    assert api.loaded_adapters(pipe) == ["a"]
    api.load_adapter(pipe, adapters["b"], f"{name}_lora")  # the name it suggests


def test_a_project_file_under_home_is_found_as_an_adapter_folder_is(tmp_path, adapters, monkeypatch):  # noqa: F811
    """`~/p.toml:dog` said "no such project file" where `~/build/adapters/dog` loaded."""
    from PIL import Image

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "1.png")
    (tmp_path / "p.toml").write_text(
        '[project]\nbase_model = "tiny-sd"\nout = "build"\n'
        '[subjects.dog]\nimages = "data"\ninstance_prompt = "a photo of sks dog"\n'
    )
    shutil.copytree(adapters["a"], tmp_path / "build" / "adapters" / "dog")
    assert api.resolve_adapter_path("~/build/adapters/dog") == tmp_path / "build" / "adapters" / "dog"
    with pytest.warns(UserWarning, match="is stale"):  # put there by hand
        assert api.resolve_adapter_path("~/p.toml:dog") == tmp_path / "build" / "adapters" / "dog"


def test_numpy_and_torch_numbers_are_weights(adapters):  # noqa: F811
    """A float32 weight (np.float32(0.5), an array from np.linspace) was refused as "must be finite
    numbers; got np.float32(0.5)", and an array of weights as "not a list"."""
    import torch

    pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"], "b": adapters["b"]}, device="cpu")
    api.set_adapter(pipe, ["a", "b"], weights=[1.0, 0.5], scale=0.5)
    plain = _image(pipe)
    api.set_adapter(pipe, ["a", "b"], weights=np.array([1.0, 0.5], dtype=np.float32), scale=np.float32(0.5))
    assert np.array_equal(_image(pipe), plain)
    api.set_adapter(pipe, ["a", "b"], weights=[torch.tensor(1.0), np.int64(0)], scale=torch.tensor(0.5))
    assert not np.array_equal(_image(pipe), plain)
    errors = api.blend(pipe, {"a": np.float32(1.0), "b": np.float64(0.5)}, "ab", "svd", svd_rank=np.int64(2))
    assert set(errors) == {"unet", "text_encoder"}
    with pytest.raises(ValueError, match="weights must be finite numbers; got nan"):
        api.set_adapter(pipe, ["a", "b"], weights=np.array([np.nan, 1.0]))


def test_what_is_not_a_pipeline_raises_value_error(adapters):  # noqa: F811
    """`pipe = api.load_adapter(pipe, ...)` makes pipe None; the next call failed with "AttributeError:
    'NoneType' object has no attribute 'unet'", and so did a module given for the pipeline."""
    pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"]}, device="cpu")
    in_place = "pipe is None, not a pipeline: load_adapter, set_adapter, blend and unload_adapter change"
    for call in (
        lambda p: api.load_adapter(p, adapters["b"], "b"),
        lambda p: api.set_adapter(p, "a"),
        lambda p: api.blend(p, {"a": 1.0}, "a2"),
        lambda p: api.unload_adapter(p, "a"),
        api.loaded_adapters,
    ):
        with pytest.raises(ValueError, match=in_place):
            call(None)
    with pytest.raises(ValueError, match="must be a diffusers pipeline, .*; got a PeftModel"):
        api.set_adapter(pipe.unet, "a")
    assert api.loaded_adapters(pipe) == ["a"]


def test_a_snapshot_written_with_leading_zeros_or_at_step_0_is_named_as_the_project_names_it(tmp_path):
    """`p.toml:dog@020` said "add 020 to its save_steps" of a subject whose save_steps are [20]; `dog@0`
    said to add 0, which save_steps refuses."""
    project = _dog_project(tmp_path)
    with pytest.raises(
        ValueError, match=re.escape(f"{project} names that snapshot dog@20, without leading zeros")
    ):
        api.resolve_adapter_path(f"{project}:dog@020")
    with pytest.raises(ValueError, match="keeps snapshots of steps 1 to 39 only; step 0 is the base model"):
        api.resolve_adapter_path(f"{project}:dog@0")
    with pytest.raises(
        ValueError, match=re.escape("keeps no snapshot at step 30 (its save_steps: 20); add 30 ")
    ):
        api.resolve_adapter_path(f"{project}:dog@030")


def test_a_path_that_is_no_adapter_says_what_is_there(tmp_path, adapters):  # noqa: F811
    """A typo (adapters/dgo) said "not an adapter folder" as if the folder were there."""
    shutil.copytree(adapters["a"], tmp_path / "adapters" / "dog")
    with pytest.raises(
        ValueError, match="dgo: no such file or folder; give an adapter folder .*; adapters beside it: dog$"
    ):
        api.resolve_adapter_path(tmp_path / "adapters" / "dgo")
    (tmp_path / "civitai").mkdir()
    shutil.copy(adapters["a"] / "a.safetensors", tmp_path / "civitai" / "dog.safetensors")
    with pytest.raises(
        ValueError, match=r"holds single files \(dog.safetensors\), .* diffusers' load_lora_weights"
    ):
        api.resolve_adapter_path(tmp_path / "civitai")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: not an adapter folder"):
        api.resolve_adapter_path(tmp_path / "empty")


def test_an_adapter_folder_as_the_base_model_says_which_base_model_to_give(adapters):  # noqa: F811
    """It said "cannot load base model ...: Error no file named model_index.json found"."""
    for given in (adapters["a"], adapters["a"] / "unet"):
        with pytest.raises(
            ValueError,
            match=re.escape(
                f"{given}: an adapter folder, not a base model; give the base model it was trained on "
                f"(tiny-sd), and {adapters['a']} in adapters"
            ),
        ):
            api.load_pipeline(str(given), device="cpu")


def test_an_adapter_of_another_family_names_the_base_model_it_was_trained_on(tmp_path, adapters):  # noqa: F811
    """An SDXL adapter (text_encoder_2/) on an SD 1.x pipeline named neither; the README promises both."""
    import json

    xl = tmp_path / "xl"
    shutil.copytree(adapters["a"], xl)
    shutil.copytree(xl / "text_encoder", xl / "text_encoder_2")
    config = xl / "unet" / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"base_model_name_or_path": "tiny-sdxl"}))
    pipe = api.load_pipeline("tiny-sd", device="cpu")
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{xl}: has text_encoder_2, which a sd1 base model does not have; was the adapter trained on another "
            "model family? Its adapter_config.json names tiny-sdxl"
        ),
    ):
        api.load_adapter(pipe, xl, "xl")
    assert api.loaded_adapters(pipe) == []


def test_base_model_config_of_a_base_that_is_not_a_single_file_is_said_to_be_ignored():
    # Was dropped without a word; the project file's key of that name is an error there.
    with pytest.warns(UserWarning) as warned:
        pipe = api.load_pipeline("tiny-sd", device="cpu", base_model_config="configs/sd15")
    assert [str(w.message) for w in warned] == [
        "base_model_config applies to a single-file base only; 'tiny-sd' is a built-in model, which has its "
        "own configs: base_model_config is ignored"
    ]
    assert warned[0].filename == __file__  # the caller's line
    assert type(pipe).__name__ == "StableDiffusionPipeline"
