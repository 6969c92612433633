"""LoRA adapters on disk: one folder, three formats, and loading them back into a pipeline.

An adapter folder (``adapters/<subject>/`` or ``blends/<name>/``) holds:

    <component>/                       PEFT layout (adapter_config.json + adapter_model.safetensors) per
                                       LoRA component of the model family (sd1: unet/, text_encoder/),
                                       what ``PeftModel.from_pretrained(pipe.unet, folder / <component>)`` reads
    pytorch_lora_weights.safetensors   diffusers layout (``pipe.load_lora_weights``), with the LoRA config
                                       in the file's metadata so that alpha != r loads at the right strength
    <folder name>.safetensors          kohya layout (A1111, ComfyUI, Forge)
    dbl.json                           provenance and metrics

Every file is written byte-for-byte deterministically: same weights and info, same bytes (the
safetensors files by runner.safetensors_io).

Which components there are, their kohya names and metadata, come from the model family
(runner.families). torch, peft and safetensors are imported inside functions.
"""

from __future__ import annotations

import enum
import json
import math
import warnings
from pathlib import Path

from runner import families
from runner.errors import AdapterError
from runner.safetensors_io import read_safetensors, write_safetensors

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
INFO_FILE = "dbl.json"
PEFT_PREFIX = "base_model.model."


def _write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n")


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)  # PeftType.LORA -> "LORA"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# --- reading a live adapter --------------------------------------------------------------------------


def _lora_layers(module, adapter_name: str):
    """(module path without PEFT's wrapper prefix, layer) for each LoRA layer that holds `adapter_name`."""
    from peft.tuners.lora import LoraLayer

    for name, layer in module.named_modules():
        if isinstance(layer, LoraLayer) and adapter_name in getattr(layer, "lora_A", {}):
            yield name.removeprefix(PEFT_PREFIX), layer


def _peft_config(module, adapter_name: str):
    configs = getattr(module, "peft_config", None)
    if not configs or adapter_name not in configs:
        have = sorted(configs) if configs else []
        raise AdapterError(
            f"{type(module).__name__} has no LoRA adapter named '{adapter_name}' (adapters: {have or 'none'})"
        )
    return configs[adapter_name]


