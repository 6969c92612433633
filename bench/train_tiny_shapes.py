"""Train the built-in `tiny-shapes` base model from scratch, from a seed, on the shapes world.

    python bench/train_tiny_shapes.py                  # writes runner/families/tiny_shapes.safetensors
    python bench/train_tiny_shapes.py --quick          # a few hundred steps: checks that the script runs

Three stages, every draw from generators seeded by --seed:
  1. pictures: --pictures scenes of SHAPES in every (shape, colour, background) combination that is not
     held out (runner.shapes.held_out), random size and place, each with a caption (some shortened:
     no size, no background, "shape" for the kind; one in ten empty, for classifier-free guidance);
  2. the VAE (64 px -> 8 x 8 x 4 latents): reconstruction loss of the posterior mean and a small KL term;
  3. the UNet and the CLIP text encoder together, on the pictures' latents (epsilon prediction, the SD
     noise schedule), with an exponential moving average of both; the averages are saved.

The weights are written in fp16 with the settings, the seed and the VAE's latent scaling factor in the
file's metadata. The same seed, settings, thread count and library versions give the same file on the
same kind of CPU; other CPUs may differ in the last bits of float sums.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runner import shapes  # noqa: E402
from runner.families import tiny_shapes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=tiny_shapes.WEIGHTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pictures", type=int, default=12000)
    parser.add_argument("--vae-steps", type=int, default=4000)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--unet-steps", type=int, default=6000)
    parser.add_argument("--unet-batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--vae-lr", type=float, default=3e-3)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument(
        "--min-snr",
        type=float,
        default=5.0,
        help="weigh each example's loss by min(SNR, GAMMA) / SNR (Min-SNR-gamma); 0: no weighting",
    )
    parser.add_argument(
        "--vae-from",
        type=Path,
        help="take the VAE from this weights file (one this script wrote with the same seed and VAE "
        "settings) instead of training it; the run's other draws stay those of a whole run",
    )
    parser.add_argument(
        "--save-every", type=int, default=1000, help="write the weights so far to OUT.partial"
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=0,
        help="end after this many UNet steps of the --unet-steps schedule, and write OUT (0: the whole schedule)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the UNet and the text encoder with torch.compile (faster steps after a few minutes of compiling)",
    )
    parser.add_argument("--quick", action="store_true", help="a short run that checks the script works")
    args = parser.parse_args()
    if args.quick:
        args.pictures, args.vae_steps, args.unet_steps = 512, 20, 20
    settings = {
        k: v
        for k, v in vars(args).items()
        if k not in ("out", "quick", "save_every", "stop_after", "vae_from")
    }
    last = args.stop_after or args.unet_steps

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    started = time.perf_counter()

    # 1. pictures
    combos = shapes.combinations(heldout=False)
    scenes = [shapes.random_scene(rng, *rng.choice(combos)) for _ in range(args.pictures)]
    captions = ["" if rng.random() < 0.1 else shapes.caption(s, rng) for s in scenes]
    pixels = np.stack([np.asarray(shapes.draw(s)) for s in scenes])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    print(
        f"{len(scenes)} pictures of {len(combos)} combinations in {time.perf_counter() - started:.0f}s",
        flush=True,
    )

    tokenizer = tiny_shapes.make_tokenizer()
    unet, vae, text_encoder = tiny_shapes.make_modules(len(tokenizer))

    # 2. the VAE
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed + 1)
    vae.train()
    if args.vae_from:
        load_vae(vae, args.vae_from, settings)
        for _ in range(args.vae_steps):  # the draws of the skipped training, so that the rest match
            torch.randint(0, len(images), (args.vae_batch,), generator=generator)
    for step in range(1, 0 if args.vae_from else args.vae_steps + 1):
        _set_lr(optimizer, args.vae_lr, step, args.vae_steps)
        batch = images[torch.randint(0, len(images), (args.vae_batch,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        # The posterior's mean, not a sample: the latents the UNet learns and renders decode are means,
        # and the small KL term keeps their scale in check.
        recon = vae.decode(posterior.mean).sample
        loss = torch.nn.functional.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.vae_steps:
            print(
                f"vae {step}/{args.vae_steps} loss {loss.item():.5f} {time.perf_counter() - started:.0f}s",
                flush=True,
            )
    vae.eval()
    with torch.no_grad():
        deterministic_posterior(vae)
        for p in vae.parameters():  # the VAE as it is saved, in fp16, so the latents are its latents
            p.copy_(p.half().float())
        means = torch.cat(
            [vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)]
        )
    scaling = 1.0 / means.std().item()
    latents_all = means * scaling
    print(f"latents {tuple(latents_all.shape[1:])}, scaling factor {scaling:.5f}", flush=True)

    # 3. the UNet and the text encoder
    with torch.no_grad():
        tokens = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
    scheduler = tiny_shapes.make_scheduler()
    alphas = scheduler.alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema = [copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()]
    for module in ema:
        module.requires_grad_(False)
    unet.train()
    text_encoder.train()
    if args.compile:
        unet.compile(dynamic=False)
        text_encoder.compile(dynamic=False)
    for step in range(1, last + 1):
        _set_lr(optimizer, args.lr, step, args.unet_steps)
        index = torch.randint(0, len(latents_all), (args.unet_batch,), generator=generator)
        x0 = latents_all[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.unet_batch,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        embeddings = text_encoder(tokens[index])[0]
        loss = torch.nn.functional.mse_loss(unet(noisy, t, embeddings).sample, noise, reduction="none")
        loss = loss.mean(dim=(1, 2, 3))
        if args.min_snr:
            snr = alphas[t] / (1 - alphas[t])
            loss = loss * torch.clamp(snr, max=args.min_snr) / snr
        loss = loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for averaged, live in zip(ema, (unet, text_encoder), strict=True):
                for p_avg, p in zip(averaged.parameters(), live.parameters(), strict=True):
                    p_avg.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == args.unet_steps:
            print(
                f"unet {step}/{args.unet_steps} loss {loss.item():.5f} {time.perf_counter() - started:.0f}s",
                flush=True,
            )
        if args.save_every and step % args.save_every == 0 and step < last:
            save(args.out.with_name(args.out.name + ".partial"), ema, vae, settings, scaling, started, step)

    save(args.out, ema, vae, settings, scaling, started, last)
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.0f}s"
    )


def save(path: Path, ema, vae, settings: dict, scaling: float, started: float, step: int) -> None:
    import torch
    from safetensors.torch import save_file

    deterministic_posterior(vae)
    state = {}
    for prefix, module in (("unet.", ema[0]), ("vae.", vae), ("text_encoder.", ema[1])):
        state.update({prefix + k: v.detach().half().contiguous() for k, v in module.state_dict().items()})
    metadata = {
        "model": "tiny-shapes",
        "settings": json.dumps(settings, sort_keys=True),
        "vae_scaling_factor": repr(scaling),
        "unet_steps_done": str(step),
        "torch": torch.__version__,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_vae(vae, path: Path, settings: dict) -> None:
    """The VAE of a weights file this script wrote, and check it was trained as this run would train it."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        written = json.loads(f.metadata()["settings"])
        state = {k.removeprefix("vae."): f.get_tensor(k).float() for k in f.keys() if k.startswith("vae.")}  # noqa: SIM118
    keys = ("seed", "threads", "pictures", "vae_steps", "vae_batch", "vae_lr")
    differ = [k for k in keys if written.get(k) != settings.get(k)]
    if differ:
        raise SystemExit(f"{path}: its VAE was trained with other settings ({', '.join(differ)})")
    with torch.no_grad():
        vae.load_state_dict(state, strict=True)


def deterministic_posterior(vae) -> None:
    """Fix the VAE posterior's log-variance at -30 (a standard deviation of 3e-7): the VAE was trained on
    the posterior's mean, so its variance half never learned anything, and trainers that sample latents
    (as DreamBooth's recipe does) must get the mean."""
    import torch

    with torch.no_grad():
        half = vae.quant_conv.out_channels // 2
        vae.quant_conv.weight[half:] = 0.0
        vae.quant_conv.bias[half:] = -30.0


def _set_lr(optimizer, peak: float, step: int, total: int) -> None:
    """Linear warm-up over 5% of the steps, then a cosine decay to a tenth of the peak."""
    warm = max(1, total // 20)
    if step <= warm:
        lr = peak * step / warm
    else:
        progress = (step - warm) / max(1, total - warm)
        lr = peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    for group in optimizer.param_groups:
        group["lr"] = lr


if __name__ == "__main__":
    main()
