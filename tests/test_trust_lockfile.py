"""Lockfile records check themselves, and two branches' lockfiles merge cleanly through git."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import warnings

import pytest

from runner import lockfile
from runner.cli import main
from tests.lockfile_fixtures import CONFLICT, OTHER_TOOLS, git, git_env

# Two renders whose records differ only in their adapter, output and times: a text merge of their
# tables can mix them line by line.
RENDER_X = '\n[renders.x]\nadapter = "dog"\nprompts = ["a dog"]\n'
RENDER_Y = '\n[renders.y]\nadapter = "toy"\nprompts = ["a dog"]\n'


def plan_lines(proj, capsys) -> tuple[str, str]:
    """`dbl plan` from the project's folder, where its reasons name files as the lockfile does."""
    with contextlib.chdir(proj.root):
        assert main(["plan", str(proj.path)]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_record_altered_by_hand_is_reported_and_rebuilt(proj, build, capsys):
    build(proj)
    text = proj.lock.read_text()
    # A hand edit that keeps the TOML valid and the record well-formed: a different metric.
    assert "fake = true" in text
    proj.lock.write_text(text.replace("fake = true", "fake = false", 1))
    out, err = plan_lines(proj, capsys)
    assert "blend:mix     not in the lockfile; restorable from cache" in out  # the first table in the file
    assert err.count("does not match its digest") == 1 and "blend:mix" in err
    with pytest.warns(lockfile.LockfileWarning, match="blend:mix"):
        result, _ = build(proj)
    assert result.ok
    out, err = plan_lines(proj, capsys)
    assert "up to date" in out and not err


@pytest.mark.parametrize("digests", [True, False])
def test_a_bare_toml_date_put_in_a_record_by_hand_is_a_record_not_built(proj, build, capsys, digests):
    """`built = 2026-12-04T02:01:57Z`, unquoted: valid TOML, a date no record holds. Every command said
    `unexpected TypeError` (the digest is taken of the record as JSON); the record is a hand edit."""
    import re

    build(proj)
    text = proj.lock.read_text()
    if not digests:  # a previous version's lockfile, whose records have none
        text = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("digest = "))
    edited, n = re.subn(r'^built = "([^"]+)"', r"built = \1", text, count=1, flags=re.M)
    assert n == 1
    proj.lock.write_text(edited)
    said = ""
    for command in ("plan", "ls", "check"):
        assert main([command, str(proj.path)]) in (0, 1), command
        err = capsys.readouterr().err
        assert "unexpected" not in err, err
        said += err  # a lockfile's warning is said once in a process
    assert "the record of blend:mix does not match its digest" in said, said
    assert main(["gc", "--dry-run", str(proj.path)]) == 0
    with pytest.warns(lockfile.LockfileWarning, match="blend:mix"):
        result, _ = build(proj)
    assert result.ok and [s.status for s in result.steps if s.id == "blend:mix"] == ["cached"]
    assert not re.search(r"^built = \d", proj.lock.read_text(), flags=re.M)


def test_records_without_digest_from_the_previous_version_stay_fresh(proj, build, capsys):
    build(proj)
    lines = [line for line in proj.lock.read_text().splitlines() if not line.startswith("digest = ")]
    proj.lock.write_text("\n".join(lines) + "\n")
    assert "digest" not in proj.lock.read_text()
    out, err = plan_lines(proj, capsys)
    assert out.startswith("all 7 steps are up to date") and not err


def test_rewriting_a_lockfile_changes_only_the_records_that_changed(proj, build):
    build(proj)
    before = tables(proj.lock.read_text())
    proj.edit("sks dog on a beach", "sks dog in the snow")
    build(proj)
    after = tables(proj.lock.read_text())
    assert set(after) == set(before)
    changed = {header for header in after if after[header] != before[header]}
    assert changed and all('"render:park"' in header for header in changed), changed


