"""Several adapters on one pipeline: load strictly, activate with weights and scale, blend with an error report.

The logic behind the notebook API (runner.api) and the blend and render steps. It raises AdapterError;
the API turns that into ValueError, the steps into their own StepError messages. The components come
from the pipeline's model family. torch and peft are imported inside the functions.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path

from runner import families, pipeline_adapters
from runner.errors import AdapterError
from runner.project.schema import BLEND_METHODS, DENSITY_METHODS, EQUAL_RANK_METHODS, MAJORITY_SIGN_METHODS

SVD_METHODS = tuple(m for m in BLEND_METHODS if m.endswith("svd"))


def loaded_adapters(pipe) -> list[str]:
    """Names of the adapters loaded on the pipeline's denoiser (every adapter has one), in load order."""
    from peft import PeftModel

    denoiser = getattr(pipe, families.of(pipe).denoiser.attr)
    return list(denoiser.peft_config) if isinstance(denoiser, PeftModel) else []


def load(pipe, folder: Path, name: str) -> None:
    """Load the adapter folder `folder` into `pipe` as `name` (not activated). Nothing stays behind
    when it fails (the denoiser may have taken it when another component did not)."""
    check_name(name)
    loaded = loaded_adapters(pipe)
    if name in loaded:
        raise AdapterError(f"an adapter named {name!r} is already loaded; loaded: {', '.join(loaded)}")
    try:
        pipeline_adapters.load_adapter_into(pipe, folder, name)
    except (AdapterError, OSError, ValueError):
        pipeline_adapters.remove_adapter(pipe, name)
        raise


def check_name(name) -> None:
    """An adapter's name becomes a module name: a non-empty string without '.', and no attribute of the
    torch ModuleDict that PEFT keeps each adapter's layers in (torch refuses 'keys', 'training', ...)."""
    import torch

    if not isinstance(name, str) or not name or "." in name:
        raise AdapterError(f"{name!r} cannot name an adapter: give a non-empty string without '.'")
    if hasattr(torch.nn.ModuleDict(), name):
        raise AdapterError(
            f"{name!r} cannot name an adapter: torch keeps adapters in a ModuleDict, which has an attribute "
            f"of that name; give another name (e.g. {name + '_lora'!r})"
        )


def unload(pipe, name: str) -> None:
    """Remove adapter `name` from the pipeline (see pipeline_adapters.remove_adapter); an unknown name is an
    error."""
    _check_names(pipe, [name])
    pipeline_adapters.remove_adapter(pipe, name)


def _finite_weights(weights, what: str, single: bool = False) -> list[float]:
    """`weights` as floats; each must be a finite number. Notebook values count: numpy numbers and arrays,
    torch tensors. `single`: `what` names one number (scale), given here as a list of one."""
    if getattr(weights, "ndim", None) == 1 and hasattr(weights, "tolist"):
        weights = weights.tolist()  # a numpy array or torch tensor of weights
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise AdapterError(f"{what} must be a list of numbers, one per adapter; got {weights!r}")
    values = []
    for w in weights:
        if getattr(w, "ndim", None) == 0 and hasattr(w, "item"):
            w = w.item()  # a 0-d array or tensor
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise AdapterError(
                f"{what} must be {'a finite number' if single else 'finite numbers'}; got {w!r}"
            )
        values.append(float(w))
    return values


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def activate_adapters(
    pipe,
    name_or_names: str | Sequence[str] | None,
    weights: Sequence[float] | None = None,
    scale: float = 1.0,
) -> None:
    """Make the named adapter(s) the active ones on every LoRA component of the pipeline.

    Several names run together, each at its weight (default 1.0); `scale` multiplies them all (the
    `lora_scale` of renders). A component that holds none of the named adapters (an adapter trained
    without text encoder) runs as the base model. `None` or `[]` turns every adapter off.
    """
    from peft import PeftModel

    if name_or_names is not None and not isinstance(name_or_names, (str, Sequence)):
        raise AdapterError(f"name the adapters with a string or a list of strings; got {name_or_names!r}")
    names = [name_or_names] if isinstance(name_or_names, str) else list(name_or_names or [])
    weights = [1.0] * len(names) if weights is None else _finite_weights(weights, "weights")
    (scale,) = _finite_weights([scale], "scale", single=True)
    if len(weights) != len(names):
        raise AdapterError(f"{_count(len(names), 'adapter')} but {_count(len(weights), 'weight')}")
    twice = sorted({n for n in names if names.count(n) > 1}, key=str)
    if twice:
        raise AdapterError(
            f"{', '.join(map(repr, twice))} named twice: give each adapter once, at its weight"
        )
    _check_names(pipe, names)
    for model in pipeline_adapters.lora_modules(pipe).values():
        if not isinstance(model, PeftModel):
            continue
        present = [n for n in names if n in model.peft_config]
        pipeline_adapters.put_trained_values(model, present)  # trained biases act whichever adapter is active
        if not present:
            pipeline_adapters.disable_adapter_layers(model)
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
        nouns = "adapter named" if len(unknown) == 1 else "adapters named"
        raise AdapterError(
            f"no {nouns} {', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} loaded; "
            f"loaded: {', '.join(loaded) or 'none'}"
        )


