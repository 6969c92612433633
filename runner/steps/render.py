"""render:<name> - one prompt batch (prompts x seeds) with a subject, a blend, or the base model; or
with several of them side by side (`adapters`).

Outputs: `<prompt index>-<seed>.png` with the A1111 `parameters` text chunk, and `grid.png`
(one row per prompt, one column per seed). With `adapters`, each adapter's images go to a folder
named after it, `<adapter>/<prompt index>-<seed>.png`, and `grid.png` has one column per adapter,
named in a strip above it, and one row per prompt and seed.

The build's shared pipeline is used as found and left as found: each adapter in turn is loaded
under a name of its own, activated on the UNet and the text encoder, scaled by `lora_scale`, and
unloaded before the next; a swapped scheduler is put back. Every image has its own CPU generator
seeded by its seed, so its pixels do not depend on `batch_size`, on the other images of the
batch, or on the device that made the latents - up to the rounding of batched kernels (about 1e-6
before quantization, so at most one level of 255 at a rare pixel).

After a change of its prompts or seeds alone, the images of the previous build (ctx.earlier) that were drawn
in a batch this build draws again, the same prompts and seeds in the same order at the same batch size, are
kept rather than drawn: they are the bytes drawing them would give. Editing one prompt of a batch of many
redraws that prompt's images (and those of the batches it shares), not the whole batch. With `adapters`,
this holds column by column: after an adapter is added, removed or retrained, the images of each adapter
the previous build rendered with too (the same name and outputs) are kept as well.

Images are drawn into the work folder first (`drawn/`, kept across attempts of one fingerprint), so a render
interrupted or killed resumes: the next attempt keeps the batches it finished and draws the rest, by whole
batches, as an uninterrupted render draws them.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from runner import pnginfo
from runner.errors import AdapterError, StepError, StepInterrupted
from runner.project import adapter_checks
from runner.project.problems import Source
from runner.project.schema import Render
from runner.steps import Inputs, StepContext, StepKind, adapter_step, kinds, register


def run(ctx: StepContext) -> dict:
    import torch

    from runner import schedulers

    spec = ctx.spec
    pipe = ctx.models.pipeline()
    prompts = {f"renders.{ctx.name}.prompts[{i}]": prompt for i, prompt in enumerate(spec.prompts)}
    prompts[f"renders.{ctx.name}.negative_prompt"] = spec.negative_prompt
    for warning in ctx.models.family.long_prompts(pipe, prompts, Source.of(ctx.project)):
        ctx.log(warning)
    source = Source.of(ctx.project)
    width, height = image_size(pipe, spec, ctx.models.family, source, f"renders.{ctx.name}")
    model_name = pnginfo.model_name(ctx.models.base)
    names = spec.adapter_names
    several = spec.adapters is not None  # one subfolder and one grid column per adapter
    batches = _batches(spec.prompts, spec.seeds, spec.batch_size)
    total = len(spec.prompts) * len(spec.seeds) * len(names)

    saved_scheduler = pipe.scheduler
    images = {}  # (adapter, prompt index, seed) -> image
    # First the images an interrupted attempt drew and those of the previous build that serve this one, so
    # that the display's rate is that of the images drawn.
    drawn = drawn_folder(
        ctx.work / "drawn", {"batch_size": spec.batch_size, "adapters": names, "model": model_name}
    )
    resumed = _resume(ctx, batches, names, drawn, images)
    reused = _keep_drawn(ctx, batches, names, images)
    try:
        if spec.scheduler is not None:
            try:
                pipe.scheduler = schedulers.make_scheduler(spec.scheduler, saved_scheduler.config)
            except ValueError as exc:
                raise StepError(source.problem(f"renders.{ctx.name}.scheduler", str(exc))) from exc
        sampler = schedulers.sampler_name(spec.scheduler, pipe.scheduler)
        if found := schedulers.too_many_steps(pipe.scheduler, spec.steps):
            raise StepError(source.problem(f"renders.{ctx.name}.steps", *found))

        # Progress at the start, then once a batch: a batch's images are drawn together, and said one by one
        # they made the display's rate that of one image per batch, then of a burst.
        done = resumed + reused  # images, as `total` counts them: a seed listed twice, twice
        ctx.progress(done, total)
        for column, adapter in enumerate(names):
            todo = [
                batch for batch in batches if any((adapter, i, seed) not in images for i, _, seed in batch)
            ]
            if not todo:  # every image kept: no need to load the adapter
                continue
            folder, first = _column(ctx.out, adapter, spec), _column(drawn, adapter, spec)
            folder.mkdir(exist_ok=True)
            first.mkdir(exist_ok=True)
            # One adapter at a time, removed before the next is loaded: the pipeline is left as found.
            with _adapter_loaded(
                ctx, pipe, adapter, f"dbl-render-{ctx.name}" + (f"-{column}" if several else "")
            ):
                lora_field = None if adapter == "none" else f"{adapter}:{pnginfo.number(spec.lora_scale)}"
                for batch in todo:
                    if ctx.should_stop():
                        raise StepInterrupted(
                            f"render:{ctx.name} stopped after {done} of {total} images; the next build keeps "
                            "them and draws the rest"
                        )
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
                        pnginfo.save_png(image, first / f"{index}-{seed}.png", params)
                        shutil.copyfile(first / f"{index}-{seed}.png", folder / f"{index}-{seed}.png")
                        images[(adapter, index, seed)] = image
                    done += len(batch)
                    ctx.progress(done, total)
    finally:
        pipe.scheduler = saved_scheduler

    if several:  # a row per prompt and seed, a column per adapter, named above it
        rows = [
            [images[(a, i, seed)] for a in names] for i in range(len(spec.prompts)) for seed in spec.seeds
        ]
        grid = make_grid(rows, labels=names)
    else:  # a row per prompt, a column per seed
        grid = make_grid(
            [[images[(names[0], i, seed)] for seed in spec.seeds] for i in range(len(spec.prompts))]
        )
    pnginfo.save_png(grid, ctx.out / "grid.png")
    if resumed:
        ctx.log(f"reusing {resumed} images drawn by an interrupted run")
    if reused:
        ctx.log(f"kept {reused} images of the previous build, drawn in the same batches")
    if resumed + reused < total:
        ctx.log(f"rendered {total - resumed - reused} images of {width}x{height} with {sampler}")
    # batch_size, in no fingerprint: the batches the images were drawn in, for the next build to reuse
    return {
        "images": total,
        "width": width,
        "height": height,
        "sampler": sampler,
        "batch_size": spec.batch_size,
    }


# In a folder of drawn images: what they were drawn with, of what no fingerprint holds (see `drawn_folder`).
DRAWN_WITH = "drawn-with.json"


def drawn_folder(folder: Path, drawn_with: dict) -> Path:
    """`folder`, into which a step draws its images before it copies them out: in its work folder, kept across
    the attempts of one fingerprint, so that an interrupted step resumes. Emptied where the images in it were
    drawn with other `drawn_with` settings, which are in no fingerprint but in the images' bytes: the batch
    size (an image's rounding depends on its batch), the names of the base model and adapters (in their
    parameters and folders)."""
    if _drawn_with(folder) != drawn_with:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / DRAWN_WITH).write_text(json.dumps(drawn_with))
    return folder


def _drawn_with(folder: Path):
    """What the images in `folder` were drawn with (see `drawn_folder`), or None where it does not say."""
    try:
        return json.loads((folder / DRAWN_WITH).read_text())
    except (OSError, ValueError):
        return None


def _resume(ctx: StepContext, batches: list[list[tuple]], names: list[str], drawn: Path, images: dict) -> int:
    """Copy into ctx.out the images an interrupted attempt drew into `drawn`, by whole batches (a batch a kill
    cut short is drawn again, as the uninterrupted render draws it), and add them to `images`; how many."""
    resumed = 0
    for adapter in names:
        source = _column(drawn, adapter, ctx.spec)
        for batch in _whole(source, batches):
            sources = [source / f"{index}-{seed}.png" for index, _, seed in batch]
            if _copy_batch(batch, sources, _column(ctx.out, adapter, ctx.spec), adapter, images):
                resumed += len(batch)
    return resumed


def _keep_drawn(ctx: StepContext, batches: list[list[tuple]], names: list[str], images: dict) -> int:
    """Copy into ctx.out the previous build's images of the `batches` (of (prompt index, prompt, seed)) it
    drew the same way, for each adapter of `names`, and add them to `images` (those not there yet); how
    many."""
    drawn = _drawn_before(ctx)
    if not drawn:
        return 0
    if ctx.spec.adapters is not None:  # the columns of the adapters the previous build rendered with too
        same = _same_adapters(ctx.earlier_record["inputs"], ctx.fingerprint_inputs or {})
        names = [a for a in names if a in same]
    kept = 0
    for adapter in names:
        earlier = _column(ctx.earlier, adapter, ctx.spec)
        for batch in _drawn_once(batches):
            before = drawn.get(tuple((prompt, seed) for _, prompt, seed in batch))
            if before is None or all((adapter, index, seed) in images for index, _, seed in batch):
                continue
            sources = [earlier / f"{was}-{seed}.png" for was, seed in before]
            if _copy_batch(batch, sources, _column(ctx.out, adapter, ctx.spec), adapter, images):
                kept += len(batch)
    return kept


def _copy_batch(batch: list[tuple], sources: list[Path], folder: Path, adapter: str, images: dict) -> bool:
    """Copy the images of `batch` (for `adapter`) from `sources` into `folder`, and add them to `images` as
    read from the copies; False, with none of them added, where one cannot be copied or read (removed or
    replaced since the build checked it): the batch is drawn."""
    folder.mkdir(exist_ok=True)
    try:
        for (index, _, seed), source in zip(batch, sources, strict=True):
            path = folder / f"{index}-{seed}.png"
            shutil.copyfile(source, path)
            images[(adapter, index, seed)] = _opened(path)
    except OSError:
        for index, _, seed in batch:
            images.pop((adapter, index, seed), None)
        return False
    return True


def _column(root: Path, adapter: str, spec: Render) -> Path:
    """Where `adapter`'s images are under `root`: a folder of its own with `adapters`, else `root` itself."""
    return root / adapter if spec.adapters is not None else root


