"""prior:<name> — the class images of one prior: the user's own, topped up with generated ones.

Outputs, in ctx.out: `0000.<ext>` ... for the user's images (their bytes unchanged, in list_images order),
then `NNNN.png` for generated ones. Image i is generated from its own generator, seeded by the project
seed and i, and the images are drawn in batches of batch_size from the first generated one, so a given
fingerprint always gives the same set (the batch size, which is not in it, changes only rounding). With several
class prompts, image i is generated with prompt i modulo their number, and every image without a
caption of its own gets its prompt as `NNNN.txt`, which the train step reads.
Generated images are first written to the work folder, so an interrupted step keeps what it made (by whole
batches, of the same batch size); after a change of count alone, those of the previous build (ctx.earlier)
in the batches both counts share are kept, and only the rest generated.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from runner import pnginfo
from runner.errors import ImageError, StepError, StepInterrupted
from runner.events import WARNING
from runner.imagefiles import Scan, more_images, said_by_kind, scan, unreadable
from runner.project import checks
from runner.project.problems import Source
from runner.project.schema import Prior
from runner.steps import Inputs, StepKind, register

# The extension of class-image captions in a prior's output folder, whatever the user's files used.
CLASS_CAPTION = ".txt"


def image_seed(seed: int, index: int) -> int:
    """The generator seed of class image `index` (image 0 of seed 0 is not image 0 of seed 1)."""
    from runner.training.data import derive_seed

    return derive_seed(seed, "class-image", index)


def run(ctx) -> dict:
    from runner.training.captions import empty_captions, kept_in, odd_captions, read_caption, unread_files

    spec = ctx.spec
    total = spec.num_images
    found = _given_images(spec, ctx.log)
    files = found.images if found else []
    given = files[:total]
    if len(files) > total:  # the rest are not read: say which are
        ctx.log(f"{len(files)} class images given, using the first {total} by name (num_images = {total})")
    if found:
        key = (Source.of(ctx.project), f"priors.{spec.name}.caption_extension")
        for warning in unread_files(found, given, spec.caption_extension, "its class prompt", key):
            ctx.log(warning)
    missing = total - len(given)
    ctx.out.mkdir(parents=True, exist_ok=True)
    empty, odd, fallback = [], [], f"the class prompt '{spec.prompts[0]}'"
    try:
        for index, path in enumerate(given):
            shutil.copyfile(path, ctx.out / f"{index:04d}{path.suffix.lower()}")
            caption = path.with_suffix(spec.caption_extension) if spec.caption_extension else None
            if caption is not None and caption.is_file():  # beside its copy, as .txt: the train step reads it
                # Read here, so that an unreadable or empty caption is named as the user's file, not its copy.
                read_caption(caption, kept_in(empty, caption), fallback, kept_in(odd, caption))
                shutil.copyfile(caption, ctx.out / f"{index:04d}{CLASS_CAPTION}")
    finally:  # what was found before a caption that fails is still said
        for warning in empty_captions(empty, fallback) + odd_captions(odd):
            ctx.log(warning)
    ctx.progress(len(given), total)
    if missing:
        ctx.log(f"{len(given)} class images given, {missing} to generate")
        _generate(ctx, range(len(given), total))
    if len(spec.prompts) > 1:
        for index in range(total):
            caption = ctx.out / f"{index:04d}{CLASS_CAPTION}"
            if not caption.is_file():
                caption.write_text(spec.prompt_of(index) + "\n", encoding="utf-8")
    metrics = {"generated": missing, "given": len(given)}
    if missing:  # in no fingerprint: the batches the images were drawn in, for the next build to reuse
        metrics["batch_size"] = spec.batch_size
    return metrics


def _given_images(spec, log) -> Scan | None:
    """The folder of the user's class images, None without one; each image used is checked to decode
    (a broken one is an error naming it), and what Pillow warns of it is said in the step's log."""
    if not spec.images:
        return None
    from runner.images import files_named_in_warnings, kept_warnings, load_rgb

    folder = Path(spec.images)
    if not folder.is_dir():
        raise StepError(f"prior:{spec.name}: images folder {folder} does not exist")
    found, said, errors = scan(folder), [], []
    with files_named_in_warnings():
        for path in found.images[: spec.num_images]:
            try:
                load_rgb(path, warn=kept_warnings(said, path))
            except ImageError as exc:  # read on: every broken image is named in one error
                errors.append(str(exc))
    if errors:
        raise ImageError(unreadable(errors))
    for warning in said_by_kind(said, more_images):  # the images that share a warning, in a few lines
        log(WARNING + warning)
    return found


