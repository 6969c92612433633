"""Reliability: project files mutated at random give clean errors or plans; untrusted and odd files (pickles,
symlink loops, unicode paths, unreadable images) are refused or named, never a traceback."""

from __future__ import annotations

import os
import textwrap
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner import executor, lockfile
from runner.cli import main
from runner.imagefiles import has_images, list_images
from runner.project import ProjectError, load_project
from tests.conftest import PETS, Proj, write_image

VALUES = st.one_of(
    st.integers(-3, 10**6).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(
        [
            '"tiny-sd"',
            '"cat"',
            "true",
            "[]",
            '["x"]',
            "[0, -1]",
            "{ dog = 1.0 }",
            '""',
            '"../../etc"',
            "{}",
            "nan",
        ]
    ),
    st.text(max_size=12).map(lambda s: '"' + s.replace("\\", "").replace('"', "") + '"'),
)


KEYS = st.sampled_from(
    [
        "rank",
        "alpha",
        "steps",
        "resolution",
        "prompts",
        "adapter",
        "adapters",
        "method",
        "density",
        "prior",
        "images",
        "seeds",
        "width",
        "base_model",
        "class_prompt",
        "num_images",
        "rnak",
        "instance_prompt",
        "svd_rank",
        "out",
    ]
)


TABLES = st.sampled_from(
    [
        "[project]",
        "[train]",
        "[lora]",
        "[priors.dog]",
        "[subjects.dog]",
        "[subjects.toy.lora]",
        "[blends.mix]",
        "[renders.park]",
        "[renders.new]",
        "[subjects.x y]",
        "[blends.mix.adapters]",
        "[[renders]]",
    ]
)


@st.composite
def mutated(draw):
    lines = textwrap.dedent(PETS).splitlines()
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(lines)))
        action = draw(st.sampled_from(["delete", "set", "table", "garbage"]))
        if action == "delete" and lines:
            del lines[min(at, len(lines) - 1)]
        elif action == "set":
            lines.insert(at, f"{draw(KEYS)} = {draw(VALUES)}")
        elif action == "table":
            lines.insert(at, draw(TABLES))
        else:
            lines.insert(at, draw(st.text(max_size=20)))
    return "\n".join(lines)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=mutated())
