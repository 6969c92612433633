"""Project files and the folders they name: image folders, the output folder, and names and paths the file
system cannot hold."""

from __future__ import annotations

import textwrap

import pytest

from runner.errors import StepError
from runner.project import load_project
from tests.conftest import write_image
from tests.project_fixtures import GOOD, folder, problems, write_project  # noqa: F401 (a fixture)


def test_an_output_folder_inside_an_image_folder_is_a_problem(folder):  # noqa: F811
    """Outputs there would be read back as training images: every build would retrain on its renders."""
    inside = GOOD.replace('base_model = "tiny-sd"', 'base_model = "tiny-sd"\nout = "data/dog/out"')
    assert problems(folder, inside) == [
        "project.out: the output folder data/dog/out is inside the image folder of subjects.dog (line 4) "
        "- the next build would train on the images of its priors and renders; put the outputs elsewhere, e.g. "
        'out = "build/p"'
    ]
    (folder / "data/dog/00.png").rename(folder / "00.png")
    here = GOOD.replace('images = "data/dog"', 'images = "."')
    assert problems(folder, here) == [
        "subjects.dog.images: the output folder build/p is inside the image folder of subjects.dog (line 9) "
        "- the next build would train on the images of its priors and renders; put the outputs elsewhere, e.g. "
        'out = "../build/p"'
    ]
    beside = GOOD.replace('base_model = "tiny-sd"', 'base_model = "tiny-sd"\nout = "."')
    load_project(write_project(folder, beside.replace('images = "data/dog"', 'images = "data/toy"')))
    # Adapters alone write no images there: valid, as it was.
    adapters_only = here.split("[priors.dog]")[0] + here.split('class_prompt = "a photo of dog"\n')[1]
    adapters_only = adapters_only.split("[renders.park]")[0].replace('prior = "dog"\n', "")
    assert load_project(write_project(folder, adapters_only)).subjects["dog"].images == str(folder)


def test_empty_images_folder(folder):  # noqa: F811
    (folder / "data/empty").mkdir()
    (folder / "data/empty/notes.txt").write_text("no photos yet")
    found = problems(folder, GOOD + "\n[subjects.cat]\nimages = 'data/empty'\ninstance_prompt = 'x'\n")
    assert found == [
        "subjects.cat.images: folder data/empty holds no images (.jpg, .png, .webp ...) (line 25) - add a few photos of the subject"
    ]


def test_an_images_folder_that_cannot_be_read_says_so_not_that_it_is_empty(folder, monkeypatch):  # noqa: F811
    import os

    from runner.project import checks

    access = os.access
    dog = str(folder / "data/dog")
    monkeypatch.setattr(checks.os, "access", lambda path, mode: str(path) != dog and access(path, mode))
    assert problems(folder, GOOD) == [
        "subjects.dog.images: folder data/dog cannot be read (permission denied) (line 9) "
        "- give read access to it (chmod u+rx data/dog)"
    ]


def test_a_folder_below_an_images_folder_that_cannot_be_read_is_an_error_naming_it(
    folder,  # noqa: F811
    monkeypatch,
    capsys,
):
    """It was left out without a word: the subject trained on the images it could list."""
    import errno
    import os

    from runner.cli import main
    from runner.imagefiles import list_images

    write_image(folder / "data/toy/more/01.png")
    path = write_project(folder, GOOD)
    assert main(["plan", str(path)]) == 0
    capsys.readouterr()
    scandir = os.scandir
    more = str(folder / "data/toy/more")

    def unlistable(path="."):
        if os.fspath(path) == more:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", unlistable)
    with pytest.raises(StepError, match="more: the folder cannot be read"):
        list_images(folder / "data/toy")
    for command in ("plan", "build"):
        assert main([command, str(path)]) == 2, command
        err = capsys.readouterr().err
        assert f"dbl: {more}: the folder cannot be read (Permission denied); give read access to it" in err, (
            err
        )