def _generate(ctx, indices: range) -> None:
    from runner.steps.render import drawn_folder

    drawn_with = {"batch_size": ctx.spec.batch_size, "model": pnginfo.model_name(ctx.models.base)}
    done_dir = drawn_folder(ctx.work / "generated", drawn_with)
    # An image's bytes depend on the batch it is drawn in, and batches start at the first generated image:
    # an interrupted run's images are reused by whole batches, so that a batch a kill cut short is drawn
    # again as the uninterrupted run draws it.
    size = ctx.spec.batch_size
    there = _whole_batches(done_dir, indices, size)
    todo = [i for i in indices if i not in there]
    if len(todo) < len(indices):
        ctx.log(f"reusing {len(indices) - len(todo)} class images generated by an interrupted run")
    if ctx.earlier is not None and _drawn_at(ctx) == size:  # only the count changed
        shared = _same_batches(ctx, indices)
        kept = {i for i in todo if i < shared and (ctx.earlier / f"{i:04d}.png").is_file()}
        for i in sorted(kept):
            shutil.copyfile(ctx.earlier / f"{i:04d}.png", done_dir / f"{i:04d}.png")
        if kept:
            ctx.log(f"keeping {len(kept)} class images of the previous build")
        todo = [i for i in todo if i not in kept]
    if todo:
        _draw(ctx, todo, done_dir, finished=len(indices) - len(todo) + indices.start)
    for i in indices:
        shutil.copyfile(done_dir / f"{i:04d}.png", ctx.out / f"{i:04d}.png")


def _whole_batches(folder: Path, indices: range, size: int) -> set[int]:
    """The images of `indices` in `folder` whose whole batch (of `size`, from the first generated image) is
    there: those an interrupted run drew as the uninterrupted one draws them."""
    there = set()
    for start in range(indices.start, indices.stop, size):
        batch = range(start, min(start + size, indices.stop))
        if all((folder / f"{i:04d}.png").is_file() for i in batch):
            there.update(batch)
    return there


def _resumable(work: Path, spec: Prior, project) -> str | None:
    """How many class images an interrupted run generated that the next one keeps (see `_generate`)."""
    from runner.steps.render import drawn_as_now

    folder = work / "generated"
    if not drawn_as_now(folder, {"batch_size": spec.batch_size}, project):
        return None
    if spec.images and not Path(spec.images).is_dir():
        return None
    given = min(len(scan(Path(spec.images)).images), spec.num_images) if spec.images else 0
    kept = len(_whole_batches(folder, range(given, spec.num_images), spec.batch_size))
    return (
        f"keeps {kept} of {spec.num_images - given} class images an interrupted run generated"
        if kept
        else None
    )


def _drawn_at(ctx) -> int | None:
    """The batch size the previous build drew its images at (in its record's metrics; None in one by a
    version that did not record it): only at this build's are they the bytes it would draw."""
    return ((ctx.earlier_record or {}).get("metrics") or {}).get("batch_size")


def _same_batches(ctx, indices: range) -> int:
    """Where the generated images of the previous build stop being those of this count. Image i has its own
    seed, but the batch it is drawn in changes its rounding: only full batches that both counts share are
    the same bytes (batches start at the first generated image; the last one is cut short by the count)."""
    size = ctx.spec.batch_size
    generated = [p for p in ctx.earlier.glob("*.png") if p.stem.isdigit() and int(p.stem) >= indices.start]
    shared = min(len(generated), len(indices))
    return indices.start + shared // size * size


def _missing(spec, device, source: Source) -> str | None:
    from runner.schedulers import missing

    found = missing(spec.scheduler)
    return source.problem(f"priors.{spec.name}.scheduler", *found) if found else None


