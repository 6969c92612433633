"""Where the time before a train step's first optimizer step goes: one phase a line.

    python bench/startup_profile.py                       # tiny-sd on the CPU, the DreamBench dog photos
    python bench/startup_profile.py --device cuda --model sd15-random --resolution 512 --mixed-precision fp16
    python bench/startup_profile.py --build               # a whole `dbl build`, its prior generating

Runs in a fresh process: the library imports, planning (the fingerprints: hashing the images and the base
model), then the train step itself, each of its phases timed by wrapping the function that does it (model
load, reading the images, LoRA, prompts, latents, optimizer, the first step). A phase's time is its own: what
it calls that is another phase counts in that one. `--json PATH` writes them too.

`--build` times a whole `dbl build` of a fresh one-subject project from process start to the train step's
first optimizer step, as the command runs it: importing dbl, loading and planning the project, the checks
before any step (every image decoded once), the prior step generating `--class-images` class images
(`--prior-steps` denoising steps each; loading the base model, saving the images), hashing and committing
its outputs, then the train step's phases. `--model` is then a base_model value (or sd15-random, saved
once as a diffusers folder under /tmp); a folder's files are hashed as a first build hashes them.

`--compare-load N` loads the base model N times each way, alternated, after one load that warms the page
cache: read straight onto `--device` (diffusers' device_map, what a step does on CUDA) and read into host
memory then moved (what it did before, and still does for an indexed device). On the CPU the first is
diffusers' device_map "cpu": the same code path, nothing to gain.

`--graph-warm-ups N` sets the passes each CUDA graph's capture warms up with (dbl's default is 1, torch's 3),
to time what the others would cost.
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
_RUNNING: list[float] = []  # of each timed call under way, the time its nested timed calls took
STOPPED: list[float] = []  # when the first optimizer step ended: later calls are not counted


def timed(name: str, fn):
    """`fn`, adding its own time (less that of the timed calls it makes) to PHASES[name]; the first call
    only when name ends with ' (first)'."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if (name.endswith("(first)") and name in PHASES) or STOPPED:
            return fn(*args, **kwargs)
        clock = time.perf_counter()
        _RUNNING.append(0.0)
        try:
            return fn(*args, **kwargs)
        finally:
            spent = time.perf_counter() - clock
            nested = _RUNNING.pop()
            if _RUNNING:
                _RUNNING[-1] += spent
            if not STOPPED:
                PHASES[name] = PHASES.get(name, 0.0) + spent - nested

    return wrapper


# sd15-random's weights are made before the train step starts, which is handed them: not one of its phases.
MADE_BEFORE = "make sd15-random's weights (before the train step)"


def time_graph_capture(prefix: str) -> None:
    """Phases inside the CUDA graphs' capture (torch.cuda.make_graphed_callables): its warm-up and
    recorded passes' backward (autograd.grad), its waits for the device, the freeing of cached memory
    before each recording, and each graph's instantiation; the forward passes are what is left of it."""
    import torch

    from runner.training import graphs

    graphs._make_graphed = timed(
        prefix + "CUDA graphs: capture (forward passes, the rest)", graphs._make_graphed
    )
    torch.autograd.grad = timed(prefix + "CUDA graphs: backward passes (autograd.grad)", torch.autograd.grad)
    torch.cuda.synchronize = timed(prefix + "waits for the device (synchronize)", torch.cuda.synchronize)
    torch.cuda.empty_cache = timed(prefix + "CUDA graphs: free cached memory", torch.cuda.empty_cache)
    torch.cuda.CUDAGraph.capture_end = timed(
        prefix + "CUDA graphs: end the recording (instantiate)", torch.cuda.CUDAGraph.capture_end
    )


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


