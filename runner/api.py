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

torch, diffusers and peft are imported inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from runner.project.schema import BLEND_METHODS, DENSITY_METHODS, EQUAL_RANK_METHODS

COMPONENTS = ("unet", "text_encoder")
SVD_METHODS = tuple(m for m in BLEND_METHODS if m.endswith("svd"))


def load_pipeline(
    base: str, adapters: Mapping[str, str | Path] | None = None, device: str = "auto", dtype=None
):
    """Load a Stable Diffusion pipeline and, optionally, adapters onto it.

    `base` is a hub id, a local diffusers folder, a single-file checkpoint (.safetensors), or "tiny-sd".
    `adapters` maps the names you want to use to adapter paths (see `load_adapter`); they are loaded in
    order and the last one is active, as after diffusers' `load_lora_weights`: pick with `set_adapter`.
    `device` is "auto" (CUDA, then MPS, then CPU), "cuda", "mps" or "cpu". `dtype` is a torch dtype or
    "fp32" / "fp16" / "bf16"; by default fp16 on CUDA and fp32 elsewhere.
    """
    from runner import models

    base_model = models.BaseModel.parse(base, Path.cwd())
    device = models.resolve_device(device)
    pipe = models.load_pipeline(base_model, dtype=_dtype(dtype, device), device=device)
    for name, path in (adapters or {}).items():
        load_adapter(pipe, path, name)
    return pipe


def _dtype(dtype, device: str):
    import torch

    if dtype is None:
        return torch.float16 if device == "cuda" else torch.float32
    if isinstance(dtype, str):
        names = {
            "fp32": torch.float32,
            "float32": torch.float32,
            "fp16": torch.float16,
            "float16": torch.float16,
        }
        names |= {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16")
        return names[dtype]
    return dtype


def resolve_adapter_path(path: str | Path) -> Path:
    """The adapter folder that `path` names.

    Accepted: an adapter folder (holds `unet/adapter_config.json`: dbl's `adapters/<subject>/` and
    `blends/<name>/`, or the output folder of the PEFT DreamBooth script), or `<project file>:<adapter>`
    for a subject or blend that project has built (`projects/pets.toml:dog`).
    """
    text = str(path)
    project_file, sep, name = text.rpartition(":")
    if sep and project_file.endswith(".toml"):
        from runner.project import load_project

        project = load_project(project_file)
        kind = project.adapter_kind(name)
        if kind is None:
            known = sorted([*project.subjects, *project.blends])
            raise ValueError(
                f"{project_file} has no subject or blend {name!r}; it has: {', '.join(known) or 'none'}"
            )
        folder = project.out / ("adapters" if kind == "subject" else "blends") / name
        if not (folder / "unet" / "adapter_config.json").is_file():
            raise ValueError(
                f"{kind} {name!r} of {project_file} is not built yet ({folder}); run `dbl build {project_file}`"
            )
        return folder
    folder = Path(path).expanduser()
    if (folder / "unet" / "adapter_config.json").is_file():
        return folder
    if folder.name in COMPONENTS and (folder / "adapter_config.json").is_file():
        return folder.parent
    raise ValueError(
        f"{path}: not an adapter folder (expected unet/adapter_config.json inside) "
        "nor <project file>:<subject or blend>"
    )


def load_adapter(pipe, path: str | Path, name: str) -> None:
    """Load the adapter at `path` (see `resolve_adapter_path`) into `pipe` as `name`, and activate it.

    The UNet gets its LoRA, and the text encoder too when the adapter has one. Raises ValueError when
    the name is taken, and when any adapter tensor matches no module of the model (an adapter made for
    another base model, or saved under other module names), instead of rendering the base model.
    """
    from runner import adapters

    folder = resolve_adapter_path(path)
    loaded = loaded_adapters(pipe)
    if name in loaded:
        raise ValueError(f"an adapter named {name!r} is already loaded; loaded: {', '.join(loaded)}")
    try:
        adapters.load_adapter_into(pipe, folder, name)
    except adapters.AdapterError as exc:
        # A half-done load must not stay behind: the UNet may have it while the text encoder failed.
        adapters.remove_adapter(pipe, name)
        raise ValueError(str(exc)) from None
    set_adapter(pipe, name)


def loaded_adapters(pipe) -> list[str]:
    """Names of the adapters loaded on the pipeline's UNet, in load order."""
    from peft import PeftModel

    unet = pipe.unet
    return list(unet.peft_config) if isinstance(unet, PeftModel) else []


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


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
    from peft import PeftModel

    names = [name_or_names] if isinstance(name_or_names, str) else list(name_or_names or [])
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"{len(names)} adapters but {len(weights)} weights")
    _check_names(pipe, names)
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if not isinstance(model, PeftModel):
            continue
        present = [n for n in names if n in model.peft_config]
        if not present:
            model.base_model.disable_adapter_layers()
            continue
        model.base_model.enable_adapter_layers()
        model.base_model.set_adapter(present, inference_mode=True)
        for layer in _lora_layers(model):
            for name, weight in zip(names, weights, strict=True):
                layer.set_scale(name, weight * scale)