def tables(text: str) -> dict[str, list[str]]:
    """{table header: its lines} of TOML text ("" for the lines before the first table)."""
    found, header = {"": []}, ""
    for line in text.splitlines():
        if line.startswith("["):
            header = line
            found[header] = []
        else:
            found[header].append(line)
    return found


def three_builds(proj, build):
    """The common lockfile, then ours (adds render x) and theirs (adds render y), each built from it."""
    build(proj)
    base, project = proj.lock.read_text(), proj.path.read_text()
    proj.path.write_text(project + RENDER_X)
    build(proj)
    ours = proj.lock.read_text()
    proj.lock.write_text(base)
    proj.path.write_text(project + RENDER_Y)
    build(proj)
    theirs = proj.lock.read_text()
    proj.path.write_text(project + RENDER_X + RENDER_Y)
    return base, ours, theirs


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_union_merged_lockfile_does_not_pass_for_up_to_date(proj, build, capsys, tmp_path):
    base, ours, theirs = three_builds(proj, build)
    files = {}
    for name, text in (("base", base), ("ours", ours), ("theirs", theirs)):
        files[name] = tmp_path / f"{name}.lock"
        files[name].write_text(text)
    subprocess.run(
        ["git", "merge-file", "--union", files["ours"], files["base"], files["theirs"]], check=True
    )
    merged = files["ours"].read_text()
    proj.lock.write_text(merged)
    # The union interleaved the two new tables: one record lost lines to the other.
    assert merged.count('[steps."render:') >= 2
    records = lockfile.read_text_records(merged)  # the mixed record is what the digest catches
    mixed = tomllib_steps(merged)
    assert any(len(mixed[sid].get("inputs", {})) < 3 for sid in ("render:x", "render:y") if sid in mixed)
    out, err = plan_lines(proj, capsys)
    assert "up to date" not in out, out
    assert "does not match its digest" in err
    assert set(mixed) - set(records), "a mixed record was accepted"
    with pytest.warns(lockfile.LockfileWarning):
        result, _ = build(proj)
    assert result.ok
    out, _ = plan_lines(proj, capsys)
    assert out.startswith("all 9 steps are up to date")


def tomllib_steps(text: str) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib.loads(text)["steps"]


def test_merge_rules():
    from runner.merge import merge_records

    a1, a2, a3 = ({"kind": "train", "fingerprint": f, "output_hash": f, "outputs": {}} for f in "123")
    base = {"s": a1, "t": a1, "u": a1, "gone": a1}
    ours = {"s": a2, "t": a1, "u": a2, "gone": a1, "new": a3}
    theirs = {"s": a1, "t": a2, "u": a3}
    merged, conflicts = merge_records(base, ours, theirs)
    # s: ours changed it; t: theirs changed it; u: both, differently: left out; gone: theirs removed it.
    assert merged == {"s": a2, "t": a2, "new": a3}
    assert conflicts == ["u"]
    # Rebuilt the same way on both sides, at other times: the same record.
    later = {**a2, "built": "later"}
    assert merge_records({"s": a1}, {"s": a2}, {"s": later}) == ({"s": a2}, [])


def test_merge_lockfile_says_which_step_one_side_removed_and_the_other_changed(tmp_path, capsys):
    made = {
        side: lockfile.record("train", side, side, {}, {}, {}, "2020-01-01T00:00:00Z", 1.0) for side in "ab"
    }
    files = {side: tmp_path / side for side in ("base", "ours", "theirs")}
    lockfile.write(files["base"], {"train:dog": made["a"], "train:toy": made["a"]})
    lockfile.write(files["ours"], {"train:dog": made["b"]})  # toy removed from the project, dog retrained
    lockfile.write(files["theirs"], {"train:dog": made["a"], "train:toy": made["b"]})  # toy retrained
    assert main(["merge-lockfile", *map(str, files.values())]) == 0
    err = capsys.readouterr().err
    assert "train:toy removed on one side and changed on the other: left out" in err, err
    merged = lockfile.read(files["ours"])
    assert list(merged) == ["train:dog"] and merged["train:dog"]["fingerprint"] == "b"


