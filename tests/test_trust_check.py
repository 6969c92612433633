"""An output edited in place with its size and mtime put back: the stat cache, ctime, and `dbl check`."""

from __future__ import annotations

import contextlib
import json
import os

from runner.check import REBUILD
from runner.cli import main
from runner.fingerprint import FileHasher

OUTPUT = "build/pets/renders/park/0-0.png"


def sneaky_edit(path) -> None:
    """Change a file's bytes but keep its size and mtime, as rsync -t or a restore from backup would."""
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def plan(proj, capsys) -> str:
    """`dbl plan` from the project's folder, where its reasons name files as the lockfile does."""
    with contextlib.chdir(proj.root):
        assert main(["plan", str(proj.path)]) == 0
    return capsys.readouterr().out


def test_plan_notices_an_edit_that_kept_size_and_mtime(proj, build, capsys):
    build(proj)
    assert plan(proj, capsys).startswith("all 7 steps are up to date")
    sneaky_edit(proj.root / OUTPUT)
    # ctime moved with the write and the utime, so the stat cache does not answer for the file.
    assert f"render:park  output {OUTPUT} differs from the lockfile's" in plan(proj, capsys)


def forge_stat_cache(proj, rel: str) -> None:
    """Make the stat cache vouch for the file's current stat with its old hash: what a file system
    whose ctime tells nothing (some network and FUSE mounts) leaves dbl to believe."""
    state = proj.root / ".dbl" / "state"
    data = json.loads(state.read_text())
    path = proj.root / rel
    key = next(k for k in data["files"] if k.endswith(rel))
    st = os.stat(path)
    data["files"][key][:4] = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
    state.write_text(json.dumps(data))


def test_check_finds_what_the_stat_cache_hides_and_tells_plan(proj, build, capsys):
    build(proj)
    sneaky_edit(proj.root / OUTPUT)
    forge_stat_cache(proj, OUTPUT)
    assert plan(proj, capsys).startswith("all 7 steps are up to date")  # blind
    assert main(["check", str(proj.path)]) == 1
    out = capsys.readouterr().out
    assert f"{OUTPUT}: output of render:park differs from the lockfile's sha256" in out
    assert "`dbl plan` could not see it" in out and "run `dbl build`" in out
    assert f"render:park  output {OUTPUT} differs from the lockfile's" in plan(proj, capsys)  # told by check
    build(proj)
    assert main(["check", str(proj.path)]) == 0
    assert capsys.readouterr().out.startswith("all ")


def test_check_reads_inputs_and_cache_entries(proj, build, capsys, monkeypatch):
    monkeypatch.chdir(proj.root)  # the files and the command to delete an entry are named as typed here
    build(proj)
    image = proj.root / "data" / "dog" / "01.png"
    sneaky_edit(image)
    forge_stat_cache(proj, "data/dog/01.png")
    entry = next((proj.root / ".dbl" / "cache").iterdir())
    cached = next(p for p in (entry / "files").rglob("*") if p.is_file())
    cached.write_bytes(cached.read_bytes() + b"x")
    assert plan(proj, capsys).startswith("all 7 steps are up to date")  # blind to both
    assert main(["check", str(proj.path)]) == 1
    out = capsys.readouterr().out
    assert "data/dog/01.png: input of train:dog changed since it was built" in out
    assert "run-cache copy of" in out and "altered" in out and "rm -r .dbl/cache/" in out
    monkeypatch.chdir(proj.root.parent)  # from the folder above: the command to type there
    assert main(["check", str(proj.path)]) == 1
    out = capsys.readouterr().out
    assert f"{proj.root.name}/data/dog/01.png: input of train:dog" in out
    assert f"rm -r {proj.root.name}/.dbl/cache/" in out
    assert "train:dog" in plan(proj, capsys)


def test_a_run_cache_entry_check_found_altered_is_not_called_restorable(proj, build, capsys):
    """The plan checks an entry's files by their sizes: after `dbl check` had found one altered (its size
    kept), the plan still said `restorable from cache`, and the build then found the damage and reran."""
    from runner import lockfile

    build(proj)
    entry = proj.root / ".dbl" / "cache" / lockfile.read(proj.lock)["render:park"]["fingerprint"]
    sneaky_edit(entry / "files" / "0-0.png")
    (proj.root / OUTPUT).unlink()
    assert f"render:park  output {OUTPUT} missing; restorable from cache" in plan(proj, capsys)  # blind to it
    assert main(["check", str(proj.path)]) == 1
    assert "run-cache copy of render:park's output is altered" in capsys.readouterr().out
    said = plan(proj, capsys)
    assert f"render:park  output {OUTPUT} missing\n" in said and "restorable" not in said, said
    result, rec = build(proj)
    assert result.ok and [e[2] for e in rec.events if e[0] == "end" and e[1] == "render:park"] == ["done"]


