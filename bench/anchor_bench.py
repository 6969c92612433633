"""DreamBooth-LoRA training: dbl's train step against diffusers' own script on the same job.

    python bench/anchor_bench.py --gpu                       # SD 1.5 shapes, 512 px, fp16, 300 steps
    python bench/anchor_bench.py --gpu --family sdxl         # SDXL shapes, 1024 px, bf16, 50 steps
    python bench/anchor_bench.py --cpu-rehearsal             # tiny-sd, 64 px, 4 steps: the same flow
    python bench/anchor_bench.py --cpu-rehearsal --family sdxl

The model has the architecture of SD 1.5 (860M-parameter UNet, its VAE and CLIP ViT-L) or of SDXL base
1.0 (2.6B-parameter UNet, two text encoders) with seeded random weights, built on the device and saved as
a diffusers folder in fp16: real memory and compute, no download. The rehearsal uses tiny-sd or
tiny-sdxl instead. The scripts are shared/anchors/train_dreambooth_lora.py and
train_dreambooth_lora_sdxl.py, run as themselves with their own arguments.

The job, for both: drawn instance images and `--class-images` given class images (prior preservation,
loss weight 1, no class image generated), batch 1 + 1, LoRA rank 16 (alpha 16) on the UNet's
to_q/to_k/to_v/to_out.0 and on the text encoders' q/k/v/out projections, learning rate 1e-4 constant,
`--steps` optimizer steps, seed 0. SD 1.5: each tool with its defaults (the script does not checkpoint
gradients; dbl decides by itself, `gradient_checkpointing = "auto"`, and replays CUDA graphs,
`cuda_graphs = "auto"`). `--variants` adds dbl-eager (CUDA graphs and compile off) and dbl-compile
(torch.compile instead of CUDA graphs); each dbl variant's choices are printed under the table.
SDXL: gradient checkpointing in both. dbl runs as `dbl build` on a project file.
Each runs in its own process, timed from inside by a global optimizer-step hook (after a CUDA
synchronize), after each has run `--machine-warmup` steps once unmeasured (a fresh machine's first
process to train reads the CUDA libraries from disk, seconds that the later ones do not pay):

    steps/s               steps after the first `--warmup`, over the time they took (the steady part)
    peak GPU memory MB    torch.cuda.max_memory_allocated, the same call in both processes
                          (on the CPU: the process tree's peak RSS)
    time to first step    from the process start: imports, loading, preparing data, compiling
    load to first step    from the end of the last model load (diffusers' ModelMixin or transformers'
                          PreTrainedModel from_pretrained) to the first step, the same hook in both
    wall time             the whole process, start to exit: also saving (the script also reloads the
                          pipeline at the end)

The scripts need torchvision and accelerate, and transformers whose PEFT check accepts peft 0.21 (5.17
does; 5.24 demands peft >= 0.22), so `--anchor-python` can name another environment's python for them.
Where torchvision's compiled operators do not load (a CUDA torchvision next to a CPU torch), the two
that its import registers are declared empty first: the scripts use only its transforms. Writes the
figures as JSON too (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The scripts, unmodified: in the checkout's shared/ (what travels to a GPU machine) or the one beside it.
SCRIPTS = {"sd15": "train_dreambooth_lora.py", "sdxl": "train_dreambooth_lora_sdxl.py"}
# Per family: the GPU job's resolution, steps, untimed steps, precision, and whether both checkpoint.
VARIANTS = ("dbl", "dbl-eager", "dbl-compile", "anchor")
LABELS = {"dbl": "dbl", "dbl-eager": "dbl eager", "dbl-compile": "dbl compile", "anchor": "script"}
CHOICES = re.compile(
    r"(compile|cuda graphs|gradient checkpointing): (on|off) |warning: (compiling|capturing|replaying)"
)
# What each dbl variant sets in [train] beyond the job: dbl keeps its defaults.
SWITCHES = {
    "dbl": "",
    "dbl-eager": "compile = false\ncuda_graphs = false\n",
    "dbl-compile": "compile = true\ncuda_graphs = false\n",
}
JOBS = {
    "sd15": dict(resolution=512, steps=300, warmup=20, mixed_precision="fp16", checkpointing=False),
    "sdxl": dict(resolution=1024, steps=50, warmup=5, mixed_precision="bf16", checkpointing=True),
}
INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of dog"
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the diffusers script's
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
RANK = 16


# --- the model ------------------------------------------------------------------------------------------


def build_sdxl(folder: Path, device: str, seed: int = 0) -> None:
    """SDXL base 1.0's architecture with seeded random weights, saved in fp16 as a diffusers folder. The
    tokenizers are tiny-sdxl's character-level ones, whose ids fall inside CLIP's vocabulary."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from runner.families.sd1 import _tiny_tokenizer_vocab, clip_vit_l_config, sd_vae, special_token_ids
    from runner.families.sdxl import sdxl_pipeline

    vocab = _tiny_tokenizer_vocab()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=128,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = sd_vae(sample_size=1024, scaling_factor=0.13025)
        text_encoder = CLIPTextModel(clip_vit_l_config(vocab))
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=20,
                hidden_act="gelu",
                projection_dim=1280,
                **special_token_ids(vocab),
            )
        )
    pipe = sdxl_pipeline(unet.half(), vae.half(), text_encoder.half(), text_encoder_2.half())
    pipe.save_pretrained(folder, safe_serialization=True)


