"""train:<subject> — DreamBooth with LoRA on the UNet (and the text encoder), with prior preservation.

The recipe, top to bottom:

1. read the images once (decode, EXIF-transpose, resize) and tokenize the two prompts once;
2. put LoRA adapters on the UNet and, if asked, the text encoder; frozen weights stay in the compute
   dtype, LoRA parameters are fp32;
3. encode every image whose crop is fixed into VAE latent moments once (and the prompts, when the text
   encoder is frozen), so a step does no decoding, resizing or VAE work;
4. train: each batch is [instance examples..., class examples...]; DDPM noise from the base model's own
   scheduler config (epsilon, v_prediction or sample target); loss = mse(instance) + w * mse(class), fp32;
5. checkpoint every `checkpoint_every` steps (and when interrupted) into the work folder, resume from
   the newest one;
6. write the adapter in every layout (runner.adapters).

Randomness is a pure function of (seed, position): every example's timestep, noise, latent sample, crop
and flip come from a generator seeded by its position in the data stream, and the data order of each
epoch from a generator seeded by the epoch. So a resumed run repeats exactly what an uninterrupted run
would have done, and N processes see the same examples as one process with N times the batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runner.errors import StepError, StepInterrupted
from runner.imagefiles import list_images
from runner.project import checks
from runner.project.schema import Subject
from runner.steps import KOHYA_STEM, Inputs, StepKind, register

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_FORMAT = 1
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class Job:
    """What a training run needs, picklable so that worker processes can receive it."""

    subject: Any  # schema.Subject (resolved: absolute image folder, merged train and lora settings)
    prior: Any  # schema.Prior or None
    class_dir: Path | None  # the prior step's output folder
    base: Any  # runner.models.BaseModel
    device: str
    mixed_precision: str
    seed: int
    work: Path
    out: Path
    fingerprint: str = ""


@dataclass
class Hooks:
    progress: Callable[..., None] = lambda done, total, **metrics: None
    log: Callable[[str], None] = lambda message: None
    should_stop: Callable[[], bool] = lambda: False


def run(ctx) -> dict:
    """Train one subject's LoRA adapter into ctx.out (see the module docstring)."""
    job = _job_from_context(ctx)
    if ctx.num_processes > 1:
        return _run_processes(ctx, job, ctx.num_processes)
    hooks = Hooks(progress=ctx.progress, log=ctx.log, should_stop=ctx.should_stop)
    return train(job, hooks, models=ctx.models)


def _job_from_context(ctx) -> Job:
    from runner.models import BaseModel, ModelCache

    spec, project = ctx.spec, ctx.project
    settings = project.settings
    prior = class_dir = None
    if spec.prior:
        prior = project.priors[spec.prior]
        class_dir = ctx.inputs.get(f"prior:{spec.prior}")
        if class_dir is None:
            raise StepError(
                f"train:{spec.name} uses prior '{spec.prior}' but its class images were not given"
            )
    models = ctx.models
    if models is None:
        base = BaseModel.parse(settings.base_model, project.dir, settings.revision, settings.allow_pickle)
        models = ctx.models = ModelCache(base, settings.device, settings.mixed_precision)
    return Job(
        subject=spec,
        prior=prior,
        class_dir=Path(class_dir) if class_dir else None,
        base=models.base,
        device=models.device,
        mixed_precision=models.mixed_precision,
        seed=settings.seed,
        work=Path(ctx.work),
        out=Path(ctx.out),
        fingerprint=ctx.fingerprint,
    )


# --- randomness -------------------------------------------------------------------------------------


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts; stable across processes and Python versions (no hash())."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*parts):
    import torch

    return torch.Generator().manual_seed(derive_seed(*parts))


class ExampleOrder:
    """The data stream: position -> (instance index, class index), one shuffled epoch after another.

    An epoch has max(#instance, #class) examples (the recipe's dataset length); instance and class
    images cycle within it.
    """

    def __init__(self, seed: int, n_instance: int, n_class: int):
        self.seed, self.n_instance, self.n_class = seed, n_instance, n_class
        self.length = max(n_instance, n_class)
        self._perms: dict[int, list[int]] = {}

    def __call__(self, position: int) -> tuple[int, int]:
        import torch

        epoch, offset = divmod(position, self.length)
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = torch.randperm(
                self.length, generator=generator(self.seed, "epoch", epoch)
            ).tolist()
        k = self._perms[epoch][offset]
        return k % self.n_instance, (k % self.n_class if self.n_class else -1)