def test_merge_lockfile_says_it_of_one_step_left_out_and_them_of_several(tmp_path, capsys):
    made = {
        side: lockfile.record("train", side, side, {}, {}, {}, "2020-01-01T00:00:00Z", 1.0) for side in "abc"
    }
    files = {side: tmp_path / side for side in ("base", "ours", "theirs")}
    for steps, said in ((["train:dog"], "train:dog"), (["train:dog", "train:toy"], "train:dog, train:toy")):
        lockfile.write(files["base"], {sid: made["a"] for sid in steps})
        lockfile.write(files["ours"], {sid: made["b"] for sid in steps})
        lockfile.write(files["theirs"], {sid: made["c"] for sid in steps})
        assert main(["merge-lockfile", *map(str, files.values())]) == 0
        err = capsys.readouterr().err
        which = "it" if len(steps) == 1 else "them"
        assert (
            f"{said} changed differently on both sides: left out; `dbl build` restores or reruns {which} "
            "for the merged project file"
        ) in err, err


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_merge_driver_in_a_real_git_repository(proj, build, capsys):
    repo = proj.root
    env = git_env()
    git(repo, "init", "-q", "-b", "main", env=env)
    driver = f"{sys.executable} -m runner merge-lockfile %O %A %B"
    git(repo, "config", "merge.dbl.driver", driver, env=env)
    (repo / ".gitattributes").write_text("*.lock merge=dbl\n")
    (repo / ".gitignore").write_text(".dbl/\nbuild/\n")
    build(proj)
    git(repo, "add", "-A", env=env)
    git(repo, "commit", "-qm", "base", env=env)
    project = proj.path.read_text()
    # Ours adds a render at the top of the renders, theirs one at the end: the project files merge.
    git(repo, "checkout", "-qb", "ours", env=env)
    proj.path.write_text(project.replace("[renders.park]", RENDER_X.strip() + "\n\n[renders.park]"))
    build(proj)
    git(repo, "commit", "-qam", "x", env=env)
    git(repo, "checkout", "-q", "main", env=env)
    git(repo, "checkout", "-qb", "theirs", env=env)
    proj.path.write_text(project + RENDER_Y)
    build(proj)
    git(repo, "commit", "-qam", "y", env=env)
    git(repo, "checkout", "-q", "ours", env=env)
    git(repo, "merge", "-q", "--no-edit", "theirs", env=env)  # check=True: no conflict
    assert "<<<<<<<" not in proj.lock.read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error", lockfile.LockfileWarning)
        records = lockfile.read(proj.lock)
    assert {"render:x", "render:y"} <= set(records)
    out, err = plan_lines(proj, capsys)
    assert out.startswith("all 9 steps are up to date") and not err


UV_LOCK = 'version = 1\nrequires-python = ">=3.11"\n\n[[package]]\nname = "numpy"\nversion = "2.0.0"\n\n[[package]]\nname = "torch"\nversion = "2.13.0"\n'


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_merge_lockfile_merges_another_tool_s_lockfile_as_git_would(tmp_path, capsys):
    # `*.lock merge=dbl` also sends uv.lock, Cargo.lock or yarn.lock here: they merge line by line.
    files = {side: tmp_path / f".merge_file_{side[:2]}" for side in ("base", "ours", "theirs")}
    files["base"].write_text(UV_LOCK)
    files["ours"].write_text(UV_LOCK.replace('"2.0.0"', '"2.1.0"'))
    files["theirs"].write_text(UV_LOCK.replace('"2.13.0"', '"2.14.0"'))
    args = ["merge-lockfile", *map(str, files.values())]
    assert main(args) == 0
    assert files["ours"].read_text() == UV_LOCK.replace('"2.0.0"', '"2.1.0"').replace('"2.13.0"', '"2.14.0"')
    files["theirs"].write_text(UV_LOCK.replace('"2.0.0"', '"2.2.0"'))
    assert main(args) == 1  # changed on both sides: git's conflict, with its markers
    assert "<<<<<<< ours" in files["ours"].read_text()
    assert "not a dbl lockfile" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.parametrize("command", ["build", "plan", "ls", "check"])
