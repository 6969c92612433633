"""The package's entry points each import first, in a fresh interpreter: an import cycle that only bites
when one module is imported before another (runner.models before runner.project, say) fails here."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

# The modules a user, a script or a worker process may import first.
ENTRY_POINTS = (
    "runner",
    "runner.adapters",
    "runner.api",
    "runner.blending",
    "runner.cli",
    "runner.executor",
    "runner.exec.launcher",
    "runner.families",
    "runner.families.sd1",
    "runner.families.sdxl",
    "runner.host",
    "runner.models",
    "runner.pipeline_adapters",
    "runner.project",
    "runner.report",
    "runner.steps",
    "runner.training",
    "runner.training.loop",
    "runner.watch",
)


def test_each_entry_point_imports_first():
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in (ROOT / "runner").rglob("*.py")
    }
    assert set(ENTRY_POINTS) <= modules
    # One interpreter, each module imported first in a forked child of it (fast: no restart per module).
    script = (
        "import importlib, os, sys\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        try:\n"
        "            importlib.import_module(name)\n"
        "        except BaseException as exc:\n"
        "            print(f'{name}: {type(exc).__name__}: {exc}', flush=True)\n"
        "            os._exit(1)\n"
        "        os._exit(0)\n"
        "    if os.waitpid(pid, 0)[1] != 0:\n"
        "        failed.append(name)\n"
        "print('failed:', failed)\n"
        "sys.exit(1 if failed else 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *ENTRY_POINTS], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_commands_that_build_nothing_load_no_torch(tmp_path):
    """`dbl plan`, `ls`, `check` and `report` answer without torch, diffusers, transformers or peft (seconds of
    imports), each run in a fresh child of one interpreter."""
    from tests.conftest import PETS, Proj

    project = Proj(tmp_path, PETS).path
    script = (
        "import os, sys\n"
        "from runner.cli import main\n"
        "loaded = {}\n"
        "for command in ('plan', 'ls', 'check', 'report'):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        main([command, sys.argv[1]])\n"
        "        heavy = [m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules]\n"
        "        print('LOADED', command, heavy, flush=True)\n"
        "        os._exit(0)\n"
        "    os.waitpid(pid, 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(project)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    loaded = [line for line in done.stdout.splitlines() if line.startswith("LOADED")]
    assert loaded == [f"LOADED {c} []" for c in ("plan", "ls", "check", "report")], done.stdout + done.stderr


def test_importing_dbl_keeps_mkl_to_the_thread_count_it_was_given_unless_told_otherwise():
    """oneMKL gives the same bytes run after run only with a thread count it does not change at run
    time; a process that imports dbl sets that before any step computes, and a value set wins."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("MKL_DYNAMIC", "OMP_DYNAMIC")}
    code = "import os, runner; print(os.environ['MKL_DYNAMIC'], os.environ['OMP_DYNAMIC'])"
    run = [sys.executable, "-c", code]
    said = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    assert said == "FALSE FALSE\n"
    env["MKL_DYNAMIC"] = "TRUE"
    said = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    assert said == "TRUE FALSE\n"
