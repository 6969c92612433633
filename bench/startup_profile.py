"""Where the time before a train step's first optimizer step goes: one phase a line.

    python bench/startup_profile.py                       # tiny-sd on the CPU, the DreamBench dog photos
    python bench/startup_profile.py --device cuda --model sd15-random --resolution 512 --mixed-precision fp16

Runs in a fresh process: the library imports, planning (the fingerprints: hashing the images and the base
model), then the train step itself, each of its phases timed by wrapping the function that does it (model
load, reading the images, LoRA, prompts, latents, optimizer, the first step). The phases are timed where they
are called, so nested work is counted once, in the phase that calls it. `--json PATH` writes them too.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES: dict[str, float] = {}


def timed(name: str, fn):
    """`fn`, adding its time to PHASES[name] (the first call only when name ends with ' (first)')."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if name.endswith("(first)") and name in PHASES:
            return fn(*args, **kwargs)
        clock = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            PHASES[name] = PHASES.get(name, 0.0) + time.perf_counter() - clock

    return wrapper


def write_project(folder: Path, photos: Path, class_images: int, resolution: int, model: str, args) -> Path:
    sys.path.insert(0, str(ROOT / "bench"))
    from train_bench import prepare_data

    prepare_data(folder / "data", class_images, photos)
    path = folder / "p.toml"
    path.write_text(
        f'[project]\nbase_model = "{model}"\ndevice = "{args.device}"\n'
        f'mixed_precision = "{args.mixed_precision}"\n'
        f"[train]\nresolution = {resolution}\nsteps = 1\ncheckpoint_every = 0\n"
        f'[priors.dog]\nclass_prompt = "a photo of dog"\nimages = "data/class"\nnum_images = {class_images}\n'
        '[subjects.dog]\nimages = "data/instance"\ninstance_prompt = "a photo of sks dog"\nprior = "dog"\n'
    )
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-sd", help="a base_model value, or sd15-random")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--class-images", type=int, default=20)
    parser.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "dreambench" / "dog")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    clock = time.perf_counter()
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    PHASES["imports (torch, diffusers, transformers, peft)"] = time.perf_counter() - clock

    from runner import executor
    from runner.models import ModelCache
    from runner.project import load_project
    from runner.steps import StepContext
    from runner.steps import train as train_step
    from runner.training import loop, lora, speed

    first_step = {}

    def progress(done, total, **metrics):
        if done == 1 and "at" not in first_step:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            first_step["at"] = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="dbl-startup-") as tmp:
        model = "tiny-sd" if args.model == "sd15-random" else args.model
        path = write_project(Path(tmp), args.photos, args.class_images, args.resolution, model, args)
        begun = time.perf_counter()
        clock = time.perf_counter()
        project = load_project(path)
        ws = executor.Workspace(project)
        _, planned = ws.plan()
        PHASES["load the project file and plan (hash images and base model)"] = time.perf_counter() - clock
        assert any(p.id == "train:dog" for p in planned)

        from runner.models import loading

        loading.load_pipeline = timed("load the base model", loading.load_pipeline)  # as ModelCache calls it
        loop.read_images = timed("read the images (decode, resize)", loop.read_images)
        lora.add_lora = timed("add LoRA", lora.add_lora)
        speed.choose = timed("choose checkpointing, CUDA graphs, compiling", speed.choose)
        loop._encode_prompts = timed("encode the prompts", loop._encode_prompts)
        loop.LatentCache = timed("VAE-encode the images (latent cache)", loop.LatentCache)
        loop._optimizer = timed("optimizer and LR schedule", loop._optimizer)
        loop._forward_backward = timed("first forward and backward (first)", loop._forward_backward)
        loop._optimizer_step = timed("first optimizer step (first)", loop._optimizer_step)
        if args.model == "sd15-random":
            sys.path.insert(0, str(ROOT / "bench"))
            from train_bench import FixedModels

            from runner.models import BaseModel, resolve_dtype, sd15_random_pipeline

            clock = time.perf_counter()
            pipe = sd15_random_pipeline(args.device, resolve_dtype(args.mixed_precision, args.device))
            PHASES["load the base model"] = time.perf_counter() - clock
            cache = FixedModels(BaseModel("builtin", "sd15-random"), pipe, args.device, args.mixed_precision)
        else:
            from runner.models import BaseModel

            cache = ModelCache(BaseModel.of(project.settings, project.dir), args.device, args.mixed_precision)
        (Path(tmp) / "out").mkdir()
        ctx = StepContext(
            step_id="train:dog",
            kind="train",
            name="dog",
            spec=project.subjects["dog"],
            project=project,
            work=Path(tmp) / "work",
            out=Path(tmp) / "out",
            inputs={"prior:dog": Path(tmp) / "data" / "class"},
            models=cache,
            progress=progress,
        )
        step_begun = time.perf_counter()
        train_step.run(ctx)
        to_first = first_step["at"] - step_begun
    named = sum(v for k, v in PHASES.items() if not k.startswith(("imports", "load the project")))
    PHASES["the rest of the train step until its first step"] = to_first - named
    total = first_step["at"] - begun
    width = max(map(len, PHASES))
    for name, seconds in PHASES.items():
        print(f"{name:{width}}  {seconds:7.3f} s")
    print(f"{'train step start to first optimizer step':{width}}  {to_first:7.3f} s")
    print(f"{'project load + plan + train step to first step':{width}}  {total:7.3f} s")
    print(f"{'process start to first step (with imports)':{width}}  {first_step['at'] - START:7.3f} s")
    if args.json:
        args.json.write_text(json.dumps({"phases": PHASES, "to_first_step_s": to_first}, indent=2) + "\n")


if __name__ == "__main__":
    main()
