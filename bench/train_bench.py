"""Train-step speed and memory: dbl's train step against a loop written the classic PEFT recipe's way.

    python bench/train_bench.py                                   # tiny-sd on the CPU, real dog photos
    python bench/train_bench.py --model sd15-random --resolution 512 --device cuda --mixed-precision fp16

The baseline does what the recipe does each step: open and decode the JPEG, resize and crop it, tokenize
the prompts, VAE-encode the pixels and run the text encoder, with the UNet in fp32 (under autocast when
mixed precision is on) and a one-worker DataLoader. dbl decodes once, caches latents (and prompt
embeddings when the text encoder is frozen) and keeps frozen weights in the compute dtype.

Both train with prior preservation (class images given), the recipe's LoRA settings (r 16 / alpha 27 on
the UNet, 16 / 17 on the text encoder) and gradient checkpointing. Each variant runs in its own process;
peak memory is that process tree's RSS (sampled with psutil) on a CPU, torch's max allocated on CUDA.
Steps/s is measured after the warm-up steps; setup (loading, decoding, caching) is reported apart.
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

DOG_PHOTOS = ROOT.parent / "shared" / "data" / "dreambench" / "dog"
INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of dog"


# --- data ---------------------------------------------------------------------------------------------


def prepare_data(folder: Path, class_images: int, photos_dir: Path, size: int = 512) -> tuple[Path, Path]:
    """Instance photos (the dreambench dog, or drawn images without it) and `class_images` JPEGs."""
    import shutil

    import numpy as np

    from bench.common import draw_discs
    from runner.imagefiles import list_images

    instance, classes = folder / "instance", folder / "class"
    instance.mkdir(parents=True, exist_ok=True)
    classes.mkdir(parents=True, exist_ok=True)
    photos = list_images(photos_dir) if photos_dir.is_dir() else []
    for photo in photos:
        shutil.copyfile(photo, instance / photo.name)
    rng = np.random.default_rng(0)
    if not photos:
        for i in range(5):
            draw_discs(instance / f"{i:02d}.jpg", rng, size, quality=90)
    for i in range(class_images):
        draw_discs(classes / f"{i:04d}.jpg", rng, size, quality=90)
    return instance, classes


# --- the models -----------------------------------------------------------------------------------------


class FixedModels:
    """A ModelCache look-alike around one pipeline built in memory (sd15-random)."""

    def __init__(self, base, pipe, device: str, mixed_precision: str):
        from runner import families
        from runner.models import resolve_dtype

        self.base, self.pipe, self.device, self.mixed_precision = base, pipe, device, mixed_precision
        self.dtype = resolve_dtype(mixed_precision, device)
        self.family = families.of(pipe)

    def pipeline(self, dtype=None):
        return self.pipe


def load(args, dtype):
    from runner.models import BaseModel, load_pipeline, sd15_random_pipeline

    if args.model == "sd15-random":
        return BaseModel("builtin", "sd15-random"), sd15_random_pipeline(args.device, dtype)
    base = BaseModel("builtin", args.model)
    return base, load_pipeline(base, dtype=dtype, device=args.device)


# --- variant: dbl -----------------------------------------------------------------------------------------


def run_dbl(args, instance: Path, classes: Path) -> dict:
    # Both variants import the libraries before their clock starts: setup_s is loading and preparing.
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import torch
    from diffusers import StableDiffusionPipeline  # noqa: F401

    from runner.models import resolve_dtype
    from runner.project.schema import LoraSettings, Prior, Project, ProjectSettings, Subject, TrainSettings
    from runner.steps import StepContext
    from runner.steps import train as train_step

    start = time.perf_counter()
    dtype = resolve_dtype(args.mixed_precision, args.device)
    base, pipe = load(args, dtype)
    models = FixedModels(base, pipe, args.device, args.mixed_precision)
    total = args.warmup + args.steps
    subject = Subject(
        name="dog",
        images=str(instance),
        instance_prompt=INSTANCE_PROMPT,
        prior="dog",
        train=TrainSettings(
            resolution=args.resolution,
            steps=total,
            batch_size=args.batch_size,
            train_text_encoder=args.text_encoder,
            gradient_checkpointing=args.gradient_checkpointing,
            checkpoint_every=0,
        ),
        lora=LoraSettings(),
    )
    prior = Prior(name="dog", class_prompt=CLASS_PROMPT, num_images=args.class_images)
    work = Path(tempfile.mkdtemp(prefix="dbl-bench-"))
    project = Project(
        path=work / "bench.toml",
        settings=ProjectSettings(
            base_model=base.ref, device=args.device, mixed_precision=args.mixed_precision
        ),
        train=TrainSettings(),
        lora=LoraSettings(),
        tables={"prior": {"dog": prior}, "train": {"dog": subject}},
    )
    (work / "out").mkdir()
    stamps: list[float] = []

    def progress(done, total_steps, **metrics):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    ctx = StepContext(
        step_id="train:dog",
        kind="train",
        name="dog",
        spec=subject,
        project=project,
        work=work / "work",
        out=work / "out",
        inputs={"prior:dog": classes},
        models=models,
        progress=progress,
    )
    metrics = train_step.run(ctx)
    # stamps[0] is the call before step 1; stamps[k] follows step k.
    loop = stamps[total] - stamps[args.warmup]
    return {
        "setup_s": stamps[0] - start,
        "loop_s": loop,
        "steps_per_s": args.steps / loop,
        "loss_first": metrics["loss_first"],
        "loss_last": metrics["loss_last"],
    }


# --- variant: the classic recipe's loop -------------------------------------------------------------------


class RecipeDataset:
    """Instance and class examples as the recipe's dataset serves them: decoded on every access."""

    def __init__(self, instance: Path, classes: Path, tokenizer, resolution: int):
        from runner.imagefiles import list_images

        self.instance, self.classes = list_images(instance), list_images(classes)
        self.tokenizer, self.resolution = tokenizer, resolution

    def __len__(self):
        return max(len(self.instance), len(self.classes))

    def _pixels(self, path):
        import numpy as np
        import torch
        from PIL import Image

        img = Image.open(path)
        if img.mode != "RGB":
            img = img.convert("RGB")
        w, h = img.size
        scale = self.resolution / min(w, h)
        img = img.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
        left = (img.width - self.resolution) // 2
        top = (img.height - self.resolution) // 2
        img = img.crop((left, top, left + self.resolution, top + self.resolution))
        array = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (array - 0.5) / 0.5

    def _ids(self, prompt):
        return self.tokenizer(
            prompt,
            truncation=True,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids[0]

    def __getitem__(self, index):
        return {
            "instance_images": self._pixels(self.instance[index % len(self.instance)]),
            "instance_prompt_ids": self._ids(INSTANCE_PROMPT),
            "class_images": self._pixels(self.classes[index % len(self.classes)]),
            "class_prompt_ids": self._ids(CLASS_PROMPT),
        }


def collate(examples):
    import torch

    pixels = [e["instance_images"] for e in examples] + [e["class_images"] for e in examples]
    ids = [e["instance_prompt_ids"] for e in examples] + [e["class_prompt_ids"] for e in examples]
    return {"pixel_values": torch.stack(pixels).float(), "input_ids": torch.stack(ids)}


def run_baseline(args, instance: Path, classes: Path) -> dict:
    import itertools

    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline  # noqa: F401 (imported before the clock)
    from peft import LoraConfig, get_peft_model

    from runner.models import resolve_dtype

    start = time.perf_counter()
    torch.manual_seed(0)
    weight_dtype = resolve_dtype(args.mixed_precision, args.device)
    _, pipe = load(args, torch.float32)
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.requires_grad_(False)
    unet = get_peft_model(
        unet, LoraConfig(r=16, lora_alpha=27, target_modules=["to_q", "to_v", "query", "value"])
    )
    vae.to(args.device, dtype=weight_dtype)
    if args.text_encoder:
        text_encoder = get_peft_model(
            text_encoder, LoraConfig(r=16, lora_alpha=17, target_modules=["q_proj", "v_proj"])
        )
    else:
        text_encoder.to(args.device, dtype=weight_dtype)
    if args.gradient_checkpointing:
        unet.base_model.model.enable_gradient_checkpointing()
        if args.text_encoder:
            text_encoder.base_model.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    params = (
        itertools.chain(unet.parameters(), text_encoder.parameters())
        if args.text_encoder
        else unet.parameters()
    )
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    dataset = RecipeDataset(instance, classes, pipe.tokenizer, args.resolution)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, collate_fn=collate, num_workers=1
    )
    autocast = torch.autocast(
        args.device.split(":")[0], dtype=weight_dtype, enabled=weight_dtype != torch.float32
    )
    unet.train()
    if args.text_encoder:
        text_encoder.train()
    total = args.warmup + args.steps
    stamps, losses = [time.perf_counter()], []
    batches = iter(())
    for _ in range(total):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        with autocast:
            pixels = batch["pixel_values"].to(args.device, dtype=weight_dtype)
            latents = vae.encode(pixels).latent_dist.sample() * 0.18215
            noise = torch.randn_like(latents)
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
            )
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            hidden = text_encoder(batch["input_ids"].to(args.device))[0]
            pred = unet(noisy, timesteps, hidden).sample
        pred, pred_prior = torch.chunk(pred, 2, dim=0)
        target, target_prior = torch.chunk(noise, 2, dim=0)
        loss = F.mse_loss(pred.float(), target.float()) + F.mse_loss(pred_prior.float(), target_prior.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())  # the recipe logs the loss every step
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    loop = stamps[total] - stamps[args.warmup]
    return {
        "setup_s": stamps[0] - start,
        "loop_s": loop,
        "steps_per_s": args.steps / loop,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


# --- one variant per process ----------------------------------------------------------------------------


def child(args) -> None:
    import torch

    from runner.models import quiet_libraries

    quiet_libraries()  # as a build does: none of the libraries' notices among the figures
    instance, classes = Path(args.data) / "instance", Path(args.data) / "class"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = (run_dbl if args.variant == "dbl" else run_baseline)(args, instance, classes)
    if args.device.startswith("cuda"):
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def measure(variant: str, args, data: Path) -> dict:
    """Run one variant in a fresh process, sampling the RSS of its process tree."""
    from bench.common import peak_rss

    argv = [sys.executable, __file__, "--variant", variant, "--data", str(data)]
    for key in (
        "model",
        "resolution",
        "steps",
        "warmup",
        "device",
        "mixed_precision",
        "batch_size",
        "class_images",
    ):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    argv += ["--text-encoder" if args.text_encoder else "--no-text-encoder"]
    argv += ["--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing"]
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    peak = peak_rss(process)
    output = process.stdout.read()
    if process.returncode != 0:
        raise SystemExit(f"{variant} failed with exit code {process.returncode}")
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result["variant"], result["peak_rss_mb"] = variant, peak / 2**20
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-sd", choices=("tiny-sd", "tiny-sd-v", "sd15-random"))
    parser.add_argument(
        "--resolution", type=int, default=None, help="default: 64 for tiny-sd, 512 for sd15-random"
    )
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--class-images", type=int, default=20)
    parser.add_argument(
        "--text-encoder",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train a text-encoder LoRA too",
    )
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per variant (0: torch's default)"
    )
    parser.add_argument(
        "--baseline-workers",
        type=int,
        default=1,
        help="DataLoader workers of the baseline (the recipe's default: 1)",
    )
    parser.add_argument(
        "--photos", type=Path, default=DOG_PHOTOS, help="instance photos (default: dreambench dog)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--variant", choices=("dbl", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.resolution is None:
        args.resolution = 512 if args.model == "sd15-random" else 64
    if args.variant:
        return child(args)

    with tempfile.TemporaryDirectory(prefix="dbl-bench-data-") as tmp:
        prepare_data(Path(tmp), args.class_images, args.photos)
        results = [measure(variant, args, Path(tmp)) for variant in ("baseline", "dbl")]
    baseline, dbl = results
    report = {
        "model": args.model,
        "resolution": args.resolution,
        "device": args.device,
        "mixed_precision": args.mixed_precision,
        "batch_size": args.batch_size,
        "train_text_encoder": args.text_encoder,
        "gradient_checkpointing": args.gradient_checkpointing,
        "threads": args.threads or "default",
        "baseline_workers": args.baseline_workers,
        "instance_images": str(args.photos) if args.photos.is_dir() else "drawn",
        "results": results,
        "speedup": dbl["steps_per_s"] / baseline["steps_per_s"],
        "peak_rss_ratio": dbl["peak_rss_mb"] / baseline["peak_rss_mb"],
    }
    print(f"{'variant':10} {'steps/s':>9} {'setup s':>8} {'peak RSS MB':>12} {'CUDA peak MB':>13}")
    for r in results:
        cuda = f"{r['cuda_peak_mb']:.0f}" if "cuda_peak_mb" in r else "-"
        print(
            f"{r['variant']:10} {r['steps_per_s']:9.2f} {r['setup_s']:8.1f} {r['peak_rss_mb']:12.0f} {cuda:>13}"
        )
    print(f"speedup {report['speedup']:.2f}x, peak RSS ratio {report['peak_rss_ratio']:.2f}")
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