def test_dbl_folder_stays_out_of_git_without_a_gitignore(proj, build, command):
    """A project written by hand (no `dbl init`, so no .gitignore) in a repository, or a clone of one: `git
    add -A` must not take the run-cache, gigabytes of adapters."""
    git(proj.root, "init", "-q", env=git_env())
    if command == "check":  # a teammate's clone: the lockfile, and no .dbl/ yet
        build(proj)
        shutil.rmtree(proj.root / ".dbl")
    build(proj) if command == "build" else main([command, str(proj.path)])
    untracked = git(proj.root, "status", "--porcelain", "--untracked-files=all", env=git_env()).splitlines()
    assert not [line for line in untracked if ".dbl/" in line], untracked
    assert any("pets.lock" in line for line in untracked) == (command in ("build", "check"))


@pytest.mark.parametrize("command", [["plan"], ["plan", "--json"], ["ls"], ["check"], ["report"], ["build"]])
def test_every_command_over_an_unreadable_lockfile_says_so_and_exits_2(proj, build, capsys, command):
    build(proj)
    proj.lock.write_text(CONFLICT + proj.lock.read_text())
    capsys.readouterr()
    assert main([command[0], str(proj.path), *command[1:]]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"dbl: {proj.lock}: cannot read the lockfile"), captured.err
    assert "Traceback" not in captured.err and not captured.out
    assert CONFLICT in proj.lock.read_text()  # nothing was built over it
    # git's markers: the conflict is named, with the git commands that resolve it
    assert "unresolved merge conflict (line 1: `<<<<<<< HEAD`)" in captured.err, captured.err
    assert f"git checkout -m {proj.lock}" in captured.err and "Lockfiles in git" in captured.err


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.parametrize("present", ["attributes", "config", "both"])
def test_a_conflict_with_the_merge_driver_half_set_up_says_what_is_missing(
    proj, capsys, monkeypatch, present
):
    """`.gitattributes` names merge=dbl but git has no merge.dbl.driver (a fresh clone: git config is not
    cloned), or the reverse: git merged the lockfile line by line without a word, and dbl said only "set up
    dbl's merge driver", as if none of it were there."""
    for key, value in git_env().items():
        monkeypatch.setenv(key, value)  # no user's or system's git config
    git(proj.root, "init", "-q", "-b", "main")
    if present in ("attributes", "both"):
        (proj.root / ".gitattributes").write_text("*.lock merge=dbl\n")
    if present in ("config", "both"):
        git(proj.root, "config", "merge.dbl.driver", "dbl merge-lockfile %O %A %B")
    proj.lock.write_text(CONFLICT)
    assert main(["plan", str(proj.path)]) == 2
    err = capsys.readouterr().err
    assert (
        "unresolved merge conflict (line 1: `<<<<<<< HEAD`)" in err and f"git checkout -m {proj.lock}" in err
    )
    said = {
        "attributes": 'git config merge.dbl.driver "dbl merge-lockfile %O %A %B"',
        "config": "echo '*.lock merge=dbl' >> .gitattributes",
        "both": "with dbl's merge driver, set up here: `git checkout -m",
    }
    assert said[present] in err, err
    assert all(words not in err for other, words in said.items() if other != present), err


