"""Project files: good files resolve; every problem is said once, located, and all at once."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from runner.project import ProjectError, load_project
from tests.project_fixtures import GOOD, folder, problem_keys, problems, write_project  # noqa: F401 (a fixture)


def test_good_project_resolves_defaults_and_overrides(folder):  # noqa: F811
    path = folder / "p.toml"
    path.write_text(
        GOOD + "\n[train]\nsteps = 10\n[subjects.dog.train]\nsteps = 20\n[subjects.dog.lora]\nrank = 8\n"
    )
    project = load_project(path)
    assert project.name == "p"
    assert project.out == folder / "build" / "p"
    dog, toy = project.subjects["dog"], project.subjects["toy"]
    assert dog.train.steps == 20 and toy.train.steps == 10
    assert dog.lora.rank == 8 and toy.lora.rank == 16 and dog.lora.alpha == 27
    assert dog.images == str(folder / "data" / "dog")
    assert project.blends["mix"].adapters == (("toy", 1.0), ("dog", 1.05))
    assert project.renders["park"].seeds == [0]


def test_a_blend_component_of_one_parent_keeps_that_parent_s_rank(folder):  # noqa: F811
    # Only dog trains a text encoder: PEFT copies its LoRA into the svd blend at its own rank (4), not at
    # svd_rank (16), so a linear blend of that blend with dog has equal ranks everywhere.
    text = GOOD + textwrap.dedent(
        """
        [subjects.dog.lora]
        text_encoder_rank = 4
        [subjects.toy.train]
        train_text_encoder = false
        [subjects.toy.lora]
        rank = 8
        [blends.s]
        adapters = { dog = 1.0, toy = 0.5 }
        method = "svd"
        svd_rank = 16
        [blends.lin]
        adapters = { s = 1.0, dog = 0.5 }
        method = "linear"
        """
    )
    assert list(load_project(write_project(folder, text)).blends) == ["mix", "s", "lin"]


def test_a_render_lists_several_adapters(folder):  # noqa: F811
    path = folder / "p.toml"
    path.write_text(GOOD + '\n[renders.grid]\nadapters = ["dog", "mix", "none"]\nprompts = ["x"]\n')
    project = load_project(path)
    assert project.renders["grid"].adapter is None
    assert project.renders["grid"].adapter_names == ["dog", "mix", "none"]
    assert project.renders["park"].adapter_names == ["mix"]


def test_render_adapter_problems_name_their_line(folder):  # noqa: F811
    text = GOOD + '\n[renders.r]\nadapter = "dog"\nadapters = ["dog", "cat"]\nprompts = ["x"]\n'
    line = textwrap.dedent(text).splitlines().index('adapters = ["dog", "cat"]') + 1
    assert problems(folder, text) == [
        f"renders.r.adapters: adapter and adapters are both given (line {line}) - keep adapter for one "
        "adapter, or adapters for one grid column per adapter",
        f"renders.r.adapters: 'cat' is not a subject or blend (line {line}) - subjects: dog, toy; "
        "blends: mix; or 'none'",
    ]
    text = GOOD + '\n[renders.r]\nprompts = ["x"]\n'
    header = textwrap.dedent(text).splitlines().index("[renders.r]") + 1
    assert problems(folder, text)[0].startswith(
        f"renders.r: missing required key 'adapter' or 'adapters' (line {header})"
    )


def test_every_problem_is_reported_at_once(folder):  # noqa: F811
    text = GOOD + "\n[train]\nstepz = 3\nresolution = 'big'\n[renders.r]\nadapter = 'cat'\nprompts = ['x']\n"
    found = problems(folder, text)
    assert len(found) == 3
    assert (
        any("stepz" in p for p in found)
        and any("resolution" in p for p in found)
        and any("'cat'" in p for p in found)
    )


def test_a_prior_with_a_problem_is_not_also_missing_for_its_subjects(folder):  # noqa: F811
    text = GOOD.replace('class_prompt = "a photo of dog"', 'class_prompt = "a photo of dog"\nnum_imgs = 3')
    line = textwrap.dedent(text).splitlines().index("num_imgs = 3") + 1
    assert problems(folder, text) == [
        f"priors.dog: unknown key 'num_imgs' (line {line}) - did you mean 'num_images'?"
    ]


@pytest.mark.parametrize(
    "broken, extra",
    [
        ('instance_prompt = "a photo of sks dog"', ""),  # the subject misses its prompt
        ('prior = "dog"', 'prior = "dog"\nrnak = 4'),  # a key it does not know
        ("[renders.park]", "[renders.park]\nwidht = 64"),
        ("adapters = { toy = 1.0, dog = 1.05 }", 'adapters = { toy = 1.0, dog = 1.05 }\nmethod = "lin"'),
    ],
    ids=["subject", "subject key", "render", "blend"],
)
def test_a_table_with_a_problem_is_not_also_missing_where_it_is_named(folder, broken, extra):  # noqa: F811
    text = GOOD.replace(broken, extra) + textwrap.dedent(
        """
        [subjects.dog.train]
        save_steps = [2]
        [blends.mix2]
        adapters = { mix = 1.0, dog = 1.0 }
        [renders.grid]
        adapters = ["dog", "dog@2", "mix"]
        prompts = ["x"]
        [evals.e]
        render = "park"
        subject = "dog"
        identifier = "sks"
        """
    )
    found = problems(folder, text)
    assert len(found) == 1, found


def test_snapshots_of_a_subject_whose_train_table_has_a_problem_are_not_also_missing(folder):  # noqa: F811
    text = (
        GOOD
        + '\n[subjects.dog.train]\nsave_steps = [2]\nstepz = 4\n[renders.r]\nadapter = "dog@2"\nprompts = ["x"]\n'
    )
    assert problem_keys(folder, text) == ["subjects.dog.train"]


def test_a_subject_whose_lora_table_has_a_problem_is_not_also_unblendable(folder):  # noqa: F811
    # [lora] would make dog a rank-16 DoRA adapter, beside toy's rank 8: neither is what its own table says.
    own = "\n[subjects.{}.lora]\nrank = 8\nuse_dora = false\n"
    text = (
        GOOD
        + '\n[lora]\nuse_dora = true\n[blends.mix2]\nadapters = { mix = 1.0, toy = 1.0 }\nmethod = "linear"\n'
    )
    text += own.format("dog") + "rnak = 4\n" + own.format("toy")
    assert problem_keys(folder, text) == ["subjects.dog.lora"]


def test_a_train_table_with_a_problem_does_not_make_problems_of_a_subject_s_own_train_keys(folder):  # noqa: F811
    # Without [train], dog's keys were checked against the defaults (steps 800, resolution 512).
    text = GOOD + textwrap.dedent(
        """
        [train]
        steps = 1000
        resolution = 1024
        stepz = 3
        [subjects.dog.train]
        save_steps = [900]
        bucket_min_side = 768
        """
    )
    assert problem_keys(folder, text) == ["train"]


def test_a_table_with_a_bad_name_is_not_also_missing_where_it_is_named(folder):  # noqa: F811
    text = (
        GOOD
        + '\n[subjects."my toy"]\nimages = "data/toy"\ninstance_prompt = "x"\n[renders.r]\nadapter = "my toy"\nprompts = ["x"]\n'
    )
    assert problem_keys(folder, text) == ["subjects.my toy"]


def test_a_size_off_the_grid_is_reported_beside_its_table_s_other_problems(folder):  # noqa: F811
    text = GOOD + '\n[renders.r]\nadapter = "dog"\nprompts = ["x"]\nwidth = 60\nheight = 0\n'
    found = problems(folder, text)
    assert any(p.startswith("renders.r.width: must be a multiple of 8, got 60") for p in found), found
    assert any(p.startswith("renders.r.height: must be at least 8, got 0") for p in found), found


def test_invalid_toml_names_the_line(folder):  # noqa: F811
    found = problems(folder, "[project]\nbase_model = \n")
    assert found == ["invalid TOML: Invalid value at column 14 (line 2) - fix the syntax"]


@pytest.mark.parametrize(
    "theirs",
    ['negative_prompt = "blurry"', "steps = 30"],  # another key on the other side, or the same one changed
)
def test_a_merge_conflict_left_in_the_project_file_is_named_with_its_fix(folder, theirs):  # noqa: F811
    # `git merge` of two branches that changed the same lines leaves both sides between git's markers.
    render = '\n[renders.r]\nadapter = "dog"\nprompts = ["x"]\n<<<<<<< HEAD\nsteps = 20\n=======\n'
    found = problems(folder, GOOD + render + theirs + "\n>>>>>>> theirs\n")
    assert found == [
        "unresolved merge conflict: `<<<<<<< HEAD` (line 27) - keep the lines you want, "
        "then delete git's marker lines (<<<<<<<, =======, >>>>>>>)"
    ]


def test_a_separator_in_a_multi_line_string_is_no_merge_conflict(folder):  # noqa: F811
    text = GOOD + '\n[renders.r]\nadapter = "dog"\nprompts = ["""a dog\n=======\n"""]\nsteps = \n'
    assert problems(folder, text) == ["invalid TOML: Invalid value at column 9 (line 29) - fix the syntax"]


def test_missing_file(tmp_path):
    with pytest.raises(ProjectError, match="no such project file"):
        load_project(tmp_path / "nope.toml")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="makes a named pipe")
def test_a_named_pipe_or_device_is_no_project_file(tmp_path):
    os.mkfifo(tmp_path / "pipe.toml")  # reading it would wait for a writer
    for path in (tmp_path / "pipe.toml", Path(os.devnull)):
        with pytest.raises(ProjectError, match="not a regular file - name a project file"):
            load_project(path)


def test_a_folder_is_no_project_file_and_its_project_files_are_named(tmp_path):
    with pytest.raises(ProjectError, match="a folder, not a project file - run `dbl init` in it"):
        load_project(tmp_path)
    (tmp_path / "b.toml").write_text("")
    (tmp_path / "a.toml").write_text("")
    with pytest.raises(ProjectError, match="a folder, not a project file - name one of: a.toml, b.toml"):
        load_project(tmp_path)


def test_report_format(folder):  # noqa: F811
    path = folder / "p.toml"
    path.write_text(GOOD + "\n[subjects.dog.lora]\nrnak = 3\n")
    with pytest.raises(ProjectError) as info:
        load_project(path)
    report = info.value.report().splitlines()
    assert report[0].endswith("p.toml: 1 problem")
    assert report[1] == "  subjects.dog.lora: unknown key 'rnak' (line 25) - did you mean 'rank'?"


def test_a_key_set_twice_is_named_with_both_lines(folder):  # noqa: F811
    found = problems(folder, GOOD + '\n[renders.r]\nadapter = "dog"\nprompts = ["x"]\nprompts = ["y"]\n')
    assert found == ["renders.r.prompts: set twice, first on line 26 (line 27) - keep one of them"]


def test_a_table_defined_twice_is_named(folder):  # noqa: F811
    found = problems(folder, GOOD + "\n[renders.park]\nseeds = [1]\n")
    assert found == ["renders.park: set twice, first on line 20 (line 24) - keep one of them"]


@pytest.mark.parametrize("key", ["gradient_checkpointing", "compile", "cuda_graphs"])
@pytest.mark.parametrize(
    "written, value", [("", "auto"), ('"auto"', "auto"), ("true", True), ("false", False)]
)
def test_speed_switches_are_auto_true_or_false_and_never_fingerprinted(folder, key, written, value):  # noqa: F811
    from runner.project.fields import fingerprinted_fields

    path = folder / "p.toml"
    path.write_text(GOOD + (f"\n[train]\n{key} = {written}\n" if written else ""))
    dog = load_project(path).subjects["dog"]
    assert getattr(dog.train, key) == value
    # Not an input of the train fingerprint: a project that wrote true or false keeps its lockfile fresh.
    assert key not in fingerprinted_fields(dog.train)


def test_a_key_at_the_wrong_level_names_the_table_it_belongs_in(folder):  # noqa: F811
    text = "steps = 5\n" + GOOD.replace('prior = "dog"', 'prior = "dog"\nrank = 4')
    text += "\n[train]\nrank = 8\n[subjects.toy.lora]\nsteps = 3\n"
    found = problems(folder, text)
    for wrong in (
        "unknown key 'steps' (line 1) - it belongs in [train]: move it there",
        "train: unknown key 'rank' (line 27) - it belongs in [lora]: move it there",
        "subjects.toy.lora: unknown key 'steps' (line 29) - it belongs in [subjects.toy.train]: move it there",
        "subjects.dog: unknown key 'rank' (line 13) - it belongs in [subjects.dog.lora]: move it there",
    ):
        assert wrong in found, found


def test_a_blend_cycle_is_one_problem_that_names_its_blends(folder):  # noqa: F811
    text = GOOD + "\n[blends.a]\nadapters = { b = 1.0 }\n[blends.b]\nadapters = { dog = 1.0, a = 1.0 }\n"
    text += "[blends.self]\nadapters = { self = 1.0 }\n"
    assert problems(folder, text) == [
        "blends.a.adapters: blend 'a' depends on itself: a -> b -> a (line 25) - remove the cycle between blends",
        "blends.self.adapters: blend 'self' depends on itself: self -> self (line 29) - remove self from its adapters",
    ]


def test_a_blend_named_like_a_subject_is_one_problem_not_a_cycle_too(folder):  # noqa: F811
    text = (
        GOOD + "\n[blends.dog]\nadapters = { dog = 1.0 }\n[blends.a]\nadapters = { dog = 1.0, mix = 1.0 }\n"
    )
    assert problems(folder, text) == [
        "blends.dog: 'dog' is both a subject and a blend (line 24) - rename one of them",
    ]


def test_an_empty_project_file_is_told_where_base_model_goes(tmp_path):
    from runner.project import ProjectError, load_project

    path = tmp_path / "p.toml"
    path.write_text("")
    with pytest.raises(ProjectError) as caught:
        load_project(path)
    assert str(caught.value.problems[0]).endswith("add base_model = ... under [project]"), (
        caught.value.report()
    )


def test_the_name_refused_for_kohya_files_is_the_diffusers_file_s():
    from runner.adapters import DIFFUSERS_WEIGHTS
    from runner.project.checks import DIFFUSERS_STEM

    assert f"{DIFFUSERS_STEM}.safetensors" == DIFFUSERS_WEIGHTS


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_lines_are_counted_as_toml_counts_them(folder, separator):  # noqa: F811
    # TOML ends a line at "\n" only: a prompt or comment pasted from a web page may hold a Unicode line
    # separator, and the lines after it are still numbered as an editor numbers them.
    text = GOOD.replace('"a photo of dog"', f'"a photo{separator}of dog"  # it is{separator}here')
    text += '\n[train]\nsteps = "800"\n'
    line = text.split("\n").index('steps = "800"') + 1
    assert problems(folder, text) == [
        f"train.steps: expected an integer, got the string '800' (line {line}) - e.g. steps = 800"
    ]


def test_a_value_with_a_line_break_or_terminal_code_is_said_on_one_line(folder):  # noqa: F811
    # A problem quotes the value; written as is, a line break splits the report and an escape
    # sequence recolours the terminal.
    text = GOOD + '\n[renders.r]\nadapter = "dog\\n\\u001b[31m\\u2028"\nprompts = ["x"]\n'
    path = folder / "p.toml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ProjectError) as info:
        load_project(path)
    lines = info.value.report().split("\n")
    assert len(lines) == 2 and all(line.isprintable() for line in lines)  # the head line, one problem
    assert "'dog\\n\\x1b[31m\\u2028' is not a subject or blend" in lines[1]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_a_project_file_in_utf16_says_to_save_it_as_utf8(folder, encoding):  # noqa: F811
    # Windows PowerShell's `>` writes UTF-16; read as UTF-8 every other byte was junk, and the problem
    # was an invalid statement at column 1.
    path = folder / "p.toml"
    path.write_bytes(GOOD.encode(encoding))
    with pytest.raises(ProjectError) as info:
        load_project(path)
    name = encoding.upper()
    assert [str(p) for p in info.value.problems] == [
        f"the file is {name} text, not UTF-8 (line 1) - save it as UTF-8"
    ]


def test_a_project_file_in_utf16_without_its_byte_order_mark_says_to_save_it_as_utf8(folder):  # noqa: F811
    # Read as UTF-8 it was `Found invalid character '\x00' at column 2`.
    path = folder / "p.toml"
    for encoding in ("utf-16-le", "utf-16-be"):
        path.write_bytes(GOOD.encode(encoding))
        with pytest.raises(ProjectError) as info:
            load_project(path)
        assert [str(p) for p in info.value.problems] == [
            "the file looks like UTF-16 text without a byte-order mark, not UTF-8 (line 1) - save it as UTF-8"
        ]


def test_a_project_file_that_cannot_be_read_is_a_problem_of_the_file_exit_2(folder, monkeypatch, capsys):  # noqa: F811
    """Without read permission it was `dbl: p.toml: Permission denied`, exit 1, as a failed step."""
    import errno
    import pathlib

    from runner.cli import main

    path = write_project(folder, GOOD)
    read_bytes = pathlib.Path.read_bytes

    def unreadable(self):
        if self == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", unreadable)
    for command in ("plan", "build", "ls", "check"):
        assert main([command, str(path)]) == 2, command
        assert capsys.readouterr().err == (
            f"{path}: 1 problem\n  cannot be read (Permission denied) - give read access to it (chmod u+r)\n"
        )


def test_a_prior_written_without_its_name_is_one_problem_not_also_each_reference_to_it(folder):  # noqa: F811
    # The subject's `prior = "dog"` was said too: "'dog' is not a prior - priors: class_prompt, num_images".
    text = GOOD.replace("[priors.dog]", "[priors]").replace(
        'class_prompt = "a photo of dog"', 'class_prompt = "a photo of dog"\nnum_images = 4'
    )
    assert problems(folder, text) == [
        "priors.class_prompt: [priors] holds one table per name, not keys: class_prompt, num_images (line 6) "
        "- name the table in its header, e.g. [priors.dog] in place of [priors]"
    ]


def test_a_quoted_header_is_said_once_with_the_unquoted_one_to_write(folder):  # noqa: F811
    # ["subjects.toy"] is one top-level table named "subjects.toy": the blend that names toy is no other problem.
    found = problems(folder, GOOD.replace("[subjects.toy]", '["subjects.toy"]'))
    assert found == [
        "unknown key 'subjects.toy' (line 13) - the quotes make it one name; without them it names toy in [subjects]"
    ]