def prior_preservation_loss(pred, target, weight: float | None):
    """(total, instance, prior) losses in fp32 for a batch laid out [instance..., class...].

    Without a prior (`weight` None) the whole batch is instance examples and the prior loss is 0.
    """
    import torch
    import torch.nn.functional as F

    pred, target = pred.float(), target.float()
    if weight is None:
        instance = F.mse_loss(pred, target, reduction="mean")
        return instance, instance, torch.zeros((), device=pred.device)
    pred_instance, pred_class = pred.chunk(2, dim=0)
    target_instance, target_class = target.chunk(2, dim=0)
    instance = F.mse_loss(pred_instance, target_instance, reduction="mean")
    prior = F.mse_loss(pred_class, target_class, reduction="mean")
    return instance + weight * prior, instance, prior


# --- the run -----------------------------------------------------------------------------------------


def train(job: Job, hooks: Hooks, models=None, rank: int = 0, world: int = 1) -> dict:
    """Train and save the adapter. `models` is the build's shared ModelCache (left as found), or None to
    load a private pipeline (worker processes)."""

    from runner.models import load_pipeline, resolve_dtype

    subject, ts, ls = job.subject, job.subject.train, job.subject.lora
    device = job.device if world == 1 or not job.device.startswith("cuda") else f"cuda:{rank}"
    dtype = models.dtype if models is not None else resolve_dtype(job.mixed_precision, job.device)
    log = hooks.log if rank == 0 else (lambda message: None)

    # 1. Images and prompts, read once. ----------------------------------------------------------------
    instance_files = list_images(Path(subject.images))
    if not instance_files:
        raise StepError(f"train:{subject.name}: no images in {subject.images}")
    class_files = list_images(job.class_dir) if job.class_dir else []
    if job.prior is not None:
        if not class_files:
            raise StepError(f"train:{subject.name}: the class images of prior '{job.prior.name}' are missing")
        class_files = class_files[: job.prior.num_images]
    weight = job.prior.loss_weight if job.prior is not None else None
    images = _read_images(instance_files, class_files, ts.resolution, log)

    # 2. Models: private when bias training would touch the shared pipeline's weights. ------------------
    trains_bias = ls.bias != "none" or (ts.train_text_encoder and ls.text_encoder_bias != "none")
    shared = models is not None and not trains_bias
    pipe = models.pipeline(dtype) if shared else load_pipeline(job.base, dtype=dtype, device=device)
    restore = _snapshot(pipe) if shared else None
    try:
        return _train_with(pipe, job, hooks, images, weight, dtype, device, rank, world, log)
    finally:
        if restore is not None:
            restore()