def _draw(ctx, todo: list[int], done_dir: Path, finished: int) -> None:
    """Generate class images `todo` into `done_dir`, `finished` of the prior's images being there."""
    import torch

    from runner.schedulers import make_scheduler, sampler_name, too_many_steps
    from runner.steps.render import image_size

    spec, seed = ctx.spec, ctx.project.settings.seed
    pipe = ctx.models.pipeline()
    prompts = spec.prompt_keys()
    prompts[f"priors.{spec.name}.negative_prompt"] = spec.negative_prompt
    source = Source.of(ctx.project)
    for warning in ctx.models.family.long_prompts(pipe, prompts, source):
        ctx.log(warning)
    own_scheduler = pipe.scheduler
    try:
        if spec.scheduler:
            try:
                pipe.scheduler = make_scheduler(spec.scheduler, own_scheduler.config)
            except ValueError as exc:
                raise StepError(source.problem(f"priors.{spec.name}.scheduler", str(exc))) from None
        sampler = sampler_name(spec.scheduler, pipe.scheduler)
        if found := too_many_steps(pipe.scheduler, spec.steps):
            raise StepError(source.problem(f"priors.{spec.name}.steps", *found))
        image_size(pipe, spec, ctx.models.family, source, f"priors.{spec.name}")  # before the first image
        ctx.progress(finished, spec.num_images)
        for start in range(0, len(todo), spec.batch_size):
            if ctx.should_stop():
                raise StepInterrupted(
                    f"prior:{spec.name} stopped after {finished} of {spec.num_images} images; the next build "
                    "keeps them and draws the rest"
                )
            batch = todo[start : start + spec.batch_size]
            generators = [torch.Generator("cpu").manual_seed(image_seed(seed, i)) for i in batch]
            with torch.inference_mode():
                result = pipe(
                    prompt=[spec.prompt_of(i) for i in batch],
                    negative_prompt=[spec.negative_prompt] * len(batch) if spec.negative_prompt else None,
                    num_inference_steps=spec.steps,
                    guidance_scale=spec.guidance_scale,
                    width=spec.width,
                    height=spec.height,
                    generator=generators,
                    output_type="pil",
                )
            for i, image in zip(batch, result.images, strict=True):
                params = pnginfo.parameters_text(
                    spec.prompt_of(i),
                    spec.negative_prompt,
                    steps=spec.steps,
                    sampler=sampler,
                    guidance_scale=spec.guidance_scale,
                    seed=image_seed(seed, i),
                    width=image.width,
                    height=image.height,
                    model=pnginfo.model_name(ctx.models.base),
                )
                # Class images are training inputs read once: fast compression beats small files.
                pnginfo.save_png(image, done_dir / f"{i:04d}.png", params, compress_level=1)
                finished += 1
            ctx.progress(finished, spec.num_images)  # once a batch: its images are drawn together
    finally:
        pipe.scheduler = own_scheduler


# --- the kind ------------------------------------------------------------------------------------------


def _inputs(i: Inputs) -> dict:
    spec = i.spec
    inputs = {"version": KIND.version, "base_model": i.base_model(), "seed": i.settings.seed}
    # The loss weight belongs to the train steps that use the prior, not to the images.
    inputs.update(i.fields(spec, exclude=("images", "loss_weight", "caption_extension")))
    if spec.images:
        inputs["images"] = i.images(spec.images)
        # Only when caption files exist: a prior without them keeps its fingerprint.
        captions = i.captions(spec.images, spec.caption_extension) if spec.caption_extension else {}
        if captions:
            inputs["captions"] = {**captions, "extension": spec.caption_extension}
    if i.settings.mixed_precision != "no":  # generated in that dtype; fp32 ("no") keys as before
        inputs["mixed_precision"] = i.settings.mixed_precision
    return inputs


def _reuses(previous: dict, inputs: dict) -> bool:
    """Whether the previous build's class images are this one's: only the count changed (image i is
    generated from its own seed, so images 0..n-1 of a larger count are those of count n)."""
    from runner.fingerprint import fingerprint

    return fingerprint({**previous, "num_images": 0}) == fingerprint({**inputs, "num_images": 0})


KIND = register(
    StepKind(
        name="prior",
        writes_images=True,
        table="priors",
        spec=Prior,
        output_dir="priors",
        version=1,
        run=run,
        inputs=_inputs,
        doc="generates the missing class images of a `[priors.<name>]`",
        read=checks.read_prior,
        check=checks.check_priors,
        folders=lambda spec: [spec.images] if spec.images else [],
        decodes=lambda project, spec: [(spec.images, spec.num_images)] if spec.images else [],
        missing=_missing,
        reuses=_reuses,
        resumable=_resumable,
    )
)
