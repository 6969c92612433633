"""How long a rebuild takes after one prompt of a render batch is edited, on tiny-sd.

    python bench/edit_bench.py [--prompts 8] [--seeds 4] [--steps 20] [--batch-size 1] [--edit adapters] [--json]

A project of one render (the base model, `--prompts` x `--seeds` images) is built, one prompt is edited,
and the build that follows is timed: dbl keeps the images of the batches it drew before and draws the
edited prompt's. Against it, the same edit built with `--force` on the render, which draws the whole batch
again (what a render did before it kept images). Both run in this process after a first build, with the
base model loaded, as in `dbl watch`. The two builds' outputs are compared byte for byte.

`--edit adapters`: the render is a grid of `adapters = ["dog", "none"]` (two subjects trained for one step
at 64 px, dog and cat), and the edit adds a column: `["dog", "cat", "none"]`. dbl keeps the columns of dog
and of the base model and draws cat's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROJECT = """[project]
base_model = "tiny-sd"

[renders.batch]
adapter = "none"
prompts = {prompts}
seeds = {seeds}
steps = {steps}
batch_size = {batch_size}
"""


# --edit adapters: a grid of some of two subjects (tests.real_builds.subjects_trained_in_a_step)
GRID = """
[renders.batch]
adapters = {adapters}
prompts = {prompts}
seeds = {seeds}
steps = {steps}
batch_size = {batch_size}
"""


def write(path: Path, prompts: list[str], args, adapters: list[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = dict(
        prompts=json.dumps(prompts),
        seeds=json.dumps(list(range(args.seeds))),
        steps=args.steps,
        batch_size=args.batch_size,
    )
    if adapters is None:
        path.write_text(PROJECT.format(**settings))
        return path
    from tests.real_builds import subjects_trained_in_a_step

    subjects = subjects_trained_in_a_step(path.parent, "dog", "cat")
    path.write_text(subjects + GRID.format(adapters=json.dumps(adapters), **settings))
    return path


def build(path: Path, force: bool = False) -> tuple[float, list[str]]:
    """Seconds to build the project at `path`, and what its render logged of the images kept and drawn."""
    from runner import executor
    from runner.project import load_project
    from runner.ui.plain import PlainReporter

    lines: list[str] = []  # "12:00:01 render:batch  kept 28 images ..."
    project = load_project(path)
    clock = time.perf_counter()
    result = executor.build(
        project,
        executor.BuildOptions(force=("render:batch",) if force else None),
        PlainReporter(verbosity=1, write=lines.append),
    )
    seconds = time.perf_counter() - clock
    if not result.ok:
        raise SystemExit(f"the build of {path} failed: {[s.error for s in result.steps if s.error]}")
    said = [line.split(None, 2)[-1] for line in lines if " render:batch " in line]
    return seconds, [message for message in said if message.startswith(("kept ", "rendered "))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--edit", choices=("prompt", "adapters"), default="prompt", help="what is edited (default: a prompt)"
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON")
    args = parser.parse_args()

    from runner.models.loading import quiet_libraries
    from tests.folders import folder_bytes

    quiet_libraries()
    prompts = [f"a photo of thing number {i}" for i in range(args.prompts)]
    edited = list(prompts)
    if args.edit == "prompt":
        edited[args.prompts // 2] = "a photo of something else"
        columns, more_columns = None, None
    else:
        columns, more_columns = ["dog", "none"], ["dog", "cat", "none"]
    figures = {"edit": args.edit, "steps": args.steps, "batch_size": args.batch_size}
    figures["images"] = args.prompts * args.seeds * len(more_columns or [None])
    with tempfile.TemporaryDirectory() as tmp:
        folders = {way: Path(tmp) / way for way in ("kept", "drawn")}
        for folder in folders.values():
            build(write(folder / "p.toml", prompts, args, columns))  # the first one also loads the model
        for way, folder in folders.items():
            seconds, said = build(write(folder / "p.toml", edited, args, more_columns), force=way == "drawn")
            figures[f"{way}_s"] = seconds
            figures[f"{way}_said"] = said
        same = folder_bytes(folders["kept"] / "build" / "p") == folder_bytes(folders["drawn"] / "build" / "p")
    figures["same_bytes"] = same
    figures["speedup"] = figures["drawn_s"] / figures["kept_s"]
    if not args.json:
        what = (
            f"one prompt of {args.prompts} edited"
            if args.edit == "prompt"
            else f"a column added to a grid of {args.prompts} prompts (dog, none -> dog, cat, none)"
        )
        kept = "images of unchanged batches kept" if args.edit == "prompt" else "columns rendered before kept"
        print(
            f"{what}, {args.seeds} seeds, {args.steps} steps, tiny-sd on this machine:\n"
            f"  {kept:<33} {figures['kept_s']:6.2f} s  ({'; '.join(figures['kept_said'])})\n"
            f"  the whole batch drawn again       {figures['drawn_s']:6.2f} s  ({'; '.join(figures['drawn_said'])})\n"
            f"  {figures['speedup']:.1f}x; the same bytes: {same}"
        )
    print(json.dumps(figures, indent=None if args.json else 2))
    if not same:
        raise SystemExit("the outputs differ")


if __name__ == "__main__":
    main()