def _train_with(pipe, job, hooks, images, weight, dtype, device, rank, world, log) -> dict:
    import torch
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig, get_peft_model

    from runner.adapters import save_adapter

    subject, ts, ls = job.subject, job.subject.train, job.subject.lora
    steps, batch, accum = ts.steps, ts.batch_size, ts.gradient_accumulation_steps

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise StepError(
            f"base model scheduler has prediction_type {prediction_type!r}; dbl trains {PREDICTION_TYPES}"
        )
    num_timesteps = noise_scheduler.config.num_train_timesteps

    vae, text_encoder, unet = pipe.vae, pipe.text_encoder, pipe.unet
    for module in (vae, text_encoder, unet):
        module.requires_grad_(False)
        module.eval()

    # LoRA init draws from the global RNG: seed it so the same seed gives the same start.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(job.seed, "lora-init"))
        unet = get_peft_model(
            unet,
            LoraConfig(
                r=ls.rank,
                lora_alpha=ls.alpha,
                lora_dropout=ls.dropout,
                bias=ls.bias,
                target_modules=list(ls.target_modules),
            ),
        )
        if ts.train_text_encoder:
            text_encoder = get_peft_model(
                text_encoder,
                LoraConfig(
                    r=ls.text_encoder_rank,
                    lora_alpha=ls.text_encoder_alpha,
                    lora_dropout=ls.text_encoder_dropout,
                    bias=ls.text_encoder_bias,
                    target_modules=list(ls.text_encoder_target_modules),
                ),
            )
    pipe_modules = {"unet": unet, "text_encoder": text_encoder}
    try:
        trainable = _trainable_parameters(unet, text_encoder if ts.train_text_encoder else None)
        if ts.gradient_checkpointing:
            unet.base_model.model.enable_gradient_checkpointing()
            if ts.train_text_encoder:
                _text_encoder_checkpointing(text_encoder.base_model.model, True)
        unet.train()
        if ts.train_text_encoder:
            text_encoder.train()

        # 3. Caches: prompt ids, prompt embeddings (frozen text encoder), latent moments. -------------
        prompts = [subject.instance_prompt] + ([job.prior.class_prompt] if weight is not None else [])
        token_ids = pipe.tokenizer(
            prompts,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        cached_embeddings = None
        if not ts.train_text_encoder:
            with torch.no_grad():
                cached_embeddings = text_encoder(token_ids)[0].to(dtype)
        latent_cache = LatentCache(vae, images, ts, device, dtype)
        log(latent_cache.describe())

        # 4. Optimizer and schedule. -------------------------------------------------------------------
        optimizer = _make_optimizer(trainable, ts, device)
        lr_scheduler = get_scheduler(
            ts.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=ts.lr_warmup_steps,
            num_training_steps=steps,
            num_cycles=ts.lr_num_cycles,
            power=ts.lr_power,
        )
        scaler = (
            torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.startswith("cuda") else None
        )

        # 5. Resume. -----------------------------------------------------------------------------------
        step, history, resumed_from = 0, {"instance": [], "prior": []}, None
        found = _newest_checkpoint(job.work, job.fingerprint, log)
        if found is not None:
            step, history = _load_checkpoint(found, trainable, optimizer, lr_scheduler, scaler)
            resumed_from = step
            log(f"resuming from {found.name}")

        order = ExampleOrder(job.seed, len(images.instance), len(images.classes))
        params = [p for group in trainable.values() for p in group.values()]
        autocast = (
            torch.autocast(device.split(":")[0], dtype=dtype)
            if dtype != torch.float32
            else torch.autocast(device.split(":")[0], enabled=False)
        )
        if rank == 0:
            hooks.progress(step, steps)

        # 6. Train. ------------------------------------------------------------------------------------
        while step < steps:
            sums = torch.zeros(2, dtype=torch.float64)
            for micro in range(accum):
                stream = (step * accum + micro) * world * batch + rank * batch
                positions = range(stream, stream + batch)
                torch.manual_seed(derive_seed(job.seed, "dropout", step, micro, rank))
                latents, noise, timesteps = latent_cache.batch(
                    positions, order, job.seed, num_timesteps, weight
                )
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                if prediction_type == "epsilon":
                    target = noise
                elif prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = latents
                with autocast:
                    if cached_embeddings is not None:
                        embeddings = cached_embeddings
                    else:
                        embeddings = text_encoder(token_ids)[0]
                    # [instance prompt] * batch, then [class prompt] * batch: the order of the latents.
                    embeddings = embeddings.repeat_interleave(batch, dim=0)
                    pred = unet(noisy.to(dtype), timesteps, embeddings.to(dtype)).sample
                loss, instance_loss, prior_loss = prior_preservation_loss(pred, target, weight)
                scaled = loss / accum
                (scaler.scale(scaled) if scaler else scaled).backward()
                sums += torch.stack([instance_loss.detach(), prior_loss.detach()]).double().cpu()

            sums /= accum
            if world > 1:
                _all_reduce_mean(params, sums, world)
            instance_value, prior_value = float(sums[0]), float(sums[1])
            if not (math.isfinite(instance_value) and math.isfinite(prior_value)):
                raise StepError(
                    f"train:{subject.name}: the loss became {instance_value if not math.isfinite(instance_value) else prior_value} "
                    f"at step {step + 1}; lower learning_rate (now {ts.learning_rate}) or use mixed_precision = "
                    "'bf16' or 'no'. The last good checkpoint is kept and the next build resumes from it."
                )
            if scaler:
                scaler.unscale_(optimizer)
            if ts.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, ts.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history["instance"].append(instance_value)
            history["prior"].append(prior_value)
            if rank == 0:
                metrics = {
                    "loss": instance_value + (weight or 0.0) * prior_value,
                    "lr": lr_scheduler.get_last_lr()[0],
                }
                if weight is not None:
                    metrics["prior_loss"] = prior_value
                hooks.progress(step, steps, **metrics)

            stop = _agree(hooks.should_stop(), world)
            due = ts.checkpoint_every > 0 and step % ts.checkpoint_every == 0 and step < steps
            if stop or due:
                _save_checkpoint(job, step, trainable, optimizer, lr_scheduler, scaler, history, world, rank)
            if stop:
                raise StepInterrupted(
                    f"train:{subject.name} stopped after step {step} of {steps}; it resumes from there"
                )

        # 7. Save. -------------------------------------------------------------------------------------
        summary = _loss_summary(history, weight)
        if rank == 0:
            save_adapter(
                job.out,
                unet,
                text_encoder if ts.train_text_encoder else None,
                adapter_name="default",
                base_model=job.base.ref,
                name=KOHYA_STEM,
                info=_info(
                    job, summary, steps, world, len(images.instance), len(images.classes), prediction_type
                ),
            )
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        return {
            "loss_first": summary["loss_first"],
            "loss_last": summary["loss_last"],
            "steps": steps,
            "resumed_from": resumed_from,
        }
    finally:
        _remove_lora(pipe_modules, ts)


# --- images and latents --------------------------------------------------------------------------------


@dataclass
class Images:
    instance: list  # uint8 (3, H, W) tensors, shorter side == resolution
    classes: list
    instance_files: list = field(default_factory=list)
    class_files: list = field(default_factory=list)


def _read_images(instance_files, class_files, resolution, log) -> Images:
    from runner.images import load_training_image

    def read(files):
        return [load_training_image(f, resolution, warn=log) for f in files]

    return Images(read(instance_files), read(class_files), instance_files, class_files)


class LatentCache:
    """VAE latent moments (mean, std) of every image whose crop is fixed, both flips when flipping.

    An image's crop is fixed when crops are centred or the resized image is already square; other images
    (random crops of non-square images, or cache_latents = false) are encoded at each step. Sampling
    latent = mean + std * eps happens per example either way, with the example's own generator, so
    both paths draw the same numbers.
    """

    def __init__(self, vae, images: Images, ts, device, dtype):
        import torch

        self.vae, self.images, self.device, self.dtype = vae, images, device, dtype
        self.resolution, self.center, self.flip = ts.resolution, ts.center_crop, ts.random_flip
        self.scale = vae.config.scaling_factor
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0
        self.moments: dict[tuple[str, int, bool], tuple] = {}
        self.encoded_per_step = 0
        if ts.cache_latents:
            todo = []
            for kind, pixels in (("instance", images.instance), ("class", images.classes)):
                for index, image in enumerate(pixels):
                    if self.center or image.shape[1] == image.shape[2]:
                        for flip in (False, True) if self.flip else (False,):
                            todo.append((kind, index, flip))
            # VAE activations grow with the pixel count: a few images at a time at 64 px, one at 512 px.
            chunk = max(1, 512 * 512 // (self.resolution * self.resolution))
            for start in range(0, len(todo), chunk):
                keys = todo[start : start + chunk]
                crops = [self._crop(k, i, f, None) for k, i, f in keys]
                mean, std = self._encode(torch.stack(crops))
                for n, key in enumerate(keys):
                    self.moments[key] = (mean[n], std[n])
        total = len(images.instance) + len(images.classes)
        cached = {(k, i) for k, i, _ in self.moments}
        self.cached_images, self.uncached_images = len(cached), total - len(cached)
        # Pixels of cached images are never read again: free them (200 class images at 512 px are 150 MB).
        for kind, index in cached:
            (images.instance if kind == "instance" else images.classes)[index] = None

    def describe(self) -> str:
        return f"latents cached for {self.cached_images} images, encoded per step for {self.uncached_images}"

    def _pixels(self, kind: str, index: int):
        return (self.images.instance if kind == "instance" else self.images.classes)[index]

    def _crop(self, kind, index, flip, g):
        from runner.images import center_offsets, crop, random_offsets

        image = self._pixels(kind, index)
        _, h, w = image.shape
        if self.center or g is None:
            top, left = center_offsets(h, w, self.resolution)
        else:
            top, left = random_offsets(h, w, self.resolution, g)
        return crop(image, top, left, self.resolution, flip)

    def _encode(self, pixels_uint8):
        import torch

        from runner.images import normalize

        with torch.no_grad():
            pixels = normalize(pixels_uint8).to(self.device, self.dtype)
            dist = self.vae.encode(pixels).latent_dist
            return dist.mean.float(), dist.std.float()

    def batch(self, positions, order: ExampleOrder, seed: int, num_timesteps: int, weight):
        """(latents, noise, timesteps) for the examples at `positions`, laid out [instance..., class...]."""
        import torch

        examples = []
        for position in positions:
            instance_index, class_index = order(position)
            examples.append(("instance", instance_index, position))
        if weight is not None:
            for position in positions:
                examples.append(("class", order(position)[1], position))

        eps, noise, timesteps, moments, pending = [], [], [], [], []
        for n, (kind, index, position) in enumerate(examples):
            g = generator(seed, "example", kind, position)
            timesteps.append(int(torch.randint(0, num_timesteps, (1,), generator=g)))
            shape = self._latent_shape()
            noise.append(torch.randn(shape, generator=g))
            eps.append(torch.randn(shape, generator=g))
            flip = bool(self.flip and torch.rand(1, generator=g).item() < 0.5)
            key = (kind, index, flip)
            if key in self.moments:
                moments.append(self.moments[key])
            else:
                moments.append(None)
                pending.append((n, self._crop(kind, index, flip, g)))
        if pending:
            self.encoded_per_step += len(pending)
            mean, std = self._encode(torch.stack([crop for _, crop in pending]))
            for j, (n, _) in enumerate(pending):
                moments[n] = (mean[j], std[j])

        mean = torch.stack([m for m, _ in moments])
        std = torch.stack([s for _, s in moments])
        eps = torch.stack(eps).to(self.device)
        latents = ((mean + std * eps) - self.shift) * self.scale
        return latents, torch.stack(noise).to(self.device), torch.tensor(timesteps, device=self.device)

    def _latent_shape(self):
        if not hasattr(self, "_shape"):
            factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            side = self.resolution // factor
            self._shape = (self.vae.config.latent_channels, side, side)
        return self._shape


# --- parameters, optimizer, restoring the shared pipeline ----------------------------------------------


def _trainable_parameters(unet, text_encoder) -> dict[str, dict]:
    """component -> {name: parameter} of what trains, cast to fp32 (frozen weights keep their dtype)."""
    import torch

    groups = {"unet": unet}
    if text_encoder is not None:
        groups["text_encoder"] = text_encoder
    trainable = {}
    for component, model in groups.items():
        named = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.float32)
                named[name] = param
        trainable[component] = named
    return trainable


def _make_optimizer(trainable, ts, device):
    import torch

    groups = [{"params": list(trainable["unet"].values()), "lr": ts.learning_rate}]
    if "text_encoder" in trainable:
        lr = ts.text_encoder_learning_rate if ts.text_encoder_learning_rate is not None else ts.learning_rate
        groups.append({"params": list(trainable["text_encoder"].values()), "lr": lr})
    kwargs = dict(
        betas=(ts.adam_beta1, ts.adam_beta2), weight_decay=ts.adam_weight_decay, eps=ts.adam_epsilon
    )
    if ts.use_8bit_adam:
        if not device.startswith("cuda"):
            raise StepError(
                "use_8bit_adam = true needs a CUDA device (bitsandbytes); set it to false on this machine"
            )
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise StepError("use_8bit_adam = true needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, **kwargs)
    # foreach=False: the same arithmetic on every device count and parameter layout.
    return torch.optim.AdamW(groups, foreach=False, **kwargs)


def _snapshot(pipe) -> Callable[[], None]:
    """Remember what training changes on a shared pipeline, and return the function that restores it."""
    modules = {name: getattr(pipe, name) for name in ("unet", "text_encoder", "vae")}
    flags = {name: [(p, p.requires_grad) for p in module.parameters()] for name, module in modules.items()}
    modes = {name: module.training for name, module in modules.items()}

    def restore():
        for name, module in modules.items():
            setattr(pipe, name, module)
            for param, flag in flags[name]:
                param.requires_grad_(flag)
            module.train(modes[name])

    return restore


def _remove_lora(pipe_modules: dict, ts) -> None:
    """Take the LoRA layers out of the (possibly shared) modules again, and gradient checkpointing off."""
    from peft import PeftModel

    unet, text_encoder = pipe_modules["unet"], pipe_modules["text_encoder"]
    if isinstance(unet, PeftModel):
        base = unet.unload()
        if ts.gradient_checkpointing:
            base.disable_gradient_checkpointing()
    if isinstance(text_encoder, PeftModel):
        base = text_encoder.unload()
        if ts.gradient_checkpointing:
            _text_encoder_checkpointing(base, False)


def _text_encoder_checkpointing(model, enable: bool) -> None:
    # transformers 5 renamed gradient checkpointing to activation checkpointing; 4.x has only the old name.
    if enable:
        kwargs = {"use_reentrant": False}  # reentrant checkpoints drop LoRA gradients of frozen inputs
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


# --- distributed helpers ---------------------------------------------------------------------------------


def _all_reduce_mean(params, sums, world: int) -> None:
    """Average gradients and loss sums over the processes (one flat buffer, one collective)."""
    import torch
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [sums.to(grads[0].device, grads[0].dtype)])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    sums.copy_(flat[offset:].double().cpu())


def _agree(flag: bool, world: int) -> bool:
    """True on every process when any process wants to stop (they must stop at the same step)."""
    if world == 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# --- checkpoints --------------------------------------------------------------------------------------


def _checkpoint_dirs(work: Path) -> list[tuple[int, Path]]:
    found = []
    if work.is_dir():
        for child in work.iterdir():
            name = child.name
            if (
                child.is_dir()
                and name.startswith(CHECKPOINT_PREFIX)
                and name[len(CHECKPOINT_PREFIX) :].isdigit()
            ):
                found.append((int(name[len(CHECKPOINT_PREFIX) :]), child))
    return sorted(found)


def _newest_checkpoint(work: Path, fingerprint: str, log) -> Path | None:
    for step, folder in reversed(_checkpoint_dirs(work)):
        try:
            state = json.loads((folder / "state.json").read_text())
        except (OSError, ValueError):
            continue  # not complete: written by an older layout or damaged
        if state.get("format") != CHECKPOINT_FORMAT or state.get("step") != step:
            continue
        if fingerprint and state.get("fingerprint") and state["fingerprint"] != fingerprint:
            log(f"ignoring {folder.name}: it belongs to other settings")
            continue
        return folder
    return None


def _save_checkpoint(job, step, trainable, optimizer, lr_scheduler, scaler, history, world, rank) -> None:
    """Write checkpoint-<step>/ atomically (temp folder + rename), then drop older checkpoints."""
    import numpy as np
    import torch

    from runner.adapters import write_safetensors

    if rank == 0:
        job.work.mkdir(parents=True, exist_ok=True)
        final = job.work / f"{CHECKPOINT_PREFIX}{step}"
        tmp = job.work / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weights = {f"{c}/{n}": p.detach() for c, group in trainable.items() for n, p in group.items()}
        write_safetensors(tmp / "lora.safetensors", weights)
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler else None,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            tmp / "training_state.pt",
        )
        np_state = np.random.get_state()
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "fingerprint": job.fingerprint,
            "num_processes": world,
            "history": history,
            "python_rng": _jsonable_rng(random.getstate()),
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        }
        # state.json last: a folder without it is incomplete.
        (tmp / "state.json").write_text(json.dumps(state, sort_keys=True))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old_step, folder in _checkpoint_dirs(job.work):
            if old_step != step:
                shutil.rmtree(folder, ignore_errors=True)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _jsonable_rng(state):
    return [state[0], list(state[1]), state[2]]


