"""LoRA adapters on disk: one folder, three formats, written from a live model and read back
(runner.pipeline_adapters loads them into a pipeline).

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
from collections.abc import Iterable
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


def unwrapped(module):
    """The model under a PEFT wrapper (`PeftModel.get_base_model()`), or `module` itself where it is not
    wrapped: the model whose module paths LoRA layers are named by, when saved and when loaded."""
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

    if any("dora_scale" in layer for part in parts.values() for layer in part["layers"].values()):
        warnings.warn(  # a step's kohya file is named after its adapter only as it is copied out
            "DoRA: the adapter's kohya file holds each magnitude per output row, as ComfyUI and "
            "Forge read it; A1111 reads dora_scale per input column and would apply the file with scrambled "
            "weights, without a message: use it in ComfyUI or Forge, not A1111",
            stacklevel=2,
        )
    _save_diffusers(folder / DIFFUSERS_WEIGHTS, parts, family)
    name = name or (info or {}).get("name") or folder.name
    from runner import kohya

    kohya.save(folder / f"{name}.safetensors", parts, unwrapped(modules[family.denoiser.name]), family)
    _write_json(folder / INFO_FILE, dict(info or {}))


_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")  # of CLIP's text encoders


def _save_diffusers(path: Path, parts: dict, family) -> None:
    tensors, adapter_metadata = {}, {}
    for component, part in parts.items():
        encoder = not family.component(component).denoiser
        # diffusers tells a text encoder's state dict in PEFT's layout (`lora_A`) by its attention keys
        # and refuses one without ("Could not automatically infer state dict type"); its own layout
        # (`lora_linear_layer.down`) it reads whatever the modules.
        own_layout = encoder and not any(
            f".{p}.lora_" in k for k in part["state"] for p in _ATTENTION_PROJECTIONS
        )
        for key, value in part["state"].items():
            if key.endswith(".lora_magnitude_vector") and encoder:
                # diffusers hands text encoders to transformers' load_adapter, which (transformers 5) puts
                # the adapter's name after `lora_*` and keeps the rest: DoRA's magnitude needs `.weight`.
                key += ".weight"
            if own_layout:
                key = key.replace(".lora_A.", ".lora_linear_layer.down.").replace(
                    ".lora_B.", ".lora_linear_layer.up."
                )
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
    configs = {
        c: read_component_config(folder / c / PEFT_CONFIG) for c in families.adapter_components(folder)
    }
    if not families.is_adapter_folder(folder):
        raise AdapterError(f"{folder}: no adapter here (expected {_denoiser_folder()}/{PEFT_CONFIG})")
    return configs


def read_component_config(path: Path) -> dict:
    """One component's PEFT `adapter_config.json`, parsed: any JSON value, the caller checks its shape. AdapterError naming
    the file where it cannot be read or is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: not a readable adapter config ({exc})") from None


def trained_on(folder: Path, components: Iterable[str] | None = None) -> str | None:
    """The base model an adapter folder was trained on, as its PEFT configs name it
    (`base_model_name_or_path`): the value of the first of `components`' configs that names one (default:
    the components the folder holds, the last first, as the DreamBooth-LoRA guide reads the last one's).

    None where none names one. A config that is missing, unreadable, not a JSON object, or names no
    string names none: the answer serves messages and defaults, and a load that needs the config says
    what is wrong with it."""
    folder = Path(folder)
    for component in reversed(families.adapter_components(folder)) if components is None else components:
        try:
            config = read_component_config(folder / component / PEFT_CONFIG)
        except AdapterError:
            continue
        value = config.get("base_model_name_or_path") if isinstance(config, dict) else None
        if isinstance(value, str) and value:
            return value
    return None


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
        raise AdapterError(f"{path}: not a readable safetensors file ({exception_line(exc)})") from None
    return {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}


def exception_line(exc: BaseException) -> str:
    """The first line of `exc`'s message that says something (torch heads its list with "...:"): how an
    AdapterError quotes what torch, peft or safetensors said of a file that does not fit or cannot be read."""
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