def test_an_unreadable_lockfile_without_git_s_markers_is_moved_aside(proj, build, capsys):
    build(proj)
    proj.lock.write_text("[steps\n" + proj.lock.read_text())
    capsys.readouterr()
    assert main(["plan", str(proj.path)]) == 2
    err = capsys.readouterr().err
    assert "cannot read the lockfile (" in err and "move it aside" in err and "merge" not in err, err


def test_a_lockfile_of_a_newer_dbl_says_to_upgrade_not_to_move_it_aside(proj, build, capsys):
    # A teammate's newer dbl wrote it: moving it aside and building would replace their records.
    build(proj)
    proj.lock.write_text(proj.lock.read_text().replace("version = 1", "version = 2", 1))
    capsys.readouterr()
    assert main(["plan", str(proj.path)]) == 2
    err = capsys.readouterr().err
    assert "written by a newer dbl (lockfile version 2; this dbl reads version 1)" in err, err
    assert "upgrade dbl" in err and "move it aside" not in err, err


def test_merge_lockfile_with_a_missing_file_writes_nothing(tmp_path, capsys):
    ours = tmp_path / "ours.lock"
    assert main(["merge-lockfile", str(tmp_path / "base"), str(ours), str(tmp_path / "theirs")]) == 2
    assert "no such file" in capsys.readouterr().err and not ours.exists()


def test_switching_back_to_a_branch_restores_its_outputs_and_leaves_its_lockfile_as_committed(proj, build):
    build(proj)
    committed = lockfile.read(proj.lock)
    for record in committed.values():  # built by a teammate, an hour's training
        record["built"], record["duration_s"] = "2020-01-01T00:00:00Z", 3600.0
    lockfile.write(proj.lock, committed)
    main_lock, main_project = proj.lock.read_text(), proj.path.read_text()
    proj.edit("rank = 4", "rank = 6")  # another branch, built
    result, _ = build(proj)
    assert result.ok and proj.lock.read_text() != main_lock
    proj.lock.write_text(main_lock)  # `git checkout main`: the project file and lockfile come back
    proj.path.write_text(main_project)
    result, rec = build(proj)
    assert result.ok and {status for _, status in rec.final} <= {"fresh", "cached"}
    assert (
        proj.lock.read_text() == main_lock
    )  # `git status` is clean: no new record of a build that did not run


def test_a_fresh_clone_that_reruns_every_step_to_the_recorded_outputs_leaves_the_lockfile_as_committed(
    proj, build
):
    def clone() -> None:  # `git clone`: no outputs, no run-cache
        for folder in ("build", ".dbl"):
            shutil.rmtree(proj.root / folder)

    build(proj)
    made = proj.lock.read_bytes()
    clone()
    result, rec = build(proj)
    assert result.ok and {status for _, status in rec.final} == {"done"}
    assert proj.lock.read_bytes() == made
    committed = lockfile.read(proj.lock)
    for record in committed.values():  # built by a teammate, an hour's training
        record["built"], record["duration_s"] = "2020-01-01T00:00:00Z", 3600.0
    # ... whose GPU made other bytes of this one (a step that does not reproduce itself)
    other = committed["render:base"]
    other["output_hash"] = "0" * 64
    for item in other["outputs"].values():
        item["sha256"] = "0" * 64
    lockfile.write(proj.lock, committed)
    clone()
    result, rec = build(proj)
    assert result.ok and {status for _, status in rec.final} == {"done"}
    rebuilt = lockfile.read(proj.lock)
    assert {sid for sid in committed if rebuilt[sid] != committed[sid]} == {"render:base"}
    assert rebuilt["render:base"]["built"] != "2020-01-01T00:00:00Z"  # the new bytes, and when they were made


def test_a_fresh_clone_keeps_a_record_written_before_a_display_key_existed(proj, build):
    build(proj)
    records = lockfile.read(proj.lock)
    del records["render:park"]["inputs"]["adapter"]["_name"]  # as a previous version wrote it
    lockfile.write(proj.lock, records)
    made = proj.lock.read_bytes()
    for folder in ("build", ".dbl"):  # `git clone`
        shutil.rmtree(proj.root / folder)
    result, rec = build(proj)
    assert result.ok and dict(rec.final)["render:park"] == "done"
    assert proj.lock.read_bytes() == made