def _whole(folder: Path, batches: list[list[tuple]]) -> list[list[tuple]]:
    """The batches drawn once (`_drawn_once`) whose every image is in `folder`."""
    return [
        batch
        for batch in _drawn_once(batches)
        if all((folder / f"{index}-{seed}.png").is_file() for index, _, seed in batch)
    ]


def _drawn_before(ctx: StepContext) -> dict[tuple, list[tuple[int, int]]]:
    """The batches the previous build drew, when its images serve this build (`_reuses`, and the same batch
    size: an image's rounding depends on its batch): (prompt, seed) of each image of a batch, in order ->
    the (prompt index, seed) of the files it left."""
    record = ctx.earlier_record or {}
    if ctx.earlier is None or record.get("metrics", {}).get("batch_size") != ctx.spec.batch_size:
        return {}
    before = record.get("inputs", {})
    drawn = {}
    for batch in _drawn_once(
        _batches(before.get("prompts", []), before.get("seeds", []), ctx.spec.batch_size)
    ):
        drawn.setdefault(
            tuple((prompt, seed) for _, prompt, seed in batch), [(i, seed) for i, _, seed in batch]
        )
    return drawn


def _batches(prompts: list[str], seeds: list[int], size: int) -> list[list[tuple[int, str, int]]]:
    """The images of `prompts` x `seeds`, (prompt index, prompt, seed), in the batches of `size` they are
    drawn in, every seed of the first prompt first."""
    jobs = [(i, prompt, seed) for i, prompt in enumerate(prompts) for seed in seeds]
    return [jobs[start : start + size] for start in range(0, len(jobs), size)]