def build_model(folder: Path, args) -> Path:
    """The model folder: a built-in tiny model for the rehearsal, else the family's shapes built once."""
    if args.shape == "tiny":
        from runner.models import ensure_builtin

        return ensure_builtin("tiny-sd" if args.family == "sd15" else "tiny-sdxl")
    if args.family == "sd15":
        from bench.common import saved_sd15_random

        return saved_sd15_random(folder, args.device)
    if not (folder / "model_index.json").is_file():
        build_sdxl(folder, args.device)
    return folder


def draw_images(folder: Path, count: int, size: int, seed: int) -> Path:
    """`count` JPEGs of coloured discs, `size` px square."""
    import numpy as np

    from bench.common import draw_discs

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        draw_discs(folder / f"{i:04d}.jpg", rng, size, quality=90)
    return folder


# --- the two commands -------------------------------------------------------------------------------------


def dbl_project(work: Path, model: Path, instance: Path, classes: Path, args, variant: str = "dbl") -> Path:
    def strings(items):
        return "[" + ", ".join(f'"{x}"' for x in items) + "]"

    checkpointing = "gradient_checkpointing = true\n" if args.checkpointing else ""
    text = f"""# python bench/anchor_bench.py: the diffusers script's job, as a dbl project
[project]
base_model = "{model}"
device = "{args.device}"
mixed_precision = "{args.mixed_precision}"
seed = 0

[train]
resolution = {args.resolution}
steps = {args.steps}
batch_size = 1
learning_rate = 1e-4
lr_scheduler = "constant"
{checkpointing}{SWITCHES[variant]}train_text_encoder = true
checkpoint_every = 0

[lora]
rank = {RANK}
alpha = {RANK}
target_modules = {strings(UNET_TARGETS)}
text_encoder_rank = {RANK}
text_encoder_alpha = {RANK}
text_encoder_target_modules = {strings(TEXT_TARGETS)}

[priors.dog]
class_prompt = "{CLASS_PROMPT}"
num_images = {args.class_images}
images = "{classes}"

[subjects.dog]
images = "{instance}"
instance_prompt = "{INSTANCE_PROMPT}"
prior = "dog"
"""
    path = work / f"{variant}.toml"
    path.write_text(text)
    return path


def anchor_args(work: Path, model: Path, instance: Path, classes: Path, args) -> list[str]:
    return [
        *("--pretrained_model_name_or_path", str(model)),
        *("--instance_data_dir", str(instance), "--class_data_dir", str(classes)),
        *("--with_prior_preservation", "--prior_loss_weight", "1.0"),
        *("--instance_prompt", INSTANCE_PROMPT, "--class_prompt", CLASS_PROMPT),
        *("--num_class_images", str(args.class_images), "--resolution", str(args.resolution)),
        *("--train_batch_size", "1", "--learning_rate", "1e-4"),
        *("--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--max_train_steps", str(args.steps)),
        *("--train_text_encoder", "--rank", str(RANK), "--seed", "0"),
        *(("--gradient_checkpointing",) if args.checkpointing else ()),
        *("--mixed_precision", args.mixed_precision, "--checkpointing_steps", "1000000"),
        *("--output_dir", str(work / "anchor-out")),
    ]


# --- one variant per process: timed from inside --------------------------------------------------------