def _check_names(pipe, names: Sequence[str]) -> None:
    loaded = loaded_adapters(pipe)
    unknown = [n for n in names if n not in loaded]
    if unknown:
        raise ValueError(
            f"no adapter named {', '.join(map(repr, unknown))} is loaded; loaded: {', '.join(loaded) or 'none'}"
        )


def unload_adapter(pipe, name: str) -> None:
    """Remove one adapter from the pipeline; the plain base modules come back when it was the last."""
    from runner import adapters

    adapters.remove_adapter(pipe, name)


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
    import torch
    from peft import PeftModel

    names, values = list(weights), [float(w) for w in weights.values()]
    if not names:
        raise ValueError("blend needs at least one adapter")
    _check_names(pipe, names)
    if name in loaded_adapters(pipe):
        raise ValueError(f"an adapter named {name!r} is already loaded; pick another name or unload it first")
    _check_method(method, density)

    errors = {}
    done = []
    try:
        for component in COMPONENTS:
            model = getattr(pipe, component, None)
            if not isinstance(model, PeftModel):
                continue
            present = [(n, w) for n, w in zip(names, values, strict=True) if n in model.peft_config]
            if not present:
                continue
            _check_ranks(model, component, present, method, svd_rank)
            done.append(model)
            with (
                _fp32_adapters(model, [n for n, _ in present]),
                torch.random.fork_rng(devices=_rng_devices(model)),
            ):
                if seed is not None:
                    torch.manual_seed(seed)
                model.add_weighted_adapter(
                    [n for n, _ in present],
                    [w for _, w in present],
                    name,
                    combination_type=method,
                    svd_rank=svd_rank,
                    svd_clamp=svd_clamp,
                    density=density,
                    majority_sign_method=majority_sign_method,
                )
            if name not in model.peft_config:
                raise ValueError(f"PEFT made no adapter {name!r} on the {component}")
            _fix_blend_scaling(model, name)
            _keep_fp32(model, name, present if method == "cat" and len(present) > 1 else None)
            errors[component] = relative_error(model, name, present)
    except Exception:
        for model in done:
            if name in model.peft_config:
                model.delete_adapter(name)
        raise
    if activate:
        set_adapter(pipe, name)
    return errors


def _check_method(method: str, density: float | None) -> None:
    if method not in BLEND_METHODS:
        raise ValueError(f"unknown blend method {method!r}; methods: {', '.join(BLEND_METHODS)}")
    if method in DENSITY_METHODS and (density is None or not 0 < density <= 1):
        raise ValueError(f"method {method!r} needs density, the fraction of weights kept, in (0, 1]")


def _check_ranks(model, component: str, present, method: str, svd_rank: int | None) -> None:
    ranks = {n: _max_rank(model.peft_config[n]) for n, _ in present}
    if method in EQUAL_RANK_METHODS and len(present) > 1 and len(set(ranks.values())) > 1:
        listed = ", ".join(f"{n} r={r}" for n, r in ranks.items())
        raise ValueError(
            f"method {method!r} needs adapters of one rank, but the {component} has {listed}; use cat or svd"
        )
    if method in SVD_METHODS and len(present) > 1:
        rank = svd_rank or max(ranks.values())
        from peft.tuners.lora import LoraLayer

        smallest = min(
            (min(layer.in_features, layer.out_features), path.removeprefix("base_model.model."))
            for path, layer in model.named_modules()
            if isinstance(layer, LoraLayer) and any(n in layer.lora_A for n, _ in present)
        )
        if rank > smallest[0]:
            raise ValueError(
                f"svd_rank {rank} exceeds the size {smallest[0]} of {component} module {smallest[1]}"
            )


