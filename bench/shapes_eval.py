"""What DreamBooth learns, measured on tiny-shapes: the figures of the README's "See it learn".

    python bench/shapes_eval.py                 # all three parts, on the CPU (about 35 minutes)
    python bench/shapes_eval.py --part base     # one part: base, subject or recipe

1. base: tiny-shapes renders every held-out (shape, colour, background) combination, which its
   training never showed, and every training combination, with --seeds seeds each; the share of
   images that show what was asked (runner.fidelity's prompt fidelity), per split.
2. subject: the ring subject of projects/demo.toml, trained by dbl with and without prior
   preservation, for --runs training seeds each; renders of "a yellow sks shape on a <colour>
   background" and of the class prompt "a yellow shape on a <colour> background" (class images worded
   as the captions: "a yellow shape on a red background", ...), by the base model and
   by each adapter, scored by an eval step: subject fidelity (base vs trained) and class drift (prior vs
   no prior).
3. recipe: the same subject, steps and settings trained by a loop written as the classic PEFT recipe
   does (bench/recipe.py: pixels encoded every step, prior half concatenated, one backward), rendered
   and scored by the same code: its subject fidelity against dbl's, over --runs training seeds from
   --first-run, and the difference of the means against its standard error. With --dbl-draws the
   loop also trains on dbl's random draws, which gives dbl's adapter (tests/test_recipe_match.py).

Each part prints a table and a JSON line (--json FILE appends them to FILE).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runner import fidelity, shapes  # noqa: E402

BACKGROUNDS = ("blue", "black", "green", "red")
SUBJECT = ROOT / "projects" / "shapes" / "ring"

SETTINGS = {  # the ring's settings in projects/demo.toml
    "steps": 800,
    "learning_rate": 1e-3,
    "rank": 16,
    "alpha": 16,
    "target_modules": "all-linear",  # on the UNet; the text encoder's query and value
    "text_encoder_rank": 16,
    "class_images": 20,
    "guidance_scale": 3.0,
    "render_steps": 20,
}
INSTANCE_PROMPT, CLASS_PROMPT = "a yellow sks shape", "a yellow shape"  # each photo has its caption
# The class images' prompts, in turn: worded as the photos' captions (see projects/demo.toml).
CLASS_PROMPTS = [f"{CLASS_PROMPT} on a {bg} background" for bg in ("red", "blue", "black", "green", "white")]
PROMPTS = [f"{INSTANCE_PROMPT} on a {bg} background" for bg in BACKGROUNDS] + [
    f"{CLASS_PROMPT} on a {bg} background" for bg in BACKGROUNDS
]


def project_text(seed: int, prior: bool, images: Path, s: dict) -> str:
    prompts = PROMPTS
    prior_lines = 'prior = "shape"\n' if prior else ""
    return f"""
[project]
base_model = "tiny-shapes"
seed = {seed}

[train]
resolution = 64
steps = {s["steps"]}
learning_rate = {s["learning_rate"]}

[lora]
rank = {s["rank"]}
alpha = {s["alpha"]}
target_modules = "{s["target_modules"]}"
text_encoder_rank = {s["text_encoder_rank"]}
text_encoder_alpha = {s["text_encoder_rank"]}

[priors.shape]
class_prompt = {json.dumps(CLASS_PROMPTS)}
num_images = {s["class_images"]}
steps = {s["render_steps"]}
guidance_scale = {s["guidance_scale"]}

[subjects.ring]
images = "{images.as_posix()}"
caption_extension = ".txt"
instance_prompt = "{INSTANCE_PROMPT}"
{prior_lines}
[renders.ring]
adapters = ["none", "ring"]
prompts = {json.dumps(prompts)}
steps = {s["render_steps"]}
guidance_scale = {s["guidance_scale"]}
seeds = [0, 1, 2]

