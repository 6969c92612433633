"""Steps at once: the wall time of `dbl build -j 1` against `dbl build -j N`, each from nothing.

    python bench/parallel_bench.py                  # tiny-sd, 4 subjects on the CPU: -j 1, then -j 2
    python bench/parallel_bench.py --gpu            # and SD 1.5 shapes on one GPU (also when CUDA is there)
    python bench/parallel_bench.py --gpu --skip-cpu --gpu-steps 200
    python bench/parallel_bench.py --ray            # the CPU comparison, and -j N on a local Ray instance

Every build is the `dbl build` command in a fresh project folder (Python start-up, model loading and every
step included); only the built-in model (or the SD 1.5-shaped one) is made beforehand, once. The figure
is the ratio of wall times, -j N / -j 1: 0.5 means twice as fast. Both builds run with
OMP_WAIT_POLICY=PASSIVE, which -j workers set for themselves: on a machine whose cores are busy with
anything else, OpenMP's default spinning slows a -j 1 build many times over, and the ratio would measure
that instead of running steps at once.

- CPU: tiny-sd, `--subjects` subjects (a train step and a render each): `-j 1`, then `-j 1 --executor
  process` (the steps in a worker process: what starting one and loading its models costs, once), then
  `-j --jobs`. On a machine of few cores, where one step keeps every core busy, -j cannot win: the
  steps share the same cores and each worker loads its own models. `--ray` adds `-j --jobs --executor
  ray`: a local Ray instance started by the build, whose workers are kept from step to step as -j keeps
  its processes.
- GPU: SD 1.5 shapes with random weights (saved once as a diffusers folder), 512 px, fp16; 4 and then
  8 subjects, each `-j 1` then `-j N --per-gpu N` (N = the subjects), every step sharing one GPU.
  Targets: 0.3 for 4 subjects, 0.2 for 8.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = """\
# python bench/parallel_bench.py
[project]
base_model = "tiny-sd"
device = "cpu"

[train]
resolution = 64
steps = {steps}
checkpoint_every = 1000

[lora]
rank = 4
alpha = 8
"""

SD15 = """\
# python bench/parallel_bench.py --gpu
[project]
base_model = "{model}"
device = "cuda"
mixed_precision = "fp16"

[train]
resolution = 512
steps = {steps}
checkpoint_every = 100000

[lora]
rank = 16
alpha = 27
"""

SUBJECT = """
[subjects.s{i}]
images = "images/s{i}"
instance_prompt = "a photo of sks{i} toy"

[renders.s{i}]
adapter = "s{i}"
prompts = ["sks{i} toy on a table"]
steps = {render_steps}
seeds = [0]
"""


def draw_images(folder: Path, seed: int, size: int, count: int = 3) -> None:
    """A few drawn pictures (a background and discs), different for every subject."""
    import numpy as np

    from bench.common import draw_discs

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        draw_discs(folder / f"{i}.png", rng, size, discs=5)


def make_project(folder: Path, head: str, subjects: int, size: int, render_steps: int) -> Path:
    folder.mkdir(parents=True)
    text = head
    for i in range(subjects):
        text += SUBJECT.format(i=i, render_steps=render_steps)
        draw_images(folder / "images" / f"s{i}", seed=i, size=size)
    (folder / "p.toml").write_text(text)
    return folder / "p.toml"


def timed_build(project: Path, *flags: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "runner", "build", str(project), "--no-progress", *flags],
        cwd=project.parent,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"dbl build {' '.join(flags)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds


def compare(tmp: Path, label: str, head: str, subjects: int, size: int, render_steps: int, *variants) -> list:
    """-j 1 against each variant's flags, each build in a fresh folder: their times and ratios."""
    rows = []
    one = timed_build(make_project(tmp / f"{label}-j1", head, subjects, size, render_steps), "-j", "1")
    print(f"{label:34} {'-j 1':32} {one:7.1f}s", flush=True)
    for n, flags in enumerate(variants):
        seconds = timed_build(make_project(tmp / f"{label}-{n}", head, subjects, size, render_steps), *flags)
        row = {"project": label, "flags": " ".join(flags), "j1_s": one, "s": seconds, "ratio": seconds / one}
        print(f"{label:34} {row['flags']:32} {seconds:7.1f}s   ratio {row['ratio']:.2f}", flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subjects", type=int, default=4, help="subjects of the CPU project (default 4)")
    parser.add_argument("--jobs", type=int, default=2, help="-j of the CPU comparison (default 2)")
    parser.add_argument(
        "--steps", type=int, default=30, help="train steps per subject on the CPU (default 30)"
    )
    parser.add_argument("--gpu", action="store_true", help="also the SD 1.5-shaped projects on one GPU")
    parser.add_argument("--gpu-steps", type=int, default=100, help="train steps per subject on the GPU")
    parser.add_argument("--skip-cpu", action="store_true", help="only the GPU projects")
    parser.add_argument("--ray", action="store_true", help="the CPU comparison on a local Ray instance too")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    from runner.models import ensure_builtin

    rows = []
    with tempfile.TemporaryDirectory(prefix="dbl-parallel-bench-") as tmp:
        tmp = Path(tmp)
        if not args.skip_cpu:
            ensure_builtin("tiny-sd")  # made once, outside the timed builds
            head = TINY.format(steps=args.steps)
            label = f"tiny-sd, {args.subjects} subjects, CPU"
            # One step at a time in a worker process each: what a worker costs (start-up, loading models).
            workers = ("-j", "1", "--executor", "process")
            # Untimed: the first build of a session reads the libraries from disk and timed -j 1 slower.
            timed_build(make_project(tmp / "warm-up", head, 1, 64, 10), "-j", "1")
            variants = [workers, ("-j", str(args.jobs))]
            if args.ray:
                variants.append(("-j", str(args.jobs), "--executor", "ray"))
            rows += compare(tmp, label, head, args.subjects, 64, 10, *variants)
        if args.gpu or _cuda():
            from bench.common import saved_sd15_random

            model = saved_sd15_random(tmp / "sd15-random", "cuda")
            head = SD15.format(model=model.as_posix(), steps=args.gpu_steps)
            for n in (4, 8):
                label = f"SD 1.5 shapes, {n} subjects, 1 GPU"
                rows += compare(tmp, label, head, n, 512, 20, ("-j", str(n), "--per-gpu", str(n)))
    report = {"cpu_count": os.cpu_count(), "results": rows}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())