def _count(n: int, noun: str) -> str:
    """`n` and `noun`, plural unless n is 1: 1 adapter, 2 adapters."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


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
    activate: bool = False,
) -> dict[str, float]:
    """Add adapter `name` = a weighted combination of loaded adapters (PEFT `add_weighted_adapter`);
    the relative error of each component's weight changes against their exact weighted sum.

    `runner.api.blend` documents the methods and options; here bad input raises AdapterError, and the
    blend is activated only when `activate` is true. Every component but the denoiser gets the
    combination of the adapters that have a LoRA there: an adapter without one changes nothing there.
    """
    import torch
    from peft import PeftModel

    if not isinstance(weights, Mapping):
        raise AdapterError(f"weights maps adapter names to weights, e.g. {{'dog': 1.0}}; got {weights!r}")
    names, values = list(weights), _finite_weights(list(weights.values()), "blend weights")
    if not names:
        raise AdapterError("blend needs at least one adapter")
    check_name(name)
    _check_names(pipe, names)
    if name in loaded_adapters(pipe):
        raise AdapterError(
            f"an adapter named {name!r} is already loaded; pick another name or unload it first"
        )
    _check_method(method, density, svd_rank, majority_sign_method, svd_clamp)
    svd_rank = None if svd_rank is None else int(svd_rank)  # a numpy integer too
    _check_no_dora(pipe, names)
    _check_no_bias(pipe, names)

    errors = {}
    done = []
    try:
        for component, model in pipeline_adapters.lora_modules(pipe).items():
            if not isinstance(model, PeftModel):
                continue
            present = [(n, w) for n, w in zip(names, values, strict=True) if n in model.peft_config]
            if not present:
                continue
            _check_ranks(model, component, present, method, svd_rank)
            done.append(model)
            # The parents as trained: set_adapter's weights and scale stay out of the blend.
            with _trained_scales(model, [n for n, _ in present]):
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
                    raise AdapterError(f"PEFT made no adapter {name!r} on the {component}")
                _fix_blend_scaling(model, name)
                _keep_fp32(model, name, present if method == "cat" and len(present) > 1 else None)
                errors[component] = relative_error(model, name, present)
    except Exception:
        for model in done:
            if name in model.peft_config:
                model.delete_adapter(name)
        raise
    if activate:
        activate_adapters(pipe, name)
    return errors


def _check_method(
    method: str, density: float | None, svd_rank=None, majority_sign_method="total", svd_clamp=None
) -> None:
    if method not in BLEND_METHODS:
        raise AdapterError(f"unknown blend method {method!r}; methods: {', '.join(BLEND_METHODS)}")
    if method in DENSITY_METHODS and (density is None or not 0 < density <= 1):
        raise AdapterError(f"method {method!r} needs density, the fraction of weights kept, in (0, 1]")
    # PEFT ignores an option its method does not use; asking for one is a mistake to say (as the project
    # file does).
    if density is not None and method not in DENSITY_METHODS:
        raise AdapterError(
            f"density does not apply to method {method!r}; methods that use it: {', '.join(DENSITY_METHODS)}"
        )
    for option, value in (("svd_rank", svd_rank), ("svd_clamp", svd_clamp)):
        if value is not None and method not in SVD_METHODS:
            raise AdapterError(
                f"{option} applies to svd methods only, not {method!r}; svd methods: {', '.join(SVD_METHODS)}"
            )
    if svd_rank is not None and (
        isinstance(svd_rank, bool) or not isinstance(svd_rank, numbers.Integral) or svd_rank < 1
    ):
        raise AdapterError(f"svd_rank must be a whole number of at least 1, or None; got {svd_rank!r}")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not 0 <= svd_clamp <= 1):
        # a quantile of the singular vectors' entries (torch.quantile fails past 1, in its own words)
        raise AdapterError(f"svd_clamp is a quantile, from 0 to 1, or None; got {svd_clamp!r}")
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise AdapterError(
            f"majority_sign_method {majority_sign_method!r} is not one of {', '.join(MAJORITY_SIGN_METHODS)}"
        )


def _check_no_dora(pipe, names: Sequence[str]) -> None:
    from peft import PeftModel

    dora = [
        n
        for n in names
        for model in pipeline_adapters.lora_modules(pipe).values()
        if isinstance(model, PeftModel) and n in model.peft_config and model.peft_config[n].use_dora
    ]
    if dora:
        raise AdapterError(
            f"{', '.join(dict.fromkeys(dora))}: DoRA adapters cannot be blended; DoRA rescales every weight "
            "row by a trained magnitude, so no blend method gives the weighted sum of their changes"
        )


def _check_no_bias(pipe, names: Sequence[str]) -> None:
    from peft import PeftModel

    trained = [
        f"{n} ({component} bias = {model.peft_config[n].bias!r})"
        for n in names
        for component, model in pipeline_adapters.lora_modules(pipe).items()
        if isinstance(model, PeftModel) and n in model.peft_config and model.peft_config[n].bias != "none"
    ]
    if trained:
        raise AdapterError(
            f"{', '.join(trained)}: adapters trained with biases cannot be blended; a trained bias is no "
            "low-rank delta, and PEFT keeps it in the base model, where a blend would keep it whole or lose it"
        )


def _check_ranks(model, component: str, present, method: str, svd_rank: int | None) -> None:
    ranks = {n: _max_rank(model.peft_config[n]) for n, _ in present}
    if method in EQUAL_RANK_METHODS and len(present) > 1 and len(set(ranks.values())) > 1:
        listed = ", ".join(f"{n} r={r}" for n, r in ranks.items())
        raise AdapterError(
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
            given = "" if svd_rank else " (the default: the largest parent rank)"
            error = AdapterError(
                f"svd_rank {rank}{given} exceeds the size {smallest[0]} of {component} module {smallest[1]}"
            )
            # A blend step names the key's line; left at its default, the key is to be written: no line of
            # its own, and the fix says where.
            error.option, error.unwritten = "svd_rank", not svd_rank
            error.fix = f"{'use' if svd_rank else 'set'} svd_rank = {smallest[0]} or less"
            raise error


def _max_rank(config) -> int:
    return max([config.r, *(config.rank_pattern or {}).values()])


class _trained_scales:
    """Give the LoRA layers of `names` their trained scale (alpha / r) for the block, and put back the
    scales that activating them with weights (`activate_adapters`) had set."""

    def __init__(self, model, names):
        self.model, self.names, self.saved = model, names, []

    def __enter__(self):
        for layer in _lora_layers(self.model):
            for n in self.names:
                if n in layer.scaling:
                    self.saved.append((layer, n, layer.scaling[n]))
                    layer.set_scale(n, 1.0)
        return self

    def __exit__(self, *exc):
        for layer, n, scaling in self.saved:
            layer.scaling[n] = scaling


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
