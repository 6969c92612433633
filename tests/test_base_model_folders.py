"""Local diffusers folders as base models: the shapes they come in (variant weights only, a missing component)."""

from __future__ import annotations

import shutil

import pytest

from runner.models import BaseModel, ensure_builtin, folder_variant, load_pipeline


def _fp16_only(src, folder):
    """A copy of diffusers folder `src` whose weights are all named as save_pretrained(variant="fp16") names them."""
    shutil.copytree(src, folder)
    for path in list(folder.rglob("*.safetensors")):
        path.rename(path.with_name(path.name.replace(".safetensors", ".fp16.safetensors")))
    return folder


def test_the_variant_of_a_folder_is_the_one_some_component_has_alone(tmp_path):
    for component, names in {
        "unet": ["diffusion_pytorch_model.fp16.safetensors"],
        "vae": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"],
        "text_encoder": ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"],
        "scheduler": [],
    }.items():
        (tmp_path / component).mkdir()
        for name in names:
            (tmp_path / component / name).write_bytes(b"")
    assert folder_variant(tmp_path) == "fp16"
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert folder_variant(tmp_path) is None  # plain weights everywhere: loaded as before


@pytest.mark.torch
def test_a_folder_with_fp16_variant_weights_only_loads(tmp_path):
    """It failed with diffusers' "no file named diffusion_pytorch_model.safetensors found"."""
    from safetensors.torch import load_file

    folder = _fp16_only(ensure_builtin("tiny-sd"), tmp_path / "fp16")
    pipe = load_pipeline(BaseModel.parse(str(folder), tmp_path))
    saved = load_file(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    assert all(saved[name].equal(value) for name, value in pipe.unet.state_dict().items())


def test_a_folder_without_a_component_its_model_index_names_is_a_project_file_error(tmp_path):
    """It planned, and the build failed with diffusers' "no file named config.json found in directory <folder>"."""
    from runner.project import ProjectError, load_project

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"], '
        '"vae": ["diffusers", "AutoencoderKL"], "safety_checker": ["stable_diffusion", "SafetyChecker"], '
        '"feature_extractor": [null, null], "text_encoder": ["transformers", "CLIPTextModel"]}'
    )
    (folder / "unet").mkdir()
    (folder / "text_encoder").mkdir()
    path = tmp_path / "p.toml"
    path.write_text('[project]\nbase_model = "model"\n[renders.r]\nadapter = "none"\nprompts = ["a cat"]\n')
    with pytest.raises(ProjectError, match="project.base_model: .*model has no vae/ folder") as err:
        load_project(path)
    assert "safety_checker" not in str(err.value)  # dbl loads without it
    (folder / "vae").mkdir()
    load_project(path)


def test_hidden_files_of_a_base_model_folder_are_named_in_a_warning(tmp_path, recwarn):
    """They count toward its identity: a git clone's .git/ changes with git commands, and with it every
    fingerprint that takes the model in."""
    from runner.project import load_project

    folder = tmp_path / "model"
    shutil.copytree(ensure_builtin("tiny-sd"), folder)
    path = tmp_path / "p.toml"
    path.write_text('[project]\nbase_model = "./model"\n[renders.r]\nadapter = "none"\nprompts = ["a cat"]\n')
    load_project(path)
    assert not recwarn.list
    (folder / ".git").mkdir()
    (folder / "unet" / ".DS_Store").write_bytes(b"")
    with pytest.warns(UserWarning) as said:
        load_project(path)
    assert [str(w.message) for w in said] == [
        f"{path}: project.base_model: {folder} holds hidden files and folders (.git, unet/.DS_Store), which "
        "count toward the model's identity: when they change (a git command, a new download, Finder), every "
        "step that uses the model runs again (line 2) - use a copy of the model folder without them"
    ]