def _component_export(module, adapter_name: str) -> dict:
    """Everything the three formats need about one component's adapter."""
    from peft.utils import get_peft_model_state_dict

    config = _peft_config(module, adapter_name)
    state = get_peft_model_state_dict(module, adapter_name=adapter_name, save_embedding_layers=False)
    # A PeftModel gives `base_model.model.<path>`, a model with injected adapters gives `<path>`.
    state = {k.removeprefix(PEFT_PREFIX): v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    layers = {}
    for path, layer in _lora_layers(module, adapter_name):
        layers[path] = {
            "A": layer.lora_A[adapter_name].weight.detach().cpu(),
            "B": layer.lora_B[adapter_name].weight.detach().cpu(),
            "scaling": float(layer.scaling[adapter_name]),
        }
        if layer.use_dora.get(adapter_name):
            from runner import kohya

            layers[path]["dora_scale"] = kohya.dora_scale(layer, adapter_name)
    if not layers:
        raise AdapterError(f"adapter '{adapter_name}' has no LoRA layers in {type(module).__name__}")
    config_dict = _jsonable(config.to_dict())
    return {"config": config_dict, "state": state, "layers": layers}


def _base_module(module):
    from peft import PeftModel

    return module.get_base_model() if isinstance(module, PeftModel) else module


# --- saving -------------------------------------------------------------------------------------------


def save_adapter(
    folder: Path,
    modules: dict,
    *,
    adapter_name: str = "default",
    base_model: str,
    info: dict | None = None,
    name: str | None = None,
    family=None,
) -> None:
    """Write the adapter `adapter_name` of `modules` (component name -> module) into `folder` in every
    layout. The family's denoiser must be among them; components left out get no adapter.

    The modules are PeftModels or models with injected PEFT LoRA layers; other adapters they carry are
    not written. `base_model` goes into every PEFT config's `base_model_name_or_path`. The kohya file is
    `<name>.safetensors`; `name` defaults to `info["name"]`, else the folder's name (a step writes into
    a work folder, so it passes the subject's or blend's name). `family` defaults to sd1.
    """
    family = family or families.get(families.DEFAULT)
    folder = Path(folder)
    if modules.get(family.denoiser.name) is None:
        raise AdapterError(f"an adapter needs its {family.denoiser.name} LoRA")
    unknown = set(modules) - {c.name for c in family.components}
    if unknown:
        raise AdapterError(f"{', '.join(sorted(unknown))}: not a LoRA component of family {family.name}")
    folder.mkdir(parents=True, exist_ok=True)
    parts = {
        c.name: _component_export(modules[c.name], adapter_name)
        for c in family.components
        if modules.get(c.name) is not None
    }

    for component, part in parts.items():
        sub = folder / component
        sub.mkdir(exist_ok=True)
        config = dict(part["config"])
        config["base_model_name_or_path"] = base_model
        config["inference_mode"] = True
        _write_json(sub / PEFT_CONFIG, config)
        write_safetensors(
            sub / PEFT_WEIGHTS, {PEFT_PREFIX + k: v for k, v in part["state"].items()}, {"format": "pt"}
        )

    extra_keys = sorted(k for part in parts.values() for k in part["state"] if ".lora_" not in k)
    if extra_keys:
        warnings.warn(
            f"{len(extra_keys)} trained bias tensors (bias != 'none') are kept in the PEFT layout only; "
            "the diffusers and kohya files hold the LoRA matrices without them",
            stacklevel=2,
        )

    for component, part in parts.items():
        lora_keys = [k for k in part["state"] if ".lora_" in k]
        if not family.component(component).denoiser and not any(
            f".{p}.lora_" in k for k in lora_keys for p in _ATTENTION_PROJECTIONS
        ):
            # diffusers tells a text encoder's PEFT state dict by its attention keys: without one it
            # refuses the file ("Could not automatically infer state dict type").
            warnings.warn(
                f"the {component} LoRA has no attention projection ({', '.join(_ATTENTION_PROJECTIONS)}): "
                f"diffusers' load_lora_weights cannot read {DIFFUSERS_WEIGHTS}; load the PEFT folders or "
                "the kohya file",
                stacklevel=2,
            )

    _save_diffusers(folder / DIFFUSERS_WEIGHTS, parts, family)
    name = name or (info or {}).get("name") or folder.name
    from runner import kohya

    kohya.save(folder / f"{name}.safetensors", parts, _base_module(modules[family.denoiser.name]), family)
    _write_json(folder / INFO_FILE, dict(info or {}))


_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")  # of CLIP's text encoders


def _save_diffusers(path: Path, parts: dict, family) -> None:
    tensors, adapter_metadata = {}, {}
    for component, part in parts.items():
        for key, value in part["state"].items():
            if key.endswith(".lora_magnitude_vector") and not family.component(component).denoiser:
                # diffusers hands text encoders to transformers' load_adapter, which (transformers 5) puts
                # the adapter's name after `lora_*` and keeps the rest: DoRA's magnitude needs `.weight`.
                key += ".weight"
            if ".lora_" in key:
                tensors[f"{component}.{key}"] = value
        for key, value in part["config"].items():
            if key in _DIFFUSERS_CONFIG_KEYS:
                adapter_metadata[f"{component}.{key}"] = value
    metadata = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps(adapter_metadata, indent=2, sort_keys=True),
    }
    write_safetensors(path, tensors, metadata)


# The LoraConfig fields that describe the adapter's shape and strength (what diffusers reads back).
_DIFFUSERS_CONFIG_KEYS = (
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "lora_dropout",
    "use_rslora",
    "use_dora",
    "lora_bias",
    "init_lora_weights",
)


def kohya_name(component: str, path: str, family=None) -> str:
    """The kohya / A1111 name of a module: `lora_unet_down_blocks_0_...`, `lora_te_text_model_encoder_...`."""
    return (family or families.get(families.DEFAULT)).kohya_name(component, path)


# --- reading a folder ----------------------------------------------------------------------------------


def read_adapter_config(folder: Path) -> dict[str, dict]:
    """component -> its PEFT adapter_config.json, for the components the folder holds."""
    folder = Path(folder)
    configs = {c: _read_config(folder / c / PEFT_CONFIG) for c in families.adapter_components(folder)}
    if not families.is_adapter_folder(folder):
        raise AdapterError(f"{folder}: no adapter here (expected {_denoiser_folder()}/{PEFT_CONFIG})")
    return configs


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: not a readable adapter config ({exc})") from None


def _denoiser_folder(family=None) -> str:
    return (family or families.get(families.DEFAULT)).denoiser.name


