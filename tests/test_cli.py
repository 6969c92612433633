"""The command line: exit codes, messages without tracebacks, locking and kills across processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal

import pytest

from runner import lockfile
from runner.cli import main
from tests.fake_build import fake_dbl, wait_for


def test_bad_project_exits_2_without_traceback(proj, capsys):
    proj.edit("rank = 4", "rnak = 4")
    assert main(["plan", str(proj.path)]) == 2
    err = capsys.readouterr().err
    assert "lora: unknown key 'rnak'" in err and "did you mean 'rank'?" in err
    assert "Traceback" not in err
    assert main(["build", str(proj.path), "--no-progress"]) == 2


@pytest.mark.parametrize("where", [".dbl", ".dbl/cache", ".dbl/tmp", ".dbl/tmp/pets"])
def test_a_file_where_dbl_keeps_a_folder_is_named_with_its_fix(proj, fake_steps, capsys, where):
    """A file named .dbl beside the project (or .dbl/tmp ...) ended build and gc in "[Errno 17] File
    exists", exit 1, and no fix."""
    blocked = proj.root / where
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("")
    for command in ("plan", "build", "ls", "check", "gc", "report"):
        assert main([command, str(proj.path)]) == 2, command
        err = capsys.readouterr().err
        assert f"dbl: {blocked} is a file, where dbl keeps" in err, (command, err)
        assert "move or delete it, and dbl makes the folder again" in err
    assert not fake_steps.ran
    assert blocked.is_file()


def test_a_dangling_link_where_dbl_keeps_a_folder_is_named_with_its_fix(proj, fake_steps, capsys):
    """A .dbl linked to a folder on a disk not mounted: build said "[Errno 17] File exists", exit 1."""
    (proj.root / ".dbl").symlink_to(proj.root / "unmounted" / "dbl-state")
    for command in ("plan", "build", "gc"):
        assert main([command, str(proj.path)]) == 2, command
        err = capsys.readouterr().err
        assert (
            f"dbl: {proj.root / '.dbl'} is a link to {proj.root / 'unmounted' / 'dbl-state'}, which does not exist"
            in err
        )
        assert "make that folder, or delete the link" in err
    assert not fake_steps.ran


@pytest.mark.parametrize(
    "error, said",
    [
        (
            FileNotFoundError(2, "No such file or directory", "/x/p.lock"),
            "dbl: /x/p.lock: No such file or directory",
        ),
        (
            OSError(18, "Invalid cross-device link", "/a", None, "/b"),
            "dbl: /a -> /b: Invalid cross-device link",
        ),
        (OSError(28, "No space left on device"), "dbl: No space left on device"),
        (OSError("no file named"), "dbl: no file named"),
    ],
)
def test_an_os_error_outside_any_step_names_its_file_without_its_number(
    proj, capsys, monkeypatch, error, said
):
    from runner import cli

    def plan(args):
        raise error

    monkeypatch.setitem(cli.COMMANDS, "plan", plan)
    assert main(["plan", str(proj.path)]) == 1
    err = capsys.readouterr().err
    assert err == said + "\n", err