def test_a_folder_linked_into_a_base_model_folder_is_named_in_a_warning(tmp_path, recwarn):
    """The model's identity reads no linked folder, so the VAE behind `vae -> ../vae-a`, linked to
    another, changed no fingerprint: every step stayed up to date, with images of the other VAE."""
    from runner.fingerprint import FileHasher, base_model_identity
    from runner.models import BaseModel
    from runner.project import load_project

    folder = tmp_path / "model"
    shutil.copytree(ensure_builtin("tiny-sd"), folder)
    shutil.move(folder / "vae", tmp_path / "vae-a")
    shutil.copytree(tmp_path / "vae-a", tmp_path / "vae-b")
    (tmp_path / "vae-b" / "config.json").write_text("{}")
    (folder / "vae").symlink_to("../vae-a")
    path = tmp_path / "p.toml"
    path.write_text('[project]\nbase_model = "./model"\n[renders.r]\nadapter = "none"\nprompts = ["a cat"]\n')
    identity = base_model_identity(BaseModel("folder", str(folder)), FileHasher())
    (folder / "vae").unlink()
    (folder / "vae").symlink_to("../vae-b")
    assert base_model_identity(BaseModel("folder", str(folder)), FileHasher()) == identity  # unseen
    with pytest.warns(UserWarning) as said:
        load_project(path)
    assert [str(w.message) for w in said] == [
        f"{path}: project.base_model: {folder} links to folders (vae) whose files are not part of the model's "
        "identity: when what they hold changes, no step that uses the model runs again (line 2) - put a copy "
        "of each linked folder in its place (cp -rL), or run the steps again with --force"
    ]
    (folder / "vae").unlink()
    shutil.copytree(tmp_path / "vae-a", folder / "vae")
    recwarn.clear()
    load_project(path)
    assert not recwarn.list


def test_a_link_to_nothing_in_a_base_model_folder_is_named_with_its_fix(tmp_path, capsys):
    """An interrupted download leaves links to files that are not there: the model's identity cannot be
    read. It said `[Errno 2] No such file or directory` and exited 1, as for a failed step."""
    from runner.cli import EXIT_USAGE, main

    folder = tmp_path / "model"
    shutil.copytree(ensure_builtin("tiny-sd"), folder)
    (folder / "unet" / "extra.safetensors").symlink_to("../blobs/0a1b")
    path = tmp_path / "p.toml"
    path.write_text('[project]\nbase_model = "./model"\n[renders.r]\nadapter = "none"\nprompts = ["a cat"]\n')
    assert main(["plan", str(path)]) == EXIT_USAGE
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"dbl: {folder}/unet/extra.safetensors: a symbolic link to ../blobs/0a1b, which does not exist; fix "
        "the link or remove it"
    )


def test_a_folder_with_pickle_weights_only_is_refused_without_allow_pickle(tmp_path):
    """It planned, and the build failed with "no file named diffusion_pytorch_model.safetensors found"."""
    from runner.project import ProjectError, load_project

    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"")
    (folder / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}'
    )
    path = tmp_path / "p.toml"
    project = '[project]\nbase_model = "model"\n{}[renders.r]\nadapter = "none"\nprompts = ["a cat"]\n'
    path.write_text(project.format(""))
    with pytest.raises(
        ProjectError, match=r"model/unet holds pickle weights \(.bin\) only.*allow_pickle = true"
    ):
        load_project(path)
    path.write_text(project.format("allow_pickle = true\n"))
    load_project(path)


@pytest.fixture
def no_network(monkeypatch):
    """Name lookups fail, as without a network; yields the hosts that were looked up."""
    import socket

    from runner.models import hub

    looked_up = []

    def getaddrinfo(host, *args, **kwargs):
        looked_up.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.delenv("ALL_PROXY", raising=False)
    monkeypatch.delenv("all_proxy", raising=False)
    hub._probe_hub.cache_clear()  # probed afresh here, and again after
    yield looked_up
    hub._probe_hub.cache_clear()