def read_adapter_weights(folder: Path, component: str) -> dict:
    """The PEFT state dict of one component, keys without the `base_model.model.` prefix."""
    path = Path(folder) / component / PEFT_WEIGHTS
    if not path.is_file():
        raise AdapterError(f"{path} does not exist")
    try:
        tensors, _ = read_safetensors(path)
    except Exception as exc:  # noqa: BLE001 - safetensors has its own error type: a truncated or foreign file
        raise AdapterError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    return {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}


def _first_line(exc: BaseException) -> str:
    """The first line of `exc`'s message that says something (torch heads its list with "...:")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if not line.endswith(":")), lines[0] if lines else type(exc).__name__)


def _pattern_value(patterns: dict, module: str, default):
    from peft.utils.other import get_pattern_key

    if not patterns:
        return default
    key = get_pattern_key(list(patterns), module)
    return patterns.get(key, default)


def module_scaling(config: dict, module: str) -> float:
    """The LoRA scale of one module under a PEFT config (alpha / r, or alpha / sqrt(r) with rslora)."""
    r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def lora_delta(folder: Path, component: str) -> dict:
    """module path -> scale * B @ A (fp32): the change the adapter makes to each weight (for a DoRA
    adapter, the low-rank part of it: DoRA also rescales each row of W + delta by its magnitude)."""
    config = read_adapter_config(folder)[component]
    state = read_adapter_weights(folder, component)
    deltas = {}
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        b = state[f"{module}.lora_B.weight"]
        delta = b.float().flatten(1) @ a.float().flatten(1)
        if a.dim() == 4:  # conv LoRA: B (out, r, 1, 1) @ A (r, in, kh, kw)
            delta = delta.reshape(b.shape[0], *a.shape[1:])
        deltas[module] = module_scaling(config, module) * delta
    return deltas


# --- loading into a pipeline ---------------------------------------------------------------------------


def _module_paths(model) -> set[str]:
    return {name.removeprefix(PEFT_PREFIX) for name, _ in _base_module(model).named_modules()}


def _translate_level(state: dict, config: dict, model, level: str) -> tuple[dict, dict]:
    """Rewrite a module level (`text_model.`) in keys and patterns to match the model at hand: some
    library versions have it and some do not (transformers 4 vs 5)."""
    paths = _module_paths(model)
    has_level = any(p.startswith(level) for p in paths)

    def fix(key: str) -> str:
        if has_level and not key.startswith(level):
            return level + key
        if not has_level:
            return key.removeprefix(level)
        return key

    state = {fix(k): v for k, v in state.items()}
    config = dict(config)
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            config[field] = {fix(k) if "." in k else k: v for k, v in config[field].items()}
    return state, config


def _check_keys(model, state: dict, adapter_name: str, where: Path) -> None:
    """Fail unless every adapter tensor landed in a module of `model` and holds the file's values."""
    params = dict(model.named_parameters())
    missing = []
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if key.endswith(".lora_magnitude_vector"):  # DoRA: `x.lora_magnitude_vector.<adapter>.weight`
            name = f"{PEFT_PREFIX}{key}.{adapter_name}.weight"
        elif ".lora_" in key:
            # `x.lora_A.weight` lives at `x.lora_A.<adapter>.weight`.
            module, _, kind = module.rpartition(".")
            name = f"{PEFT_PREFIX}{module}.{kind}.{adapter_name}.{leaf}"
        else:
            name = f"{PEFT_PREFIX}{key}"
        param = params.get(name)
        if param is None or param.shape != value.shape:
            missing.append(key)
    if missing:
        raise AdapterError(
            f"{where}: {len(missing)} of {len(state)} adapter tensors match no module of the model "
            f"(first: {missing[0]}); was the adapter trained on a different base model?"
        )