def child(variant: str, stats: Path, rest: list[str], anchor: Path) -> int:
    """Run `dbl build` or the diffusers script in this process, stamping every optimizer step."""
    start = time.perf_counter()
    import atexit

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[float] = []
    loads: list[float] = []  # when each model's from_pretrained returned
    cuda = torch.cuda.is_available()

    def stamp(optimizer, args, kwargs):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    def write():
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        stats.write_text(json.dumps({"start": start, "stamps": stamps, "loads": loads, "cuda_peak_mb": peak}))

    register_optimizer_step_post_hook(stamp)
    atexit.register(write)
    stamp_loads(loads)
    if variant != "anchor":
        from runner.cli import main

        return main(["build", *rest, "--no-progress", "-v", "--force", "train:dog"])  # never from a cache
    import runpy

    if not cuda:
        declare_torchvision_operators()
    sys.argv = [str(anchor), *rest]
    runpy.run_path(str(anchor), run_name="__main__")
    return 0


def stamp_loads(loads: list[float]) -> None:
    """Append the time to `loads` whenever a model's weights are loaded: diffusers' ModelMixin and
    transformers' PreTrainedModel from_pretrained, which both tools call (dbl through the pipeline's)."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    for owner in (ModelMixin, PreTrainedModel):
        load = owner.from_pretrained.__func__

        def from_pretrained(cls, *args, _load=load, **kwargs):
            model = _load(cls, *args, **kwargs)
            loads.append(time.perf_counter())
            return model

        owner.from_pretrained = classmethod(from_pretrained)


def declare_torchvision_operators() -> None:
    """Let torchvision import where its compiled operators cannot load (a CUDA build of it next to a CPU
    torch): its import registers fake kernels for nms and qnms, which must then be declared. The scripts
    use only torchvision's transforms, which need no operator."""
    import importlib.util

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return
    try:
        torch.ops.load_library(next(Path(spec.origin).parent.glob("_C*.so")))
    except (OSError, StopIteration):
        library = torch.library.Library("torchvision", "DEF")
        for name in ("nms", "qnms"):
            library.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        declare_torchvision_operators.library = library  # kept alive: dropping it undoes the definitions


class Failed(Exception):
    """A variant that did not run to its end: the others still run."""


