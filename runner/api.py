"""Python API for notebooks: load a base model with dbl's adapters, switch between them, blend them.

    from runner import api

    pipe = api.load_pipeline("CompVis/stable-diffusion-v1-4",
                             {"dog": "build/pets/adapters/dog", "crochet": "projects/pets.toml:crochet"})
    api.set_adapter(pipe, "dog")                      # one adapter, on the UNet and the text encoder
    api.blend(pipe, {"crochet": 1.0, "dog": 1.05}, "crochet_dog")   # exact (method="cat"), now active
    image = pipe("sks dog in the style of <1>", num_inference_steps=50, guidance_scale=7).images[0]

These are the helpers of the PEFT DreamBooth guide (`PeftModel.from_pretrained`, `load_adapter`,
`add_weighted_adapter`, `set_adapter`), made strict: an adapter whose tensors find no module of the
model is an error instead of a silent no-op, an unknown adapter name lists the loaded ones, a blend
whose name exists is refused instead of silently ignored, the new blend is activated, and lossy blends
report their error. Components are wrapped in `peft.PeftModel`, as in the guide.

This is a thin layer over runner.blending. Every input the caller must fix (a name, a path, a weight, a
device, a project file) raises ValueError, as notebook code expects, with a message that says which
and how. torch, diffusers and peft are imported inside the functions.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from runner import blending, families
from runner.blending import _lora_layers, relative_error  # noqa: F401 - part of the API
from runner.errors import DblError
from runner.project import ProjectError
from runner.project.schema import DEVICES

if TYPE_CHECKING:
    import torch


def _value_errors(fn):
    """`fn`, raising ValueError for dbl's errors of input (DblError, ProjectError)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (DblError, ProjectError) as exc:
            raise ValueError(str(exc)) from None

    return wrapper


def _check_pipe(pipe) -> None:
    """`pipe` must be a pipeline with its family's denoiser (not None, which the functions that change
    a pipeline return, nor blend's errors, nor one of its modules)."""
    if getattr(pipe, families.of(pipe).denoiser.attr, None) is not None:
        return
    if pipe is None:
        raise ValueError(
            "pipe is None, not a pipeline: load_adapter, set_adapter and unload_adapter change the "
            "pipeline in place and return nothing; keep the one load_pipeline returned"
        )
    hint = ": blend returns the blend's errors, not the pipeline" if isinstance(pipe, dict) else ""
    raise ValueError(
        f"pipe must be a diffusers pipeline, as load_pipeline returns it; got a {type(pipe).__name__}{hint}"
    )