def _drawn_once(batches: list[list[tuple[int, str, int]]]) -> list[list[tuple[int, str, int]]]:
    """The batches none of whose images another batch draws too. With a seed listed twice, two batches may
    draw the same image into the same file, the last one's bytes staying: such a file does not say which
    batch drew it, so those batches are drawn again rather than kept."""
    batch_of: dict[tuple[int, int], set[int]] = {}
    for b, batch in enumerate(batches):
        for index, _, seed in batch:
            batch_of.setdefault((index, seed), set()).add(b)
    return [
        batch for b, batch in enumerate(batches) if all(batch_of[(i, seed)] == {b} for i, _, seed in batch)
    ]


def _opened(path: Path):
    """The image of a PNG this step wrote, read whole (the file may be replaced before the grid is made)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


@contextlib.contextmanager
def _adapter_loaded(ctx: StepContext, pipe, adapter: str, name: str):
    """Adapter `adapter` loaded into `pipe` as `name` and active at the render's scale, for the block;
    removed after it, whatever happens. 'none' loads nothing."""
    from runner import blending, pipeline_adapters

    if adapter == "none":
        yield
        return
    folder = _adapter_folder(ctx, adapter)
    try:
        blending.load(pipe, folder, name)
        blending.activate_adapters(pipe, name, scale=ctx.spec.lora_scale)
    except (AdapterError, ValueError, OSError) as exc:
        pipeline_adapters.remove_adapter(pipe, name)
        raise StepError(
            Source.of(ctx.project).problem(
                f"renders.{ctx.name}",
                f"cannot load adapter {adapter!r} from {folder}: {exc}",
                at=f"renders.{ctx.name}.{'adapter' if ctx.spec.adapters is None else 'adapters'}",
            )
        ) from exc
    try:
        yield
    finally:
        pipeline_adapters.remove_adapter(pipe, name)


def image_size(pipe, spec, family, source: Source, key: str) -> tuple[int, int]:
    """The width and height of the images of `spec` (a render's or a prior's table, at `key`); an error at
    the line of the side that is wrong where the base model's VAE cannot draw them."""
    native = family.native_size(pipe)
    width, height = spec.width or native, spec.height or native
    step = pipe.vae_scale_factor
    if width % step or height % step:
        side = "width" if spec.width and width % step else "height" if spec.height and height % step else None
        near = [f"{max(step, n // step * step)}" for n in (width, height)]
        raise StepError(
            source.problem(
                key,
                f"width and height must be multiples of {step} for this base model (got {width}x{height})",
                f"use width = {near[0]} and height = {near[1]}, say",
                at=f"{key}.{side}" if side else None,
            )
        )
    return width, height