@pytest.mark.torch
def test_a_hub_model_loads_from_the_cache_alone_when_the_hub_cannot_be_reached(
    no_network, tmp_path, monkeypatch
):
    """Without a network the hub client retried each request for about 20 s, twice, before the load
    read the cache; the hub is now asked nothing once one lookup has failed."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    from runner.models import ModelError

    asked = []  # what the hub client requested, each with its retries

    def backoff(method, url, **kwargs):
        asked.append(url)
        raise _http.httpx2.ConnectError("no network")

    monkeypatch.setattr(_http, "_http_backoff_base", backoff)

    snapshot = tmp_path / "models--someone--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(ensure_builtin("tiny-sd"), snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))

    pipe = load_pipeline(BaseModel.parse("someone/tiny", tmp_path))
    assert pipe.unet is not None
    with pytest.raises(ModelError) as error:
        load_pipeline(BaseModel.parse("someone/not-cached", tmp_path))
    assert str(error.value) == (
        "cannot load base model someone/not-cached: it is not in the Hugging Face cache, and huggingface.co "
        "cannot be reached (Name or service not known); load it once where there is a network, or set "
        "base_model to a local diffusers folder"
    )
    assert asked == [] and no_network[0] == "huggingface.co"


def test_through_a_proxy_the_hub_is_not_probed(no_network, monkeypatch):
    from runner.models import hub_unreachable

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub_unreachable() is None and no_network == []


def test_a_build_identifies_a_hub_model_not_cached_yet_by_the_commit_its_steps_load(tmp_path, monkeypatch):
    """Before planning, a build fetches the model's index: planned before, a model not cached yet was
    revision 'main' of SD 1.x, and the next build, finding the commit and family its download cached,
    ran every step again."""
    import huggingface_hub
    from PIL import Image

    from runner import executor, models
    from runner.project import load_project
    from runner.store import DiskFacts
    from tests.conftest import Recorder

    commit = "c" * 40
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(models.hub, "hub_unreachable", lambda: None)
    fetched = []

    def download(repo_id, filename, revision=None, **kwargs):  # what the hub client leaves in the cache
        fetched.append((repo_id, filename, revision))
        repo = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True)
        index = repo / "snapshots" / commit / filename
        index.write_text('{"_class_name": "StableDiffusionXLPipeline"}')
        return str(index)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    identities = []
    base_model = DiskFacts.base_model
    monkeypatch.setattr(
        DiskFacts, "base_model", lambda self: identities.append(base_model(self)) or identities[-1]
    )
    (tmp_path / "data").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "a.png")
    (tmp_path / "p.toml").write_text(
        '[project]\nbase_model = "someone/xl"\n[train]\nresolution = 1024\n'  # SDXL's size, found once fetched
        '[subjects.dog]\nimages = "data"\ninstance_prompt = "sks dog"\n'
    )
    executor.build(load_project(tmp_path / "p.toml"), executor.BuildOptions(dry_run=True), Recorder())
    assert fetched == [("someone/xl", "model_index.json", None)]
    executor.build(load_project(tmp_path / "p.toml"), executor.BuildOptions(dry_run=True), Recorder())
    assert len(fetched) == 1  # cached now: the build asks the hub nothing before its steps
    assert identities and all(
        i == {"hub": "someone/xl", "revision": commit, "family": "sdxl"} for i in identities
    )


@pytest.mark.torch
def test_a_built_in_model_whose_text_encoder_does_not_load_is_an_error_not_random_weights(
    tmp_path, monkeypatch
):
    """A transformers before 5.6 reading a tiny-sd saved by 5.6 or later (no `text_model.` level) only
    warned and trained on a random text encoder. Keys no version places stand in for that layout here."""
    from safetensors.torch import load_file, save_file

    from runner.errors import ModelError

    home = tmp_path / "home"
    shutil.copytree(ensure_builtin("tiny-sd"), home / "models" / ensure_builtin("tiny-sd").name)
    monkeypatch.setenv("DBL_HOME", str(home))
    weights = ensure_builtin("tiny-sd") / "text_encoder" / "model.safetensors"
    assert weights.is_relative_to(home)
    save_file({f"clip.{key}": value for key, value in load_file(weights).items()}, weights)

    with pytest.raises(
        ModelError, match=r"did not load under transformers .* so text_encoder would be random"
    ):
        load_pipeline(BaseModel(kind="builtin", ref="tiny-sd"))


def test_a_cached_hub_model_loads_the_commit_its_identity_names(tmp_path, monkeypatch):
    """A step asked the hub for the model's index before loading, which moved the cache's `main` to the
    hub's newest commit, and loaded `main`: outputs made from other weights than the commit their record
    (and their run-cache entry) names. A cached model is left as it is, and loaded by its commit."""
    import huggingface_hub

    from runner import families, models
    from runner.fingerprint import FileHasher, base_model_identity

    planned, newer = "a" * 40, "b" * 40
    repo = tmp_path / "hub" / "models--someone--tiny"
    (repo / "snapshots" / planned).mkdir(parents=True)
    (repo / "snapshots" / planned / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline"}'
    )
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(planned)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(models.hub, "hub_unreachable", lambda: None)  # a network
    fetched = []

    def download(repo_id, filename, revision=None, **kwargs):  # the hub has a newer main
        fetched.append(filename)
        (repo / "refs" / "main").write_text(newer)
        return str(repo / "snapshots" / planned / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    loaded = []

    def load_pretrained(self, folder, **kwargs):
        loaded.append((folder, kwargs["revision"]))
        raise models.ModelError("not loaded in this test")

    monkeypatch.setattr(families.Family, "load_pretrained", load_pretrained)
    base = models.BaseModel.parse("someone/tiny", tmp_path)
    identity = base_model_identity(base, FileHasher(tmp_path / "hashes.json"))
    assert identity["revision"] == planned
    cache = models.ModelCache(base, device="cpu")
    with pytest.raises(models.ModelError, match="not loaded in this test"):
        cache.pipeline()
    assert loaded == [("someone/tiny", planned)] and fetched == []
    assert (repo / "refs" / "main").read_text() == planned


def test_a_single_files_hub_configs_load_at_the_commit_its_identity_names(tmp_path, monkeypatch):
    """`base_model_config` as a hub id is part of the identity by the commit its main names in the cache;
    from_single_file fetched its configs at the hub's main, which may be a newer commit."""
    from runner import families, models
    from runner.fingerprint import FileHasher, base_model_identity

    planned = "a" * 40
    repo = tmp_path / "hub" / "models--someone--configs"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(planned)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(models.hub, "hub_unreachable", lambda: None)  # a network
    (tmp_path / "model.safetensors").write_bytes(b"")
    loaded = []

    def load_single_file(self, path, **kwargs):
        loaded.append((kwargs["config"], kwargs.get("revision")))
        raise models.ModelError("not loaded in this test")

    monkeypatch.setattr(families.Family, "load_single_file", load_single_file)
    base = models.BaseModel.parse("model.safetensors", tmp_path, config="someone/configs")
    monkeypatch.setattr(families, "detect", lambda b: families.get("sd1"))
    identity = base_model_identity(base, FileHasher(tmp_path / "hashes.json"))
    assert identity["config"] == {"hub": "someone/configs", "revision": planned}
    with pytest.raises(models.ModelError, match="not loaded in this test"):
        models.load_pipeline(base, family=families.get("sd1"))
    assert loaded == [("someone/configs", planned)]