def test_outputs_of_an_older_build_after_a_pull_are_not_called_edited(proj, build, capsys):
    build(proj)
    ours = proj.path.read_text(), proj.lock.read_text()
    proj.edit("sks dog in a park", "sks dog in a garden")  # a teammate's commit, built
    build(proj)
    theirs = proj.path.read_text(), proj.lock.read_text()
    proj.path.write_text(ours[0])
    proj.lock.write_text(ours[1])
    build(proj)  # our outputs, as they were before the pull
    proj.path.write_text(theirs[0])  # `git pull`
    proj.lock.write_text(theirs[1])
    out, _ = plan_lines(proj, capsys)
    assert (
        "render:park  output build/pets/renders/park/0-0.png differs from the lockfile's: another "
        "build's, or edited; restorable from cache" in out
    ), out


def test_merge_lockfile_names_the_side_of_a_record_set_aside_or_an_unreadable_lockfile(tmp_path, capsys):
    # git hands the driver temporary files (.merge_file_XXXXXX): their names tell the user nothing.
    made = lockfile.record("train", "f", "h", {}, {}, {}, "2020-01-01T00:00:00Z", 1.0)
    files = {side: tmp_path / f".merge_file_{side[:2]}" for side in ("base", "ours", "theirs")}
    for path in files.values():
        lockfile.write(path, {"train:dog": made, "train:toy": made})
    text = files["theirs"].read_text()
    files["theirs"].write_text(text.replace("duration_s = 1.0", "duration_s = 2.0", 1))
    args = ["merge-lockfile", *map(str, files.values())]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "theirs: the record of train:dog does not match its digest" in err, err
    assert ".merge_file" not in err
    files["ours"].write_text(CONFLICT + text)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("dbl merge-lockfile: ours: cannot read the lockfile"), err
    assert ".merge_file" not in err and "git checkout --theirs" in err


def test_a_windows_checkout_with_crlf_and_a_byte_order_mark_stays_up_to_date(proj, build, capsys):
    build(proj)
    for path in (proj.path, proj.lock):  # git's autocrlf, then saved by an editor that writes a BOM
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    out, err = plan_lines(proj, capsys)
    assert out.startswith("all 7 steps are up to date") and not err, out + err
    assert main(["check", str(proj.path)]) == 0
    result, rec = build(proj)
    assert result.ok and all(status == "fresh" for _, status in rec.final)


def test_a_project_file_renamed_without_its_lockfile_is_told_where_it_lies(proj, build, capsys):
    """`git mv pets.toml dogs.toml` left pets.lock behind: every step said 'never built', no more."""
    build(proj)
    proj.path.rename(proj.root / "dogs.toml")
    assert main(["plan", str(proj.root / "dogs.toml")]) == 0
    err = capsys.readouterr().err
    assert (
        "pets.lock lies beside dogs.toml, and no pets.toml: if this project file was renamed from it, "
        "rename the lockfile too (git mv pets.lock dogs.lock)"
    ) in err, err
    (proj.root / "pets.lock").rename(proj.root / "dogs.lock")
    assert main(["plan", str(proj.root / "dogs.toml")]) == 0
    assert "lies beside" not in capsys.readouterr().err


def test_other_tools_lockfiles_are_no_renamed_lockfile(proj, capsys):
    # A project not built yet, in a repository with uv.lock or Cargo.lock beside it, or a tool's lock folder.
    for name, text in OTHER_TOOLS.items():
        (proj.root / name).write_text(text)
    (proj.root / "pip.lock").mkdir()
    assert main(["plan", str(proj.path)]) == 0
    assert "lies beside" not in capsys.readouterr().err
