"""The classic PEFT DreamBooth-LoRA recipe on tiny-shapes, written out as its training loop does it.

Every step: one instance photo and one class image, their pixels encoded by the VAE (a latent sampled
from its distribution), noised at a random timestep; one UNet call on both with their prompts encoded
by the LoRA-wrapped text encoder; loss = mse(instance) + mse(class); one backward, gradient clipping at
1.0, AdamW. Nothing is cached or precomputed: this is the loop dbl's trainer must agree with.

Where its random numbers come from is a `draws` object, so that the same loop can run on its own
randomness (`RecipeDraws`: bench/shapes_eval.py's seed-to-seed comparison) or on dbl's (`DblDraws`:
tests/test_recipe_match.py, which checks that both end at the same adapter).
"""

from __future__ import annotations

import contextlib
import itertools
import random
from dataclasses import dataclass
from pathlib import Path

# Every linear layer of the transformer blocks (attention and feed-forward): dbl's "all-linear" on a
# Stable Diffusion 1.x UNet, whose proj_in and proj_out are convolutions.
ALL_LINEAR = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


@dataclass
class Settings:
    steps: int
    learning_rate: float
    rank: int
    alpha: float
    text_encoder_rank: int
    text_encoder_alpha: float
    target_modules: tuple = tuple(ALL_LINEAR)


class RecipeDraws:
    """The recipe's own randomness: torch's global generator seeded once, a random photo and class
    image at each step."""

    def __init__(self, seed: int):
        self.seed, self.choice = seed, random.Random(seed)

    def start(self):
        """Around the LoRA start: the generator is seeded here, and every later draw follows from it."""
        import torch

        torch.manual_seed(self.seed)
        return contextlib.nullcontext()

    def pair(self, step: int, n_instance: int, n_class: int) -> tuple[int, int]:
        return self.choice.randrange(n_instance), self.choice.randrange(n_class)

    def example(self, step: int, dist, scale: float, num_timesteps: int):
        """(latents, noise, timesteps) of the step's two examples, drawn as the recipe draws them."""
        import torch

        latents = dist.sample() * scale
        noise = torch.randn_like(latents)
        return latents, noise, torch.randint(0, num_timesteps, (latents.shape[0],))


class DblDraws:
    """dbl's randomness: its LoRA start, its example order, and every example's numbers from a generator
    of its own (runner.training.data). `order` replaces the example order (a control)."""

    def __init__(self, seed: int, order=None):
        self.seed, self.order = seed, order

    @contextlib.contextmanager
    def start(self):
        """Around the LoRA start: dbl seeds it on a fork of the global generator."""
        import torch

        from runner.training.data import derive_seed

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "lora-init"))
            yield

    def pair(self, step: int, n_instance: int, n_class: int) -> tuple[int, int]:
        from runner.training.data import ExampleOrder

        if self.order is None:
            self.order = ExampleOrder(self.seed, n_instance, n_class)
        return self.order(step)

    def example(self, step: int, dist, scale: float, num_timesteps: int):
        """(latents, noise, timesteps) of the step's two examples: each example's timestep, noise and
        latent sample, in that order, from the generator of its position."""
        import torch

        from runner.training.data import generator

        shape = tuple(dist.mean.shape[1:])
        draws = [generator(self.seed, "example", kind, step) for kind in ("instance", "class")]
        timesteps = torch.tensor([int(torch.randint(0, num_timesteps, (1,), generator=g)) for g in draws])
        noise = torch.stack([torch.randn(shape, generator=g) for g in draws])
        eps = torch.stack([torch.randn(shape, generator=g) for g in draws])
        return (dist.mean + dist.std * eps) * scale, noise, timesteps


def train(pipe, instance: list, classes: list, settings: Settings, draws) -> list[tuple[float, float]]:
    """Train LoRA on `pipe`'s UNet and text encoder from `instance` and `classes`, lists of (image
    path, prompt). The pipeline keeps the LoRA-wrapped modules (pipe.unet, pipe.text_encoder), in
    eval mode. Returns each step's (instance loss, prior loss)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from peft import LoraConfig, get_peft_model
    from PIL import Image

    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    with draws.start():
        unet = get_peft_model(
            unet,
            LoraConfig(
                r=settings.rank, lora_alpha=settings.alpha, target_modules=list(settings.target_modules)
            ),
        )
        text_encoder = get_peft_model(
            text_encoder,
            LoraConfig(
                r=settings.text_encoder_rank,
                lora_alpha=settings.text_encoder_alpha,
                target_modules=["q_proj", "v_proj"],
            ),
        )
    params = [p for p in itertools.chain(unet.parameters(), text_encoder.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=1e-2)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def pixels(path: Path):
        image = Image.open(path).convert("RGB")
        array = np.asarray(image.resize((64, 64)), dtype=np.float32) / 127.5 - 1
        return torch.from_numpy(array).permute(2, 0, 1)

    def ids(prompt: str):
        return tokenizer(
            prompt,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids[0]

    losses = []
    unet.train()
    text_encoder.train()
    for step in range(settings.steps):
        i, c = draws.pair(step, len(instance), len(classes))
        (photo, photo_prompt), (image, image_prompt) = instance[i], classes[c]
        batch = torch.stack([pixels(photo), pixels(image)])
        tokens = torch.stack([ids(photo_prompt), ids(image_prompt)])
        dist = vae.encode(batch).latent_dist
        latents, noise, timesteps = draws.example(
            step, dist, vae.config.scaling_factor, noise_scheduler.config.num_train_timesteps
        )
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, text_encoder(tokens)[0]).sample
        pred_instance, pred_prior = torch.chunk(pred, 2)
        noise_instance, noise_prior = torch.chunk(noise, 2)
        instance_loss = F.mse_loss(pred_instance.float(), noise_instance.float(), reduction="mean")
        prior_loss = F.mse_loss(pred_prior.float(), noise_prior.float(), reduction="mean")
        (instance_loss + prior_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append((instance_loss.item(), prior_loss.item()))
    unet.eval()
    text_encoder.eval()
    pipe.unet, pipe.text_encoder = unet, text_encoder
    return losses