def build_project(folder: Path, photos: Path, model: str, args) -> Path:
    """A one-subject project whose prior generates its class images, for --build."""
    sys.path.insert(0, str(ROOT / "bench"))
    from train_bench import prepare_data

    prepare_data(folder / "data", 0, photos)
    path = folder / "p.toml"
    path.write_text(
        f'[project]\nbase_model = "{model}"\ndevice = "{args.device}"\n'
        f'mixed_precision = "{args.mixed_precision}"\n'
        f"[train]\nresolution = {args.resolution}\nsteps = 1\ncheckpoint_every = 0\n"
        f'[priors.dog]\nclass_prompt = "a photo of dog"\nnum_images = {args.class_images}\n'
        f"steps = {args.prior_steps}\nwidth = {args.resolution}\nheight = {args.resolution}\n"
        '[subjects.dog]\nimages = "data/instance"\ninstance_prompt = "a photo of sks dog"\nprior = "dog"\n'
    )
    return path


def saved_model(args) -> str:
    """The base_model value --build and --compare-load load: sd15-random is saved once as a diffusers folder."""
    if args.model != "sd15-random":
        return args.model
    from bench.common import saved_sd15_random

    return str(saved_sd15_random(Path(tempfile.gettempdir()) / "dbl-sd15-profile-model", args.device))