@pytest.mark.torch
def test_a_built_in_weight_that_loaded_with_another_value_is_an_error():
    """Where a saved weight's name is found but its value is not what the file holds (the layout change
    leaves a CLIP layer at random under the name it would have), the load is refused too."""
    import torch

    from runner.errors import ModelError
    from runner.models import check_all_loaded

    pipe = load_pipeline(BaseModel(kind="builtin", ref="tiny-sd"))
    folder = ensure_builtin("tiny-sd")
    check_all_loaded(pipe, folder, "tiny-sd")  # as loaded: nothing to say
    with torch.no_grad():
        next(pipe.unet.parameters()).view(-1)[0] += 1.0
    with pytest.raises(ModelError, match=r"1 of the weights saved in .*unet.* did not load"):
        check_all_loaded(pipe, folder, "tiny-sd")


@pytest.mark.torch
def test_same_values_answers_as_torch_equal():
    import torch

    from runner.safetensors_io import same_values

    a = torch.arange(40000, dtype=torch.float32).reshape(200, 200)
    nan = a.clone()
    nan[3, 4] = float("nan")
    zero = torch.zeros(5)
    pairs = [
        (a, a.clone()),
        (a, a + torch.eye(200)),  # a few values differ
        (a, a.reshape(400, 100)),  # the same values, another shape
        (nan, nan.clone()),  # NaN equals nothing, itself neither
        (zero, -zero),  # -0.0 equals 0.0
        (a.half(), a.half().clone()),
        (a.bfloat16(), a.bfloat16() + 1),  # not a numpy dtype: torch compares it
        (a.double(), a.double().clone()),
        (torch.nn.Parameter(a.clone()), a),
    ]
    for x, y in pairs:
        assert same_values(x, y) == torch.equal(x, y), (x.dtype, x.shape, y.shape)
    assert [same_values(x, y) for x, y in pairs] == [True, False, False, False, True, True, False, True, True]
