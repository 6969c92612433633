"""How fast dbl answers, and how much memory it takes, on a large project where nothing changed.

    python bench/plan_bench.py [--subjects 50] [--images 20] [--json]
    python bench/plan_bench.py --subjects 200 --images 50 --prompts 20 --seeds 4 --blend-depth 50 \
        --cache-entries 5000 --commands --no-restore
    python bench/plan_bench.py --subjects 200 --images 50 --profile check

Makes a project of N subjects with M images each (small PNGs), one prior, a render per subject (P prompts x
S seeds), a blend of four subjects and a chain of D blends each on the one before, and builds it once with
stand-in steps that write the files the real ones would (an adapter's seven files with a dbl.json of 800
losses, a render's images and grid): the engine is what is measured here, not training. Then times the
first plan (every image hashed), later plans (stat cache), and what the file system saw during a later plan
and a no-op build: files opened, stats, images re-read (none may be), whether the lockfile or any output was
written (none may be).

--commands times each command as users run it (a fresh process, imports included) with its peak memory
and whether it imported torch: plan, plan --json, a no-op build, check, ls, ls --json, report, gc --dry-run,
init. --cache-entries adds that many entries no lockfile names to the run-cache (copies of an adapter's),
for gc. Unless --no-restore: a lockfile write after one step, a build that restores every step from the
run-cache (the lockfile moved aside: a revert), and its CPU time with plain lines and with the live table.
--profile COMMAND prints the 30 costliest functions of one run of a command, in this process (cumulative).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
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


def make_project(
    root: Path, subjects: int, images: int, prompts: int = 1, seeds: int = 1, blend_depth: int = 0
) -> Path:
    lines = ['[project]\nbase_model = "tiny-sd"\n', '[priors.person]\nclass_prompt = "a photo of a person"\n']
    seed_list = ", ".join(str(s) for s in range(seeds))
    for s in range(subjects):
        folder = root / "data" / f"s{s:03d}"
        folder.mkdir(parents=True)
        for i in range(images):
            (folder / f"{i:03d}.png").write_bytes(png(s * 1000 + i, size=16))
        lines.append(
            f'[subjects.s{s:03d}]\nimages = "data/s{s:03d}"\ninstance_prompt = "a photo of sks{s} person"\nprior = "person"\n'
        )
        said = ", ".join(f'"sks{s} person, take {p}, on a beach at dawn"' for p in range(prompts))
        lines.append(f'[renders.r{s:03d}]\nadapter = "s{s:03d}"\nprompts = [{said}]\nseeds = [{seed_list}]\n')
    parents = ", ".join(f"s{s:03d} = 1.0" for s in range(min(subjects, 4)))
    lines.append(f"[blends.group]\nadapters = {{ {parents} }}\n")
    for d in range(blend_depth):  # each on the one before: a chain as deep as blend_depth
        before = "group" if d == 0 else f"chain{d - 1:03d}"
        lines.append(f"[blends.chain{d:03d}]\nadapters = {{ {before} = 0.9, s{d % subjects:03d} = 0.1 }}\n")
    path = root / "big.toml"
    path.write_text("\n".join(lines))
    return path


ADAPTER_FILES = (
    "unet/adapter_model.safetensors",
    "unet/adapter_config.json",
    "text_encoder/adapter_model.safetensors",
    "text_encoder/adapter_config.json",
    "pytorch_lora_weights.safetensors",
    "kohya.safetensors",
)


def stand_in(ctx) -> dict:
    """The files a real step of this kind writes, small: the engine handles as many as it would."""
    if ctx.kind == "render":
        for i in range(len(ctx.spec.prompts)):
            for seed in ctx.spec.seeds:
                (ctx.out / f"{i}-{seed}.png").write_bytes(png(i * 1000 + seed, size=4))
        (ctx.out / "grid.png").write_bytes(png(len(ctx.spec.prompts), size=16))
    elif ctx.kind in ("train", "blend"):
        for name in ADAPTER_FILES:
            (ctx.out / name).parent.mkdir(parents=True, exist_ok=True)
            (ctx.out / name).write_text(f"{name} {ctx.fingerprint}")
        losses = [round(0.5 / (1 + step / 100), 4) for step in range(800)]
        log = {"instance_loss": losses, "prior_loss": losses} if ctx.kind == "train" else {}
        info = {"steps": 800, "instance_prompt": getattr(ctx.spec, "instance_prompt", None), "log": log}
        (ctx.out / "dbl.json").write_text(json.dumps(info))
    else:
        (ctx.out / "out.txt").write_text(ctx.fingerprint)
    return {"loss_first": 0.5, "loss_last": 0.1, "steps": 800} if ctx.kind == "train" else {}


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


class FileSystemCounter:
    """Files opened (an audit hook) and stats (os.stat wrapped) under a folder, while it is active."""

    def __init__(self, root: Path):
        self.root = str(root)
        self.active = False
        self.opened: dict[str, int] = {}
        self.stats = 0
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if self.active and event == "open" and isinstance(args[0], (str, Path)):
            path = str(args[0])
            if path.startswith(self.root):
                self.opened[path] = self.opened.get(path, 0) + 1

    def __enter__(self):
        self.opened, self.stats, self.active = {}, 0, True
        self._stat = os.stat

        def counting(*a, **kw):
            self.stats += 1
            return self._stat(*a, **kw)

        os.stat = counting
        return self

    def __exit__(self, *exc):
        os.stat = self._stat
        self.active = False

    def figures(self, images: Path) -> dict:
        inside = [p for p in self.opened if p.startswith(str(images))]
        return {
            "files_opened": len(self.opened),
            "opens": sum(self.opened.values()),
            "opened_twice": sum(1 for n in self.opened.values() if n > 1),
            "images_read": len(inside),
            "stats": self.stats,
        }


def lockfile_steps(path: Path) -> dict:
    from runner import lockfile

    return lockfile.read(path.with_suffix(".lock"))


def files_state(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def add_cache_entries(root: Path, count: int) -> None:
    """`count` run-cache entries no lockfile names (copies of an adapter's entry: seven files), for gc."""
    import hashlib

    cache = root / ".dbl" / "cache"
    model = next(p for p in sorted(cache.iterdir()) if (p / "files" / "dbl.json").is_file())
    for i in range(count):
        shutil.copytree(model, cache / hashlib.sha256(f"unnamed {i}".encode()).hexdigest())


RUNNER = (
    "import json, os, resource, sys\n"
    "from runner.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "with open(os.environ['BENCH_OUT'], 'w') as f:\n"
    "    usage = resource.getrusage(resource.RUSAGE_SELF)\n"
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, from the bench's own forked process.
    "    peak = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]\n"
    "    json.dump({'rss_mb': int(peak) / 1024, 'cpu_s': usage.ru_utime + usage.ru_stime,"
    " 'torch': 'torch' in sys.modules}, f)\n"
    "sys.exit(code)\n"
)


def run_command(args: list[str], cwd: Path, repeat: int = 3) -> dict:
    """The least wall time and CPU time (user and system: other work on the machine moves the wall time)
    of `repeat` runs of `dbl ARGS` in a fresh process, its peak RSS and whether it imported torch."""
    out = cwd / ".bench-out.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), BENCH_OUT=str(out))
    best, cpu, facts = float("inf"), float("inf"), {}
    for _ in range(repeat):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", RUNNER, *args], env=env, cwd=cwd, capture_output=True, text=True
        )
        best = min(best, time.perf_counter() - start)
        assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
        facts = json.loads(out.read_text())
        cpu = min(cpu, facts["cpu_s"])
    out.unlink()
    return {
        "s": round(best, 3),
        "cpu_s": round(cpu, 3),
        "rss_mb": round(facts["rss_mb"]),
        "torch": facts["torch"],
    }


