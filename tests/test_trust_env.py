"""Odd environments: file names that are not UTF-8, a closed or broken standard output, a full disk."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner import lockfile
from runner.cli import main
from tests.conftest import ROOT, write_image
from tests.fake_build import fake_dbl

ALL = {"prior:dog", "train:dog", "train:toy", "blend:mix", "render:park", "render:mixed", "render:base"}


@pytest.mark.skipif(sys.platform != "linux", reason="Linux file names are bytes")
def test_a_file_name_that_is_not_utf8_is_named_in_a_clear_error(proj, capsys):
    folder = os.fsencode(str(proj.root / "data" / "toy"))  # train:toy needs no prior: planned at once
    write_image(Path(os.fsdecode(os.path.join(folder, b"\xff.png"))))
    assert os.path.exists(os.path.join(folder, b"\xff.png"))
    assert main(["plan", str(proj.path)]) == 2
    err = capsys.readouterr().err
    assert "the file name b'\\xff.png' is not valid UTF-8" in err and "rename it" in err
    assert "Traceback" not in err and "unexpected" not in err
    built = fake_dbl("build", proj.path, "--no-progress")
    assert built.returncode == 2, built.stderr
    assert "b'\\xff.png'" in built.stderr and "Traceback" not in built.stderr


def test_a_dangling_symlink_among_the_images_is_named_in_a_clear_error(proj, capsys):
    (proj.root / "data" / "toy" / "moved.png").symlink_to(proj.root / "gone" / "moved.png")
    assert main(["plan", str(proj.path)]) == 2
    err = capsys.readouterr().err
    assert "moved.png: a symbolic link to " in err and "which does not exist" in err
    assert "Errno" not in err and "Traceback" not in err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_a_named_pipe_among_the_images_is_named_in_a_clear_error(proj, capsys):
    os.mkfifo(proj.root / "data" / "toy" / "pipe.jpg")  # reading it would wait for a writer forever
    assert main(["plan", str(proj.path)]) == 2
    err = capsys.readouterr().err
    assert "pipe.jpg: a named pipe, not a file" in err and "remove it" in err
    assert "Traceback" not in err


def closed_stdout(*command: str) -> subprocess.CompletedProcess:
    """Run `command` as a shell would run `command >&-`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), FAKE_STEPS_LOG=os.devnull)
    return subprocess.run(
        ["sh", "-c", 'exec "$@" >&-', "sh", *command],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "display", [[], ["--no-progress"], ["--no-progress", "-j", "2"]], ids=["auto", "plain", "workers"]
)
def test_build_with_stdout_closed(proj, display):
    probe = closed_stdout(sys.executable, "-c", "import sys; print(sys.stdout is None, file=sys.stderr)")
    assert probe.stderr.strip() == "True"  # the descriptor really is closed
    done = closed_stdout(sys.executable, "-m", "tests.fake_build", "--", "build", str(proj.path), *display)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Error" not in done.stderr
    assert set(lockfile.read(proj.lock)) == ALL


def broken_stdout(*command: str) -> tuple[int, str]:
    """Run `command` with its standard output a pipe whose reader has gone: (exit code, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), FAKE_STEPS_LOG=os.devnull)
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader goes away before the command prints its first line
    err = proc.stderr.read().decode()
    return proc.wait(timeout=120), err


def test_build_with_stdout_broken(proj):
    probe = broken_stdout(sys.executable, "-c", "print('x', flush=True)")
    assert probe[0] != 0 and "BrokenPipeError" in probe[1]  # the pipe really is broken
    code, err = broken_stdout(
        sys.executable, "-m", "tests.fake_build", "--", "build", str(proj.path), "--no-progress"
    )
    assert code == 0, err
    assert "Broken pipe" not in err and "Exception ignored" not in err and "Traceback" not in err
    assert set(lockfile.read(proj.lock)) == ALL


@pytest.fixture
def full_disk_for_state(monkeypatch):
    """Writing the stat cache fails with ENOSPC; everything else writes as usual."""
    real = Path.write_text
    attempts = []

    def write_text(self, *args, **kwargs):
        if self.name.startswith("state.tmp-"):
            attempts.append(self)
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    return attempts


def test_plan_goes_on_when_the_stat_cache_cannot_be_saved(proj, capsys, full_disk_for_state):
    assert main(["plan", str(proj.path)]) == 0
    captured = capsys.readouterr()
    assert full_disk_for_state, "the stat cache was never written"
    assert "7 of 7 steps stale" in captured.out
    assert captured.err.count("cannot save the file-hash cache") == 1 and "No space left" in captured.err
    assert not list((proj.root / ".dbl").glob("state*"))


def test_build_warns_once_when_the_stat_cache_cannot_be_saved(proj, fake_steps, capsys, full_disk_for_state):
    assert main(["build", str(proj.path), "--no-progress"]) == 0
    assert len(full_disk_for_state) > 1  # tried after the plan and after every step
    assert capsys.readouterr().err.count("cannot save the file-hash cache") == 1
    assert set(lockfile.read(proj.lock)) == ALL


def test_a_stream_whose_reader_went_away_becomes_a_sink():
    from runner.ui.streams import SurvivableStream

    read, write = os.pipe()
    os.close(read)
    # Closing the raw file flushes what it still buffers into the broken pipe once more.
    with contextlib.suppress(BrokenPipeError), open(write, "w") as raw:
        stream = SurvivableStream(raw)
        stream.write("x" * 100_000)
        stream.flush()
        assert stream.gone
        assert stream.write("more") == 4 and not stream.isatty()


def test_text_the_stream_cannot_encode_is_escaped_not_lost(tmp_path):
    from runner.ui.streams import SurvivableStream

    with open(tmp_path / "out", "w", encoding="utf-8") as raw:
        stream = SurvivableStream(raw)
        stream.write("data/\udcff.png\n")  # a file name that is not UTF-8, as Python decodes it
        stream.write("still here\n")
        assert not stream.gone
    assert (tmp_path / "out").read_text() == "data/\\udcff.png\nstill here\n"
