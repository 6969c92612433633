"""Reliability on a full disk: while committing, copying outputs out, storing in the run-cache or writing
the lockfile, a build keeps the earlier outputs and leaves no half-written file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from runner import lockfile, store
from runner.cli import main
from runner.events import FAILED
from tests.conftest import PETS, Proj, folder_bytes, output_bytes


def test_disk_full_while_committing_keeps_earlier_outputs(proj, build, fake_steps, monkeypatch):
    build(proj)
    before_lock = proj.lock.read_text()
    before = output_bytes(proj.root)
    proj.edit("sks dog on a beach", "sks dog on the moon")
    real = store.copy_hashed
    calls = {"n": 0}

    def full(src, dst, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(store, "copy_hashed", full)
    result, rec = build(proj)
    assert result.exit_code == 1
    failures = [e for e in rec.events if e[0] == "end" and e[2] == FAILED]
    assert failures and "No space left on device" in failures[0][3]
    assert output_bytes(proj.root) == before and proj.lock.read_text() == before_lock
    monkeypatch.setattr(store, "copy_hashed", real)
    result, _ = build(proj)
    assert result.ok
    assert fake_steps.ran == []  # what the step made was kept in the run-cache: restored, not run again


def test_disk_full_while_copying_outputs_out_is_one_os_error_and_leaves_no_half_copy(
    proj, build, monkeypatch
):
    build(proj)
    before_lock, before = proj.lock.read_text(), output_bytes(proj.root)
    proj.edit("sks dog on a beach", "sks dog on the moon")
    real, failed = store.copy_hashed, []

    def full(src, dst, *a, **kw):
        if failed or Path(dst).name == "0-1.png":  # full from the second image on, as a disk fills up
            failed.append(dst)
            raise OSError(errno.ENOSPC, "No space left on device", str(src), None, str(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(store, "copy_hashed", full)
    result, rec = build(proj)
    assert failed and result.exit_code == 1  # the copy really failed
    (failure,) = [e[3] for e in rec.events if e[0] == "end" and e[2] == FAILED]
    assert failure.endswith("0-1.png: No space left on device") and failure.count("No space") == 1, failure
    assert "Errno" not in failure
    assert output_bytes(proj.root) == before and proj.lock.read_text() == before_lock
    assert not list((proj.root / ".dbl" / "tmp" / "pets").glob(".staged-*"))


def test_outputs_on_another_file_system_are_replaced_by_the_next_build(tmp_path, build, monkeypatch):
    """`out` on another disk than `.dbl/` (a scratch disk, a symlinked build folder): a rename between the
    two fails with EXDEV, here as there."""
    disk = tmp_path / "scratch"
    p = Proj(tmp_path, PETS.replace('base_model = "tiny-sd"', 'base_model = "tiny-sd"\nout = "scratch/pets"'))
    real, crossed = os.rename, []

    def rename(src, dst, *a, **kw):
        if Path(src).is_relative_to(disk) != Path(dst).is_relative_to(disk):
            crossed.append((src, dst))
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "rename", rename)
    result, _ = build(p)
    assert result.ok and crossed  # the outputs really went to "another file system"
    p.edit("sks dog on a beach", "sks dog on the moon")
    result, rec = build(p)
    assert result.ok, rec.events
    assert [e[2] for e in rec.events if e[0] == "end" and e[1] == "render:park"] == ["done"]
    park = disk / "pets" / "renders" / "park"
    assert "sks dog on the moon" in (park / "1-0.png").read_text()
    assert sorted(q.name for q in park.parent.iterdir()) == ["base", "mixed", "park"]  # no temp left
    assert main(["check", str(p.path)]) == 0


def test_disk_full_while_copying_to_outputs_on_another_file_system_leaves_nothing_half_copied(
    tmp_path, build, monkeypatch
):
    """The copy beside the outputs failed with shutil's list of every file's error as its message, and
    the part it had copied stayed there, on the disk that was full."""
    import shutil

    disk = tmp_path / "scratch"
    p = Proj(tmp_path, PETS.replace('base_model = "tiny-sd"', 'base_model = "tiny-sd"\nout = "scratch/pets"'))
    real_rename, real_copy, copied = os.rename, shutil.copyfile, []

    def rename(src, dst, *a, **kw):
        if Path(src).is_relative_to(disk) != Path(dst).is_relative_to(disk):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
        return real_rename(src, dst, *a, **kw)

    def copyfile(src, dst, *a, **kw):
        if Path(dst).is_relative_to(disk) and "park" in str(dst) and copied:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # the second file of a render
        copied.append(dst)
        return real_copy(src, dst, *a, **kw)

    def exchange(a, b):
        if Path(a).is_relative_to(disk) != Path(b).is_relative_to(disk):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(a), None, str(b))
        return real_exchange(a, b)

    from runner import exchange as exchange_module

    real_exchange = exchange_module.exchange
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(exchange_module, "exchange", exchange)
    assert build(p)[0].ok
    before_lock, before = p.lock.read_text(), folder_bytes(disk)
    p.edit("sks dog on a beach", "sks dog on the moon")
    monkeypatch.setattr(shutil, "copyfile", copyfile)
    copied.clear()
    result, rec = build(p)
    assert result.exit_code == 1 and copied  # a file was copied, the next one failed
    (failure,) = [e[3] for e in rec.events if e[0] == "end" and e[2] == FAILED]
    assert failure == f"{disk / 'pets' / 'renders'}: No space left on device", failure
    assert folder_bytes(disk) == before and p.lock.read_text() == before_lock  # nothing half-copied left
    assert sorted(q.name for q in (disk / "pets" / "renders").iterdir()) == ["base", "mixed", "park"]


def test_disk_full_while_storing_in_the_run_cache_frees_the_half_written_entry(proj, build, monkeypatch):
    from runner import store

    build(proj)
    before_lock, before = proj.lock.read_text(), output_bytes(proj.root)
    proj.edit("sks dog on a beach", "sks dog on the moon")
    failed = []

    def full(folder):
        failed.append(folder)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "fsync_tree", full)
    result, rec = build(proj)
    assert failed and result.exit_code == 1  # storing the entry really failed
    failures = [e for e in rec.events if e[0] == "end" and e[2] == FAILED]
    # where the disk is full: the error of a write names no file
    assert failures and failures[0][3] == f"{proj.root / '.dbl' / 'cache'}: No space left on device"
    assert output_bytes(proj.root) == before and proj.lock.read_text() == before_lock
    assert [p.name for p in (proj.root / ".dbl" / "cache").iterdir() if p.name.startswith(".")] == []


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/self/fd")
def test_a_run_cache_entry_is_flushed_file_by_file_several_at_once(tmp_path, monkeypatch):
    """Each fsync waits for a journal commit: one file after the other, storing a render of hundreds of
    images took seconds. Every file is flushed, each while another flush waits too; an error is raised."""
    import threading

    from runner import store

    files = [tmp_path / f"{i:04d}.png" for i in range(5)] + [tmp_path / "grid" / "grid.png"]
    for path in files:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"image")
    real, met = os.fsync, threading.Barrier(2, timeout=30)
    flushed, together = [], []

    def fsync(fd):
        flushed.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        try:
            met.wait()  # passes only when a second flush is under way
            together.append(True)
        except threading.BrokenBarrierError:
            together.append(False)
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store.fsync_tree(tmp_path)
    assert sorted(flushed) == sorted(files)
    assert together == [True] * len(files)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        store.fsync_tree(tmp_path)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/self/fd")
def test_disk_full_while_writing_the_lockfile_leaves_no_temp_file_beside_it(proj, build, monkeypatch):
    build(proj)
    before_lock = proj.lock.read_text()
    proj.edit("sks dog on a beach", "sks dog on the moon")
    real, failed = os.fsync, []

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".pets.lock.tmp-"):
            failed.append(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    result, rec = build(proj)
    assert failed and result.exit_code == 1  # the lockfile's write really failed
    failures = [e for e in rec.events if e[0] == "end" and e[2] == FAILED]
    assert failures and "No space left on device" in failures[0][3]
    assert proj.lock.read_text() == before_lock
    assert sorted(p.name for p in proj.root.iterdir() if p.name.startswith(".pets.lock")) == []
    monkeypatch.setattr(os, "fsync", real)
    result, _ = build(proj)
    assert (
        result.ok and lockfile.read(proj.lock)["render:park"]["inputs"]["prompts"][1] == "sks dog on the moon"
    )