def profile(command: str, path: Path, options) -> None:
    """The costliest functions of one run of `dbl COMMAND`, in this process."""
    import cProfile
    import pstats

    from runner.cli import main as dbl

    extra = {"build": ["--no-progress"], "gc": ["--dry-run"], "report": ["-o", str(path.parent / "r.html")]}
    argv = [*command.split(), str(path), *extra.get(command, [])]
    with cProfile.Profile() as prof:
        code = dbl(argv)
    assert code == 0, code
    pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats(30)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subjects", type=int, default=50)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=1, help="prompts of each render")
    parser.add_argument("--seeds", type=int, default=1, help="seeds of each render")
    parser.add_argument("--blend-depth", type=int, default=0, help="a chain of this many blends")
    parser.add_argument("--cache-entries", type=int, default=0, help="run-cache entries no lockfile names")
    parser.add_argument("--commands", action="store_true", help="time every command in a fresh process")
    parser.add_argument("--no-restore", action="store_true", help="skip the lockfile write and restores")
    parser.add_argument("--profile", metavar="COMMAND", help="plan, build, check, ls, report, gc ...")
    parser.add_argument("--dir", help="make and build the project here once, and reuse it next time")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from runner import executor
    from runner.project import load_project
    from runner.ui import make_reporter

    figures: dict = {"subjects": args.subjects, "images": args.subjects * args.images}
    with tempfile.TemporaryDirectory(prefix="dbl-plan-bench-") as tmp:
        root = Path(args.dir or tmp)
        path = root / "big.toml"
        options = executor.BuildOptions(backend_factory=StandInBackend)
        if not (args.dir and path.with_suffix(".lock").is_file()):  # --dir: made and built once
            shutil.rmtree(root / "data", ignore_errors=True)
            path = make_project(root, args.subjects, args.images, args.prompts, args.seeds, args.blend_depth)
            result = executor.build(load_project(path), options, make_reporter("plain", -1))
            assert result.ok, [(e.id, e.error) for e in result.steps if e.error][:3]
            if args.cache_entries:
                add_cache_entries(root, args.cache_entries)
        figures["steps"] = len(lockfile_steps(path))
        figures["output_files"] = sum(1 for _ in (root / "build").rglob("*") if _.is_file())
        figures["cache_entries"] = len(list((root / ".dbl" / "cache").iterdir()))
        if args.profile:
            profile(args.profile, path, args)
            return 0
        (root / ".dbl" / "state").unlink()  # forget every hash: the next plan reads every file

        def plan():
            ws = executor.Workspace(load_project(path))
            _, planned = ws.plan()
            assert not any(p.stale for p in planned), [p.reasons for p in planned if p.stale][:3]

        counter = FileSystemCounter(root)
        figures["plan_first_s"] = round(timed(plan), 3)
        figures["plan_cached_s"] = round(timed(plan, repeat=5), 3)
        with counter:
            plan()
        figures["plan_cached_fs"] = counter.figures(root / "data")

        lock_path = path.with_suffix(".lock")
        lock_before, lock_mtime = lock_path.read_bytes(), lock_path.stat().st_mtime_ns
        outputs_before = files_state(root / "build")
        state_before = (root / ".dbl" / "state").stat().st_mtime_ns
        with counter:
            noop = executor.build(load_project(path), options, make_reporter("plain", -1))
        assert {e.status for e in noop.steps} == {"fresh"}, {e.status for e in noop.steps}
        figures["noop_build_fs"] = counter.figures(root / "data")
        figures["noop_build_rewrote_lockfile"] = (
            lock_path.read_bytes() != lock_before or lock_path.stat().st_mtime_ns != lock_mtime
        )
        figures["noop_build_touched_outputs"] = files_state(root / "build") != outputs_before
        figures["noop_build_rewrote_hash_cache"] = (
            root / ".dbl" / "state"
        ).stat().st_mtime_ns != state_before

        if args.commands:
            fresh = Path(tempfile.mkdtemp(dir=root))  # where `dbl init` starts a project
            commands = {
                "plan": ["plan", str(path)],
                "plan --json": ["plan", "--json", str(path)],
                "build (no-op)": ["build", "--no-progress", str(path)],
                "check": ["check", str(path)],
                "ls": ["ls", str(path)],
                "ls --json": ["ls", "--json", str(path)],
                "report": ["report", str(path), "-o", str(root / "report.html")],
                "gc --dry-run": ["gc", "--dry-run", str(path)],
                "init": ["init", str(fresh / "p")],
            }
            figures["commands"] = {}
            for name, argv in commands.items():
                repeat = 1 if name in ("check", "report", "init") else 3
                figures["commands"][name] = run_command(argv, root, repeat)
        elif not args.no_restore:
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            dbl = [sys.executable, "-m", "runner"]

            def command(*a):
                done = subprocess.run(dbl + list(a) + [str(path)], env=env, capture_output=True, text=True)
                assert done.returncode == 0, done.stderr

            figures["dbl_plan_command_s"] = round(timed(lambda: command("plan"), repeat=3), 3)
            figures["dbl_build_noop_command_s"] = round(
                timed(lambda: command("build", "--no-progress"), repeat=3), 3
            )

        if not args.no_restore:
            from runner import lockfile

            lock = lockfile.read(lock_path)
            lockfile.write(lock_path, lock)
            first = next(iter(lock))

            def write_after_a_step():
                lock[first] = {**lock[first], "duration_s": lock[first]["duration_s"] + 1}
                lockfile.write(lock_path, lock)

            figures["lockfile_bytes"] = lock_path.stat().st_size
            figures["lockfile_write_s"] = round(timed(write_after_a_step, repeat=5), 4)
            lock_path.unlink()

            def restore_all():
                result = executor.build(load_project(path), options, make_reporter("plain", -1))
                assert {e.status for e in result.steps} == {"cached"}, {e.status for e in result.steps}

            figures["restore_every_step_s"] = round(timed(restore_all), 3)

            def restore_cpu(mode: str) -> float:
                """CPU seconds (every thread: rich's refresh too) of restoring every step, drawn on a 120 x
                50 in-memory terminal; the least of three."""
                from rich.console import Console

                lock_path.unlink()
                console = Console(file=io.StringIO(), force_terminal=True, width=120, height=50)
                start = time.process_time()
                executor.build(load_project(path), options, make_reporter(mode, 0, console=console))
                return time.process_time() - start

            figures["restore_cpu_plain_s"] = round(min(restore_cpu("plain") for _ in range(3)), 3)
            figures["restore_cpu_live_table_s"] = round(min(restore_cpu("live") for _ in range(3)), 3)
        figures["lockfile_bytes"] = lock_path.stat().st_size
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        show(figures, args)
    return 0


