"""CPU time of `dbl report` on a project of many subjects with long loss logs, built by fake steps (no
torch, no model): what the page costs per subject, and where (cProfile).

    python bench/report_bench.py                                  # 40 subjects of 1,000 steps
    python bench/report_bench.py --subjects 4 --steps 100000      # long runs
    python bench/report_bench.py --profile 25                     # and the 25 costliest functions

The project is built once in --workdir (default a temp folder); each subject's dbl.json then gets a loss
log of --steps steps (instance and prior loss, with a snapshot every tenth of the run).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make(workdir: Path, subjects: int, steps: int):
    """A project of `subjects` subjects built by fake steps, each with a `steps`-step loss log."""
    from runner import executor
    from runner.project import load_project
    from tests.conftest import FakeBackend, FakeSteps, Recorder, use_backend, write_image

    write_image(workdir / "data" / "s" / "00.png")
    text = '[project]\nbase_model = "tiny-sd"\n\n[priors.dog]\nclass_prompt = "a dog"\nnum_images = 1\n'
    for i in range(subjects):
        text += f'\n[subjects.s{i}]\nimages = "data/s"\ninstance_prompt = "a photo of sks{i} dog"\n'
        text += 'prior = "dog"\n' if i % 2 == 0 else ""
    path = workdir / "many.toml"
    path.write_text(text)
    undo = use_backend(lambda project: FakeBackend(FakeSteps()))
    try:
        executor.build(load_project(path), executor.BuildOptions(), Recorder())
    finally:
        undo()
    from runner import lockfile

    lock = lockfile.read(lockfile.lock_path(path))
    rng = random.Random(0)
    for i in range(subjects):
        loss = [0.2 + 0.1 * math.exp(-s / steps * 3) + rng.gauss(0, 0.03) for s in range(steps)]
        log = {"instance_loss": loss, "prior_loss": [v * 0.8 for v in loss] if i % 2 == 0 else None}
        info = {"kind": "train", "steps": steps, "instance_prompt": f"a photo of sks{i} dog", "log": log}
        rel = next(r for r in lock[f"train:s{i}"]["outputs"] if r.endswith("dbl.json"))
        (workdir / rel).write_text(json.dumps(info))
    return load_project(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--steps", type=int, default=1000, help="loss log length of each subject")
    parser.add_argument("--workdir", type=Path, help="where to build the project (default: a temp folder)")
    parser.add_argument("--profile", type=int, default=0, help="print the N costliest functions")
    args = parser.parse_args()
    from runner import report

    with tempfile.TemporaryDirectory(prefix="dbl-report-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        project = make(workdir, args.subjects, args.steps)
        report.render(project)  # warm: matplotlib's imports and font cache
        profiler = cProfile.Profile() if args.profile else None
        cpu = time.process_time()
        if profiler:
            profiler.enable()
        page = report.render(project)
        if profiler:
            profiler.disable()
        cpu = time.process_time() - cpu
    print(
        f"{args.subjects} subjects x {args.steps} steps: {cpu:.2f} s CPU, "
        f"{1000 * cpu / args.subjects:.1f} ms per subject, page {len(page) / 1e6:.2f} MB"
    )
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
