"""Class-image generation, images per second: dbl's prior step against the recipe's loop.

    python bench/prior_bench.py [--model tiny-sd|sd15-random] [--images 8] [--steps 20] [--device cpu]

The recipe's loop (PEFT's DreamBooth script) loads the pipeline, then calls it on batches of
`sample_batch_size` prompts and saves each image as a JPEG named by a hash of its bytes. dbl's prior
step does the same generation with one seeded generator per image (so the set does not depend on the
batch size) and saves PNGs with their parameters, on the build's shared pipeline. Both run the same
model, prompt, steps, batch size and dtype here; generation time is measured apart from loading.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class SharedModels:
    """A stand-in for the build's ModelCache holding one already-loaded pipeline."""

    def __init__(self, pipe, base, device, dtype):
        from runner import families

        self._pipe, self.base, self.device, self.dtype = pipe, base, device, dtype
        self.family = families.of(pipe)

    def pipeline(self, dtype=None):
        return self._pipe


def load(model: str, device: str, dtype):
    from runner.models import BaseModel, load_pipeline, sd15_random_pipeline

    if model == "sd15-random":
        return sd15_random_pipeline(device=device, dtype=dtype), BaseModel("builtin", "sd15-random")
    base = BaseModel.parse(model, ROOT)
    return load_pipeline(base, dtype=dtype, device=device), base


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def recipe_loop(pipe, prompt: str, n: int, batch: int, steps: int, out: Path, device: str) -> float:
    start = time.perf_counter()
    for first in range(0, n, batch):
        images = pipe([prompt] * min(batch, n - first), num_inference_steps=steps).images
        for image in images:
            name = hashlib.sha1(image.tobytes()).hexdigest()
            image.save(out / f"{first}-{name}.jpg")
    sync(device)
    return time.perf_counter() - start


def dbl_prior(
    models, project_seed: int, prompt: str, n: int, batch: int, steps: int, work: Path, device: str
) -> float:
    from types import SimpleNamespace

    from runner.project.schema import Prior
    from runner.steps import StepContext, prior

    spec = Prior(name="bench", class_prompt=prompt, num_images=n, steps=steps, batch_size=batch)
    out = work / "out"
    out.mkdir(parents=True)
    ctx = StepContext(
        step_id="prior:bench",
        kind="prior",
        name="bench",
        spec=spec,
        project=SimpleNamespace(settings=SimpleNamespace(seed=project_seed)),
        work=work,
        out=out,
        inputs={},
        models=models,
    )
    start = time.perf_counter()
    prior.run(ctx)
    sync(device)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-sd", choices=["tiny-sd", "sd15-random"])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print only the JSON")
    args = parser.parse_args()

    import torch

    from runner.models import resolve_dtype

    dtype = resolve_dtype(args.mixed_precision, args.device)
    start = time.perf_counter()
    pipe, base = load(args.model, args.device, dtype)
    load_s = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    models = SharedModels(pipe, base, args.device, dtype)
    prompt = "a photo of dog"
    recipe, dbl = [], []
    with tempfile.TemporaryDirectory() as tmp:
        with torch.inference_mode():
            recipe_loop(pipe, prompt, args.batch_size, args.batch_size, 2, Path(tmp), args.device)  # warm-up
        for r in range(args.repeat):
            folder = Path(tmp) / f"recipe{r}"
            folder.mkdir()
            with torch.inference_mode():
                recipe.append(
                    recipe_loop(pipe, prompt, args.images, args.batch_size, args.steps, folder, args.device)
                )
            dbl.append(
                dbl_prior(
                    models,
                    0,
                    prompt,
                    args.images,
                    args.batch_size,
                    args.steps,
                    Path(tmp) / f"dbl{r}",
                    args.device,
                )
            )
    figures = {
        "model": args.model,
        "device": args.device,
        "images": args.images,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "pipeline_load_s": round(load_s, 2),
        "recipe_images_per_s": round(args.images / min(recipe), 3),
        "dbl_images_per_s": round(args.images / min(dbl), 3),
    }
    figures["speedup"] = round(figures["dbl_images_per_s"] / figures["recipe_images_per_s"], 2)
    if args.json:
        print(json.dumps(figures))
    else:
        print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
