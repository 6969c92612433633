"""SDXL DreamBooth-LoRA training: dbl's train step against diffusers' own SDXL script on the same job.

    python bench/sdxl_bench.py --gpu                 # SDXL shapes, 1024 px, bf16, 50 steps, one CUDA GPU
    python bench/sdxl_bench.py --cpu-rehearsal       # tiny-sdxl shapes, 64 px, 4 steps: the same flow

The model is SDXL base 1.0's architecture (2.6B-parameter UNet, its VAE, CLIP ViT-L and OpenCLIP bigG
text encoders) with seeded random weights, built from its configs on the device and saved as a diffusers
folder (fp16, about 7 GB): real memory and compute, no download. The rehearsal builds tiny-sdxl instead.

The job, for both: drawn instance images and `--class-images` given class images (prior preservation,
loss weight 1, no class image generated), batch 1 + 1, LoRA rank 16 (alpha 16) on the UNet's
to_q/to_k/to_v/to_out.0 and on both text encoders' q/k/v/out projections, learning rate 1e-4 constant,
gradient checkpointing, `--steps` optimizer steps, seed 0. dbl runs as `dbl build` on a project file
(shared/anchors/train_dreambooth_lora_sdxl.py as itself, with its own arguments); each runs in
its own process, timed from inside by a global optimizer-step hook (after a CUDA synchronize):

    steps/s               steps after the first `--warmup`, over the time they took
    peak GPU memory MB    torch.cuda.max_memory_allocated (on the CPU: the process tree's peak RSS)
    time to first step    from the process start: imports, loading, preparing data
    wall time             the whole process: also saving (the script also reloads the pipeline at the end)

The diffusers script needs torchvision and accelerate; on the CPU it needs transformers < 5.24 (peft
0.21.2 is refused by 5.24's PEFT integration), so `--anchor-python` can name another environment's
python for it. Writes the figures as JSON too (`--out`).
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

# The script, unmodified: in the checkout's shared/ (what travels to a GPU machine) or the one beside it.
ANCHORS = [base / "shared" / "anchors" / "train_dreambooth_lora_sdxl.py" for base in (ROOT, ROOT.parent)]
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
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from runner.families.sd1 import _tiny_tokenizer_vocab

    vocab = _tiny_tokenizer_vocab()
    ids = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    ids["pad_token_id"] = ids["eos_token_id"]
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
        vae = AutoencoderKL(
            sample_size=1024,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            scaling_factor=0.13025,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                hidden_act="quick_gelu",
                projection_dim=768,
                **ids,
            )
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=20,
                hidden_act="gelu",
                projection_dim=1280,
                **ids,
            )
        )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae.half(),
        text_encoder=text_encoder.half(),
        text_encoder_2=text_encoder_2.half(),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
        tokenizer_2=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
        unet=unet.half(),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def build_model(folder: Path, args) -> None:
    if (folder / "model_index.json").is_file():
        return
    if args.shape == "tiny":
        from runner.families.sdxl import build_tiny_sdxl

        build_tiny_sdxl(folder)
    else:
        build_sdxl(folder, args.device)


def draw_images(folder: Path, count: int, size: int, seed: int) -> Path:
    """`count` JPEGs of coloured discs, `size` px square."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(count):
        img = np.broadcast_to(rng.uniform(0, 255, 3), (size, size, 3)).copy()
        for _ in range(6):
            cy, cx, r = *rng.uniform(0, size, 2), rng.uniform(size / 16, size / 4)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        Image.fromarray(img.astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
    return folder


# --- the two commands -------------------------------------------------------------------------------------


def dbl_project(work: Path, model: Path, instance: Path, classes: Path, args) -> Path:
    def strings(items):
        return "[" + ", ".join(f'"{x}"' for x in items) + "]"

    text = f"""# python bench/sdxl_bench.py: the diffusers script's job, as a dbl project
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
gradient_checkpointing = true
train_text_encoder = true
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
    path = work / "bench.toml"
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
        *("--train_text_encoder", "--rank", str(RANK), "--seed", "0", "--gradient_checkpointing"),
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
    cuda = torch.cuda.is_available()

    def stamp(optimizer, args, kwargs):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    def write():
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        stats.write_text(json.dumps({"start": start, "stamps": stamps, "cuda_peak_mb": peak}))

    register_optimizer_step_post_hook(stamp)
    atexit.register(write)
    if variant == "dbl":
        from runner.cli import main

        return main(["build", *rest, "--no-progress"])
    import runpy

    sys.argv = [str(anchor), *rest]
    runpy.run_path(str(anchor), run_name="__main__")
    return 0


def measure(variant: str, python: str, rest: list[str], work: Path, args) -> dict:
    """One variant in a fresh process: its figures, with the peak RSS of its process tree."""
    import psutil

    stats, log, warmup = work / f"{variant}-stats.json", work / f"{variant}.log", args.warmup
    argv = [python, __file__, "--child", variant, "--stats", str(stats), "--anchor", str(args.anchor)]
    argv += ["--", *rest]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.update(PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    began = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        watched, peak = psutil.Process(process.pid), 0
        while process.poll() is None:
            try:
                tree = [watched, *watched.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)
    wall = time.perf_counter() - began
    if process.returncode != 0 or not stats.is_file():
        tail = log.read_text()[-4000:]
        raise SystemExit(f"{variant} failed (exit {process.returncode}); the end of {log}:\n{tail}")
    data = json.loads(stats.read_text())
    stamps = data["stamps"]
    if len(stamps) <= warmup:
        raise SystemExit(f"{variant}: {len(stamps)} optimizer steps seen, not more than --warmup {warmup}")
    loop = stamps[-1] - stamps[warmup - 1] if warmup else stamps[-1] - data["start"]
    return {
        "variant": variant,
        "steps": len(stamps),
        "steps_per_s": (len(stamps) - warmup) / loop,
        "cuda_peak_mb": data["cuda_peak_mb"],
        "peak_rss_mb": peak / 2**20,
        "first_step_s": stamps[0] - data["start"],
        "wall_s": wall,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="SDXL shapes on CUDA (the defaults below)")
    mode.add_argument("--cpu-rehearsal", action="store_true", help="tiny-sdxl shapes on the CPU")
    parser.add_argument("--resolution", type=int, help="default: 1024 (rehearsal: 64)")
    parser.add_argument("--steps", type=int, help="optimizer steps; default: 50 (rehearsal: 4)")
    parser.add_argument("--warmup", type=int, help="untimed first steps; default: 5 (rehearsal: 1)")
    parser.add_argument(
        "--mixed-precision", choices=("no", "fp16", "bf16"), help="default: bf16 (rehearsal: no)"
    )
    parser.add_argument("--class-images", type=int, default=8)
    parser.add_argument("--work", type=Path, help="model, data and outputs (default: a temporary folder)")
    parser.add_argument("--model-dir", type=Path, help="reuse a model folder built by an earlier run")
    parser.add_argument(
        "--anchor", type=Path, help="diffusers' train_dreambooth_lora_sdxl.py (default: shared/anchors/)"
    )
    parser.add_argument("--anchor-python", default=sys.executable, help="the python that runs the script")
    parser.add_argument("--skip", nargs="*", default=[], choices=("dbl", "anchor"))
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    parser.add_argument("--child", choices=("dbl", "anchor"), help=argparse.SUPPRESS)
    parser.add_argument("--stats", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.stats, args.rest, args.anchor)
    if not (args.gpu or args.cpu_rehearsal):
        parser.error("give --gpu or --cpu-rehearsal")
    args.anchor = args.anchor or next((a for a in ANCHORS if a.is_file()), ANCHORS[0])
    if "anchor" not in args.skip and not args.anchor.is_file():
        parser.error(f"no {args.anchor}: give --anchor, or --skip anchor")

    rehearsal = args.cpu_rehearsal
    args.shape, args.device = ("tiny", "cpu") if rehearsal else ("sdxl", "cuda")
    args.resolution = args.resolution or (64 if rehearsal else 1024)
    args.steps = args.steps or (4 if rehearsal else 50)
    args.warmup = args.warmup if args.warmup is not None else (1 if rehearsal else 5)
    args.mixed_precision = args.mixed_precision or ("no" if rehearsal else "bf16")
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device here; use --cpu-rehearsal")
        print(torch.cuda.get_device_name(0), flush=True)

    work = args.work or Path(tempfile.mkdtemp(prefix="dbl-sdxl-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.model_dir or work / "model"
    began = time.perf_counter()
    build_model(model, args)
    print(
        f"model: {model} ({args.shape} shapes, built or found in {time.perf_counter() - began:.0f}s)",
        flush=True,
    )
    instance = draw_images(work / "instance", 5, args.resolution, seed=1)
    classes = draw_images(work / "class", args.class_images, args.resolution, seed=2)

    results = {}
    if "dbl" not in args.skip:
        project = dbl_project(work, model, instance, classes, args)
        results["dbl"] = measure("dbl", sys.executable, [str(project)], work, args)
        print(f"dbl: {results['dbl']}", flush=True)
    if "anchor" not in args.skip:
        script = anchor_args(work, model, instance, classes, args)
        results["anchor"] = measure("anchor", args.anchor_python, script, work, args)
        print(f"diffusers script: {results['anchor']}", flush=True)

    report = {
        "shape": args.shape,
        "device": args.device,
        "resolution": args.resolution,
        "mixed_precision": args.mixed_precision,
        "steps": args.steps,
        "warmup": args.warmup,
        "class_images": args.class_images,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    print_table(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def print_table(report: dict) -> None:
    results = report["results"]
    mine, base = results.get("dbl"), results.get("anchor")
    memory = "cuda_peak_mb" if report["device"] == "cuda" else "peak_rss_mb"
    print(
        f"\nSDXL ({report['shape']} shapes), {report['resolution']} px, {report['mixed_precision']}, "
        f"{report['steps']} steps ({report['warmup']} untimed), batch 1 + 1 class image, LoRA rank {RANK} "
        "on the UNet and both text encoders, gradient checkpointing"
    )
    print(f"{'figure':28} {'dbl':>10} {'script':>10} {'dbl/script':>11}")
    rows = [
        ("train steps/s", "steps_per_s", "higher"),
        ("peak GPU memory MB" if memory == "cuda_peak_mb" else "peak RSS MB", memory, "lower"),
        ("time to first step s", "first_step_s", "lower"),
        ("wall time s", "wall_s", "lower"),
    ]
    for label, key, better in rows:
        a = mine[key] if mine else None
        b = base[key] if base else None
        ratio = f"{a / b:10.2f}x" if a is not None and b else "          -"
        cells = [f"{v:10.2f}" if v is not None else "         -" for v in (a, b)]
        print(f"{label:28} {cells[0]} {cells[1]} {ratio}  ({better} is better)")


if __name__ == "__main__":
    raise SystemExit(main())