def test_check_without_a_lockfile_and_when_all_is_well(proj, build, capsys):
    assert main(["check", str(proj.path)]) == 0
    assert capsys.readouterr().out.startswith("nothing to check: the lockfile records no built step yet")
    build(proj)
    assert main(["check", str(proj.path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("all ") and out.endswith(" files match the lockfile\n") and "all 0 " not in out


def test_old_stat_cache_entries_miss(tmp_path):
    path = tmp_path / "f"
    path.write_text("new")
    st = os.stat(path)
    state = tmp_path / "state"
    old = [st.st_size, st.st_mtime_ns, st.st_ino, "0" * 64]  # the key before ctime joined it
    state.write_text(json.dumps({"version": 1, "files": {str(path): old}}))
    hasher = FileHasher(state)
    assert hasher.hash(path) != "0" * 64 and hasher.reads == 1


def test_a_plan_after_a_build_reads_no_file(proj, build):
    # ctime in the key must not cost re-reads: nothing a build does after hashing a file moves its ctime.
    from runner.executor import Workspace

    build(proj)
    ws = Workspace(proj.load())
    ws.plan()
    assert ws.hasher.reads == 0


def test_check_reports_a_record_that_does_not_match_its_digest(proj, build, capsys):
    build(proj)
    proj.lock.write_text(proj.lock.read_text().replace("fake = true", "fake = false", 1))
    assert main(["check", str(proj.path)]) == 1
    captured = capsys.readouterr()
    assert "pets.lock: the record of blend:mix does not match its digest" in captured.out
    assert "`dbl build` restores or reruns blend:mix" in captured.out


def test_missing_files_count_among_the_files_checked(proj, build, capsys):
    import shutil

    from runner import lockfile

    build(proj)
    assert main(["check", str(proj.path)]) == 0
    checked = int(capsys.readouterr().out.split()[1])  # "all N files match the lockfile"
    cache = proj.root / ".dbl" / "cache"
    cached = sum(1 for entry in cache.iterdir() for p in (entry / "files").rglob("*") if p.is_file())
    outputs = sum(len(r["outputs"]) for r in lockfile.read(proj.root / "pets.lock").values())
    shutil.rmtree(proj.root / "build")
    shutil.rmtree(cache)
    assert main(["check", str(proj.path)]) == 1
    # The inputs are read as before; the outputs are counted although none could be read.
    expected = f"{outputs} files of {checked - cached} differ from the lockfile:"
    assert capsys.readouterr().out.splitlines()[0] == expected


def test_check_says_a_missing_output_folder_in_one_line_and_a_missing_file_in_its_own(
    proj, build, capsys, monkeypatch
):
    import shutil

    build(proj)
    shutil.rmtree(proj.root / "build/pets/adapters/dog")  # as in a fresh clone
    (proj.root / OUTPUT).unlink()
    monkeypatch.chdir(proj.root)
    assert main(["check", str(proj.path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("3 files of ")  # the adapter's two files, and the render's one
    assert lines[1:3] == [
        f"  {OUTPUT}: output of render:park is missing - {REBUILD}",
        f"  build/pets/adapters/dog: output folder of train:dog is missing (2 files) - {REBUILD}",
    ]
    # From the folder above, the files are named as typed there, as a build's lines name them.
    monkeypatch.chdir(proj.root.parent)
    assert main(["check", str(proj.path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"  {proj.root.name}/{OUTPUT}: output of render:park is missing - {REBUILD}", lines


def test_a_build_writes_the_stat_cache_once_not_after_every_step(proj, build, monkeypatch):
    # The file holds every hash: rewriting it after each of a few hundred quick steps was most of a build.
    from runner import fingerprint

    saves = []
    replace = os.replace

    def counted(src, dst):
        if os.path.basename(dst) == "state":
            saves.append(dst)
        replace(src, dst)

    monkeypatch.setattr(fingerprint.os, "replace", counted)
    result, _ = build(proj)
    assert result.ok and len(saves) <= 2  # after the plan and at the end


def test_check_works_out_how_to_show_a_path_only_for_a_mismatch(proj, build, monkeypatch):
    # Resolving the path of each of thousands of matching images was a good part of `dbl check`.
    from runner import check

    build(proj)
    shown = []
    monkeypatch.setattr(check, "fmt_path", lambda path: shown.append(path) or str(path))
    assert check.check(proj.load()).mismatches == [] and shown == []