def test_mutated_project_files_give_clean_errors_or_plans(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("fuzz")
    for sub in ("dog", "toy"):
        write_image(folder / "data" / sub / "00.png")
    path = folder / "pets.toml"
    path.write_text(text)
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            project = load_project(path)
    except ProjectError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.key or problem.line, str(problem)
        return
    for warning in said:  # a file that loads may be warned of (a prior no subject uses): in its name
        assert str(warning.message).startswith(f"{path}: "), str(warning.message)
    _, planned = executor.Workspace(project).plan()
    assert planned or not (project.priors or project.subjects or project.renders)


def test_pickle_base_model_is_refused_unless_allowed(tmp_path, capsys):
    from runner.models import BaseModel, ModelError, load_pipeline

    (tmp_path / "model.ckpt").write_bytes(b"not really a pickle")
    base = BaseModel.parse("model.ckpt", tmp_path)
    with pytest.raises(ModelError, match="pickle checkpoints can run arbitrary code"):
        load_pipeline(base)
    proj = Proj(tmp_path, PETS.replace('base_model = "tiny-sd"', 'base_model = "model.ckpt"'))
    assert main(["plan", str(proj.path)]) == 2
    assert "pickle checkpoint" in capsys.readouterr().err
    proj.edit('base_model = "model.ckpt"', 'base_model = "model.ckpt"\nallow_pickle = true')
    assert main(["plan", str(proj.path)]) == 0


def test_unicode_and_space_paths(tmp_path, build, fake_steps):
    root = tmp_path / "mein Projekt ü"
    root.mkdir()
    text = PETS.replace('"data/dog"', '"fotos del perro/ñandú"')
    p = Proj(root, text)
    write_image(root / "fotos del perro" / "ñandú" / "foto 1 ✓.png")
    result, _ = build(p)
    assert result.ok
    record = lockfile.read(p.lock)["train:dog"]["inputs"]["images"]
    assert record["_folder"] == "fotos del perro/ñandú" and list(record["files"]) == ["foto 1 ✓.png"]


def test_symlink_loop_does_not_hang(tmp_path):
    folder = tmp_path / "imgs"
    write_image(folder / "a.png")
    os.symlink(folder, folder / "loop")
    os.symlink(folder / "missing.png", folder / "dangling.png")
    assert [p.name for p in list_images(folder)] == ["a.png", "dangling.png"]


def test_hidden_and_non_image_files_are_skipped(tmp_path):
    folder = tmp_path / "imgs"
    write_image(folder / "a.png")
    (folder / ".DS_Store").write_bytes(b"\0")
    (folder / "notes.txt").write_text("captions")
    write_image(folder / ".git" / "b.png")
    assert [p.name for p in list_images(folder)] == ["a.png"]


def test_images_are_sorted_by_relative_path_and_found_in_subfolders(tmp_path):
    names = [
        "b.png",
        "a.PNG",
        "a/b.jpg",
        "a-b.jpg",
        "a.b/c.png",
        "A/x.png",
        "u/v/w.jpeg",
        "ü.png",
        "x/.y.png",
    ]
    for name in names:
        write_image(tmp_path / "imgs" / name)
    found = [p.relative_to(tmp_path / "imgs").as_posix() for p in list_images(tmp_path / "imgs")]
    assert found == sorted(n for n in names if "/." not in n)
    assert has_images(tmp_path / "imgs" / "u") and not has_images(tmp_path / "imgs" / "x")


def test_one_walk_finds_the_images_and_what_a_step_does_not_read(tmp_path, monkeypatch):
    from runner import imagefiles

    folder = tmp_path / "imgs"
    for name in ["b.png", "a/b.jpg", "a/c.heic", "a-b.jfif", "a.png", ".x/y.heic", "z.txt"]:
        write_image(folder / name)
    os.symlink(tmp_path, folder / "more")
    walks, walk = [], os.walk
    monkeypatch.setattr(os, "walk", lambda *a, **k: walks.append(a) or walk(*a, **k))
    found = imagefiles.scan(folder)
    assert len(walks) == 1
    assert found.images == list_images(folder)
    assert found.skipped == ["a/c.heic", "a-b.jfif"] and found.linked == ["more"]  # in path order


def test_a_plan_lists_the_images_of_a_subject_with_captions_once(proj, monkeypatch):
    proj.edit('"a toy in the style of <1>"', '"a toy in the style of <1>"\ncaption_extension = ".txt"')
    (proj.root / "data" / "toy" / "01.txt").write_text("a toy on a shelf")
    toy, walks, walk = proj.root / "data" / "toy", [], os.walk
    monkeypatch.setattr(os, "walk", lambda folder, **k: walks.append(Path(folder)) or walk(folder, **k))
    assert main(["plan", str(proj.path)]) == 0
    assert walks.count(toy) == 2  # one to find an image when the project loads, one for images and captions


def test_half_precision_ignored_on_a_cpu_is_said_once_not_once_per_step(monkeypatch):
    # Every step that loads the base model resolves the dtype; loading a pipeline restores a warnings
    # filter, after which Python's own once-per-place says the warning again.
    import warnings

    from runner import models

    monkeypatch.setattr(models.loading, "_IGNORED_SAID", set())  # said before, in this process
    shown = []
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = lambda message, *args, **kwargs: shown.append(str(message))
        for _ in range(3):
            models.resolve_dtype("fp16", "cpu")
            with warnings.catch_warnings():  # as loading a pipeline does
                pass
    assert shown == ["mixed_precision = 'fp16' is ignored on the CPU; computing in fp32"]


def test_an_image_that_is_a_symlink_loop_is_named_as_one(tmp_path):
    # a.png -> b.png -> a.png: was "a symbolic link to b.png, which does not exist", though b.png is there.
    from runner.errors import ImageError
    from runner.fingerprint import FileHasher

    folder = tmp_path / "imgs"
    write_image(folder / "00.png")
    os.symlink("b.png", folder / "a.png")
    os.symlink("a.png", folder / "b.png")
    with pytest.raises(ImageError) as info:
        FileHasher().manifest(folder)
    assert (  # b.png is one as well, named in the same error
        f"{folder / 'a.png'}: a symbolic link to b.png, which leads back to it; fix the link or remove it"
        in str(info.value).split("\n  ")
    )


def test_every_unreadable_image_is_named_in_one_error_past_a_few_how_many_more(tmp_path):
    # Was the first alone, found as the build planned: one broken link a build.
    from runner.errors import ImageError
    from runner.fingerprint import FileHasher

    folder = tmp_path / "imgs"
    write_image(folder / "00.png")
    for name in "abcdefg":
        os.symlink(f"{name}{name}.png", folder / f"{name}.png")
        os.symlink(f"{name}.png", folder / f"{name}{name}.png")
    with pytest.raises(ImageError) as info:
        FileHasher().manifest(folder)
    lines = str(info.value).split("\n  ")
    assert lines[0] == "14 images cannot be read; fix or remove each:"
    assert lines[1:] == [
        f"{folder / name}: a symbolic link to {target}, which leads back to it; fix the link or remove it"
        for name, target in [
            ("a.png", "aa.png"),
            ("aa.png", "a.png"),
            ("b.png", "bb.png"),
            ("bb.png", "b.png"),
            ("c.png", "cc.png"),
        ]
    ] + ["and 9 more"]
