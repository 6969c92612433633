"""How fast `dbl plan` and a no-op `dbl build` answer on a large project (nothing changed).

    python bench/plan_bench.py [--subjects 50] [--images 20] [--json]

Makes a project of N subjects with M images each (small PNGs), one prior, a blend and a render per
subject, builds it once with stand-in steps (the engine is what is measured here, not training), then
times: the first plan (every image hashed), later plans (stat cache), `dbl plan` / `dbl build` as
commands, Python start-up included, a lockfile write after one step (what a build pays per step), a
build that restores every step from the run-cache (the lockfile moved aside: a revert), and the CPU
time of that build with plain lines and with the live table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def png(seed: int, size: int = 64) -> bytes:
    import struct

    rows = b"".join(
        b"\x00" + bytes((x * 7 + y * 13 + seed * 31) % 256 for x in range(size * 3)) for y in range(size)
    )

    def chunk(tag, data):
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def make_project(root: Path, subjects: int, images: int) -> Path:
    lines = ['[project]\nbase_model = "tiny-sd"\n', '[priors.person]\nclass_prompt = "a photo of a person"\n']
    for s in range(subjects):
        folder = root / "data" / f"s{s:03d}"
        folder.mkdir(parents=True)
        for i in range(images):
            (folder / f"{i:03d}.png").write_bytes(png(s * 1000 + i))
        lines.append(
            f'[subjects.s{s:03d}]\nimages = "data/s{s:03d}"\ninstance_prompt = "a photo of sks{s} person"\nprior = "person"\n'
        )
        lines.append(f'[renders.r{s:03d}]\nadapter = "s{s:03d}"\nprompts = ["sks{s} person on a beach"]\n')
    parents = ", ".join(f"s{s:03d} = 1.0" for s in range(min(subjects, 4)))
    lines.append(f"[blends.group]\nadapters = {{ {parents} }}\n")
    path = root / "big.toml"
    path.write_text("\n".join(lines))
    return path


def stand_in(ctx) -> dict:
    (ctx.out / "out.txt").write_text(ctx.fingerprint)
    return {}


class StandInBackend:
    """Runs `stand_in` for every step: the bench measures planning, not steps."""

    name = "stand-in"

    def __init__(self, project):
        pass

    def run(self, job, hooks):
        from runner.exec.job import run_job

        return run_job(job, hooks, models=None, run=stand_in)

    def close(self) -> None:
        pass


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subjects", type=int, default=50)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from runner import executor
    from runner.project import load_project
    from runner.ui import make_reporter

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = make_project(root, args.subjects, args.images)
        project = load_project(path)
        options = executor.BuildOptions(backend_factory=StandInBackend)
        executor.build(project, options, make_reporter("plain", -1))
        (root / ".dbl" / "state").unlink()  # forget every hash: the next plan reads every file

        def plan():
            ws = executor.Workspace(load_project(path))
            _, planned = ws.plan()
            assert not any(p.stale for p in planned), [p.reasons for p in planned if p.stale][:3]

        cold = timed(plan)
        warm = timed(plan, repeat=5)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        dbl = [sys.executable, "-m", "runner"]

        def command(*a):
            done = subprocess.run(dbl + list(a) + [str(path)], env=env, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr

        plan_cmd = timed(lambda: command("plan"), repeat=3)
        build_cmd = timed(lambda: command("build", "--no-progress"), repeat=3)

        from runner import lockfile

        lock_path = path.with_suffix(".lock")
        lock = lockfile.read(lock_path)
        lockfile.write(lock_path, lock)
        first = next(iter(lock))

        def write_after_a_step():
            lock[first] = {**lock[first], "duration_s": lock[first]["duration_s"] + 1}
            lockfile.write(lock_path, lock)

        lock_write = timed(write_after_a_step, repeat=5)
        lock_path.unlink()

        def restore_all():
            result = executor.build(load_project(path), options, make_reporter("plain", -1))
            assert {e.status for e in result.steps} == {"cached"}, {e.status for e in result.steps}

        restore = timed(restore_all)

        def restore_cpu(mode: str) -> float:
            """CPU seconds (every thread: rich's refresh too) of restoring every step, drawn on a 120 x 50
            in-memory terminal; the least of three."""
            from rich.console import Console

            lock_path.unlink()
            console = Console(file=io.StringIO(), force_terminal=True, width=120, height=50)
            start = time.process_time()
            executor.build(load_project(path), options, make_reporter(mode, 0, console=console))
            return time.process_time() - start

        restore_plain_cpu = min(restore_cpu("plain") for _ in range(3))
        restore_live_cpu = min(restore_cpu("live") for _ in range(3))
        lock_size = lock_path.stat().st_size
        steps = 1 + 2 * args.subjects + 1
    figures = {
        "subjects": args.subjects,
        "images": args.subjects * args.images,
        "steps": steps,
        "plan_first_s": round(cold, 3),
        "plan_cached_s": round(warm, 3),
        "dbl_plan_command_s": round(plan_cmd, 3),
        "dbl_build_noop_command_s": round(build_cmd, 3),
        "lockfile_bytes": lock_size,
        "lockfile_write_s": round(lock_write, 4),
        "restore_every_step_s": round(restore, 3),
        "restore_cpu_plain_s": round(restore_plain_cpu, 3),
        "restore_cpu_live_table_s": round(restore_live_cpu, 3),
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"project: {args.subjects} subjects x {args.images} images, {steps} steps, nothing changed")
        for key in ("plan_first_s", "plan_cached_s", "dbl_plan_command_s", "dbl_build_noop_command_s"):
            print(f"  {key:<26} {figures[key]:8.3f} s")
        print(f"  {'lockfile_write_s':<26} {figures['lockfile_write_s']:8.4f} s ({lock_size} bytes)")
        print(f"  {'restore_every_step_s':<26} {figures['restore_every_step_s']:8.3f} s")
        for key in ("restore_cpu_plain_s", "restore_cpu_live_table_s"):
            print(f"  {key:<26} {figures[key]:8.3f} s CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
