"""Every benchmark side by side with its baseline, in one run: JSON and a table.

    python bench/run.py                                       # tiny-sd on the CPU (minutes)
    python bench/run.py --model sd15-random --resolution 256  # SD 1.5 shapes, random weights, CPU
    python bench/run.py --model sd15-random --resolution 512 --device cuda --mixed-precision fp16

Runs bench/train_bench.py (train steps/s, peak memory, time to the first step), bench/prior_bench.py
(class images/s), bench/render_bench.py (render images/s, tiny-sd) and bench/plan_bench.py (no-op
`dbl plan` / `dbl build` on a 50-subject project), each in its own process, and prints one table.
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

HERE = Path(__file__).resolve().parent


def run(args: list[str]) -> str:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=os.environ)
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    print(f"  {Path(args[0]).name}: {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return done.stdout


def last_json(text: str) -> dict:
    start = text.index("{")
    return json.loads(text[start : text.rindex("}") + 1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-sd", choices=["tiny-sd", "sd15-random"])
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument(
        "--train-steps", type=int, default=None, help="timed train steps (default: the train bench's)"
    )
    parser.add_argument("--photos", type=Path, help="instance photos for the train bench")
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "prior", "render", "plan"])
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    args = parser.parse_args()

    common = ["--device", args.device, "--mixed-precision", args.mixed_precision]
    report: dict = {"model": args.model, "device": args.device, "mixed_precision": args.mixed_precision}
    rows = []
    if "train" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            extra = ["--model", args.model, *common, "--json", f"{tmp}/train.json"]
            extra += ["--resolution", str(args.resolution)] if args.resolution else []
            extra += ["--steps", str(args.train_steps)] if args.train_steps else []
            extra += ["--photos", str(args.photos)] if args.photos else []
            run([str(HERE / "train_bench.py"), *extra])
            train = json.loads(Path(f"{tmp}/train.json").read_text())
        report["train"] = train
        base, dbl = train["results"]
        mem = "cuda_peak_mb" if "cuda_peak_mb" in dbl else "peak_rss_mb"
        res = train["resolution"]
        rows.append((f"train steps/s ({res} px)", dbl["steps_per_s"], base["steps_per_s"], "higher"))
        rows.append((f"train peak memory MB ({mem})", dbl[mem], base[mem], "lower"))
        rows.append(("time to first train step s", dbl["setup_s"], base["setup_s"], "lower"))
    if "prior" not in args.skip:
        prior = last_json(run([str(HERE / "prior_bench.py"), "--model", args.model, *common, "--json"]))
        report["prior"] = prior
        rows.append(("class images/s", prior["dbl_images_per_s"], prior["recipe_images_per_s"], "higher"))
    if "render" not in args.skip:
        render = last_json(run([str(HERE / "render_bench.py"), "--device", args.device, "--json"]))
        report["render"] = render
        results = render["results"]
        rows.append(
            (
                "render images/s (tiny-sd, shared pipeline)",
                results["dbl render, batch 1, shared pipeline"]["images_per_s"],
                results["notebook (load per image)"]["images_per_s"],
                "higher",
            )
        )
    if "plan" not in args.skip:
        plan = last_json(run([str(HERE / "plan_bench.py"), "--json"]))
        report["plan"] = plan
        rows.append(("no-op dbl plan s (50 subjects x 20 images)", plan["dbl_plan_command_s"], None, "lower"))
        rows.append(
            ("no-op dbl build s (50 subjects x 20 images)", plan["dbl_build_noop_command_s"], None, "lower")
        )

    print(json.dumps(report, indent=2))
    print(f"\n{args.model}, {args.device}, mixed precision {args.mixed_precision}")
    print(f"{'figure':48} {'dbl':>10} {'baseline':>10} {'dbl/base':>9}")
    for name, mine, base, better in rows:
        ratio = f"{mine / base:8.2f}x" if base else "        -"
        base_text = f"{base:10.3f}" if base is not None else "         -"
        print(f"{name:48} {mine:10.3f} {base_text} {ratio}  ({better} is better)")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
