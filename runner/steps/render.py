"""render:<name> - one prompt batch (prompts x seeds) with a subject, a blend, or the base model.

Outputs: `<prompt index>-<seed>.png` with the A1111 `parameters` text chunk, and `grid.png`
(one row per prompt, one column per seed).

The build's shared pipeline is used as found and left as found: the adapter is loaded under a
name of its own, activated on the UNet and the text encoder, scaled by `lora_scale`, and
unloaded at the end; a swapped scheduler is put back. Every image has its own CPU generator
seeded by its seed, so its pixels do not depend on `batch_size`, on the other images of the
batch, or on the device that made the latents - up to the rounding of batched kernels (about 1e-6
before quantization, so at most one level of 255 at a rare pixel).
"""

from __future__ import annotations

from pathlib import Path

from runner import pnginfo
from runner.errors import AdapterError, StepError, StepInterrupted
from runner.project import checks
from runner.project.schema import Render
from runner.steps import Inputs, StepContext, StepKind, adapter_step, register


def run(ctx: StepContext) -> dict:
    import torch

    from runner import adapters, blending, schedulers

    spec = ctx.spec
    pipe = ctx.models.pipeline()
    prompts = {f"renders.{ctx.name}.prompts[{i}]": prompt for i, prompt in enumerate(spec.prompts)}
    prompts[f"renders.{ctx.name}.negative_prompt"] = spec.negative_prompt
    for warning in ctx.models.family.long_prompts(pipe, prompts):
        ctx.log(warning)
    width, height = _size(pipe, spec, ctx.models.family)
    jobs = [(i, prompt, seed) for i, prompt in enumerate(spec.prompts) for seed in spec.seeds]
    model_name = pnginfo.model_name(ctx.models.base)

    saved_scheduler = pipe.scheduler
    adapter_name = None
    try:
        if spec.scheduler is not None:
            try:
                pipe.scheduler = schedulers.make_scheduler(spec.scheduler, saved_scheduler.config)
            except ValueError as exc:
                raise StepError(f"renders.{ctx.name}.scheduler: {exc}") from exc
        sampler = schedulers.sampler_name(spec.scheduler, pipe.scheduler)

        if spec.adapter != "none":
            folder = _adapter_folder(ctx)
            adapter_name = f"dbl-render-{ctx.name}"
            try:
                blending.load(pipe, folder, adapter_name)
                blending.activate_adapters(pipe, adapter_name, scale=spec.lora_scale)
            except (AdapterError, ValueError, OSError) as exc:
                adapters.remove_adapter(pipe, adapter_name)
                raise StepError(
                    f"renders.{ctx.name}: cannot load adapter {spec.adapter!r} from {folder}: {exc}"
                ) from exc
        lora_field = None if spec.adapter == "none" else f"{spec.adapter}:{spec.lora_scale:g}"

        images = {}
        for start in range(0, len(jobs), spec.batch_size):
            if ctx.should_stop():
                raise StepInterrupted(f"render:{ctx.name} stopped after {len(images)} of {len(jobs)} images")
            batch = jobs[start : start + spec.batch_size]
            generators = [torch.Generator("cpu").manual_seed(seed) for _, _, seed in batch]
            out = pipe(
                prompt=[prompt for _, prompt, _ in batch],
                negative_prompt=[spec.negative_prompt] * len(batch) if spec.negative_prompt else None,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance_scale,
                width=width,
                height=height,
                generator=generators,
            )
            for (index, prompt, seed), image in zip(batch, out.images, strict=True):
                params = pnginfo.parameters_text(
                    prompt,
                    spec.negative_prompt,
                    steps=spec.steps,
                    sampler=sampler,
                    guidance_scale=spec.guidance_scale,
                    seed=seed,
                    width=width,
                    height=height,
                    model=model_name,
                    lora=lora_field,
                )
                pnginfo.save_png(image, ctx.out / f"{index}-{seed}.png", params)
                images[(index, seed)] = image
                ctx.progress(len(images), len(jobs))
    finally:
        pipe.scheduler = saved_scheduler
        if adapter_name is not None:
            adapters.remove_adapter(pipe, adapter_name)

    grid = make_grid([[images[(i, seed)] for seed in spec.seeds] for i in range(len(spec.prompts))])
    pnginfo.save_png(grid, ctx.out / "grid.png")
    ctx.log(f"rendered {len(jobs)} images of {width}x{height} with {sampler}")
    return {"images": len(jobs), "width": width, "height": height, "sampler": sampler}


def _size(pipe, spec, family) -> tuple[int, int]:
    native = family.native_size(pipe)
    width, height = spec.width or native, spec.height or native
    step = pipe.vae_scale_factor
    if width % step or height % step:
        raise StepError(
            f"width and height must be multiples of {step} for this base model (got {width}x{height})"
        )
    return width, height


def _adapter_folder(ctx: StepContext) -> Path:
    name = ctx.spec.adapter
    for step_id in (f"train:{name}", f"blend:{name}"):
        if step_id in ctx.inputs:
            return Path(ctx.inputs[step_id])
    if len(ctx.inputs) == 1:
        return Path(next(iter(ctx.inputs.values())))
    raise StepError(
        f"renders.{ctx.name}: adapter {name!r} has no built outputs (inputs: {', '.join(ctx.inputs) or 'none'})"
    )


def make_grid(rows: list[list]):
    """One image of `rows` (lists of PIL images of one size), left to right, top to bottom."""
    from PIL import Image

    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)))
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * w, y * h))
    return grid


# --- the kind ------------------------------------------------------------------------------------------


def _deps(project, spec) -> list[str]:
    return [] if spec.adapter == "none" else [adapter_step(project, spec.adapter)]


def _inputs(i: Inputs) -> dict:
    spec = i.spec
    inputs = {"version": KIND.version, "base_model": i.base_model()}
    inputs.update(i.fields(spec, exclude=("adapter",)))
    if spec.adapter == "none":
        inputs["adapter"] = "none"
    else:
        inputs["adapter"] = {"_name": spec.adapter, "output": i.output(i.step.deps[0])}
    if i.settings.mixed_precision != "no":  # rendered in that dtype; fp32 ("no") keys as before
        inputs["mixed_precision"] = i.settings.mixed_precision
    return inputs


KIND = register(
    StepKind(
        name="render",
        table="renders",
        spec=Render,
        output_dir="renders",
        version=1,
        run=run,
        inputs=_inputs,
        deps=_deps,
        doc="renders a prompt batch with a subject, a blend or the base model",
        check=checks.check_renders,
    )
)