[evals.ring]
render = "ring"
subject = "ring"
"""


def dbl(*args: str, cwd: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "runner", *args], cwd=cwd, check=True, capture_output=True, text=True
    )


# --- 1. the base model -----------------------------------------------------------------------------------


def part_base(args) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    from runner.models import ensure_builtin

    pipe = StableDiffusionPipeline.from_pretrained(str(ensure_builtin("tiny-shapes")))
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for split, heldout in (("held out", True), ("trained", False)):
        combos = shapes.combinations(heldout=heldout)
        if split == "trained":
            combos = random.Random(0).sample(combos, len(shapes.combinations(heldout=True)))
        prompts = [f"a large {c} {s} on a {b} background" for s, c, b in combos]
        items, rows = [], []
        for seed in range(args.seeds):
            generators = [torch.Generator().manual_seed(seed) for _ in prompts]
            images = pipe(
                prompts,
                num_inference_steps=SETTINGS["render_steps"],
                guidance_scale=SETTINGS["guidance_scale"],
                generator=generators,
            ).images
            items += list(zip(prompts, images, strict=True))
            rows.append(images)
        if split == "held out" and args.grid:
            write_grid(args.grid, rows[:3])
        result = fidelity.score(items)
        parts = {
            key: sum(r["measured"][key] == r["expected"][key] for r in result["images"]) / len(items)
            for key in ("shape", "colour", "background")
        }
        out[split] = {
            "combinations": len(combos),
            "images": len(items),
            "all": result["scores"]["prompt_fidelity"],
            **parts,
        }
    print(
        f"\ntiny-shapes, {args.seeds} seeds per combination, {SETTINGS['render_steps']} steps, guidance "
        f"{SETTINGS['guidance_scale']}: share of images showing what was asked"
    )
    print(f"{'combinations':<22}{'images':>8}{'all three':>11}{'shape':>8}{'colour':>8}{'background':>12}")
    for split, r in out.items():
        print(
            f"{split + ' (' + str(r['combinations']) + ')':<22}{r['images']:>8}{r['all']:>11.2f}"
            f"{r['shape']:>8.2f}{r['colour']:>8.2f}{r['background']:>12.2f}"
        )
    return {"part": "base", **out}


def write_grid(path: Path, rows: list) -> None:
    """Images in rows (a row per seed), each shown at twice its size, nearest-neighbour."""
    from PIL import Image

    side = rows[0][0].width * 2
    grid = Image.new("RGB", (side * len(rows[0]), side * len(rows)))
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image.resize((side, side), Image.Resampling.NEAREST), (x * side, y * side))
    grid.save(path, optimize=True)
    print(f"wrote {path}")


# --- 2. the subject, with and without prior preservation -----------------------------------------------


def part_subject(args) -> dict:
    from runner import lockfile

    rows = {"prior": [], "no prior": []}
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for variant in rows:
            for run in range(args.first_run, args.first_run + args.runs):
                folder = Path(tmp) / f"{variant.replace(' ', '-')}-{run}"
                folder.mkdir()
                path = folder / "p.toml"
                path.write_text(project_text(run, variant == "prior", SUBJECT, SETTINGS))
                started = time.perf_counter()
                dbl("build", str(path), "--no-progress", cwd=folder)
                metrics = lockfile.read(path.with_suffix(".lock"))["eval:ring"]["metrics"]
                rows[variant].append(metrics["ring"])
                base = metrics["none"]
                print(
                    f"{variant} seed {run}: {metrics['ring']} ({time.perf_counter() - started:.0f}s)",
                    flush=True,
                )
    print(
        f"\nring subject, {SETTINGS['steps']} steps, {args.runs} training seeds each; renders: 4 backgrounds x 3 seeds"
    )
    print(f"{'adapter':<22}{'subject fidelity':>18}{'class drift':>13}{'prompt fidelity':>17}")
    print(
        f"{'none (base model)':<22}{base['subject_fidelity']:>18.2f}{base['class_drift']:>13.2f}{base['prompt_fidelity']:>17.2f}"
    )
    summary = {"part": "subject", "base": base}
    for variant, runs in rows.items():
        means = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
        spread = {k: (min(r[k] for r in runs), max(r[k] for r in runs)) for k in runs[0]}
        summary[variant] = {"mean": means, "range": spread, "runs": runs}
        print(
            f"{'ring, ' + variant:<22}"
            + "".join(
                f"{means[k]:>{w}.2f}"
                for k, w in (("subject_fidelity", 18), ("class_drift", 13), ("prompt_fidelity", 17))
            )
            + f"   (ranges {', '.join(f'{k} {lo:.2f}-{hi:.2f}' for k, (lo, hi) in spread.items())})"
        )
    return summary


# --- 3. the classic recipe's loop ------------------------------------------------------------------------


def recipe_adapter_scores(seed: int, class_images: Path, s: dict, dbl_draws: bool = False) -> dict:
    """Train the ring subject the classic recipe's way (bench/recipe.py, on its own randomness, or on
    dbl's with `dbl_draws`), with prior preservation on `class_images`, then render and score it as the
    eval step does."""
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from bench import recipe
    from runner.imagefiles import list_images
    from runner.models import ensure_builtin

    pipe = StableDiffusionPipeline.from_pretrained(str(ensure_builtin("tiny-shapes")))
    pipe.set_progress_bar_config(disable=True)

    def captioned(folder):  # every photo and class image has its caption beside it
        return [(path, path.with_suffix(".txt").read_text().strip()) for path in list_images(folder)]

    settings = recipe.Settings(
        steps=s["steps"],
        learning_rate=s["learning_rate"],
        rank=s["rank"],
        alpha=s["alpha"],
        text_encoder_rank=s["text_encoder_rank"],
        text_encoder_alpha=s["text_encoder_rank"],
    )
    draws = recipe.DblDraws(seed) if dbl_draws else recipe.RecipeDraws(seed)
    recipe.train(pipe, captioned(SUBJECT), captioned(class_images), settings, draws)
    items = []
    with torch.no_grad():
        for prompt in PROMPTS:
            for render_seed in (0, 1, 2):
                image = pipe(
                    prompt,
                    num_inference_steps=s["render_steps"],
                    guidance_scale=s["guidance_scale"],
                    generator=torch.Generator().manual_seed(render_seed),
                ).images[0]
                items.append((prompt, image))
    photos = [Image.open(p).convert("RGB") for p in list_images(SUBJECT)]
    return fidelity.score(items, fidelity.subject_traits(photos))["scores"]


def part_recipe(args) -> dict:
    """dbl and the recipe's loop, one training seed after another; with --dbl-draws also the loop on
    dbl's randomness (which trains dbl's adapter to rounding: tests/test_recipe_match.py)."""
    from runner import lockfile

    arms = {"dbl": [], "recipe loop": []} | ({"loop, dbl's draws": []} if args.dbl_draws else {})
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.first_run, args.first_run + args.runs):
            folder = Path(tmp) / f"dbl-{run}"
            folder.mkdir()
            path = folder / "p.toml"
            path.write_text(project_text(run, True, SUBJECT, SETTINGS))
            dbl("build", str(path), "--no-progress", cwd=folder)
            arms["dbl"].append(lockfile.read(path.with_suffix(".lock"))["eval:ring"]["metrics"]["ring"])
            classes = folder / "build" / "p" / "priors" / "shape"
            arms["recipe loop"].append(recipe_adapter_scores(run, classes, SETTINGS))
            if args.dbl_draws:
                arms["loop, dbl's draws"].append(recipe_adapter_scores(run, classes, SETTINGS, True))
            print(
                f"seed {run}: " + ", ".join(f"{name} {runs[-1]}" for name, runs in arms.items()), flush=True
            )
            shutil.rmtree(folder)
    print(
        f"\nring subject with prior preservation, {SETTINGS['steps']} steps, training seeds "
        f"{args.first_run}-{args.first_run + args.runs - 1}: dbl against the recipe's loop"
    )
    summary = {"part": "recipe", "first_run": args.first_run}
    for name, runs in arms.items():
        values = [r["subject_fidelity"] for r in runs]
        summary[name] = {"subject_fidelity": values, "class_drift": [r["class_drift"] for r in runs]}
        print(
            f"{name:<18} subject fidelity mean {statistics.mean(values):.2f} (sd {_sd(values):.2f}, range "
            f"{min(values):.2f}-{max(values):.2f}); class drift mean "
            f"{statistics.mean(r['class_drift'] for r in runs):.2f}"
        )
    ours, theirs = summary["dbl"]["subject_fidelity"], summary["recipe loop"]["subject_fidelity"]
    if len(ours) > 1:
        difference = statistics.mean(ours) - statistics.mean(theirs)
        error = (_sd(ours) ** 2 / len(ours) + _sd(theirs) ** 2 / len(theirs)) ** 0.5
        summary["difference"] = {"mean": difference, "standard_error": error}
        print(
            f"dbl - recipe loop: {difference:+.2f}, standard error {error:.2f} "
            f"({'within' if abs(difference) <= 2 * error else 'outside'} two standard errors)"
        )
    return summary


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("base", "subject", "recipe"), action="append")
    parser.add_argument("--seeds", type=int, default=8, help="render seeds per combination (part base)")
    parser.add_argument(
        "--runs", type=int, default=3, help="training seeds per variant (parts subject, recipe)"
    )
    parser.add_argument(
        "--first-run", type=int, default=0, help="the first training seed (parts subject, recipe)"
    )
    parser.add_argument(
        "--dbl-draws",
        action="store_true",
        help="part recipe: also train the recipe's loop on dbl's random draws (the same adapter as dbl's)",
    )
    parser.add_argument("--json", type=Path, help="append each part's figures to this file")
    parser.add_argument(
        "--grid",
        type=Path,
        help="part base: write the held-out renders of the first three seeds here (a column per combination)",
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    for part in args.part or ["base", "subject", "recipe"]:
        result = {"base": part_base, "subject": part_subject, "recipe": part_recipe}[part](args)
        line = json.dumps(result, sort_keys=True)
        print(line)
        if args.json:
            with args.json.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