def test_a_folder_of_pictures_dbl_does_not_read_says_what_it_holds(folder):  # noqa: F811
    (folder / "data/phone").mkdir()
    for name in ["IMG_1.HEIC", "IMG_2.HEIC", "IMG_3.HEIC", "IMG_4.heic"]:
        (folder / "data/phone" / name).write_bytes(b"not decoded")
    (folder / "data/linked").mkdir()
    (folder / "data/linked/dog").symlink_to(folder / "data/dog", target_is_directory=True)
    text = "\n[subjects.cat]\nimages = 'data/phone'\ninstance_prompt = 'x'\n"
    found = problems(folder, GOOD + text + text.replace("cat", "fox").replace("phone", "linked"))
    assert found == [
        "subjects.cat.images: folder data/phone holds no images (.jpg, .png, .webp ...), only IMG_1.HEIC, "
        "IMG_2.HEIC, IMG_3.HEIC and 1 more (line 25) - convert them to .jpg or .png",
        "subjects.fox.images: folder data/linked holds no images (.jpg, .png, .webp ...), only symbolic links to "
        "folders, which dbl does not follow: dog (line 29) - copy their images in, or name the folder they "
        "link to",
    ]


LONG = "x" * 300


@pytest.mark.parametrize(
    "old, new, key, message",
    [
        (
            'images = "data/dog"',
            f'images = "data/{LONG}"',
            "subjects.dog.images",
            "holds a name of 300 bytes",
        ),
        ('images = "data/dog"', f'images = "{"ab/" * 1500}"', "subjects.dog.images", "is 4500 bytes long"),
        (
            'base_model = "tiny-sd"',
            f'base_model = "{LONG}"',
            "project.base_model",
            "holds a name of 300 bytes",
        ),
        (
            'base_model = "tiny-sd"',
            f'base_model = "models/{LONG}.safetensors"',
            "project.base_model",
            "holds a name",
        ),
        (
            'prior = "dog"',
            f'prior = "dog"\ncaption_extension = ".{LONG}"',
            "subjects.dog.caption_extension",
            "holds",
        ),
        ('base_model = "tiny-sd"', f'base_model = "tiny-sd"\nout = "{LONG}"', "project.out", "holds a name"),
        (
            'class_prompt = "a photo of dog"',
            f'class_prompt = "a"\nimages = "{LONG}"',
            "priors.dog.images",
            "holds",
        ),
    ],
    ids=["images", "deep images", "hub id", "checkpoint", "caption extension", "out", "class images"],
)
def test_a_path_too_long_for_the_file_system_is_a_problem_of_its_key(folder, old, new, key, message):  # noqa: F811
    # The OS refuses to look such a path up (ENAMETOOLONG): it was an OSError and exit 1, naming no key.
    found = problems(folder, GOOD.replace(old, new))
    assert len(found) == 1 and found[0].startswith(f"{key}: {message}") and found[0].endswith("- shorten it")


@pytest.mark.parametrize(
    "old, new, key, step",
    [
        ('images = "data/dog"', 'images = "adapters/dog"', "subjects.dog.images", "train:dog"),
        (
            'class_prompt = "a photo of dog"',
            'class_prompt = "a"\nimages = "priors/dog/mine"',
            "priors.dog.images",
            "prior:dog",
        ),
    ],
    ids=["photos", "class images"],
)
def test_an_image_folder_inside_a_step_s_output_folder_is_a_problem(folder, old, new, key, step):  # noqa: F811
    # With out = "." the train step's outputs replace adapters/dog/: the photos kept there were deleted.
    shown = new.split('images = "')[1].rstrip('"')
    write_image(folder / shown / "00.png")
    text = GOOD.replace('base_model = "tiny-sd"', 'base_model = "tiny-sd"\nout = "."').replace(old, new)
    found = problems(folder, text)
    assert [p for p in found if p.startswith(key)] == [
        f"{key}: folder {shown} lies in the output folder of {step}, which its outputs replace: a build deletes "
        f"the images in it (line {textwrap.dedent(text).split(chr(10)).index(new.split(chr(10))[-1]) + 1}) - move "
        "the images to a folder of their own, or set out in [project] to another folder"
    ]


