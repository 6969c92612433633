"""A valid project file, and helpers that load a variant of it and give its problems, for the project-file tests.

Import the fixture into a test module by name (`from tests.project_fixtures import folder, ...`).
"""

from __future__ import annotations

import textwrap

import pytest

from runner.project import ProjectError, load_project
from tests.conftest import write_image

GOOD = """
[project]
base_model = "tiny-sd"

[priors.dog]
class_prompt = "a photo of dog"

[subjects.dog]
images = "data/dog"
instance_prompt = "a photo of sks dog"
prior = "dog"

[subjects.toy]
images = "data/toy"
instance_prompt = "a toy"

[blends.mix]
adapters = { toy = 1.0, dog = 1.05 }

[renders.park]
adapter = "mix"
prompts = ["sks dog in a park"]
"""


@pytest.fixture
def folder(tmp_path):
    write_image(tmp_path / "data/dog/00.png")
    write_image(tmp_path / "data/toy/00.png")
    return tmp_path


def problems(folder, text: str) -> list[str]:
    path = folder / "p.toml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ProjectError) as info:
        load_project(path)
    assert info.value.report().startswith(f"{path}: ") or "p.toml:" in info.value.report()
    return [str(p) for p in info.value.problems]


def problem_keys(folder, text: str) -> list[str]:
    """The keys of the file's problems, in the order they are said."""
    return [p.split(":")[0] for p in problems(folder, text)]


def write_project(folder, text: str):
    """`text`, dedented, as the project file p.toml in `folder`; its path."""
    path = folder / "p.toml"
    path.write_text(textwrap.dedent(text))
    return path


def assert_problem_said(folder, extra: str | None, expected: str) -> None:
    """`expected`, with its {line} the line of the offending key, is among the problems of GOOD plus `extra`
    (None: GOOD on a base model file that does not exist)."""
    if extra is None:
        text = GOOD.replace('base_model = "tiny-sd"', 'base_model = "model.ckpt"')
    else:
        text = GOOD + "\n" + extra
    # The line of the offending key: the last line of `extra` that mentions it, counted in the file.
    found = problems(folder, text)
    lines = textwrap.dedent(text).splitlines()
    for n in range(len(lines), 0, -1):
        candidate = expected.format(line=n, folder=folder)
        if candidate in found:
            break
    else:
        raise AssertionError(f"{expected!r} not in {found!r}")