def _load_component(model, sub: Path, adapter_name: str, component):
    """Load one PEFT-layout folder into `model` as `adapter_name`; returns the (possibly wrapped) model."""
    from peft import LoraConfig, PeftModel
    from peft.utils import set_peft_model_state_dict

    config = _read_config(sub / PEFT_CONFIG)
    if isinstance(config, dict) and config.get("peft_type", "LORA") != "LORA":
        # LoHa, LoKr, ... (LyCORIS methods in PEFT) hold other matrices than LoRA's A and B.
        raise AdapterError(
            f"{sub / PEFT_CONFIG}: a {config['peft_type']} adapter, not a LoRA; dbl loads LoRA adapters only"
        )
    state = read_adapter_weights(sub.parent, sub.name)
    if component.text_model_level:
        state, config = _translate_level(state, config, model, component.text_model_level)
    config["inference_mode"] = True
    known = set(LoraConfig.__dataclass_fields__)
    try:
        lora_config = LoraConfig(**{k: v for k, v in config.items() if k in known})
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{sub / PEFT_CONFIG}: not a LoRA config PEFT accepts ({exc})") from None

    wrapped_here = not isinstance(model, PeftModel)
    if not wrapped_here:
        if adapter_name in model.peft_config:
            raise AdapterError(f"the {sub.name} already has an adapter named '{adapter_name}'")
        model.add_adapter(adapter_name, lora_config)
    else:
        model = PeftModel(model, lora_config, adapter_name=adapter_name)
    _keep_base_values(model, state, adapter_name)
    try:
        set_peft_model_state_dict(
            model, {PEFT_PREFIX + k: v for k, v in state.items()}, adapter_name=adapter_name
        )
        _check_keys(model, state, adapter_name, sub)
        _keep_trained_values(model, state, adapter_name)
    except Exception as exc:
        _restore_base_values(model, adapter_name)
        if wrapped_here:
            # PEFT put its layers into the module the pipeline holds; only the wrapper can take them out.
            model.unload()
        # (an adapter added to a wrapped component is deleted by the caller, who sees the wrapper)
        if isinstance(exc, AdapterError):
            raise
        # Mostly shapes of another model (an SD 1.x adapter on SDXL): name the one it was trained on.
        trained_on = config.get("base_model_name_or_path")
        raise AdapterError(
            f"{sub}: does not fit the {sub.name} ({_first_line(exc)}); was the adapter trained on a different "
            "base model?" + (f" Its {PEFT_CONFIG} names {trained_on}" if trained_on else "")
        ) from None
    for name, param in model.named_parameters():
        if f".{adapter_name}." in name:
            param.requires_grad_(False)
    model.eval()
    return model


# PEFT keeps trained biases (bias != "none") in the base layers themselves, where they act whichever
# adapter is active. dbl keeps, on the component's PeftModel, the base model's values of the parameters
# they overwrite and each adapter's trained values, and puts in place those of the active adapters.
_BASE_VALUES = "_dbl_base_values"  # {parameter name: the base model's value}
_TRAINED_VALUES = "_dbl_trained_values"  # {adapter name: {parameter name: its trained value}}


def _keep_base_values(model, state: dict, adapter_name: str) -> None:
    """Keep a copy of the base values of the parameters the adapter's non-LoRA tensors (trained biases)
    overwrite, before it loads."""
    names = _overwritten(model, state)
    if not names:
        return
    params = dict(model.named_parameters())
    base = model.__dict__.setdefault(_BASE_VALUES, {})
    for name in names:
        base.setdefault(name, params[name].detach().clone())  # not another bias adapter's value


def _keep_trained_values(model, state: dict, adapter_name: str) -> None:
    """Keep a copy of the values the adapter's trained biases gave, once it loaded."""
    names = _overwritten(model, state)
    if names:
        params = dict(model.named_parameters())
        trained = model.__dict__.setdefault(_TRAINED_VALUES, {})
        trained[adapter_name] = {name: params[name].detach().clone() for name in names}


def _overwritten(model, state: dict) -> list[str]:
    params = dict(model.named_parameters())
    return [name for k in state if ".lora_" not in k and (name := PEFT_PREFIX + k) in params]


def _restore_base_values(model, adapter_name: str | None = None) -> None:
    """Forget the trained values of adapter `adapter_name` (None: of every adapter), and put in place
    those of the adapters still active, the base model's elsewhere."""
    trained = model.__dict__.get(_TRAINED_VALUES, {})
    for name in [adapter_name] if adapter_name is not None else list(trained):
        trained.pop(name, None)
    put_trained_values(model, [n for n in active_adapters(model) if n != adapter_name])


def put_trained_values(model, names) -> None:
    """The trained biases of the adapters `names` in the base layers, the base model's values elsewhere
    (where two of them trained one bias, the last named wins, as the last loaded does in PEFT)."""
    import torch

    base = model.__dict__.get(_BASE_VALUES)
    if not base:
        return
    trained = model.__dict__.get(_TRAINED_VALUES, {})
    params = dict(model.named_parameters())
    with torch.no_grad():
        for param_name, value in base.items():
            params[param_name].copy_(value)
        for name in names:
            for param_name, value in trained.get(name, {}).items():
                params[param_name].copy_(value)