def _adapter_folder(ctx: StepContext, name: str) -> Path:
    """The built outputs of adapter `name`: those of the step that produces it."""
    candidates = [kind.step_id(name) for kind in kinds() if kind.produces_adapter]
    with contextlib.suppress(KeyError, AttributeError):  # a hand-made context's project may hold no tables
        candidates.insert(0, adapter_step(ctx.project, name))
    for step_id in candidates:
        if step_id in ctx.inputs:
            return Path(ctx.inputs[step_id])
    if len(ctx.inputs) == 1 and ctx.spec.adapters is None:
        return Path(next(iter(ctx.inputs.values())))
    raise StepError(
        f"renders.{ctx.name}: adapter {name!r} has no built outputs (inputs: {', '.join(ctx.inputs) or 'none'})"
    )


def make_grid(rows: list[list], labels: list[str] | None = None):
    """One image of `rows` (lists of PIL images of one size), left to right, top to bottom; with
    `labels`, a strip above them names each column."""
    from PIL import Image

    w, h = rows[0][0].size
    columns = max(len(r) for r in rows)
    strip = _label_strip(labels, w) if labels else None
    top = strip.height if strip else 0
    grid = Image.new("RGB", (w * columns, top + h * len(rows)))
    if strip:
        grid.paste(strip, (0, 0))
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * w, top + y * h))
    return grid


