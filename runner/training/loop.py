"""The training loop: DreamBooth with LoRA on a model family's components, with prior preservation.

The recipe, top to bottom (`train`):

1. read the images once (decode, EXIF-transpose, resize);
2. put LoRA adapters on the family's components (sd1: the UNet and, if asked, the text encoder); frozen
   weights stay in the compute dtype, LoRA parameters are fp32;
3. encode the prompts once (and keep their embeddings when no text encoder trains), and every image whose
   crop is fixed into VAE latent moments once, so a step does no decoding, resizing or VAE work;
4. train: each batch is [instance examples..., class examples...]; DDPM noise from the base model's own
   scheduler config (epsilon, v_prediction or sample target), with offset noise if asked;
   loss = mse(instance) + w * mse(class), fp32, each example min-SNR weighted if asked (losses.py);
5. checkpoint every `checkpoint_every` steps (and when interrupted) into the work folder, resume from
   the newest one (runner.training.checkpoints);
6. write the adapter in every layout, snapshots and logs (runner.training.outputs).

Randomness: see runner.training.data. torch, diffusers and peft are imported inside functions.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any

from runner.errors import StepError, StepInterrupted
from runner.host import to_device
from runner.training import captions, checkpoints, lora, optimizers, outputs, speed
from runner.training.data import BucketOrder, ExampleOrder, Images, derive_seed, examples_at, read_images
from runner.training.distributed import agree, all_reduce_mean
from runner.training.job import Hooks, Job
from runner.training.latents import LatentCache
from runner.training.losses import min_snr_weights, prior_preservation_loss

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Steps between reading the losses back on an accelerator: each read waits for the device's queue to drain.
READBACK_STEPS = 10


@dataclass
class Run:
    """One training run while it runs: what it was given, and what it builds up step by step."""

    job: Job
    hooks: Hooks
    pipe: Any
    images: Images
    weight: float | None  # prior loss weight; None without a prior
    dtype: Any
    device: str
    rank: int = 0
    world: int = 1
    components: list = field(default_factory=list)  # the family's components that train
    modules: dict = field(default_factory=dict)  # component name -> module (LoRA-wrapped when it trains)
    noise: Any = None  # the DDPM scheduler that adds noise
    token_ids: Any = None
    prompts: Any = None  # prompt embeddings, when no text encoder trains
    vae_home: Any = None  # the VAE's device while it waits in host memory (_park_vae)
    # With captions or caption dropout: each distinct prompt's row in token_ids (and prompts); else None.
    rows: dict | None = None
    latents: LatentCache | None = None
    trainable: dict = field(default_factory=dict)
    optimizer: Any = None
    lr_scheduler: Any = None
    scaler: Any = None
    step: int = 0
    history: dict = field(default_factory=lambda: {"instance": [], "prior": []})
    resumed_from: int | None = None
    writer: Any = None  # TensorBoard's SummaryWriter, when the subject asks for logs
    # How the step is made fast (runner.training.speed): gradient checkpointing, as chosen for this run;
    # the CUDA graphs of the denoiser and of each text encoder that trains; the modules compiled.
    checkpointing: bool = False
    graphs: list = field(default_factory=list)
    prompt_graphs: Any = None  # the text encoders' graphs (in `graphs` too): embeds the prompts
    compiled: list = field(default_factory=list)
    # Losses stay on the device until read back (every `readback_every` steps): (losses, lr) of each step.
    pending: list = field(default_factory=list)
    readback_every: int = 1
    read_at: float = 0.0  # time.perf_counter() of the last read-back
    metrics: dict = field(default_factory=dict)  # the last read-back step's loss and lr, for the display

    @property
    def settings(self):
        return self.job.subject.train

    def log(self, message: str) -> None:
        if self.rank == 0:
            self.hooks.log(message)


def train(job: Job, hooks: Hooks, models=None, rank: int = 0, world: int = 1) -> dict:
    """Train and save the adapter. `models` is the build's shared ModelCache (left as found), or None to
    load a private pipeline (worker processes)."""
    from runner.models import load_pipeline, resolve_dtype

    family, ts = job.family, job.subject.train
    device = job.device if world == 1 or not job.device.startswith("cuda") else f"cuda:{rank}"
    dtype = models.dtype if models is not None else resolve_dtype(job.mixed_precision, job.device)
    log = hooks.log if rank == 0 else (lambda message: None)

    # 1. Images, read once.
    images, weight = read_images(job, log)
    # A private pipeline when bias training would touch the shared pipeline's weights.
    # A learning rate of a component that does not train is said as the file loads (project.unused).
    components = family.trained_components(ts)
    shared = models is not None and not lora.trains_bias(components, job.subject.lora)
    if shared:
        pipe = models.pipeline(dtype)
    else:
        pipe = load_pipeline(job.base, dtype=dtype, device=device, family=family)
    restore = lora.snapshot(pipe, family) if shared else None
    prompts = {f"subjects.{job.subject.name}.instance_prompt": job.subject.instance_prompt}
    if job.prior is not None:
        prompts.update(job.prior.prompt_keys())
    captioned = {}
    for image, prompt in zip(images.instance_files, images.prompts["instance"], strict=True):
        if prompt != job.subject.instance_prompt:
            captioned[captions.caption_file(image, job.subject.caption_extension)] = prompt
    for image, prompt in zip(images.class_files, images.prompts["class"], strict=True):
        if prompt not in job.prior.prompts:  # a caption of the user's class images, as the prior copied it
            captioned[captions.caption_file(image, ".txt")] = prompt
    said = family.long_prompts(pipe, prompts, job.source) + captions.long_captions(family, pipe, captioned)
    for warning in said:
        log(warning)
    run = Run(job, hooks, pipe, images, weight, dtype, device, rank, world, components)
    try:
        return _train(run)
    finally:
        if restore is not None:
            restore()


def _train(run: Run) -> dict:
    ts = run.settings
    _noise_scheduler(run)  # the base model's own noise schedule and prediction type
    # 2. LoRA on the components that train; their parameters in fp32.
    job = run.job
    run.modules = lora.add_lora(
        run.pipe, job.family, run.components, job.subject.lora, job.seed, job.lora_key, job.problem
    )
    try:
        run.trainable = lora.trainable_parameters(run.modules, run.components)
        speed.choose(run)  # gradient checkpointing, CUDA graphs, compiling
        lora.start_training(run.modules, run.components, run.checkpointing)
        # 3. Prompts and latents, encoded once.
        _encode_prompts(run)
        run.latents = LatentCache(
            run.pipe.vae, run.images, ts, run.device, run.dtype, vae_fp32=run.job.family.vae_fp32
        )
        run.log(run.latents.describe())
        _park_vae(run)
        # Optimizer and schedule; 5. resume from the newest good checkpoint.
        _optimizer(run)
        _resume(run)
        if run.rank == 0:
            run.hooks.progress(run.step, ts.steps)
        # 4. Train.
        order = _order(run)
        params = [p for group in run.trainable.values() for p in group.values()]
        run.writer = outputs.log_writer(run)
        run.readback_every, run.read_at = readback_interval(run.device), time.perf_counter()
        while run.step < (run.job.stop_at or ts.steps):
            losses = speed.forward_backward(run, lambda: _forward_backward(run, order))
            if run.world > 1:
                all_reduce_mean(params, losses, run.world)
            _optimizer_step(run, params, losses)
            if run.step in run.job.snapshots:  # keep the adapter of this step as it is
                _read_losses(run)
                outputs.snapshot(run, run.job.snapshots[run.step])
            _checkpoint_or_stop(run)  # 5. checkpoint when due or asked to stop
        # 6. Write the adapter in every layout.
        _read_losses(run)
        return _save(run)
    finally:
        if run.writer is not None:
            run.writer.close()
        _unpark_vae(run)
        speed.undo(run)
        lora.remove_lora(run.modules, run.checkpointing)


def _park_vae(run: Run) -> None:
    """Where every image's latents are cached, no step uses the VAE: on a CUDA device its weights wait in
    host memory while the run trains (the step's peak of GPU memory lower by as much, 160 MB for SD 1.5),
    and go back when it ends, for the build's next steps that share the pipeline."""
    if run.latents.uncached_images or not str(run.device).startswith("cuda"):
        return
    vae = run.pipe.vae
    run.vae_home = next(vae.parameters()).device
    vae.to("cpu")


def _unpark_vae(run: Run) -> None:
    if run.vae_home is not None:
        run.pipe.vae.to(run.vae_home)
        run.vae_home = None


def readback_interval(device: str) -> int:
    """Steps between reading the losses back: every step on a CPU, where it costs nothing; every
    READBACK_STEPS on an accelerator, whose queue each read would drain."""
    return 1 if device == "cpu" else READBACK_STEPS


def _order(run: Run):
    """The data stream; with buckets, each micro-batch of every process holds images of one bucket."""
    ts, images = run.settings, run.images
    if ts.buckets:
        return BucketOrder(
            run.job.seed, images.buckets("instance"), images.buckets("class"), ts.batch_size * run.world
        )
    return ExampleOrder(run.job.seed, len(images.instance), len(images.classes))


def _noise_scheduler(run: Run) -> None:
    from diffusers import DDPMScheduler

    kind = type(run.pipe.scheduler).__name__
    if "EDM" in kind:  # its config has sigmas, no betas: DDPM's default schedule would train unsaid
        raise StepError(
            f"the base model's scheduler is {kind}, an EDM noise schedule (Playground v2.5 has one); dbl "
            "trains models with a DDPM beta schedule: Stable Diffusion 1.x, 2.x, SDXL and their fine-tunes"
        )
    run.noise = DDPMScheduler.from_config(run.pipe.scheduler.config)
    prediction_type = run.noise.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise StepError(
            f"base model scheduler has prediction_type {prediction_type!r}; dbl trains {PREDICTION_TYPES}"
        )


def _encode_prompts(run: Run) -> None:
    """Tokenize the instance (and class) prompt once; embed them once when no text encoder trains."""
    import torch

    job, family = run.job, run.job.family
    class_prompt = job.prior.prompts[0] if run.weight is not None else None
    prompts = [job.subject.instance_prompt] + ([class_prompt] if class_prompt is not None else [])
    per_image = run.images.prompts["instance"] + run.images.prompts["class"]
    # [instance prompt, class prompt] serves only when every image trains with its kind's prompt.
    uniform = all(p == job.subject.instance_prompt for p in run.images.prompts["instance"]) and all(
        p == class_prompt for p in run.images.prompts["class"]
    )
    if run.settings.caption_dropout or not uniform:
        # One row per distinct prompt: a caption shared by many images is tokenized (and embedded) once.
        prompts = sorted(set(prompts) | set(per_image) | ({""} if run.settings.caption_dropout else set()))
        run.rows = {prompt: row for row, prompt in enumerate(prompts)}
        if run.settings.caption_dropout:
            run.log(f"caption dropout {run.settings.caption_dropout:g}")
        run.log(f"{len(prompts)} distinct prompts")
    run.token_ids = family.tokenize(run.pipe, prompts, run.device)
    if all(c.denoiser for c in run.components):  # no text encoder trains: the embeddings never change
        with torch.no_grad():  # predict casts them; a few at a time, as captions may be many
            ids = run.token_ids
            count = len(ids[0] if isinstance(ids, tuple) else ids)
            chunks = [
                family.encode_prompts(run.modules, _take(ids, slice(i, i + 64))) for i in range(0, count, 64)
            ]
            if isinstance(chunks[0], tuple):
                run.prompts = tuple(torch.cat(parts) for parts in zip(*chunks, strict=True))
            else:
                run.prompts = torch.cat(chunks)


def _optimizer(run: Run) -> None:
    import torch
    from diffusers.optimization import get_scheduler

    ts = run.settings
    say = functools.partial(run.job.train_problem, optimizers.asked_key(ts))
    run.optimizer = optimizers.make_optimizer(run.trainable, run.components, ts, run.device, say)
    # Keys the schedule does not take, and Prodigy's small learning rate, are said as the file loads.
    run.lr_scheduler = get_scheduler(
        ts.lr_scheduler,
        optimizer=run.optimizer,
        num_warmup_steps=ts.lr_warmup_steps,
        num_training_steps=ts.steps,
        num_cycles=ts.lr_num_cycles,
        power=ts.lr_power,
    )
    if run.dtype == torch.float16 and run.device.startswith("cuda"):
        run.scaler = torch.amp.GradScaler("cuda")


def _resume(run: Run) -> None:
    found = checkpoints.resume(
        run.job.work,
        run.job.fingerprint,
        run.log,
        run.trainable,
        run.optimizer,
        run.lr_scheduler,
        run.scaler,
        run.rank,
    )
    if found is not None:
        run.step, run.history, folder = found
        run.resumed_from = run.step
        run.log(f"resuming from {folder.name}")


def _forward_backward(run: Run, order: ExampleOrder):
    """Accumulate the gradients of one optimizer step; returns the mean (instance, prior) losses."""
    import torch

    ts, job, family = run.settings, run.job, run.job.family
    batch, accum = ts.batch_size, ts.gradient_accumulation_steps
    device_type = run.device.split(":")[0]
    autocast = (
        torch.autocast(device_type, dtype=run.dtype)
        if run.dtype != torch.float32
        else torch.autocast(device_type, enabled=False)
    )
    sums = torch.zeros(2, dtype=torch.float32 if run.device == "mps" else torch.float64, device=run.device)
    for micro in range(accum):
        stream = (run.step * accum + micro) * run.world * batch + run.rank * batch
        positions = range(stream, stream + batch)
        torch.manual_seed(derive_seed(job.seed, "dropout", run.step, micro, run.rank))
        groups = run.latents.batch(
            positions, order, job.seed, run.noise.config.num_train_timesteps, run.weight
        )
        with autocast:  # prompts are embedded here when a text encoder trains
            if run.rows is None:  # [instance prompt, class prompt], each for `batch` examples
                prompts = run.prompts if run.prompts is not None else _embed(run, run.token_ids)
            else:  # one prompt per example
                prompts = _example_prompts(run, positions, order)
        preds, targets = [], []
        for n, group in enumerate(groups):
            if run.rows is not None:
                group_prompts, repeat = _take(prompts, group.examples), 1
            elif len(groups) == 1:
                group_prompts, repeat = prompts, batch
            else:  # the instance and the class examples apart (their buckets differ)
                group_prompts, repeat = _take(prompts, slice(n, n + 1)), batch
            noisy = run.noise.add_noise(group.latents, group.noise, group.timesteps)
            targets.append(_target(run, group.latents, group.noise, group.timesteps))
            with autocast:
                pred = family.predict(
                    run.modules,
                    noisy,
                    group.timesteps,
                    group_prompts,
                    repeat,
                    run.dtype,
                    conditions=group.conditions,
                )
            preds.append(pred)
        weights = None
        if ts.snr_gamma is not None:  # min-SNR: each example's weight from its timestep
            weights = [
                min_snr_weights(
                    run.noise.alphas_cumprod, group.timesteps, ts.snr_gamma, run.noise.config.prediction_type
                )
                for group in groups
            ]
        if len(groups) == 1:
            loss, instance_loss, prior_loss = prior_preservation_loss(
                preds[0], targets[0], run.weight, weights[0] if weights else None
            )
        else:
            loss, instance_loss, prior_loss = prior_preservation_loss(preds, targets, run.weight, weights)
        scaled = loss / accum
        (run.scaler.scale(scaled) if run.scaler else scaled).backward()
        if micro == 0 and accum > 1:
            for graphed in run.graphs:
                graphed.own_gradients()  # before the next replay overwrites them
        sums += torch.stack([instance_loss.detach(), prior_loss.detach()]).to(sums.dtype)
    return sums / accum  # on the device: read back by _read_losses


def _example_prompts(run: Run, positions, order: ExampleOrder):
    """One embedding row per example (captions, or caption dropout), in the latents' order."""
    examples = examples_at(positions, order, run.weight)
    texts = captions.prompts_for(examples, run.images.prompts, run.job.seed, run.settings.caption_dropout)
    rows = [run.rows[text] for text in texts]
    if run.prompts is not None:  # frozen text encoder: every distinct prompt was embedded once
        return _take(run.prompts, to_device(rows, run.device))
    needed = sorted(set(rows))
    embedded = _embed(run, _take(run.token_ids, to_device(needed, run.device)))
    return _take(embedded, to_device([needed.index(row) for row in rows], run.device))


def _embed(run: Run, token_ids):
    """The prompts' embeddings by the text encoders that train: through their CUDA graphs where captured
    (a call of other shapes, such as a step's distinct captions, runs eagerly)."""
    if run.prompt_graphs is not None:
        return run.prompt_graphs(token_ids)
    return run.job.family.encode_prompts(run.modules, token_ids)


def _take(value, rows):
    """Rows of a tensor, or of each tensor of a tuple (a family's prompts may be several: SDXL's are
    the embeddings and the pooled embeddings)."""
    if isinstance(value, tuple):
        return tuple(v[rows] for v in value)
    return value[rows]


def _target(run: Run, latents, noise, timesteps):
    prediction_type = run.noise.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return run.noise.get_velocity(latents, noise, timesteps)
    return latents


def _optimizer_step(run: Run, params, losses) -> None:
    """Step the optimizer and the LR schedule, keep the step's losses and report the step. The losses are
    read back (and checked) every `readback_every` steps, so that a step never waits for the device."""
    import torch

    ts, scaler, optimizer = run.settings, run.scaler, run.optimizer
    if scaler:
        scaler.unscale_(optimizer)
    if ts.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, ts.max_grad_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    lr = run.lr_scheduler.get_last_lr()[0]  # the rate this step used
    run.lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.pending.append((losses, lr))
    total = run.job.stop_at or ts.steps
    if run.step % run.readback_every == 0 or run.step == total:
        _read_losses(run)
        if run.rank == 0:
            run.hooks.progress(run.step, total, **run.metrics)
    elif run.rank == 0:
        run.hooks.progress(run.step, total)


def _read_losses(run: Run) -> None:
    """Read the pending steps' losses back (one wait for the device), check them, and add them to the
    history and the TensorBoard logs. A non-finite loss, or latent encoded since, stops the run before any
    checkpoint keeps it."""
    import torch

    if run.latents is not None:
        run.latents.check()
    if not run.pending:
        return
    values = torch.stack([losses for losses, _ in run.pending]).tolist()
    now = time.perf_counter()
    seconds, run.read_at = (now - run.read_at) / len(values), now
    first = run.step - len(values) + 1
    for step, ((instance, prior), (_, lr)) in enumerate(zip(values, run.pending, strict=True), first):
        if not (math.isfinite(instance) and math.isfinite(prior)):
            ts = run.settings
            kept = checkpoints.checkpoint_dirs(run.job.work)
            raise StepError(
                f"{run.job.step_id}: the loss became "
                f"{instance if not math.isfinite(instance) else prior} "
                f"at step {step}; lower learning_rate (now {ts.learning_rate}) or use mixed_precision = "
                "'bf16' or 'no' (a changed setting trains from the start)"
                + (f". {kept[-1][1].name}, the last good checkpoint, is kept" if kept else "")
            )
        run.history["instance"].append(instance)
        run.history["prior"].append(prior)
        run.history.setdefault("lr", []).append(lr)
        run.metrics = {"loss": instance + (run.weight or 0.0) * prior, "lr": lr}
        if run.weight is not None:
            run.metrics["prior_loss"] = prior
        if run.writer is not None and run.rank == 0:
            for tag, value in {**run.metrics, "instance_loss": instance, "step_time_s": seconds}.items():
                run.writer.add_scalar(tag, value, step)
    run.pending.clear()


def _checkpoint_or_stop(run: Run) -> None:
    ts = run.settings
    stop = agree(run.hooks.should_stop(), run.world)
    due = ts.checkpoint_every > 0 and run.step % ts.checkpoint_every == 0 and run.step < ts.steps
    if stop or due:
        _read_losses(run)  # the checkpoint keeps the history, and never a non-finite loss
        checkpoints.save(
            run.job,
            run.step,
            run.trainable,
            run.optimizer,
            run.lr_scheduler,
            run.scaler,
            run.history,
            run.world,
            run.rank,
        )
    if stop:
        raise StepInterrupted(
            f"{run.job.step_id} stopped after step {run.step} of {run.job.stop_at or ts.steps}; it resumes from there"
        )


def _save(run: Run) -> dict:
    summary = outputs.write_adapter(run, run.job.out, run.job.subject, run.job.stop_at)
    if run.world > 1:
        import torch.distributed as dist

        dist.barrier()
    return {
        "loss_first": summary["loss_first"],
        "loss_last": summary["loss_last"],
        "steps": run.step,
        "resumed_from": run.resumed_from,
    }