def compare_load(args) -> None:
    """--compare-load: the base model read straight onto the device against read on the CPU and moved."""
    import torch

    from runner.models import BaseModel, load_pipeline, loading, resolve_dtype

    base = BaseModel.parse(saved_model(args), ROOT)
    dtype = resolve_dtype(args.mixed_precision, args.device)
    ways = {"straight onto the device": lambda device: device, "on the CPU, then moved": lambda device: None}
    times: dict[str, list[float]] = {way: [] for way in ways}

    def load(decide) -> float:
        loading.loads_straight_to = decide
        clock = time.perf_counter()
        pipe = load_pipeline(base, dtype=dtype, device=args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - clock
        assert pipe.unet.device.type == torch.device(args.device).type
        del pipe
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        return seconds

    load(ways["on the CPU, then moved"])  # the page cache holds the files for both from here on
    for _ in range(args.compare_load):
        for way, decide in ways.items():
            times[way].append(load(decide))
    width = max(map(len, ways))
    print(f"load {base.display} on {args.device} in {str(dtype).removeprefix('torch.')}:")
    for way, seconds in times.items():
        print(f"  {way:{width}}  {' '.join(f'{s:.3f}' for s in seconds)} s (best {min(seconds):.3f} s)")
    if args.json:
        args.json.write_text(json.dumps({"load_s": times}, indent=2) + "\n")


def profile_build(args) -> None:
    """--build: `dbl build` of a fresh project, from process start to the first optimizer step."""
    clock = time.perf_counter()
    from runner import cli

    PHASES["import dbl (the command line)"] = time.perf_counter() - clock
    model = saved_model(args)  # SD 1.5's architecture, saved once as a diffusers folder

    clock = time.perf_counter()
    import diffusers
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from runner import families
    from runner.models import BaseModel, quiet_libraries

    quiet_libraries()  # as a step does before it loads a model
    base = BaseModel.parse(model, ROOT)
    getattr(diffusers, families.detect(base).pipeline_class)  # the pipeline's module and its components'
    PHASES["imports (torch, diffusers, transformers, peft, the pipeline's classes)"] = (
        time.perf_counter() - clock
    )

    from runner import pnginfo, project, store
    from runner.exec import scheduler, workspace
    from runner.models import loading
    from runner.steps import prior
    from runner.training import loop, lora, speed

    def first_step_done(fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            result = fn(*a, **kw)
            if not STOPPED:
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                STOPPED.append(time.perf_counter())
            return result

        return wrapper

    project.load_project = timed("load the project file", project.load_project)
    workspace.Workspace.plan = timed("plan (hash the images and the base model)", workspace.Workspace.plan)
    scheduler._fail_before_start = timed(
        "checks before any step (decode every image, LoRA targets)", scheduler._fail_before_start
    )
    loading.load_pipeline = timed("load the base model", loading.load_pipeline)
    prior.run = timed("prior step: generate the class images", prior.run)
    pnginfo.save_png = timed("prior step: save the class images", pnginfo.save_png)
    store.stage = timed("copy out and hash a step's outputs", store.stage)
    scheduler.finish_step = timed("store and commit a step's outputs", scheduler.finish_step)
    loop.read_images = timed("train step: read the images (decode, resize)", loop.read_images)
    lora.add_lora = timed("train step: add LoRA", lora.add_lora)
    speed.choose = timed("train step: choose checkpointing, CUDA graphs, compiling", speed.choose)
    loop._encode_prompts = timed("train step: encode the prompts", loop._encode_prompts)
    loop.LatentCache = timed("train step: VAE-encode the images (latent cache)", loop.LatentCache)
    loop._optimizer = timed("train step: optimizer and LR schedule", loop._optimizer)
    loop._forward_backward = timed("train step: first forward and backward (first)", loop._forward_backward)
    time_graph_capture("train step: ")
    loop._optimizer_step = first_step_done(
        timed("train step: first optimizer step (first)", loop._optimizer_step)
    )

    with tempfile.TemporaryDirectory(prefix="dbl-startup-") as tmp:
        path = args.project or build_project(Path(tmp), args.photos, model, args)
        begun = time.perf_counter()
        code = cli.main(["build", str(path), "--no-progress", *(["--force"] if args.project else [])])
        if code != 0 or not STOPPED:
            raise SystemExit(f"dbl build ended with {code} before a first train step")
    counted = sum(PHASES.values())
    PHASES["the rest (the scheduler, the lockfile, the display, the steps' own code)"] = (
        STOPPED[0] - START - counted
    )
    width = max(map(len, PHASES))
    for name, seconds in PHASES.items():
        print(f"{name:{width}}  {seconds:7.3f} s")
    print(f"{'dbl build to the first optimizer step':{width}}  {STOPPED[0] - begun:7.3f} s")
    print(f"{'process start to the first optimizer step':{width}}  {STOPPED[0] - START:7.3f} s")
    if args.json:
        figures = {"phases": PHASES, "to_first_step_s": STOPPED[0] - START}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


def default_photos() -> Path:
    """The DreamBench dog photos: in the checkout's shared/ (what travels to a GPU machine) or the one beside it."""
    folders = [base / "shared" / "data" / "dreambench" / "dog" for base in (ROOT, ROOT.parent)]
    return next((f for f in folders if f.is_dir()), folders[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-sd", help="a base_model value, or sd15-random")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--class-images", type=int, default=20)
    parser.add_argument(
        "--photos", type=Path, default=default_photos(), help="default: shared/data/dreambench/dog"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--build", action="store_true", help="profile a whole `dbl build` with a prior")
    parser.add_argument("--prior-steps", type=int, default=10, help="--build: denoising steps a class image")
    parser.add_argument(
        "--project", type=Path, help="--build: profile `dbl build --force` of this project file instead"
    )
    parser.add_argument(
        "--compare-load", type=int, metavar="N", help="time N loads straight onto the device against N moved"
    )
    parser.add_argument(
        "--graph-warm-ups", type=int, metavar="N", help="warm-up passes before each CUDA graph's recording"
    )
    args = parser.parse_args(argv)
    if args.graph_warm_ups is not None:
        from runner.training import graphs

        graphs.WARM_UP_PASSES = args.graph_warm_ups
    if args.build:  # the build hides the libraries' notices itself
        return profile_build(args)
    from runner.exec.job import quiet_library_notices

    quiet_library_notices()  # as a build's process does: no FutureWarning of a library among the figures
    if args.compare_load:
        return compare_load(args)

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
        time_graph_capture("")
        if args.model == "sd15-random":
            sys.path.insert(0, str(ROOT / "bench"))
            from train_bench import FixedModels

            from runner.models import BaseModel, resolve_dtype, sd15_random_pipeline

            clock = time.perf_counter()
            pipe = sd15_random_pipeline(args.device, resolve_dtype(args.mixed_precision, args.device))
            PHASES[MADE_BEFORE] = time.perf_counter() - clock
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
    named = sum(
        v for k, v in PHASES.items() if not k.startswith(("imports", "load the project", MADE_BEFORE))
    )
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
