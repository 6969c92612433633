"""Every shipped project file and template, mutated at random with a fixed seed: each mutant loads, or is
a ProjectError whose problems are one printable line each; never another exception."""

from __future__ import annotations

import random
import re
import shutil
import warnings
from pathlib import Path

import pytest

from runner.project import ProjectError, load_project
from tests.conftest import write_image

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(ROOT.glob("projects/*.toml")) + sorted(ROOT.glob("templates/*.toml"))
# Values that once escaped as an OSError (a name too long to look up), or that a report must escape.
ODD = [
    '""', '" "', "0", "-1", "nan", "inf", "1e300", "true", "[]", "{}", "2024-01-02", '"../.."', '"~"', '"/"',
    '"a\\u0000b"', '"a\\nb\\u001b[31m"', '"\\u2028"', f'"{"x" * 300}"', f'"{"ab/" * 1500}"', '"none"', '"🐶"',
]  # fmt: skip
KEYVAL = re.compile(r"^(\s*[A-Za-z0-9_]+\s*=\s*)(.*)$")


def mutants(text: str, rng: random.Random, count: int):
    lines = text.split("\n")
    keyed = [i for i, line in enumerate(lines) if KEYVAL.match(line) and not line.rstrip().endswith("[")]
    for _ in range(count):
        changed = list(lines)
        for _ in range(rng.choice([1, 2, 3])):
            i = rng.choice(keyed)
            what = rng.random()
            if what < 0.6:
                changed[i] = KEYVAL.sub(lambda m: m.group(1) + rng.choice(ODD), changed[i])
            elif what < 0.8:
                changed[i] = ""  # a key left out
            else:
                changed.insert(i, changed[i])  # a key set twice
        yield "\n".join(changed)


@pytest.mark.parametrize("shipped", SHIPPED, ids=[f"{p.parent.name}/{p.name}" for p in SHIPPED])
def test_mutated_shipped_files_load_or_say_their_problems(tmp_path, shipped):
    shutil.copytree(ROOT / "projects", tmp_path, dirs_exist_ok=True)
    for folder in ("data/mine", "data/dog", "data/style", "pets/dog", "pets/crochet"):
        write_image(tmp_path / folder / "00.png")
    path = tmp_path / shipped.name
    rng = random.Random(shipped.name)
    loaded = refused = 0
    for text in mutants(shipped.read_text(), rng, 25):
        path.write_text(text)
        try:
            with warnings.catch_warnings():  # what loads but looks wrong is said as a warning: expected here
                warnings.simplefilter("ignore")
                load_project(path)
            loaded += 1
        except ProjectError as exc:
            refused += 1
            assert exc.problems, text
            assert all(line.isprintable() for line in exc.report().split("\n")), exc.report()
    assert refused > 0  # the mutations reach the checks