def _label_strip(labels: list[str], width: int):
    """White names on black, one per column of `width` pixels, in Pillow's built-in bitmap font (the same
    pixels on every machine), scaled up by whole pixels for large images. A name wider than its column
    keeps its start and its end around "...", which is where names that differ differ
    (dog_blend_strong, dog_blend_stronger)."""
    from PIL import Image, ImageDraw, ImageFont

    font = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()
    scale, pad = max(1, width // 256), 2
    small = -(-width // scale)  # a column's width before scaling, rounded up
    labels = [_fitted(label, font, small - 2 * pad) for label in labels]
    height = max(font.getbbox(label)[3] for label in labels) + 2 * pad
    strip = Image.new("RGB", (width * len(labels), height * scale))
    for x, label in enumerate(labels):
        cell = Image.new("RGB", (small, height))
        ImageDraw.Draw(cell).text((pad, pad), label, fill=(255, 255, 255), font=font)
        cell = cell.resize((small * scale, height * scale), Image.NEAREST)
        strip.paste(cell.crop((0, 0, width, height * scale)), (x * width, 0))
    return strip


def _fitted(label: str, font, room: int) -> str:
    """`label` where it is at most `room` pixels wide in `font`, else its first and last characters around
    "...", as many as fit (the start one more than the end where they are odd)."""
    if font.getlength(label) <= room:
        return label

    def cut(keep: int) -> str:
        head = -(-keep // 2)
        return label[:head] + "..." + label[len(label) - (keep - head) :]

    keep = len(label) - 1
    while keep > 0 and font.getlength(cut(keep)) > room:
        keep -= 1
    return cut(keep)


# --- the kind ------------------------------------------------------------------------------------------


def _missing(spec, device, source: Source) -> str | None:
    from runner.schedulers import missing

    found = missing(spec.scheduler)
    return source.problem(f"renders.{spec.name}.scheduler", *found) if found else None


def _check(check, tables: dict) -> None:
    adapter_checks.check_renders(check, tables)
    for name, spec in tables.get("render", {}).items():
        # said as the file loads, not when the step runs: the user can fix it before the build begins
        repeated = sorted({seed for seed in spec.seeds if spec.seeds.count(seed) > 1})
        if repeated:
            check.note(
                ("renders", name, "seeds"),
                f"repeats {', '.join(map(str, repeated))}: the same images are rendered again, into the "
                "same files",
                "list each seed once",
            )
        if -1 in spec.seeds:  # other tools' "a random seed": here a seed like any other
            check.note(
                ("renders", name, "seeds"),
                "-1 is a seed like any other here, not a random one: it renders the same image at every "
                "build",
                "give the seeds to render (a build is reproducible); add seeds to see more images",
            )


def _deps(project, spec) -> list[str]:
    return [adapter_step(project, name) for name in spec.adapter_names if name != "none"]


def _inputs(i: Inputs) -> dict:
    spec = i.spec
    inputs = {"version": KIND.version, "base_model": i.base_model()}
    inputs.update(i.fields(spec, exclude=("adapter", "adapters")))
    if spec.adapters is not None:  # in column order; 'none' as an output of its own
        inputs["adapters"] = [
            {"_name": name, "output": "none" if name == "none" else i.output(adapter_step(i.project, name))}
            for name in spec.adapters
        ]
    elif spec.adapter == "none":
        inputs["adapter"] = "none"
    else:
        inputs["adapter"] = {"_name": spec.adapter, "output": i.output(i.step.deps[0])}
    if i.settings.mixed_precision != "no":  # rendered in that dtype; fp32 ("no") keys as before
        inputs["mixed_precision"] = i.settings.mixed_precision
    return inputs


def drawn_as_now(folder: Path, drawn_with: dict, project) -> bool:
    """Whether the images in `folder` were drawn with `drawn_with` (see `drawn_folder`) and the name the
    project's base model has now: those the step's next run keeps."""
    from runner.models import BaseModel

    model = pnginfo.model_name(BaseModel.of(project.settings, project.dir))
    return _drawn_with(folder) == {**drawn_with, "model": model}


def _resumable(work: Path, spec: Render, project) -> str | None:
    """How many images an interrupted run drew that the next one keeps: whole batches of this batch size, for
    the adapters it renders with (see `drawn_folder`)."""
    drawn = work / "drawn"
    names = spec.adapter_names
    if not drawn_as_now(drawn, {"batch_size": spec.batch_size, "adapters": names}, project):
        return None
    batches = _batches(spec.prompts, spec.seeds, spec.batch_size)
    kept = sum(len(batch) for adapter in names for batch in _whole(_column(drawn, adapter, spec), batches))
    total = len(spec.prompts) * len(spec.seeds) * len(names)
    return f"keeps {kept} of {total} images an interrupted run drew" if kept else None


def _reuses(previous: dict, inputs: dict) -> bool:
    """Whether the previous build's images can serve this one: only the prompts or the seeds changed (not
    the adapter's name either, which its images carry); with `adapters`, also which adapters it renders
    with, where one of them is the same adapter (its name and its outputs: `_same_adapters`). The base
    model's images (`none`) do not depend on `lora_scale`: they serve across a change of it."""
    from runner.fingerprint import fingerprint

    def rest(i: dict) -> str:
        kept = {**i, "prompts": [], "seeds": [], "lora_scale": None}
        if isinstance(kept.get("adapters"), list):
            kept["adapters"] = []  # compared adapter by adapter
        return fingerprint(kept)

    if rest(previous) != rest(inputs):
        return False
    if isinstance(inputs.get("adapters"), list):
        return bool(_same_adapters(previous, inputs))
    if _unhashed(previous) != _unhashed(inputs):
        return False
    return _scaled_alike(previous, inputs) or inputs.get("adapter") == "none"


def _same_adapters(previous: dict, inputs: dict) -> set[str]:
    """The adapters of `adapters` that both inputs render with, by the same name and from the same outputs:
    each adapter's images depend on it alone, not on the other columns of the grid; after a change of
    `lora_scale`, `none` alone (no adapter scales the base model's images)."""

    def named(i: dict) -> set[tuple]:
        listed = i.get("adapters")
        if not isinstance(listed, list):
            return set()
        return {(a.get("_name"), a.get("output")) for a in listed if isinstance(a, dict)}

    same = {name for name, _ in named(previous) & named(inputs)}
    return same if _scaled_alike(previous, inputs) else same & {"none"}


def _scaled_alike(previous: dict, inputs: dict) -> bool:
    return previous.get("lora_scale") == inputs.get("lora_scale")


def _unhashed(inputs: dict) -> dict:
    """The adapter names a render's outputs carry: in each image's Lora field, and with `adapters`, as the
    folders of their images and the labels of the grid's columns."""
    if isinstance(inputs.get("adapters"), list):
        return {"adapters": [a.get("_name") if isinstance(a, dict) else None for a in inputs["adapters"]]}
    adapter = inputs.get("adapter")
    return {"adapter": adapter.get("_name") if isinstance(adapter, dict) else adapter}


KIND = register(
    StepKind(
        name="render",
        writes_images=True,
        table="renders",
        spec=Render,
        output_dir="renders",
        version=1,
        run=run,
        inputs=_inputs,
        deps=_deps,
        doc="renders a prompt batch with a subject, a blend or the base model, or with several side by side",
        check=_check,
        unhashed=_unhashed,
        missing=_missing,
        reuses=_reuses,
        resumable=_resumable,
    )
)