@_value_errors
def load_pipeline(
    base: str,
    adapters: Mapping[str, str | Path] | None = None,
    device: str | torch.device = "auto",
    dtype=None,
    base_model_config: str | Path | None = None,
):
    """Load a Stable Diffusion pipeline and, optionally, adapters onto it.

    `base` is a hub id, a local diffusers folder, a single-file checkpoint (.safetensors), or a built-in
    model ("tiny-sd", "tiny-sdxl", ...); an SDXL model gives an SDXL pipeline.
    `adapters` maps the names you want to use to adapter paths (see `load_adapter`); they are loaded in
    order and the last one is active, as after diffusers' `load_lora_weights`: pick with `set_adapter`.
    `device` is "auto" (CUDA, then MPS, then CPU), "cuda" (or "cuda:N"), "mps" or "cpu", or one of those
    as a torch.device. `dtype` is a torch dtype or "fp32" / "fp16" / "bf16"; by default fp16 on CUDA and
    fp32 elsewhere. `base_model_config`, for a single-file `base`: a diffusers folder or hub id whose
    configs and tokenizers describe it, as the project file's key of that name.
    """
    import torch

    from runner import models

    if isinstance(device, torch.device):
        device = str(device)  # torch.device("cuda", 1) is "cuda:1"
    if device not in DEVICES and not re.fullmatch(r"cuda:\d+", str(device)):
        raise ValueError(f"unknown device {device!r}; use {', '.join(DEVICES)} or cuda:N")
    if adapters is not None and not isinstance(adapters, Mapping):
        raise ValueError(
            f"adapters maps names to adapter paths, e.g. {{'dog': 'build/pets/adapters/dog'}}; got {adapters!r}"
        )
    if not isinstance(base, (str, os.PathLike)):
        raise ValueError(f"base is a hub id, a built-in model name or a path; got {base!r}")
    is_path = isinstance(base, os.PathLike)  # a Path is local, even where its text reads as owner/name
    base = os.fspath(base)
    if is_path and not models.local_path(base, Path.cwd()).exists():
        raise ValueError(f"no such file or folder: {models.local_path(base, Path.cwd())}")
    config = str(base_model_config) if base_model_config is not None else None
    base_model = models.BaseModel.parse(base, Path.cwd(), config=config)
    if config is not None and base_model.kind != "file":
        from runner.project.base_model import KINDS

        warnings.warn(  # as the project file's key, which is an error there; a call that ran must still run
            f"base_model_config applies to a single-file base only; {base!r} is {KINDS[base_model.kind]}, "
            "which has its own configs: base_model_config is ignored",
            stacklevel=3,  # the caller's line, past _value_errors
        )
    if base_model.kind == "file" and Path(base_model.ref).suffix == ".toml":
        # diffusers would try it as a checkpoint and blame the hub or the file's weights
        raise ValueError(f"{base}: a project file, not a base model; {_base_of_project(base)}")
    if base_model.kind == "folder":
        _refuse_adapter_folder(Path(base_model.ref), base)
    if base_model.kind == "hub" and models.looks_local(str(base)):
        # a path (./models/sd15), not a hub id (owner/name): say so, not what the hub makes of it
        raise ValueError(f"no such file or folder: {models.local_path(str(base), Path.cwd())}")
    device = models.resolve_device(device)
    pipe = models.load_pipeline(base_model, dtype=_dtype(dtype, device), device=device)
    for name, path in (adapters or {}).items():
        load_adapter(pipe, path, name)
    return pipe


def _refuse_adapter_folder(folder: Path, base: str) -> None:
    """An adapter folder (or one of its components) given as the base model: say which base model it
    was trained on, instead of diffusers' "no file named model_index.json"."""
    from runner.adapters import trained_on

    holder = folder if families.is_adapter_folder(folder) else folder.parent
    if not families.is_adapter_folder(holder):
        return
    base_model = trained_on(holder)
    hint = f"give the base model it was trained on ({base_model})" if base_model else "give a base model"
    raise ValueError(f"{base}: an adapter folder, not a base model; {hint}, and {holder} in adapters")


def _base_of_project(project_file: str) -> str:
    """Which base model to give for the project file `project_file`, as much as it can tell."""
    from runner import models
    from runner.project import load_project

    try:
        project = load_project(project_file)
    except ProjectError:
        return "give the base model its [project] base_model names"
    base = models.BaseModel.of(project.settings, Path(project.path).parent)
    return f"give its [project] base_model, {base.display!r}, and its adapters as {project_file}:<name>"


def _dtype(dtype, device: str):
    import torch

    if dtype is None:
        return torch.float16 if device.partition(":")[0] == "cuda" else torch.float32
    if isinstance(dtype, str):
        names = {
            "fp32": torch.float32,
            "float32": torch.float32,
            "fp16": torch.float16,
            "float16": torch.float16,
        }
        names |= {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
        dtype = names.get(dtype, dtype)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):  # diffusers ignores a non-dtype
        raise ValueError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16 (or a floating torch dtype)")
    return dtype


