"""SIGTERM and SIGHUP stop a build at a safe point with 128+signal; the terminal gets its cursor back;
a worker that called die_with_parent goes when its parent is SIGKILLed."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from runner import lockfile
from runner.exec import lastbuild
from tests.conftest import ROOT

# A build with fake steps in which one step waits, checking for a stop request, and writes down
# that it received one: the proof that the signal became a stop request and not a kill.
SLOW_BUILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from tests.conftest import FakeBackend, FakeSteps, use_backend

    fake = FakeSteps()

    def slow(inner):
        def run(ctx):
            if ctx.step_id == os.environ["SLOW_STEP"]:
                print("SLOW STEP RUNNING", flush=True)
                for _ in range(1200):
                    if ctx.should_stop():
                        Path(os.environ["STOP_MARKER"]).write_text(ctx.step_id + " asked to stop")
                        from runner.errors import StepInterrupted

                        raise StepInterrupted("stopped at a safe point")
                    time.sleep(0.05)
            return inner(ctx)

        return run

    use_backend(lambda project: FakeBackend(fake, slow))
    from runner.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)


def slow_build(proj, tmp_path, *args, **popen):
    script = tmp_path / "slow_build.py"
    script.write_text(SLOW_BUILD)
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        SLOW_STEP="train:toy",
        STOP_MARKER=str(tmp_path / "stop-marker"),
        **popen.pop("env", {}),
    )
    cmd = [sys.executable, str(script), "build", str(proj.path), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, **popen)


def read_until(proc, text: str) -> str:
    seen = ""
    while text not in seen:
        line = proc.stdout.readline()
        assert line, f"the build ended before printing {text!r}: {seen}"
        seen += line
    return seen


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)], ids=["TERM", "HUP"])
def test_signal_stops_the_build_at_a_safe_point(proj, tmp_path, signum, code):
    proc = slow_build(
        proj, tmp_path, "--no-progress", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        read_until(proc, "SLOW STEP RUNNING")
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == code, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "stop-marker").read_text() == "train:toy asked to stop"
    err = proc.stderr.read()
    assert f"{signal.Signals(signum).name}: stopping at the next safe point" in err
    assert "Traceback" not in err
    assert set(lockfile.read(proj.lock)) == {"prior:dog", "train:dog"}  # reads, with what finished
    # dbl report's "Last build" says the exit code the shell, Slurm or docker saw, not Ctrl-C's
    assert lastbuild.read(proj.load())["exit_code"] == code


HIDE, SHOW = b"\x1b[?25l", b"\x1b[?25h"


def test_sigterm_gives_the_terminal_its_cursor_back(proj, tmp_path):
    master, slave = pty.openpty()
    proc = slow_build(
        proj, tmp_path, stdin=slave, stdout=slave, stderr=slave, env={"TERM": "xterm", "COLUMNS": "120"}
    )
    os.close(slave)
    output = bytearray()
    done = threading.Event()

    def drain():
        while True:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                output.extend(chunk)
            elif done.is_set():
                break

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while b"SLOW STEP RUNNING" not in output:
            assert proc.poll() is None and time.monotonic() < deadline, bytes(output)
            time.sleep(0.05)
        assert HIDE in output  # the live display is up and has hidden the cursor
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        done.set()
        reader.join(5)
        os.close(master)
    assert output.rfind(SHOW) > output.rfind(HIDE), bytes(output[-400:])
    assert (tmp_path / "stop-marker").exists()


# --- die_with_parent ---------------------------------------------------------------------------------

PARENT = textwrap.dedent(
    """
    import os, subprocess, sys, time

    child = subprocess.Popen(
        [sys.executable, "-c", sys.argv[1], str(os.getpid())], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline() == "ready\\n"
    print(child.pid, flush=True)
    time.sleep(120)
    """
)
WORKER = "import sys, time\n{setup}\nprint('ready', flush=True)\ntime.sleep(120)\n"


def gone(pid: int) -> bool:
    """Whether `pid` has exited (a zombie waiting for a reaper counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "State:\tZ" in status


def orphan_after_parent_killed(setup: str, tmp_path) -> int:
    """Start parent -> worker, SIGKILL the parent; the worker's pid."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    worker = WORKER.format(setup=setup)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    parent = subprocess.Popen(
        [sys.executable, str(script), worker], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    pid = int(parent.stdout.readline())
    assert not gone(pid)
    parent.kill()
    assert parent.wait(timeout=10) == -signal.SIGKILL
    return pid


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_worker_that_asked_dies_with_its_parent(tmp_path):
    setup = "from runner.interrupt import die_with_parent\nassert die_with_parent(int(sys.argv[1]))"
    pid = orphan_after_parent_killed(setup, tmp_path)
    deadline = time.monotonic() + 30
    while not gone(pid):
        assert time.monotonic() < deadline, "the worker outlived its parent"
        time.sleep(0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_worker_that_did_not_ask_survives_its_parent(tmp_path):
    # The control: without die_with_parent the same worker is orphaned, which is what the call prevents.
    pid = orphan_after_parent_killed("pass", tmp_path)
    time.sleep(1)
    try:
        assert not gone(pid)
    finally:
        os.kill(pid, signal.SIGKILL)


def python_of_this_checkout(code: str, timeout: float) -> subprocess.CompletedProcess:
    """`python -c code` with this checkout's dbl, its output kept."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_die_with_parent_notices_a_parent_already_gone(tmp_path):
    code = "import sys\nfrom runner.interrupt import die_with_parent\ndie_with_parent(1)\nprint('still here')"
    done = python_of_this_checkout(code, timeout=30)
    if sys.platform.startswith("linux"):
        assert done.returncode == -signal.SIGTERM and "still here" not in done.stdout
    else:
        assert done.returncode == 0


# Ctrl-C while Python still imports dbl's modules (the first tenth of a second of every command).
CTRL_C_DURING_IMPORT = textwrap.dedent(
    """
    import os, signal, sys

    class CtrlCOnImport:
        def find_spec(self, name, path=None, target=None):
            if name == "runner.cli":
                print("SIGINT SENT", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGINT)
            return None

    sys.meta_path.insert(0, CtrlCOnImport())
    from runner.console import main
    sys.argv = ["dbl", "--version"]
    raise SystemExit(main())
    """
)


def test_ctrl_c_while_dbl_is_imported_ends_quietly_with_130():
    done = python_of_this_checkout(CTRL_C_DURING_IMPORT, timeout=60)
    assert "SIGINT SENT" in done.stderr  # the signal really came during the import
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr
    assert done.stderr.rstrip().endswith("dbl: interrupted")


def test_the_entry_point_exits_130_as_the_scheduler_does():
    from runner import console
    from runner.exec import scheduler

    assert console.EXIT_INTERRUPTED == scheduler.EXIT_INTERRUPTED


# A stop signal while the command exits: its exit handlers, and what followed them, the interpreter's
# teardown of torch and every other module, took a second or two after each build.
SIGNAL_WHILE_EXITING = textwrap.dedent(
    """
    import atexit, os, signal, sys, time

    def signal_while_exiting():
        print("SIGNAL SENT", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.{signal})
        time.sleep(5)

    atexit.register(signal_while_exiting)
    from runner.console import main
    sys.argv = ["dbl", "--version"]
    raise SystemExit(main())
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_dbl_exits_ends_it_with_dbl_s_exit_code(signum):
    done = python_of_this_checkout(SIGNAL_WHILE_EXITING.format(signal=signum.name), timeout=60)
    assert "SIGNAL SENT" in done.stderr  # the signal really came as the process was exiting
    assert done.returncode == 128 + signum, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr
    assert done.stdout.startswith("dbl ")  # what the command printed is all there


def test_the_command_s_exit_handlers_run_and_its_exit_code_stays():
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('EXIT HANDLER RAN', flush=True))\n"
        "from runner.console import main\n"
        "sys.argv = ['dbl', 'plan', 'no-such-project.toml']\n"
        "raise SystemExit(main())"
    )
    done = python_of_this_checkout(code, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "EXIT HANDLER RAN" in done.stdout and "no-such-project.toml" in done.stderr