def _load_checkpoint(folder: Path, trainable, optimizer, lr_scheduler, scaler) -> tuple[int, dict]:
    import numpy as np
    import torch

    from runner.adapters import read_safetensors

    weights, _ = read_safetensors(folder / "lora.safetensors")
    expected = {f"{c}/{n}" for c, group in trainable.items() for n in group}
    if set(weights) != expected:
        raise StepError(
            f"{folder}: the checkpoint does not match the adapter's shape; delete it to start over"
        )
    with torch.no_grad():
        for component, group in trainable.items():
            for name, param in group.items():
                param.copy_(weights[f"{component}/{name}"])
    saved = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if scaler is not None and saved["scaler"]:
        scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["torch_rng"])
    if saved["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    state = json.loads((folder / "state.json").read_text())
    py = state["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy_rng"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    return state["step"], state["history"]


# --- results --------------------------------------------------------------------------------------------


def _loss_summary(history: dict, weight) -> dict:
    def mean(values):
        return float(sum(values) / len(values)) if values else float("nan")

    n = len(history["instance"])
    tenth = max(1, n // 10)
    summary = {
        "instance_loss_first": mean(history["instance"][:tenth]),
        "instance_loss_last": mean(history["instance"][-tenth:]),
    }
    if weight is not None:
        summary["prior_loss_first"] = mean(history["prior"][:tenth])
        summary["prior_loss_last"] = mean(history["prior"][-tenth:])
    w = weight or 0.0
    summary["loss_first"] = summary["instance_loss_first"] + w * summary.get("prior_loss_first", 0.0)
    summary["loss_last"] = summary["instance_loss_last"] + w * summary.get("prior_loss_last", 0.0)
    return summary


def _info(job, summary, steps, world, n_instance, n_class, prediction_type) -> dict:
    subject = job.subject
    info = {
        "kind": "train",
        "base_model": job.base.ref,
        "base_revision": job.base.revision,
        "prediction_type": prediction_type,
        "mixed_precision": job.mixed_precision,
        "seed": job.seed,
        "steps": steps,
        "num_processes": world,
        "instance_prompt": subject.instance_prompt,
        "instance_images": n_instance,
        "train": asdict(subject.train),
        "lora": asdict(subject.lora),
        "loss": summary,
        "step_version": KIND.version,
    }
    if job.prior is not None:
        info["prior"] = {
            "class_prompt": job.prior.class_prompt,
            "class_images": n_class,
            "loss_weight": job.prior.loss_weight,
        }
    return info


# --- several processes ------------------------------------------------------------------------------------

MESSAGE_MARK = "\x1edbl-train "


def _run_processes(ctx, job: Job, world: int) -> dict:
    """Train with `world` worker processes (DDP-style gradient averaging; gloo on a CPU, nccl on CUDA).

    Workers are fresh interpreters (`python -m runner.steps.train JOB RANK WORLD`), so this works from
    any caller, scripts and notebooks included. They report progress, logs and their result as marked
    lines on stdout; a stop request reaches them as a file in the work folder, which they agree on at
    the next step boundary.
    """
    import pickle
    import queue as queue_module
    import subprocess
    import sys
    import threading

    if job.device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < world:
            raise StepError(
                f"num_processes = {world} but only {torch.cuda.device_count()} CUDA devices are visible"
            )
    job.work.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{time.time_ns()}"
    job_file = job.work / f".job-{tag}.pkl"
    job_file.write_bytes(pickle.dumps(job))
    stop_file = job.work / f".stop-{tag}"
    rendezvous = job.work / f".rendezvous-{tag}"
    messages: queue_module.Queue = queue_module.Queue()

    def read(rank: int, stream) -> None:
        for line in stream:
            if line.startswith(MESSAGE_MARK):
                messages.put((rank, json.loads(line[len(MESSAGE_MARK) :])))
        messages.put((rank, {"kind": "eof"}))

    processes, logs = [], []
    try:
        for rank in range(world):
            log_file = open(job.work / f".worker-{rank}.log", "w+")  # noqa: SIM115 - closed below
            logs.append(log_file)
            cmd = [
                sys.executable,
                "-m",
                "runner.steps.train",
                str(job_file),
                str(rank),
                str(world),
                str(rendezvous),
                str(stop_file),
            ]
            process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True)
            processes.append(process)
            threading.Thread(target=read, args=(rank, process.stdout), daemon=True).start()
        results: dict[int, dict] = {}
        ended = 0
        while ended < world:
            if ctx.should_stop() and not stop_file.exists():
                stop_file.touch()
            try:
                rank, message = messages.get(timeout=0.2)
            except queue_module.Empty:
                continue
            kind = message["kind"]
            if kind == "progress":
                ctx.progress(message["done"], message["total"], **message["metrics"])
            elif kind == "log":
                ctx.log(message["message"])
            elif kind == "eof":
                ended += 1
                if rank not in results:
                    # Died without a word (killed, out of memory): stop the others, they would wait forever.
                    stop_file.touch()
                    processes[rank].wait()
                    for other in processes:
                        if other.poll() is None:
                            other.terminate()
                    logs[rank].seek(0)
                    tail = "".join(logs[rank].readlines()[-15:])
                    raise StepError(
                        f"train:{job.subject.name}: training process {rank} exited with code "
                        f"{processes[rank].returncode}\n{tail}"
                    )
            else:
                results[rank] = message
                if kind != "done":
                    stop_file.touch()
        for process in processes:
            process.wait()
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait()
        for log_file in logs:
            log_file.close()
        for path in (job_file, stop_file, rendezvous):
            path.unlink(missing_ok=True)
    outcomes = [results[rank] for rank in range(world)]
    for outcome in outcomes:
        if outcome["kind"] == "error":
            raise StepError(outcome["message"])
    for outcome in outcomes:
        if outcome["kind"] == "interrupted":
            raise StepInterrupted(outcome["message"])
    return outcomes[0]["result"]


def _worker(job_file: str, rank: int, world: int, rendezvous: str, stop_file: str) -> None:
    """Entry point of one training process."""
    import pickle
    import sys

    import torch
    import torch.distributed as dist

    def send(**message) -> None:
        sys.stdout.write(MESSAGE_MARK + json.dumps(message) + "\n")
        sys.stdout.flush()

    try:
        job = pickle.loads(Path(job_file).read_bytes())
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        backend = "nccl" if job.device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world)
        hooks = Hooks(
            progress=lambda done, total, **metrics: send(
                kind="progress", done=done, total=total, metrics=metrics
            ),
            log=lambda message: send(kind="log", message=message),
            should_stop=lambda: os.path.exists(stop_file),
        )
        send(kind="done", result=train(job, hooks, models=None, rank=rank, world=world))
    except StepInterrupted as exc:
        send(kind="interrupted", message=str(exc))
    except StepError as exc:
        send(kind="error", message=str(exc))
    except BaseException as exc:  # reported to the parent, which raises it as a StepError
        send(kind="error", message=f"training process {rank} failed: {exc!r}\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --- the kind ------------------------------------------------------------------------------------------


def _deps(project, spec) -> list[str]:
    return [f"prior:{spec.prior}"] if spec.prior else []


def _inputs(i: Inputs) -> dict:
    spec, settings = i.spec, i.settings
    inputs = {
        "version": KIND.version,
        "base_model": i.base_model(),
        "mixed_precision": settings.mixed_precision,
        "seed": settings.seed,
        # The processes it really runs with: the effective batch is num_processes x batch_size.
        "num_processes": i.num_processes,
        "instance_prompt": spec.instance_prompt,
        "train": i.fields(spec.train),
        "lora": i.fields(spec.lora),
        "images": i.images(spec.images),
    }
    if spec.prior:
        inputs["prior"] = {
            "_name": spec.prior,
            "output": i.output(f"prior:{spec.prior}"),
            "loss_weight": i.project.priors[spec.prior].loss_weight,
        }
    return inputs


KIND = register(
    StepKind(
        name="train",
        table="subjects",
        spec=Subject,
        output_dir="adapters",
        version=1,
        run=run,
        inputs=_inputs,
        deps=_deps,
        doc="trains one subject's LoRA (UNet, and text encoder if asked)",
        produces_adapter=True,
        read=checks.read_subject,
        check=checks.check_subjects,
        folders=lambda spec: [spec.images],
        layout=lambda name: {f"{KOHYA_STEM}.safetensors": f"{name}.safetensors"},
        unit=("step", "it/s"),
    )
)

if __name__ == "__main__":
    import sys

    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