@_value_errors
def resolve_adapter_path(path: str | Path) -> Path:
    """The adapter folder that `path` names.

    Accepted: an adapter folder (holds `unet/adapter_config.json`, or its model family's denoiser
    folder: dbl's `adapters/<subject>/` and
    `blends/<name>/`, or the output folder of the PEFT DreamBooth script), or `<project file>:<adapter>`
    for a subject, blend or snapshot that project has built (`projects/pets.toml:dog`,
    `projects/pets.toml:dog@400`); a stale one is the last build's, with a warning that says why.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"an adapter path is a folder or <project file>:<name>; got {path!r}")
    text = os.fspath(path)
    project_file, sep, name = text.rpartition(":")
    if sep and project_file.endswith(".toml"):
        return _project_adapter(str(Path(project_file).expanduser()), name)  # ~ as in an adapter folder
    folder = Path(path).expanduser()
    if families.is_adapter_folder(folder):
        return folder
    if folder.name in families.component_names() and (folder / "adapter_config.json").is_file():
        return folder.parent
    if folder.is_file() and folder.suffix == ".toml":
        raise ValueError(
            f"{path}: a project file; name one of its adapters, {path}:<subject, blend or snapshot>"
        )
    if folder.is_file():
        # a kohya or diffusers file: the API loads PEFT folders, which dbl writes beside them
        holder = next((p for p in folder.parents[:2] if families.is_adapter_folder(p)), None)
        if holder is not None:
            raise ValueError(f"{path}: a single file; load the adapter folder that holds it, {holder}")
        raise ValueError(
            f"{path}: a single file; the API loads adapter folders (unet/adapter_config.json inside), "
            "as dbl and the PEFT DreamBooth script write them"
        )
    raise ValueError(_not_an_adapter(folder, text))


def _not_an_adapter(folder: Path, path: str) -> str:
    """Why `folder` (written `path`) is no adapter, and the adapters nearest it."""

    def adapters_in(parent: Path) -> list[str]:
        if not parent.is_dir():
            return []
        return sorted(p.name for p in parent.iterdir() if families.is_adapter_folder(p))

    expected = (
        "an adapter folder (unet/adapter_config.json inside) or <project file>:<subject, blend or snapshot>"
    )
    if not folder.exists():
        beside = adapters_in(folder.parent)
        return f"{path}: no such file or folder; give {expected}" + (
            f"; adapters beside it: {', '.join(beside)}" if beside else ""
        )
    inside = adapters_in(folder)
    if inside:
        return f"{path}: a folder of adapters, not one; name one of them: {', '.join(inside)}"
    single = sorted(p.name for p in folder.glob("*.safetensors"))
    if single:
        return (
            f"{path}: holds single files ({', '.join(single)}), not an adapter folder; give {expected}, "
            "or load a single file with diffusers' load_lora_weights"
        )
    return f"{path}: not {expected}"


def _project_adapter(project_file: str, name: str) -> Path:
    """The output folder of adapter `name` (a subject, blend or snapshot) of a built project."""
    from runner import steps
    from runner.project import load_project
    from runner.project.adapter_checks import (
        _adapter_listing,
        _adapter_nouns,
        adapter_tables,
        missing_snapshot,
    )

    project = load_project(project_file)
    producers = [kind for kind in steps.kinds() if kind.produces_adapter]
    kind = next((k for k in producers if name in project.tables.get(k.name, {})), None)
    if kind is None:
        missing = missing_snapshot(name, project.subjects)
        if missing is not None:  # a snapshot no save step gives
            case, subject, step = missing
            train = project.subjects[subject].train
            if case == "zeros":
                raise ValueError(
                    f"{project_file} names that snapshot {subject}@{step}, without leading zeros"
                )
            if case == "base":
                raise ValueError(
                    f"subject {subject!r} of {project_file} keeps snapshots of steps 1 to {train.steps - 1} "
                    f"only; step 0 is the base model"
                )
            if case in ("last", "past"):
                raise ValueError(
                    f"subject {subject!r} of {project_file} trains {train.steps} steps, so it keeps no snapshot "
                    f"at step {step}; its last step's adapter is {subject!r}"
                )
            saved = ", ".join(map(str, train.save_steps or ())) or "none"
            raise ValueError(
                f"subject {subject!r} of {project_file} keeps no snapshot at step {step} (its save_steps: "
                f"{saved}); add {step} to its save_steps and run `dbl build {project_file}`"
            )
        adapters = adapter_tables(project.tables)
        raise ValueError(
            f"{project_file} has no {_adapter_nouns(adapters)} {name!r}; it has {_adapter_listing(adapters)}"
        )
    folder = project.out / kind.output_dir / name
    if not families.is_adapter_folder(folder):
        noun = kind.table.removesuffix("s") or kind.name
        raise ValueError(
            f"{noun} {name!r} of {project_file} is not built yet ({folder}); run `dbl build {project_file}`"
        )
    _warn_if_stale(project, project_file, kind.step_id(name), folder)
    return folder


def _warn_if_stale(project, project_file: str, step_id: str, folder: Path) -> None:
    """Warn when the adapter in `folder` is not what a build of the project makes now (a setting or an
    image changed since, or its files did): it still loads, as the last build left it."""
    from runner.executor import Workspace
    from runner.ui.plain import reason_text

    try:
        _, planned = Workspace(project).plan()
    except DblError as exc:  # a lockfile that does not read: the folder holds some earlier build
        warnings.warn(
            f"cannot tell whether {step_id} is up to date, loading {folder} as it is: {exc}",
            stacklevel=_caller_level(),
        )
        return
    step = next(p for p in planned if p.id == step_id)
    if step.stale:
        warnings.warn(
            f"{step_id} of {project_file} is stale ({reason_text(step)}): loading {folder} as the last "
            f"build left it; `dbl build {project_file}` brings it up to date",
            stacklevel=_caller_level(),
        )


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _caller_level() -> int:
    """The `stacklevel` that makes a warning of the function calling this point at the line that called
    dbl: the first frame outside the package, however many API functions lie between (load_pipeline,
    load_adapter, resolve_adapter_path, each wrapped). Within dbl alone, the function's own caller."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2