def _max_rank(config) -> int:
    return max([config.r, *(config.rank_pattern or {}).values()])


class _fp32_adapters:
    """Hold the LoRA weights of `names` in fp32 during the combination (SVD has no fp16 kernel, and fp16
    sums lose digits), then put their dtypes back."""

    def __init__(self, model, names):
        self.model, self.names, self.saved = model, names, []

    def __enter__(self):
        import torch

        for layer in _lora_layers(self.model):
            for n in self.names:
                if n in layer.lora_A:
                    for p in (layer.lora_A[n].weight, layer.lora_B[n].weight):
                        self.saved.append((p, p.dtype))
                        p.data = p.data.to(torch.float32)
        return self

    def __exit__(self, *exc):
        for p, dtype in self.saved:
            p.data = p.data.to(dtype)


def _keep_fp32(model, name: str, cat_parents=None) -> None:
    """Hold the new adapter in fp32, like the adapters PeftModel loads.

    PEFT makes the new adapter in the dtype of the base weights, and its `cat` writes the exact result
    into it: on an fp16 pipeline that rounds it (relative error ~3e-4). So a cat blend is redone here
    in fp32 the same way: A stacks weight * scale * A_i, B puts the B_i side by side.
    """
    import torch

    for layer in _lora_layers(model):
        if name not in layer.lora_A:
            continue
        new_a, new_b = layer.lora_A[name].weight, layer.lora_B[name].weight
        if new_a.dtype == torch.float32 and new_b.dtype == torch.float32:
            continue
        if cat_parents is None:
            new_a.data, new_b.data = new_a.data.float(), new_b.data.float()
            continue
        a = torch.zeros(new_a.shape, dtype=torch.float32, device=new_a.device)
        b = torch.zeros(new_b.shape, dtype=torch.float32, device=new_b.device)
        row = 0
        for parent, weight in cat_parents:
            if parent not in layer.lora_A:
                continue
            part_a = layer.lora_A[parent].weight.detach().float()
            rank = part_a.shape[0]
            a[row : row + rank] = part_a * (weight * layer.scaling[parent])
            b[:, row : row + rank] = layer.lora_B[parent].weight.detach().float()
            row += rank
        new_a.data, new_b.data = a, b


def _rng_devices(model) -> list:
    import torch

    device = next(model.parameters()).device
    return [device] if device.type == "cuda" and torch.cuda.is_available() else []


def _fix_blend_scaling(model, name: str) -> None:
    # PEFT gives the blend alpha = r, i.e. a scale of 1, but copies use_rslora from the first adapter,
    # which would scale it by sqrt(r) instead.
    config = model.peft_config[name]
    if not getattr(config, "use_rslora", False):
        return
    config.use_rslora = False
    for layer in _lora_layers(model):
        if name in layer.lora_A:
            layer.use_rslora[name] = False
            layer.scaling[name] = 1.0


def relative_error(model, name: str, parents: Sequence[tuple[str, float]]) -> float:
    """||delta(name) - sum(w * delta(parent))||_F / ||sum(w * delta(parent))||_F over all LoRA layers."""
    import torch

    diff2 = ref2 = 0.0
    for layer in _lora_layers(model):
        if name not in layer.lora_A:
            continue
        target = None
        for parent, weight in parents:
            if parent in layer.lora_A:
                d = weight * _delta(layer, parent)
                target = d if target is None else target + d
        got = _delta(layer, name)
        if target is None:
            target = torch.zeros_like(got)
        diff2 += float((got - target).double().pow(2).sum())
        ref2 += float(target.double().pow(2).sum())
    if ref2 == 0.0:
        return 0.0 if diff2 == 0.0 else math.inf
    return math.sqrt(diff2 / ref2)


def _delta(layer, adapter: str):
    import torch

    a = layer.lora_A[adapter].weight.detach().to(torch.float64)
    b = layer.lora_B[adapter].weight.detach().to(torch.float64)
    delta = b.flatten(1) @ a.flatten(1)
    return layer.scaling[adapter] * delta
