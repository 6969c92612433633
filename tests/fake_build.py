"""Run `dbl` in a subprocess with fake steps, for tests that kill or lock a real process.

    python -m tests.fake_build [--crash MODULE:FUNC:N] [--slow STEP_ID] -- dbl-args...

--crash kills this process with SIGKILL on the N-th call of MODULE.FUNC (a crash at that point); N = 0
never kills, and prints "CALLS <n>" at the end: how often MODULE.FUNC was called;
--slow makes one step sleep, so that a test can act while it runs. Every step that runs is appended
to the file named by $FAKE_STEPS_LOG.

Tests start it with fake_dbl (any command) or fake_build (`dbl build PROJECT --no-progress`), and read what
it prints with wait_for: `from tests.fake_build import fake_dbl, wait_for`.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT, FakeBackend, FakeSteps, use_backend


def fake_dbl(*args, crash=None, slow=None, log=None, wait=True, **kw):
    """`dbl ARGS` run by this script in a process of its own: the finished process, or with wait=False the
    running one (`kw` go to subprocess.run)."""
    cmd = [sys.executable, "-m", "tests.fake_build"]
    if crash:
        cmd += ["--crash", crash]
    if slow:
        cmd += ["--slow", slow]
    env = dict(os.environ, PYTHONPATH=str(ROOT), FAKE_STEPS_LOG=str(log or os.devnull))
    cmd += ["--", *map(str, args)]
    if not wait:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, **kw)


def fake_build(project: Path, *extra, crash: str | None = None, log: Path | None = None):
    """`dbl build PROJECT --no-progress EXTRA` run by this script in a process of its own, finished."""
    return fake_dbl("build", project, "--no-progress", *extra, crash=crash, log=log)


def wait_for(proc, text: str) -> None:
    """Read the running `proc`'s output until it has printed `text`."""
    seen = []
    while text not in "".join(seen):
        line = proc.stdout.readline()
        assert line, f"process ended before printing {text!r}: {''.join(seen)}"
        seen.append(line)


def main() -> int:
    args = sys.argv[1:]
    split = args.index("--")
    opts, dbl_args = args[:split], args[split + 1 :]
    fake = FakeSteps()
    log = os.environ.get("FAKE_STEPS_LOG")
    slow = opts[opts.index("--slow") + 1] if "--slow" in opts else None

    def wrap(inner):
        def run(ctx):
            if log:
                with open(log, "a") as f:
                    f.write(ctx.step_id + "\n")
            if ctx.step_id == slow:
                print("SLOW STEP RUNNING", flush=True)
                for _ in range(600):
                    if ctx.should_stop():
                        from runner.steps import StepInterrupted

                        raise StepInterrupted("stopped")
                    time.sleep(0.05)
            return inner(ctx)

        return run

    import runner.executor  # noqa: F401 - import the build's modules before patching them below

    use_backend(lambda project: FakeBackend(fake, wrap))
    if "--crash" in opts:
        module_name, func_name, count = opts[opts.index("--crash") + 1].split(":")
        owner_name, _, attr = func_name.rpartition(".")
        module = importlib.import_module(module_name)
        owner = getattr(module, owner_name) if owner_name else module
        original = getattr(owner, attr)
        calls = {"n": 0}

        def crashing(*a, **kw):
            calls["n"] += 1
            if calls["n"] == int(count):
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*a, **kw)

        setattr(owner, attr, crashing)
        # Modules that imported the function by name get the crashing one too.
        for mod in list(sys.modules.values()):
            if (
                mod
                and getattr(mod, "__name__", "").startswith("runner")
                and getattr(mod, attr, None) is original
            ):
                setattr(mod, attr, crashing)
    from runner.cli import main as dbl

    code = dbl(dbl_args)
    if "--crash" in opts:
        print(f"CALLS {calls['n']}", flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