def test_an_image_folder_beside_the_outputs_is_no_problem(folder):  # noqa: F811
    write_image(folder / "adapters/mine/00.png")  # a folder no step of the project writes
    text = GOOD.replace('base_model = "tiny-sd"', 'base_model = "tiny-sd"\nout = "."')
    (folder / "p.toml").write_text(text.replace('images = "data/toy"', 'images = "adapters/mine"'))
    assert load_project(folder / "p.toml").tables["train"]["toy"].images == str(folder / "adapters/mine")


@pytest.mark.parametrize(
    "out, file, key, fix",
    [
        ('out = "notes.txt"', "notes.txt", "project.out", 'name a folder in out = "..."'),
        ('out = "notes.txt/outputs"', "notes.txt", "project.out", 'name a folder in out = "..."'),
        (None, "build", "project", 'move build away, or set out = "..." in [project]'),
    ],
    ids=["out", "inside a file", "default"],
)
def test_an_output_folder_that_cannot_be_made_is_a_problem(folder, out, file, key, fix):  # noqa: F811
    # The build ran its first step, then could not store its outputs ("Not a directory").
    (folder / file).write_text("#!/bin/sh\n")
    text = GOOD.replace('base_model = "tiny-sd"', f'base_model = "tiny-sd"\n{out}') if out else GOOD
    found = problems(folder, text)
    shown = out.split('"')[1] if out else "build/p"
    line = 4 if out else 2
    assert found == [
        f"{key}: the output folder {shown} cannot be made: {file} is a file (line {line}) - {fix}"
    ]


def test_a_name_too_long_for_its_step_s_folders_is_a_problem(folder):  # noqa: F811
    # The step made .dbl/tmp/<stem>/render-<name>, and on commit .staged-render-<name>: over 255 bytes,
    # "[Errno 36] File name too long", after a train step's work was done.
    render, subject = "r" * 241, "d" * 238
    text = f"""
    [project]
    base_model = "tiny-sd"

    [subjects.{subject}]
    images = "data/dog"
    instance_prompt = "a photo of sks dog"
    [subjects.{subject}.train]
    save_steps = [400]

    [renders.{render}]
    adapter = "none"
    prompts = ["a dog"]
    """
    assert problems(folder, text) == [
        f"subjects.{subject}: a name of 238 characters is too long: the folder .staged-snapshot-<name>@400 that "
        "a build makes would be 259 bytes, over the 255 a file name holds (line 5) - shorten it to 234 characters "
        "at most",
        f"renders.{render}: a name of 241 characters is too long: the folder .staged-render-<name> that a build "
        "makes would be 256 bytes, over the 255 a file name holds (line 11) - shorten it to 240 characters at most",
    ]


@pytest.mark.parametrize(
    "name, problem",
    [
        ("../../x", "names the output folder build/<name>, which would be outside build/"),
        ("/tmp/x", "names the output folder build/<name>, which would be outside build/"),
        (
            "n" * 300,
            "names the output folder build/<name>, and holds a name over the 255 bytes a file name holds",
        ),
    ],
    ids=["up", "absolute", "too long"],
)
def test_a_project_name_that_cannot_name_the_output_folder_is_a_problem(folder, name, problem):  # noqa: F811
    # Without out, the outputs go to build/<name>: "../../x" wrote them two folders above the project's.
    found = problems(
        folder, GOOD.replace('base_model = "tiny-sd"', f'base_model = "tiny-sd"\nname = "{name}"')
    )
    assert found == [f"project.name: '{name}' {problem} (line 4) - rename the project, or set out = \"...\""]


def test_a_project_name_with_a_slash_still_names_a_folder_in_build(folder):  # noqa: F811
    (folder / "p.toml").write_text(
        GOOD.replace('base_model = "tiny-sd"', 'base_model = "tiny-sd"\nname = "team/dog"')
    )
    assert load_project(folder / "p.toml").out == folder / "build" / "team" / "dog"
