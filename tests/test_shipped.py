"""Every shipped project file and template loads and plans; the README documents every key."""

from __future__ import annotations

import re
import shutil
import sys

import pytest

from bench.shapes_eval import CLASS_PROMPTS, PROMPTS, SETTINGS
from runner import executor
from runner.cli import main
from runner.project import load_project, schema
from runner.project.load import tomllib
from tests.conftest import ROOT, write_image

PROJECTS = sorted((ROOT / "projects").glob("*.toml"))
TEMPLATES = sorted((ROOT / "templates").glob("*.toml"))


def with_images(src, folder):
    """Copy a project file into `folder` and give every images folder it names one image."""
    target = folder / src.name
    shutil.copy(src, target)
    data = tomllib.loads(src.read_text())
    for group in ("subjects", "priors"):
        for table in data.get(group, {}).values():
            if "images" in table:
                images = src.parent / table["images"]
                if images.is_dir():
                    shutil.copytree(images, folder / table["images"], dirs_exist_ok=True)
                else:
                    write_image(folder / table["images"] / "00.png")
    return target


@pytest.mark.parametrize("path", PROJECTS + TEMPLATES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_file_loads_and_plans(path, tmp_path):
    assert path.read_text().startswith("# dbl build "), "shipped files open with the command that uses them"
    project = load_project(with_images(path, tmp_path))
    _, planned = executor.Workspace(project).plan()
    assert planned and all(p.stale for p in planned)
    kinds = {p.step.kind for p in planned}
    assert {"train", "render"} <= kinds


def test_flow_is_a_complete_flow():
    project = load_project(ROOT / "projects" / "flow.toml")
    assert project.settings.base_model == "tiny-sd"
    assert len(project.priors) == 1 and len(project.subjects) == 2
    assert len(project.blends) == 1 and len(project.renders) == 2


def test_demo_teaches_tiny_shapes_two_subjects_and_scores_them():
    project = load_project(ROOT / "projects" / "demo.toml")
    assert project.settings.base_model == "tiny-shapes"
    assert set(project.subjects) == {"ring", "cross"}
    for subject in project.subjects.values():
        assert subject.prior in project.priors, "every subject trains with prior preservation"
        captions = sorted((ROOT / "projects" / subject.images).glob("*.txt"))
        assert len(captions) == len(sorted((ROOT / "projects" / subject.images).glob("*.png")))
        identifier = subject.instance_prompt.split()[-2]
        assert all(identifier in c.read_text() for c in captions)
    assert project.blends["both"].adapters == (("ring", 1.0), ("cross", 1.0))
    assert "none" in project.renders["ring"].adapters, "the base model's renders, for contrast"
    # The ring trains and its eval scores as bench/shapes_eval.py's do: the demo shows its seed-0 figures.
    ring, yellow = project.subjects["ring"], project.priors["yellow"]
    assert (ring.train.steps, ring.train.learning_rate) == (SETTINGS["steps"], SETTINGS["learning_rate"])
    assert (ring.lora.rank, ring.lora.alpha, ring.lora.target_modules) == (
        SETTINGS["rank"],
        SETTINGS["alpha"],
        SETTINGS["target_modules"],
    )
    assert (ring.lora.text_encoder_rank, ring.lora.text_encoder_alpha) == (SETTINGS["text_encoder_rank"],) * 2
    assert (list(yellow.prompts), yellow.num_images) == (CLASS_PROMPTS, SETTINGS["class_images"])
    measure = project.renders[project.tables["eval"]["ring"].render]
    assert list(measure.adapters) == ["none", "ring"] and list(measure.seeds) == [0, 1, 2]
    assert list(measure.prompts) == PROMPTS
    assert (measure.steps, measure.guidance_scale) == (SETTINGS["render_steps"], SETTINGS["guidance_scale"])


def test_pets_is_the_classic_recipe(tmp_path):
    project = load_project(with_images(ROOT / "projects" / "pets.toml", tmp_path))
    dog = project.subjects["dog"]
    assert project.settings.base_model == "CompVis/stable-diffusion-v1-4"
    assert (dog.lora.rank, dog.lora.alpha, dog.lora.text_encoder_rank, dog.lora.text_encoder_alpha) == (
        16,
        27,
        16,
        17,
    )
    assert (dog.train.steps, dog.train.learning_rate, dog.train.resolution) == (800, 1e-4, 512)
    assert dog.train.train_text_encoder and dog.train.gradient_checkpointing
    assert project.priors["dog"].num_images == 200 and project.priors["dog"].loss_weight == 1.0
    assert project.blends["crochet_dog"].adapters == (("crochet", 1.0), ("dog", 1.05))
    park = project.renders["dog_park"]
    assert (park.steps, park.guidance_scale, park.negative_prompt) == (
        50,
        7.0,
        "low quality, blurry, unfinished",
    )


@pytest.mark.parametrize("name", [p.stem for p in TEMPLATES])
def test_init_from_template_then_plan(name, tmp_path, capsys):
    assert main(["init", str(tmp_path / "new"), "--template", name]) == 0
    out = capsys.readouterr().out
    assert f"created {tmp_path / 'new' / name}.toml" in out
    for folder in (tmp_path / "new" / "data").iterdir():
        write_image(folder / "00.png")
    assert main(["plan", str(tmp_path / "new" / f"{name}.toml")]) == 0
    assert main(["init", str(tmp_path / "new"), "--template", name]) == 2  # never overwrites


def test_init_in_a_repository_adds_dbl_folders_to_its_gitignore(tmp_path, capsys):
    (tmp_path / ".gitignore").write_text("node_modules/\n/build\n*.pyc")  # no newline at the end
    assert main(["init", str(tmp_path), "--template", "subject"]) == 0
    assert (tmp_path / ".gitignore").read_text() == "node_modules/\n/build\n*.pyc\n.dbl/\n"
    assert main(["init", str(tmp_path), "--template", "subject_and_style"]) == 0
    assert (tmp_path / ".gitignore").read_text() == "node_modules/\n/build\n*.pyc\n.dbl/\n"


def test_init_where_a_file_takes_a_folder_writes_nothing(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine").write_text("not a folder")
    assert main(["init", str(tmp_path), "--template", "subject"]) == 2
    assert (
        f"{tmp_path / 'data' / 'mine'} is a file, where the project needs a folder" in capsys.readouterr().err
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no half-made project to trip over


def test_init_below_a_file_names_that_file(tmp_path, capsys):
    (tmp_path / "notes").write_text("a file")
    assert main(["init", str(tmp_path / "notes" / "new")]) == 2
    assert f"dbl: {tmp_path / 'notes'} is a file, where the project needs a folder" in capsys.readouterr().err
    assert (tmp_path / "notes").read_text() == "a file"


def test_init_where_a_folder_cannot_be_made_or_written_says_so(tmp_path, capsys, monkeypatch):
    import errno
    import pathlib

    def mkdir(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    with monkeypatch.context() as patched:
        patched.setattr(pathlib.Path, "mkdir", mkdir)
        assert main(["init", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert (
        f"cannot make the folder {tmp_path / 'new'} (Permission denied); choose a folder you can write" in err
    )
    assert "Traceback" not in err and "Errno" not in err, err

    def write_text(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    assert main(["init", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'full' / 'subject.toml'} (No space left on device)" in err, err
    assert not (tmp_path / "full" / "subject.toml").exists()


def test_init_keeps_a_gitignore_in_another_encoding_and_leaves_nothing_when_it_cannot_read_it(
    tmp_path, capsys
):
    """A .gitignore that is not UTF-8 (git takes its bytes as they are) gets dbl's folders added, its own
    bytes kept; one that cannot be read stops init before it has made a folder or written a file."""
    (tmp_path / "latin").mkdir()
    (tmp_path / "latin" / ".gitignore").write_bytes(b"caf\xe9/\n")
    assert main(["init", str(tmp_path / "latin")]) == 0
    assert (tmp_path / "latin" / ".gitignore").read_bytes() == b"caf\xe9/\n.dbl/\nbuild/\n"
    assert (tmp_path / "latin" / "subject.toml").is_file()

    (tmp_path / "odd" / ".gitignore").mkdir(parents=True)
    assert main(["init", str(tmp_path / "odd")]) == 2
    err = capsys.readouterr().err
    assert f"cannot read {tmp_path / 'odd' / '.gitignore'} (Is a directory)" in err, err
    assert sorted(p.name for p in (tmp_path / "odd").iterdir()) == [".gitignore"]  # nothing made
    assert main(["init", str(tmp_path / "odd"), "--template", "subject"]) == 2  # and still so


def test_init_that_fails_late_takes_away_the_folders_it_made(tmp_path, capsys, monkeypatch):
    import errno
    import pathlib

    made = []
    real_open = pathlib.Path.open

    def failing_open(self, mode="r", *args, **kwargs):
        if self.name == ".gitignore" and "a" in mode:
            made.extend(p for p in (tmp_path / "new").rglob("*"))
            raise OSError(errno.EDQUOT, "Disk quota exceeded", str(self))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", failing_open)
    assert main(["init", str(tmp_path / "new" / "inner")]) == 2
    assert "Disk quota exceeded" in capsys.readouterr().err
    assert any(p.name == "subject.toml" for p in made)  # it got that far, and took it back
    assert list(tmp_path.iterdir()) == []


def test_init_names_a_dangling_link_and_quotes_the_command_it_prints(tmp_path, capsys):
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    assert main(["init", str(tmp_path / "gone")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'gone'} is a link to {tmp_path / 'nowhere'}, which does not exist" in err, err
    assert main(["init", str(tmp_path / "my pets")]) == 0
    assert f"then: dbl build '{tmp_path / 'my pets' / 'subject.toml'}'" in capsys.readouterr().out


def test_init_given_a_project_file_name_says_it_takes_a_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "pets.toml"]) == 2
    err = capsys.readouterr().err
    assert "pets.toml: `dbl init` takes the folder for the new project, not a project file" in err, err
    assert "`dbl init pets` makes pets/subject.toml" in err, err
    assert not list(tmp_path.iterdir())  # no folder named pets.toml


def test_init_lists_the_templates_and_names_them_for_an_unknown_one(tmp_path, capsys):
    assert main(["init", "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == sorted(p.stem for p in TEMPLATES)
    assert all(len(line.split()) > 1 for line in listed), listed  # each with what it is
    # the whole first sentence of each comment, which may wrap over several lines, in one column
    assert all(line.endswith((".", '."')) for line in listed), listed
    assert len({line.index(line.split()[1], len(line.split()[0])) for line in listed}) == 1, listed
    assert main(["init", str(tmp_path / "new"), "--template", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no template 'nope'; templates: " + ", ".join(sorted(p.stem for p in TEMPLATES)) in err
    assert not (tmp_path / "new").exists()
    assert main(["init", str(tmp_path / "new"), "--template", "subjct"]) == 2
    assert "no template 'subjct'; did you mean 'subject'? templates: " in capsys.readouterr().err
    assert main(["init", str(tmp_path / "new"), "--template", "subject.toml"]) == 0  # the file's name
    assert (tmp_path / "new" / "subject.toml").is_file()
    assert main(["init", str(tmp_path / "other"), "--list"]) == 2
    assert "dbl init --list lists the templates and makes no project" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_readme_reference_is_the_schema():
    from runner.project.docs import reference_markdown, tables

    readme = (ROOT / "README.md").read_text()
    assert reference_markdown() in readme, "regenerate it: python -m runner.project.docs"
    for table, cls in tables().items():
        for f in schema.keys_of(cls):
            assert re.search(rf"^\| `{f.name}` \|", readme, re.M), f"{table}.{f.name}"


def test_readme_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    assert "dbl build projects/demo.toml" in blocks[0]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci.replace("python -m pytest", "").strip() == "" and "python -m pytest" in blocks[1]
    assert sys.version_info >= (3, 10)
