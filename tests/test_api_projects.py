"""The notebook API and project files: an adapter named by its project file and subject, as the build left it."""

from __future__ import annotations

import re
import shutil

import pytest

from runner import api
from tests.blend_fixtures import adapters  # noqa: F401

pytestmark = pytest.mark.torch


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


def test_the_stale_adapter_warning_points_at_the_caller_s_line(tmp_path, adapters):  # noqa: F811
    """`warnings` showed a line of dbl's own code (runner/api.py) as where the stale adapter was asked
    for, whichever API function the notebook called."""
    import warnings

    project = _dog_project(tmp_path)
    shutil.copytree(adapters["a"], tmp_path / "build" / "adapters" / "dog")  # by hand: stale
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        api.resolve_adapter_path(f"{project}:dog")
        pipe = api.load_pipeline("tiny-sd", {"dog": f"{project}:dog"}, device="cpu")
        api.load_adapter(pipe, f"{project}:dog", "again")
    stale = [w for w in said if "is stale" in str(w.message)]
    assert len(stale) == 3
    assert [w.filename for w in stale] == [__file__] * 3, [(w.filename, w.lineno) for w in stale]