def measure(variant: str, python: str, rest: list[str], work: Path, args) -> dict:
    """One variant in a fresh process: its figures, with the peak RSS of its process tree."""
    from bench.common import peak_rss

    stats, log, warmup = work / f"{variant}-stats.json", work / f"{variant}.log", args.warmup
    argv = [python, __file__, "--child", variant, "--stats", str(stats), "--anchor", str(args.anchor)]
    argv += ["--", *rest]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.update(PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    began = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        stopped = threading.Event()

        def stop():
            stopped.set()
            process.kill()

        timer = threading.Timer(args.timeout, stop) if args.timeout else None
        if timer:
            timer.start()
        try:
            peak = peak_rss(process)
        finally:
            if timer:
                timer.cancel()
    wall = time.perf_counter() - began
    if stopped.is_set():
        raise Failed(
            f"{variant} ran past --timeout {args.timeout:g} s and was stopped; the end of {log}:\n"
            + log.read_text()[-2000:]
        )
    if process.returncode != 0 or not stats.is_file():
        tail = log.read_text()[-4000:]
        raise Failed(f"{variant} failed (exit {process.returncode}); the end of {log}:\n{tail}")
    data = json.loads(stats.read_text())
    stamps = data["stamps"]
    if len(stamps) <= warmup:
        raise Failed(f"{variant}: {len(stamps)} optimizer steps seen, not more than --warmup {warmup}")
    loop = stamps[-1] - stamps[warmup - 1] if warmup else stamps[-1] - data["start"]
    # The base model is loaded when the last model load before the first step returned.
    loaded = max((t for t in data["loads"] if t < stamps[0]), default=None)
    return {
        "variant": variant,
        "steps": len(stamps),
        "steps_per_s": (len(stamps) - warmup) / loop,
        "cuda_peak_mb": data["cuda_peak_mb"],
        "peak_rss_mb": peak / 2**20,
        "first_step_s": stamps[0] - data["start"],
        "loaded_s": None if loaded is None else loaded - data["start"],
        "load_to_first_step_s": None if loaded is None else stamps[0] - loaded,
        "wall_s": wall,
        # What dbl chose for itself, as its log says (compile, CUDA graphs, checkpointing, fallbacks).
        "choices": [
            m.string[m.start() :].strip() for m in map(CHOICES.search, log.read_text().splitlines()) if m
        ],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="the family's shapes on CUDA")
    mode.add_argument("--cpu-rehearsal", action="store_true", help="tiny-sd or tiny-sdxl on the CPU")
    parser.add_argument("--family", choices=tuple(JOBS), default="sd15")
    parser.add_argument("--resolution", type=int, help="default: 512 sd15, 1024 sdxl (rehearsal: 64)")
    parser.add_argument(
        "--steps", type=int, help="optimizer steps; default: 300 sd15, 50 sdxl (rehearsal: 4)"
    )
    parser.add_argument(
        "--warmup", type=int, help="untimed first steps; default: 20 sd15, 5 sdxl (rehearsal: 1)"
    )
    parser.add_argument(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        help="default: fp16 sd15, bf16 sdxl (rehearsal: no)",
    )
    parser.add_argument("--class-images", type=int, default=8)
    parser.add_argument("--work", type=Path, help="model, data and outputs (default: a temporary folder)")
    parser.add_argument("--model-dir", type=Path, help="reuse a model folder built by an earlier run")
    parser.add_argument(
        "--anchor", type=Path, help="the family's diffusers script (default: shared/anchors/)"
    )
    parser.add_argument("--anchor-python", default=sys.executable, help="the python that runs the script")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["dbl", "anchor"],
        choices=VARIANTS,
        help="what to run: dbl (its defaults), dbl-eager (cuda_graphs and compile off), dbl-compile (compile "
        "on, cuda_graphs off), anchor (the script)",
    )
    parser.add_argument(
        "--machine-warmup",
        type=int,
        help="first run each variant for this many steps, unmeasured, so that none pays for the machine's "
        "first reads of the CUDA libraries; default: 3 (rehearsal: 1), 0 for none",
    )
    parser.add_argument("--out", type=Path, help="write the JSON here too (after each variant)")
    parser.add_argument(
        "--timeout", type=float, help="stop a variant after this many seconds; the next ones still run"
    )
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--stats", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.stats, args.rest, args.anchor)
    if not (args.gpu or args.cpu_rehearsal):
        parser.error("give --gpu or --cpu-rehearsal")
    anchors = [base / "shared" / "anchors" / SCRIPTS[args.family] for base in (ROOT, ROOT.parent)]
    args.anchor = args.anchor or next((a for a in anchors if a.is_file()), anchors[0])
    if "anchor" in args.variants and not args.anchor.is_file():
        parser.error(f"no {args.anchor}: give --anchor, or leave anchor out of --variants")

    rehearsal, job = args.cpu_rehearsal, JOBS[args.family]
    args.shape, args.device = ("tiny", "cpu") if rehearsal else (args.family, "cuda")
    args.resolution = args.resolution or (64 if rehearsal else job["resolution"])
    args.steps = args.steps or (4 if rehearsal else job["steps"])
    args.warmup = args.warmup if args.warmup is not None else (1 if rehearsal else job["warmup"])
    args.mixed_precision = args.mixed_precision or ("no" if rehearsal else job["mixed_precision"])
    args.checkpointing = job["checkpointing"]
    if args.machine_warmup is None:
        args.machine_warmup = 1 if rehearsal else 3
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device here; use --cpu-rehearsal")
        print(torch.cuda.get_device_name(0), flush=True)

    work = args.work or Path(tempfile.mkdtemp(prefix=f"dbl-{args.family}-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    model = build_model(args.model_dir or work / "model", args)
    print(
        f"model: {model} ({args.shape} shapes, built or found in {time.perf_counter() - began:.0f}s)",
        flush=True,
    )
    instance = draw_images(work / "instance", 5, args.resolution, seed=1)
    classes = draw_images(work / "class", args.class_images, args.resolution, seed=2)

    if args.machine_warmup:
        warm_up(args, model, instance, classes, work / "warm-up")
    results, failures = {}, {}
    for variant in args.variants:
        python, rest = command(variant, work, model, instance, classes, args)
        try:
            results[variant] = measure(variant, python, rest, work, args)
        except Failed as failure:
            failures[variant] = str(failure)
            print(failure, flush=True)
            continue
        print(f"{variant}: {results[variant]}", flush=True)
        if args.out:  # what has run so far, should a later variant never end
            args.out.write_text(json.dumps(summary(args, results, failures), indent=2) + "\n")

    report = summary(args, results, failures)
    print(json.dumps(report, indent=2))
    if results:
        print_table(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if failures:
        print("failed: " + ", ".join(failures), file=sys.stderr)
    return 1 if failures else 0


def command(variant: str, work: Path, model: Path, instance: Path, classes: Path, args) -> tuple[str, list]:
    """(the python, the arguments after `--`) of one variant's process: the script, or `dbl build` of its
    project file, written into `work`."""
    if variant == "anchor":
        return args.anchor_python, anchor_args(work, model, instance, classes, args)
    return sys.executable, [str(dbl_project(work, model, instance, classes, args, variant))]


def warm_up(args, model: Path, instance: Path, classes: Path, work: Path) -> None:
    """Run each variant for a few steps, unmeasured, before any is measured. A fresh machine's first process
    to train on its GPU reads the CUDA libraries from disk (seconds; 9 s on an H200 that measured dbl
    first), where the ones after find them in memory: warming both up leaves neither paying for it."""
    work.mkdir(parents=True, exist_ok=True)
    warm = argparse.Namespace(**{**vars(args), "steps": args.machine_warmup, "warmup": 0})
    began = time.perf_counter()
    for variant in args.variants:
        python, rest = command(variant, work, model, instance, classes, warm)
        try:
            measure(variant, python, rest, work, warm)
        except Failed as failure:  # the measured run says so again
            print(f"warm-up: {failure}", flush=True)
    print(f"warm-up: {args.machine_warmup} step(s) of each, {time.perf_counter() - began:.0f}s", flush=True)


def summary(args, results: dict, failures: dict) -> dict:
    return {
        "family": args.family,
        "shape": args.shape,
        "device": args.device,
        "resolution": args.resolution,
        "mixed_precision": args.mixed_precision,
        "steps": args.steps,
        "warmup": args.warmup,
        "gradient_checkpointing": "both" if args.checkpointing else "defaults",
        "class_images": args.class_images,
        "machine_warmup_steps": args.machine_warmup,
        "results": results,
        "failures": failures,
    }


def print_table(report: dict) -> None:
    results = report["results"]
    memory = "cuda_peak_mb" if report["device"] == "cuda" else "peak_rss_mb"
    name = {"sd15": "SD 1.5", "sdxl": "SDXL"}[report["family"]]
    checkpointing = (
        "gradient checkpointing in both"
        if report["gradient_checkpointing"] == "both"
        else "each tool's defaults"
    )
    precision = {"no": "fp32"}.get(report["mixed_precision"], report["mixed_precision"])
    print(
        f"\n{name} ({report['shape']} shapes), {report['resolution']} px, {precision}, "
        f"{report['steps']} steps ({report['warmup']} untimed), batch 1 + 1 class image, LoRA rank {RANK} "
        f"on the UNet and the text encoders, {checkpointing}"
    )
    columns = list(results)
    ratios = [v for v in columns if v != "anchor"] if "anchor" in results else []
    width = max((len(v + "/script") + 2 for v in ratios), default=0)  # a ratio's name and two spaces
    header = "".join(f"{LABELS[v]:>12}" for v in columns) + "".join(
        f"{v + '/script':>{width}}" for v in ratios
    )
    print(f"{'figure':24}{header}")
    rows = [
        ("train steps/s", "steps_per_s", "higher"),
        ("peak GPU memory MB" if memory == "cuda_peak_mb" else "peak RSS MB", memory, "lower"),
        ("time to first step s", "first_step_s", "lower"),
        ("load to first step s", "load_to_first_step_s", "lower"),
        ("wall time s", "wall_s", "lower"),
    ]
    for label, key, better in rows:
        figures = {v: results[v][key] for v in columns}
        cells = "".join(f"{'-':>12}" if figures[v] is None else f"{figures[v]:12.2f}" for v in columns)
        cells += "".join(
            f"{'-':>{width}}"
            if None in (figures[v], figures["anchor"]) or not figures["anchor"]
            else f"{figures[v] / figures['anchor']:{width - 1}.2f}x"
            for v in ratios
        )
        print(f"{label:24}{cells}  ({better} is better)")
    for variant in columns:
        if results[variant].get("choices"):
            print(f"{LABELS[variant]}: " + "; ".join(results[variant]["choices"]))


if __name__ == "__main__":
    raise SystemExit(main())