def show(figures: dict, args) -> None:
    print(
        f"project: {args.subjects} subjects x {args.images} images, renders of {args.prompts} prompts x "
        f"{args.seeds} seeds, {figures['steps']} steps, {figures['output_files']} output files, "
        f"{figures['cache_entries']} cache entries, lockfile {figures['lockfile_bytes']} bytes; nothing changed"
    )
    for key in ("plan_first_s", "plan_cached_s", "dbl_plan_command_s", "dbl_build_noop_command_s"):
        if key in figures:
            print(f"  {key:<26} {figures[key]:8.3f} s")
    for key in ("plan_cached_fs", "noop_build_fs"):
        fs = figures[key]
        print(
            f"  {key:<26} {fs['files_opened']} files opened ({fs['opened_twice']} more than once), "
            f"{fs['images_read']} images read, {fs['stats']} stats"
        )
    for key in ("noop_build_rewrote_lockfile", "noop_build_touched_outputs", "noop_build_rewrote_hash_cache"):
        print(f"  {key:<26} {figures[key]}")
    for name, row in figures.get("commands", {}).items():
        torch = ", imports torch" if row["torch"] else ""
        print(
            f"  dbl {name:<22} {row['s']:8.3f} s  {row['cpu_s']:8.3f} s CPU  {row['rss_mb']:5d} MB peak{torch}"
        )
    if "lockfile_write_s" in figures:
        print(f"  {'lockfile_write_s':<26} {figures['lockfile_write_s']:8.4f} s")
        print(f"  {'restore_every_step_s':<26} {figures['restore_every_step_s']:8.3f} s")
        for key in ("restore_cpu_plain_s", "restore_cpu_live_table_s"):
            print(f"  {key:<26} {figures[key]:8.3f} s CPU")


if __name__ == "__main__":
    raise SystemExit(main())
