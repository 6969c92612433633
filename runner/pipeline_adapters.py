"""LoRA adapters in a live pipeline: load the PEFT layout of an adapter folder (see runner.adapters) into
the pipeline's LoRA components, make one adapter active, remove one, or unload them all.

Which components there are comes from the model family (runner.families). torch and peft are imported
inside functions.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from runner import families
from runner.adapters import (
    PEFT_CONFIG,
    PEFT_PREFIX,
    exception_line,
    read_adapter_weights,
    read_component_config,
    trained_on,
    unwrapped,
)
from runner.errors import AdapterError


def _module_paths(model) -> set[str]:
    return {name.removeprefix(PEFT_PREFIX) for name, _ in unwrapped(model).named_modules()}


def _translate_level(state: dict, config: dict, model, level: str) -> tuple[dict, dict]:
    """Rewrite a module level (`text_model.`) in keys and patterns to match the model at hand: some
    library versions have it and some do not (transformers 4 vs 5). A key of a module beside the level
    (CLIPTextModelWithProjection's text_projection) stays as it is."""
    paths = _module_paths(model)
    has_level = any(p.startswith(level) for p in paths)
    beside = {p for p in paths if p and "." not in p}  # the model's top-level modules

    def fix(key: str) -> str:
        if has_level and not key.startswith(level) and key.split(".", 1)[0] not in beside:
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

    config = read_component_config(sub / PEFT_CONFIG)
    if not isinstance(config, dict):
        raise AdapterError(f"{sub / PEFT_CONFIG}: not a LoRA config (a JSON object of LoraConfig's fields)")
    if config.get("peft_type", "LORA") != "LORA":
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
    if not wrapped_here and adapter_name in model.peft_config:
        raise AdapterError(f"the {sub.name} already has an adapter named '{adapter_name}'")
    try:
        if wrapped_here:
            with warnings.catch_warnings():
                # PEFT asks transformers' deprecated is_gradient_checkpointing: a FutureWarning at each load
                # (every load_pipeline of a notebook's loop), about neither the adapter nor the user's code
                warnings.filterwarnings(
                    "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
                )
                model = PeftModel(model, lora_config, adapter_name=adapter_name)
        else:
            model.add_adapter(adapter_name, lora_config)
    except ValueError as exc:
        # PEFT finds none of the config's target modules (an adapter of another model), or none named:
        # its message names neither the file nor the model the adapter was made for.
        raise AdapterError(_misfit(sub, exc)) from None
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
        raise AdapterError(_misfit(sub, exc)) from None
    for name, param in model.named_parameters():
        if f".{adapter_name}." in name:
            param.requires_grad_(False)
    model.eval()
    return model


def _misfit(sub: Path, exc: Exception) -> str:
    """What to say when the adapter in `sub` does not fit its component: the cause, and the base model
    its config names."""
    return (
        f"{sub}: does not fit the {sub.name} ({exception_line(exc)}); was the adapter trained on a different "
        "base model?" + _names(sub.parent, [sub.name])
    )


def _names(folder: Path, components=None) -> str:
    """The end of a message that names the base model the adapter in `folder` was trained on, where its
    configs of `components` name one ("" where none does)."""
    base = trained_on(folder, components)
    return f" Its {PEFT_CONFIG} names {base}" if base else ""


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
            "was the adapter trained on another model family?" + _names(folder, [family.denoiser.name])
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