def disable_adapter_layers(model) -> None:
    """Run a wrapped component as the base model: put_trained_values puts back the base values of the
    biases, which PEFT warns it leaves as trained."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Careful, disabling adapter layers with bias")
        model.base_model.disable_adapter_layers()


def active_adapters(model) -> list[str]:
    """The adapters a wrapped component runs with: none while its adapter layers are disabled."""
    from peft.tuners.lora import LoraLayer

    layers = (m for m in model.modules() if isinstance(m, LoraLayer))
    if any(layer.disable_adapters for layer in layers):
        return []
    return list(model.active_adapters)


def load_adapter_into(pipe, folder: Path, adapter_name: str, family=None) -> None:
    """Load the PEFT layout of `folder` into the pipeline's LoRA components (the denoiser, and each other
    component the folder has) as adapter `adapter_name`, wrapping them in PeftModel on first use.

    Raises AdapterError when an adapter tensor finds no module (a silent no-op load would render the base
    model), and when the folder holds a component the pipeline's family has not. The new adapter is not
    made active: call `set_active(pipe, adapter_name)`.
    """
    family = family or families.of(pipe)
    folder = Path(folder)
    if not (folder / family.denoiser.name / PEFT_CONFIG).is_file():
        raise AdapterError(f"{folder}: no adapter here (expected {family.denoiser.name}/{PEFT_CONFIG})")
    names = {c.name for c in family.components}
    foreign = [p.parent.name for p in sorted(folder.glob(f"*/{PEFT_CONFIG}")) if p.parent.name not in names]
    if foreign:
        raise AdapterError(
            f"{folder}: has {', '.join(foreign)}, which a {family.name} base model does not have; "
            "was the adapter trained on another model family?"
        )
    for c in family.components:
        if (folder / c.name / PEFT_CONFIG).is_file():
            setattr(pipe, c.attr, _load_component(getattr(pipe, c.attr), folder / c.name, adapter_name, c))


def lora_modules(pipe) -> dict:
    """component name -> the pipeline's module, for the LoRA components of its family."""
    return {c.name: getattr(pipe, c.attr, None) for c in families.of(pipe).components}


def set_active(pipe, adapter_name: str | None) -> None:
    """Make `adapter_name` the active adapter of the pipeline's wrapped components (None: disable all)."""
    from peft import PeftModel

    for model in lora_modules(pipe).values():
        if not isinstance(model, PeftModel):
            continue
        if adapter_name is None:
            disable_adapter_layers(model)
        elif adapter_name in model.peft_config:
            model.base_model.enable_adapter_layers()
            model.set_adapter(adapter_name)
        else:
            # A component the adapter does not touch (no text-encoder LoRA) runs as the base model.
            disable_adapter_layers(model)
        put_trained_values(model, active_adapters(model))


def remove_adapter(pipe, adapter_name: str) -> None:
    """Delete one adapter from the pipeline's wrapped components, keeping the others. Those active with
    it stay active; where it was the only active one, the component runs as the base model until another
    is activated (PEFT on its own would activate another loaded adapter, with a warning). Base weights
    that the adapter overwrote (its trained biases, bias != "none") get their base values back."""
    from peft import PeftModel

    for c in families.of(pipe).components:
        model = getattr(pipe, c.attr)
        if isinstance(model, PeftModel) and adapter_name in model.peft_config:
            _restore_base_values(model, adapter_name)
            if len(model.peft_config) == 1:
                setattr(pipe, c.attr, model.unload())
                continue
            active = [n for n in model.active_adapters if n != adapter_name]
            if not active:
                model.base_model.set_adapter([], inference_mode=True)
            model.delete_adapter(adapter_name)
            if model.active_adapter not in model.peft_config:
                # The wrapper's own name of its adapter, which PEFT moves only when one adapter stays
                # active; a deleted name there fails the next forward pass (KeyError).
                model.active_adapter = (active or list(model.peft_config))[0]


def unload_adapters(pipe) -> None:
    """Remove every adapter from the pipeline and put the plain base modules back (weights untouched),
    whether they were loaded with PEFT (PeftModel) or with diffusers' `load_lora_weights`."""
    from peft import PeftModel

    attrs = [c.attr for c in families.of(pipe).components]
    for attr in attrs:
        model = getattr(pipe, attr, None)
        if isinstance(model, PeftModel):
            _restore_base_values(model)
            setattr(pipe, attr, model.unload())
    if any(getattr(getattr(pipe, a, None), "peft_config", None) for a in attrs):
        pipe.unload_lora_weights()