def test_an_option_a_command_lacks_is_refused_with_that_commands_usage(capsys):
    """`dbl plan --dry-run` printed the top level's usage (`dbl [-h] [--version] COMMAND ...`), which does
    not say what `dbl plan` takes."""
    assert main(["plan", "p.toml", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("usage: dbl plan [-h]") and "dbl plan: error: unrecognized arguments: --dry-run" in err
    )
    assert main(["--bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: dbl [-h]") and "dbl: error: unrecognized arguments: --bogus" in err


def test_missing_project_and_bad_usage(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "nope.toml"]) == 2
    assert "no such project file" in capsys.readouterr().err
    assert main(["build"]) == 2
    assert "no project file given" in capsys.readouterr().err


def test_plan_text_and_up_to_date_line(proj, build, capsys):
    assert main(["plan", str(proj.path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "7 of 7 steps stale:"
    assert "train:toy     never built" in out and "train:dog     upstream prior:dog stale" in out
    build(proj)
    assert main(["plan", str(proj.path)]) == 0
    assert capsys.readouterr().out == "all 7 steps are up to date\n"


def test_plan_of_one_step_or_none_says_what_build_says(tmp_path, build, capsys, monkeypatch):
    from tests.conftest import Proj

    monkeypatch.chdir(tmp_path)  # the project's folder: the folders it names, as written here

    one = Proj(
        tmp_path,
        '[project]\nbase_model = "tiny-sd"\n[subjects.toy]\nimages = "data/toy"\ninstance_prompt = "a toy"\n',
    )
    build(one)
    assert main(["plan", str(one.path)]) == 0
    assert capsys.readouterr().out == "the one step is up to date\n"
    one.path.write_text('[project]\nbase_model = "tiny-sd"\n')
    assert main(["plan", str(one.path)]) == 0
    assert capsys.readouterr().out == (
        "nothing to build: the project defines no steps\n"
        "1 step no longer in the project:\n"
        "  train:toy  the next build removes build/pets/adapters/toy\n"
    )


def test_build_twice_prints_one_line(proj, fake_steps, capsys):
    assert main(["build", str(proj.path), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["build", str(proj.path), "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "all 7 steps are up to date" in out[0]


def test_failed_step_exits_1(proj, fake_steps, capsys):
    fake_steps.fail = {"train:toy"}
    assert main(["build", str(proj.path), "--no-progress"]) == 1
    assert "train:toy failed on purpose" in capsys.readouterr().out + capsys.readouterr().err


def test_unknown_only_step_exits_2(proj, fake_steps, capsys):
    assert main(["build", str(proj.path), "--no-progress", "--only", "train:cat"]) == 2
    assert "no step 'train:cat'" in capsys.readouterr().err


def test_ls_and_gc(proj, build, capsys):
    build(proj)
    assert main(["ls", str(proj.path), "--json"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["train:dog"]["path"] == "build/pets/adapters/dog" and rows["train:dog"]["status"] == "fresh"
    proj.edit("sks dog on a beach", "sks dog in the snow")
    build(proj)
    assert main(["gc", str(proj.path)]) == 0
    assert capsys.readouterr().out.startswith("dropped 1 cache entry")
    assert main(["gc", str(proj.path)]) == 0
    assert capsys.readouterr().out.startswith("dropped 0 cache entries")


def test_ls_shows_a_stale_step_where_its_last_build_put_it(proj, build, capsys):
    build(proj)
    proj.edit('base_model = "tiny-sd"', 'base_model = "tiny-sd"\nout = "elsewhere"')
    assert main(["ls", str(proj.path), "--json"]) == 0
    row = {r["id"]: r for r in json.loads(capsys.readouterr().out)}["train:dog"]
    assert row["status"] == "stale" and row["path"] == "build/pets/adapters/dog"
    assert all(f.startswith(row["path"] + "/") for f in row["files"])


def test_ls_names_folders_as_typed_here_and_its_json_relative_to_the_project_file(
    proj, build, capsys, monkeypatch
):
    """From another folder, `dbl ls` names each output folder as a build's lines do (the path to type here),
    not relative to the project file; --json keeps the project file's paths, as its lockfile records them."""
    build(proj)
    shutil.rmtree(proj.root / "build" / "pets" / "renders" / "mixed")
    monkeypatch.chdir(proj.root.parent)
    here = proj.root.name
    assert main(["ls", str(proj.path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"prior:dog     fresh  {here}/build/pets/priors/dog" in lines
    assert f"render:mixed  stale  {here}/build/pets/renders/mixed (missing)" in lines
    assert main(["ls", str(proj.path), "--json"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["prior:dog"]["path"] == "build/pets/priors/dog"
    (proj.root / "elsewhere").mkdir()
    monkeypatch.chdir(proj.root / "elsewhere")  # not above the project: its folders are named in full
    assert main(["ls", str(proj.path)]) == 0
    assert (
        f"prior:dog     fresh  {proj.root / 'build/pets/priors/dog'}" in capsys.readouterr().out.splitlines()
    )


def test_plan_and_build_name_the_files_their_reasons_speak_of_as_typed_here(proj, build, capsys, monkeypatch):
    """From another folder, the reasons of `dbl plan` and of a build's lines name the files they speak of as
    a build's other lines do (the path to type here), and so do the folders of removed steps; `plan --json`
    keeps them relative to the project file, as the lockfile records inputs and outputs."""
    from tests.conftest import write_image

    build(proj)
    write_image(proj.root / "data" / "dog" / "01.png", seed=7)
    (proj.root / "build" / "pets" / "renders" / "base" / "0-0.png").unlink()
    proj.edit('[renders.mixed]\nadapter = "mix"\nprompts = ["a sks dog toy"]\n', "")
    monkeypatch.chdir(proj.root.parent)
    here = proj.root.name
    assert main(["plan", str(proj.path)]) == 0
    said = dict(
        line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines() if line.startswith("  ")
    )
    assert said["train:dog"] == f"image {here}/data/dog/01.png changed", said
    missing = f"output {here}/build/pets/renders/base/0-0.png missing"
    assert said["render:base"] == f"{missing}; restorable from cache"
    assert said["render:mixed"] == f"the next build removes {here}/build/pets/renders/mixed"
    assert main(["plan", str(proj.path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    stale = {s["id"]: s["reasons"] for s in plan["stale"]}
    assert stale["train:dog"] == ["image data/dog/01.png changed"]
    assert stale["render:base"] == ["output build/pets/renders/base/0-0.png missing", "restorable from cache"]
    assert plan["removed"] == [{"id": "render:mixed", "outputs": "build/pets/renders/mixed"}]
    assert main(["build", str(proj.path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"train:dog    start (image {here}/data/dog/01.png changed)" in out, out
    assert f"render:base  start ({missing})" in out, out
    assert f"removed {here}/build/pets/renders/mixed: render:mixed is no longer in the project" in out, out


def test_ls_shows_a_hand_edited_loss_of_an_older_lockfile_as_written(proj, build, capsys):
    """A record without a digest (a lockfile an earlier dbl wrote) is read as it is, even hand-edited."""
    build(proj)
    records = lockfile.read(proj.lock)
    records["train:dog"]["metrics"] = {"loss_first": 0.5, "loss_last": "low", "steps": "three"}
    lockfile.write(proj.lock, records)
    text = proj.lock.read_text()
    start = text.index('[steps."train:dog"]')
    end = text.index("\n[steps.", start + 1)
    record = text[start:end]
    proj.lock.write_text(text[:start] + re.sub(r'digest = "[0-9a-f]+"\n', "", record) + text[end:])
    assert lockfile.read(proj.lock)["train:dog"]["metrics"]["loss_last"] == "low"  # no digest to check
    assert main(["ls", str(proj.path)]) == 0
    assert "loss 0.5000 -> low" in capsys.readouterr().out


def test_ls_and_plan_tell_a_step_the_lockfile_has_no_record_of_from_one_never_built(
    proj, build, capsys, monkeypatch
):
    monkeypatch.chdir(proj.root)
    build(proj)
    records = lockfile.read(proj.lock)
    del records["render:park"]  # a merge left it out: changed differently on both sides
    lockfile.write(proj.lock, records)
    proj.edit("[renders.base]", '[renders.new]\nadapter = "dog"\nprompts = ["a dog"]\n\n[renders.base]')
    assert main(["ls", str(proj.path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "render:park   stale  build/pets/renders/park (not in the lockfile)" in lines
    assert "render:new    stale  (not built)" in lines
    assert main(["ls", str(proj.path), "--json"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["render:park"]["path"] is None and rows["render:new"]["path"] is None
    assert rows["render:park"]["unrecorded_path"] == "build/pets/renders/park"
    assert rows["render:new"]["unrecorded_path"] is None
    assert rows["render:base"]["unrecorded_path"] is None  # recorded: its folder is `path`
    assert main(["plan", str(proj.path)]) == 0
    out = capsys.readouterr().out
    assert "render:park  not in the lockfile; restorable from cache" in out
    shutil.rmtree(proj.root / ".dbl" / "cache")  # a clone's, which never built it
    assert main(["plan", str(proj.path)]) == 0
    out = capsys.readouterr().out
    assert "render:park  not in the lockfile\n" in out and "render:new   never built\n" in out, out
    shutil.rmtree(proj.root / "build/pets/renders/mixed")  # as in a fresh clone
    assert main(["ls", str(proj.path)]) == 0
    assert "render:mixed  stale  build/pets/renders/mixed (missing)" in capsys.readouterr().out.splitlines()


def test_ls_lists_the_steps_the_next_build_removes(proj, build, capsys, monkeypatch):
    """A step taken out of the project was left out of `dbl ls`, though the next build deletes its folder."""
    monkeypatch.chdir(proj.root)
    build(proj)
    proj.edit(
        '[renders.park]\nadapter = "dog"\nprompts = ["sks dog in a park", "sks dog on a beach"]\nseeds = [0, 1]\n',
        "",
    )
    assert main(["ls", str(proj.path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "render:park   removed  build/pets/renders/park (the next build removes it)" in lines
    assert "prior:dog     fresh    build/pets/priors/dog" in lines  # the status column made room
    assert main(["ls", str(proj.path), "--json"]) == 0
    row = {r["id"]: r for r in json.loads(capsys.readouterr().out)}["render:park"]
    assert row["status"] == "removed" and row["kind"] == "render" and row["path"] == "build/pets/renders/park"
    assert row["files"] and row["built"]
    build(proj)
    assert not (proj.root / "build" / "pets" / "renders" / "park").exists()
    assert main(["ls", str(proj.path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not any("render:park" in line for line in lines)
    assert "prior:dog     fresh  build/pets/priors/dog" in lines  # as wide as ever without one


def test_ls_shows_the_first_and_last_loss_of_trained_steps(proj, capsys, monkeypatch):
    from tests.conftest import FakeBackend, FakeSteps, use_backend

    monkeypatch.chdir(proj.root)

    losses = {"train:dog": (0.41234, 0.087123, 4), "train:toy": (0.5, float("nan"), 1)}

    def with_losses(run):
        def step(ctx):
            metrics = run(ctx)
            if ctx.step_id in losses:
                first, last, steps = losses[ctx.step_id]
                metrics.update(loss_first=first, loss_last=last, steps=steps)
            return metrics

        return step

    undo = use_backend(lambda project: FakeBackend(FakeSteps(), with_losses))
    try:
        assert main(["build", str(proj.path), "--no-progress"]) == 0
    finally:
        undo()
    capsys.readouterr()
    assert main(["ls", str(proj.path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == [
        "prior:dog     fresh  build/pets/priors/dog",
        "train:dog     fresh  build/pets/adapters/dog   loss 0.4123 -> 0.08712 in 4 steps",
        "train:toy     fresh  build/pets/adapters/toy   loss 0.5000 -> nan in 1 step",
        "blend:mix     fresh  build/pets/blends/mix",
    ]
    assert lines[-1] == "render:base   fresh  build/pets/renders/base"
    assert main(["ls", str(proj.path), "--json"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["train:dog"]["metrics"]["loss_last"] == 0.087123
    assert rows["train:toy"]["metrics"]["loss_last"] is None  # NaN, which JSON cannot hold
    assert rows["blend:mix"]["metrics"] == {"fake": True}


def test_second_build_exits_3_naming_the_holder(proj):
    first = fake_dbl("build", proj.path, "--no-progress", slow="train:dog", wait=False)
    try:
        wait_for(first, "SLOW STEP RUNNING")
        second = fake_dbl("build", proj.path, "--no-progress")
        assert second.returncode == 3
        assert f"another build of this project is running (pid {first.pid} on" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()
    # A lock left by a killed build does not block.
    assert fake_dbl("build", proj.path, "--no-progress").returncode == 0


def test_sigint_stops_cleanly_with_130(proj):
    first = fake_dbl("build", proj.path, "--no-progress", slow="train:toy", wait=False)
    wait_for(first, "SLOW STEP RUNNING")
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=30) == 130
    recorded = lockfile.read(proj.lock)
    assert set(recorded) == {"prior:dog", "train:dog"}


def test_sigkill_during_a_step_keeps_lockfile_and_outputs(proj, tmp_path):
    log = tmp_path / "ran.log"
    assert fake_dbl("build", proj.path, "--no-progress", log=log).returncode == 0
    before = proj.lock.read_text()
    adapter = proj.root / "build/pets/adapters/toy/unet/adapter.json"
    old_adapter = adapter.read_bytes()
    proj.edit("rank = 4", "rank = 6")
    first = fake_dbl("build", proj.path, "--no-progress", slow="train:toy", log=log, wait=False)
    wait_for(first, "SLOW STEP RUNNING")
    first.send_signal(signal.SIGKILL)
    first.wait()
    # train:dog finished before the kill: it is in the lockfile; train:toy is not.
    after = lockfile.read(proj.lock)
    assert after["train:dog"]["inputs"]["lora"]["rank"] == 6
    assert after["train:toy"] == lockfile.read_text_records(before)["train:toy"]
    assert adapter.read_bytes() == old_adapter
    log.write_text("")
    assert fake_dbl("build", proj.path, "--no-progress", log=log).returncode == 0
    assert log.read_text().split() == ["train:toy", "blend:mix", "render:park", "render:mixed"]


def test_unreadable_image_is_an_error_without_traceback(proj, capsys):
    import os

    os.symlink(proj.root / "nowhere.png", proj.root / "data" / "toy" / "05.png")  # dangling
    code = main(["plan", str(proj.path)])
    err = capsys.readouterr().err
    assert code == 2 and "05.png" in err and "Traceback" not in err


def test_gc_removes_what_killed_builds_left_in_the_cache(proj, build, capsys):
    build(proj)
    dead = proj.root / ".dbl" / "cache" / ".abc.tmp-999999999"
    dead.mkdir()
    alive = proj.root / ".dbl" / "cache" / f".def.tmp-{os.getpid()}"
    alive.mkdir()
    assert main(["gc", str(proj.path)]) == 0
    assert "1 folder(s) left by builds that were killed" in capsys.readouterr().out
    assert not dead.exists() and alive.exists()


def test_plan_and_build_refuse_an_sd3_or_flux_single_file(proj, capsys):
    """Exit 2 before any step runs, with the model-family message; not a failed train step."""
    from tests.single_file import keys_only_file

    for keys, kind in (
        (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], "SD3"),
        (["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"], "Flux"),
    ):
        keys_only_file(proj.root / f"{kind}.safetensors", keys)
        proj.path.write_text(proj.path.read_text().replace('"tiny-sd"', f'"{kind}.safetensors"', 1))
        for command in (["plan"], ["build", "--no-progress"]):
            assert main([command[0], str(proj.path), *command[1:]]) == 2
            err = capsys.readouterr().err
            assert f"is a {kind} checkpoint; this model family is not supported yet" in err, err
            assert "Traceback" not in err
        assert not proj.lock.exists()
        proj.path.write_text(proj.path.read_text().replace(f'"{kind}.safetensors"', '"tiny-sd"', 1))


def test_gc_judges_only_the_leftovers_of_its_own_host(proj, build, capsys):
    """On a shared .dbl/ (several hosts building with Ray) a pid means nothing on another host."""
    from runner import tempnames

    build(proj)
    cache = proj.root / ".dbl" / "cache"
    ours = cache / f".abc.tmp-a1b2c3-{tempnames.host()}-999999999"
    theirs = cache / ".def.tmp-a1b2c3-other-node-7-999999999"
    for folder in (ours, theirs):
        folder.mkdir()
    assert main(["gc", str(proj.path)]) == 0
    assert "1 folder(s) left by builds that were killed" in capsys.readouterr().out
    assert not ours.exists() and theirs.exists()


def test_a_build_removes_the_temp_files_of_dead_builds_in_dbl_and_no_others(proj, build):
    """The file-hash cache and a lockfile's parse are written aside, then renamed: a build removes what a
    killed one left, never the temp file of a live process (this one) or of another host (a Ray node)."""
    from runner import tempnames

    build(proj)
    state = proj.root / ".dbl"
    dead = state / f"state.tmp-a1b2c3-{tempnames.host()}-999999999"
    parse = state / f"parsed-{proj.lock.name}.json.tmp-a1b2c3-{tempnames.host()}-999999999"
    alive = state / f"state.tmp-{tempnames.suffix()}"
    theirs = state / "state.tmp-a1b2c3-other-node-7-999999999"
    for path in (dead, parse, alive, theirs):
        path.write_text("{")
    build(proj)
    assert not dead.exists() and not parse.exists()
    assert alive.exists() and theirs.exists()


def test_temp_names_carry_a_random_part_the_host_and_the_pid():
    from runner import tempnames

    first, second = tempnames.suffix(), tempnames.suffix()
    assert first != second
    assert tempnames.owner(f"state.tmp-{first}") == (tempnames.host(), os.getpid())
    assert tempnames.owner(".x.trash-0a1b2c-node-2-77") == ("node-2", 77)
    assert tempnames.owner(".x.tmp-77") == (None, 77)  # made before hosts were part of the name
    assert tempnames.owner(".stop-train-dog") is None


def test_warnings_raised_in_dbl_read_as_one_line_and_a_librarys_as_python_prints_them(capsys, monkeypatch):
    import warnings as w
    from pathlib import Path

    import runner
    from runner import cli

    shown_as_python = []
    monkeypatch.setattr(cli, "_show_library_warning", lambda *args: shown_as_python.append(args[0]))
    ours = str(Path(runner.__file__).parent / "models" / "loading.py")
    cli._show_warning("mixed precision ignored", UserWarning, ours, 9)
    assert capsys.readouterr().err == "dbl: warning: mixed precision ignored\n"
    cli._show_warning("a library's", UserWarning, w.__file__, 9)
    assert shown_as_python == ["a library's"] and not capsys.readouterr().err


def test_a_project_file_named_after_force_or_only_is_the_project(proj, build, capsys, monkeypatch, tmp_path):
    build(proj)
    monkeypatch.chdir(tmp_path.parent)  # no project file here: only the one named can be meant
    assert main(["build", "--force", str(proj.path), "--dry-run", "--no-progress"]) == 0
    assert "dry run: 7 steps would run" in capsys.readouterr().out
    assert main(["build", "--only", "render:park", str(proj.path), "--dry-run", "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["build", "--only", str(proj.path)]) == 2
    assert f"--only needs a step id: dbl build {proj.path} --only STEP..." in capsys.readouterr().err


def test_repeated_only_and_force_add_up(proj, build, capsys):
    argv = ["build", str(proj.path), "--dry-run", "--no-progress"]
    assert main([*argv, "--only", "train:toy", "--only", "render:base"]) == 0
    assert "2 steps would run: train:toy, render:base" in capsys.readouterr().out
    build(proj)
    assert main([*argv, "--force", "train:toy", "--force", "train:dog"]) == 0
    out = capsys.readouterr().out
    assert "train:toy" in out and "train:dog" in out
    assert main([*argv, "--force", "train:toy", "--force"]) == 0  # --force alone: every step
    assert "dry run: 7 steps would run" in capsys.readouterr().out


def test_unknown_step_ids_are_named_all_at_once_with_what_was_meant(proj, fake_steps, capsys):
    argv = ["build", str(proj.path), "--dry-run", "--no-progress"]
    assert main([*argv, "--only", "dog", "train:*", "train:dgo", "--force", "render:prak"]) == 2
    err = capsys.readouterr().err
    assert "--force: no step 'render:prak' (did you mean render:park?)" in err
    assert "'dog' (a step id is kind:name: prior:dog or train:dog?)" in err
    assert "'train:*' (a step id, not a pattern: train:dog train:toy)" in err
    assert "'train:dgo' (did you mean train:dog?)" in err
    assert not fake_steps.ran


def test_several_project_files_here_are_named_with_the_command_to_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("pyproject.toml", "pets.toml", "cats.toml"):
        (tmp_path / name).write_text("")
    assert main(["ls"]) == 2
    assert "several project files here (cats.toml, pets.toml): name one, e.g. `dbl ls cats.toml`" in (
        capsys.readouterr().err
    )


def test_a_folder_with_one_project_file_names_it(proj, capsys):
    """`dbl plan projects/` as `dbl plan` in that folder: its only project file; several are named."""
    (proj.root / "pyproject.toml").write_text("")
    assert main(["plan", str(proj.root)]) == 0
    assert "train:dog" in capsys.readouterr().out
    (proj.root / "cats.toml").write_text("")
    assert main(["plan", str(proj.root)]) == 2
    assert "a folder, not a project file - name one of: cats.toml, pets.toml" in capsys.readouterr().err


def test_quiet_and_verbose_together_is_a_usage_error(proj, fake_steps, capsys):
    assert main(["build", str(proj.path), "--no-progress", "-q", "-v"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert not fake_steps.ran


def test_plan_takes_the_num_processes_a_build_was_run_with(proj, build, capsys):
    build(proj, num_processes=2)  # the train steps' fingerprints hold the processes they ran with
    assert main(["plan", str(proj.path), "--num-processes", "2"]) == 0
    assert capsys.readouterr().out == "all 7 steps are up to date\n"
    assert main(["plan", str(proj.path)]) == 0
    assert "train:dog" in capsys.readouterr().out  # as a plain build would: it would train again
    assert main(["ls", str(proj.path), "--num-processes", "2"]) == 0
    assert " stale " not in capsys.readouterr().out
    assert main(["ls", str(proj.path)]) == 0
    assert "train:dog     stale" in capsys.readouterr().out
    assert main(["plan", str(proj.path), "--num-processes", "0"]) == 2
    assert "--num-processes must be at least 1" in capsys.readouterr().err