@_value_errors
def load_adapter(pipe, path: str | Path, name: str) -> None:
    """Load the adapter at `path` (see `resolve_adapter_path`) into `pipe` as `name`, and activate it.

    The UNet gets its LoRA, and the text encoder too when the adapter has one. Raises ValueError when
    the name is taken, and when any adapter tensor matches no module of the model (an adapter made for
    another base model, or saved under other module names), instead of rendering the base model.
    """
    _check_pipe(pipe)
    folder = resolve_adapter_path(path)
    blending.load(pipe, folder, name)
    set_adapter(pipe, name)


def loaded_adapters(pipe) -> list[str]:
    """Names of the adapters loaded on the pipeline, in load order."""
    _check_pipe(pipe)
    return blending.loaded_adapters(pipe)


@_value_errors
def set_adapter(
    pipe,
    name_or_names: str | Sequence[str] | None,
    weights: Sequence[float] | None = None,
    scale: float = 1.0,
) -> None:
    """Make the named adapter(s) the active ones on the UNet and the text encoder.

    Several names run together, each at its weight (default 1.0); `scale` multiplies them all (the
    `lora_scale` of renders). A component that holds none of the named adapters (an adapter trained
    without text encoder) runs as the base model. `None` or `[]` turns every adapter off.
    """
    _check_pipe(pipe)
    blending.activate_adapters(pipe, name_or_names, weights, scale)


@_value_errors
def unload_adapter(pipe, name: str) -> None:
    """Remove one adapter from the pipeline; the plain base modules come back when it was the last. The
    adapters active with it stay active; where it was the only active one, the pipeline runs as the base
    model until `set_adapter` names another. An unknown name raises ValueError."""
    _check_pipe(pipe)
    blending.unload(pipe, name)


@_value_errors
def blend(
    pipe,
    weights: Mapping[str, float],
    name: str,
    method: str = "cat",
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int | None = 0,
    activate: bool = True,
) -> dict[str, float]:
    """Add adapter `name` = a weighted combination of loaded adapters (PEFT `add_weighted_adapter`).

    `method`: "cat" (exact: the blend's change to every weight is sum(weight * change of each adapter)),
    "svd" and the "*_svd" methods (truncated to `svd_rank`, default the largest rank; `svd_clamp` a
    quantile clamp), "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune" (every adapter of
    the same rank; all but linear need `density`). DARE prunes at random: `seed` makes it repeatable.
    The combination is computed in fp32 whatever the pipeline's dtype.

    The text encoder gets the combination of the adapters that have a text-encoder LoRA, at their
    weights: an adapter without one changes nothing there, so that is also its exact sum.

    Returns the relative error ||blend - sum(w_i * adapter_i)||_F / ||sum(w_i * adapter_i)||_F of the
    weight changes, per component (0 for cat up to float error). The blend is activated unless
    `activate=False`.
    """
    _check_pipe(pipe)
    return blending.blend(
        pipe,
        weights,
        name,
        method,
        svd_rank=svd_rank,
        svd_clamp=svd_clamp,
        density=density,
        majority_sign_method=majority_sign_method,
        seed=seed,
        activate=activate,
    )
