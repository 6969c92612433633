"""Project files that load with a warning naming its line: likely mistakes that still make a valid project."""

from __future__ import annotations

import shutil

import pytest

from runner.project import load_project
from tests.project_fixtures import GOOD, folder, problems  # noqa: F401 (a fixture)


def test_a_file_that_is_not_utf8_loads_as_before_with_a_warning_naming_its_line(folder):  # noqa: F811
    path = folder / "p.toml"
    path.write_bytes(GOOD.replace("a toy", "a caf\xe9 toy").encode("latin-1"))
    with pytest.warns(UserWarning, match=r"p.toml is not UTF-8 \(line 15\).*save the file as UTF-8"):
        project = load_project(path)
    assert project.tables["train"]["toy"].instance_prompt == "a caf\ufffd toy"


def test_a_prior_no_subject_uses_loads_with_a_warning_naming_its_line(folder):  # noqa: F811
    path = folder / "p.toml"
    path.write_text(GOOD + '\n[priors.cat]\nclass_prompt = "a photo of cat"\n')
    line = path.read_text().splitlines().index("[priors.cat]") + 1
    with pytest.warns(UserWarning) as said:
        assert "cat" in load_project(path).priors
    assert [str(w.message) for w in said] == [
        f'{path}: priors.cat: no subject uses this prior (line {line}) - add prior = "cat" to a subject, '
        "or remove it"
    ]


@pytest.mark.parametrize(
    "written, said",
    [
        ('" "', "is empty: the class images would have no prompt"),
        ('["a photo of dog", ""]', "prompt 1 is empty: the class images of its turn would have no prompt"),
    ],
)
def test_an_empty_class_prompt_loads_with_a_warning_naming_its_line(folder, written, said):  # noqa: F811
    path = folder / "p.toml"
    path.write_text(GOOD.replace('class_prompt = "a photo of dog"', f"class_prompt = {written}"))
    line = path.read_text().splitlines().index(f"class_prompt = {written}") + 1
    with pytest.warns(UserWarning) as warned:
        load_project(path)  # a project built with it must still load
    assert [str(w.message) for w in warned] == [
        f'{path}: priors.dog.class_prompt: {said} (line {line}) - name the class, e.g. "a photo of dog"'
    ]


def test_an_empty_instance_prompt_without_captions_loads_with_a_warning_naming_its_line(folder):  # noqa: F811
    path = folder / "p.toml"
    path.write_text(GOOD.replace('instance_prompt = "a toy"', 'instance_prompt = ""'))
    line = path.read_text().splitlines().index('instance_prompt = ""') + 1
    with pytest.warns(UserWarning) as warned:
        load_project(path)  # a project built with it must still load
    assert [str(w.message) for w in warned] == [
        f"{path}: subjects.toy.instance_prompt: is empty: the photos would train on no prompt, and no word "
        f'would call up the subject (line {line}) - give the subject a rare word, e.g. "a photo of sks toy"'
    ]
    path.write_text(
        GOOD.replace('instance_prompt = "a toy"', 'instance_prompt = ""\ncaption_extension = ".txt"')
    )
    load_project(path)  # every photo may have its caption: nothing said


def test_trigger_in_a_render_prompt_loads_with_a_warning_giving_its_words(folder):  # noqa: F811
    path = folder / "p.toml"
    text = GOOD.replace('prior = "dog"', 'prior = "dog"\ntrigger = "sks dog"')
    path.write_text(text.replace('prompts = ["sks dog in a park"]', 'prompts = ["[trigger] in a park"]'))
    line = path.read_text().splitlines().index('prompts = ["[trigger] in a park"]') + 1
    with pytest.warns(UserWarning) as warned:
        load_project(path)  # the render mixes toy and dog: the words of dog's trigger
    assert [str(w.message) for w in warned] == [
        f"{path}: renders.park.prompts: [trigger] is rendered as written: only captions and instance prompts "
        f"replace it (line {line}) - write the words it stands for, e.g. 'sks dog'"
    ]


def test_names_that_differ_only_in_case_load_with_a_warning_naming_both(folder):  # noqa: F811
    path = folder / "p.toml"
    path.write_text(GOOD + '\n[renders.Park]\nadapter = "dog"\nprompts = ["x"]\n')
    lines = path.read_text().splitlines()
    park, twin = lines.index("[renders.park]") + 1, lines.index("[renders.Park]") + 1
    with pytest.warns(UserWarning) as said:
        assert set(load_project(path).renders) == {"park", "Park"}  # a lockfile may hold both: still loads
    assert [str(w.message) for w in said] == [
        f"{path}: renders.Park: 'Park' differs only in case from renders.park, whose table is at line {park}: "
        f"on macOS and Windows, whose file names ignore case, both would write one output folder (line {twin}) "
        "- rename one of them"
    ]


def test_empty_images_loads_as_the_project_folder_with_a_warning(folder):  # noqa: F811
    path = folder / "p.toml"
    text = '[project]\nbase_model = "tiny-sd"\n[subjects.toy]\nimages = ""\ninstance_prompt = "a sks toy"\n'
    path.write_text(text)
    with pytest.warns(UserWarning) as said:
        assert load_project(path).subjects["toy"].images == str(folder)  # as it loaded before
    assert [str(w.message) for w in said] == [
        f"{path}: subjects.toy.images: is empty, which names the project file's folder and every image below "
        'it (line 4) - write images = "." if that is meant, or name the folder of the images'
    ]
    shutil.rmtree(folder / "data")  # no image below it: said as the folder '.', not ''
    assert "subjects.toy.images: folder . holds no images" in "\n".join(problems(folder, text))


def test_a_name_windows_keeps_for_a_device_loads_with_a_warning(folder):  # noqa: F811
    path = folder / "p.toml"
    path.write_text(GOOD + '\n[renders.CON]\nadapter = "dog"\nprompts = ["x"]\n')
    line = path.read_text().splitlines().index("[renders.CON]") + 1
    with pytest.warns(UserWarning) as said:
        assert "CON" in load_project(path).renders  # valid where it was built
    assert [str(w.message) for w in said] == [
        f"{path}: renders.CON: 'CON' is a device name on Windows, where no folder can have it: its outputs "
        f"could not be written there (line {line}) - rename it"
    ]


def test_a_prior_s_caption_extension_without_images_loads_with_a_warning(folder):  # noqa: F811
    path = folder / "p.toml"
    path.write_text(
        GOOD.replace(
            'class_prompt = "a photo of dog"', 'class_prompt = "a photo of dog"\ncaption_extension = ".txt"'
        )
    )
    line = path.read_text().splitlines().index('caption_extension = ".txt"') + 1
    with pytest.warns(UserWarning) as said:
        load_project(path)
    assert [str(w.message) for w in said] == [
        f"{path}: priors.dog.caption_extension: reads the captions of your own class images, and the prior has "
        f"none (line {line}) - give them with images = ..., or remove the key"
    ]
