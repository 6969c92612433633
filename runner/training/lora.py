"""LoRA on the components of a model family: configs, trainable parameters, and taking it all off a
shared pipeline again. torch and peft are imported inside functions."""

from __future__ import annotations

from collections.abc import Callable

from runner.errors import StepError
from runner.project.schema import TARGET_PRESETS


def lora_config(component, lora_settings, model=None):
    """The PEFT LoraConfig of one component, from the [lora] keys that configure it (rank, alpha, ...
    for the denoiser; text_encoder_rank, ... for sd1's text encoder). `model` is the component's module,
    which a target preset needs (see `target_modules`)."""
    from peft import LoraConfig

    def setting(key):
        return component.value(lora_settings, key)

    return LoraConfig(
        r=setting("rank"),
        lora_alpha=setting("alpha"),
        lora_dropout=setting("dropout"),
        bias=setting("bias"),
        target_modules=target_modules(component, setting("target_modules"), model),
        use_dora=bool(setting("use_dora")),
        use_rslora=bool(setting("use_rslora")),
    )


def names_module(name: str, path: str) -> bool:
    """Whether target `name` names the module at `path`, as PEFT matches them: the whole path or its last
    parts."""
    return path == name or path.endswith(f".{name}")


def matched_targets(targets: list[str], model) -> set[str]:
    """The names of `targets` that name some module of `model`."""
    paths = [path for path, _ in model.named_modules()]
    return {t for t in targets if any(names_module(t, p) for p in paths)}


def target_modules(component, value, model) -> list[str]:
    """The module names of a `target_modules` setting: a list as written, a preset as the component
    names it. `all-linear` keeps the names whose modules in `model` are all linear layers (a transformer
    block's proj_in is one in SDXL and a 1x1 convolution in SD 1.x)."""
    if not isinstance(value, str):
        return list(value)
    names = component.preset(value)
    if value != "all-linear":
        return list(names)
    import torch

    linear: dict[str, set[bool]] = {}
    for path, module in model.named_modules():
        for name in names:
            if names_module(name, path):
                linear.setdefault(name, set()).add(isinstance(module, torch.nn.Linear))
    return [name for name in names if linear.get(name) == {True}]


def trains_bias(components, lora_settings) -> bool:
    """Whether bias training would change base weights (then a shared pipeline must not be used)."""
    return any(c.value(lora_settings, "bias") != "none" for c in components)


def add_lora(
    pipe,
    family,
    components,
    lora_settings,
    seed: int,
    key_of=lambda field: f"lora.{field}",
    say=None,
) -> dict:
    """Freeze the pipeline's modules and wrap each of `components` in a LoRA PeftModel. `key_of(field)` is
    the key a problem of a LoRA setting names, and `say(key, what, fix)` words it (see check_targets).

    Returns component name -> module, the wrapped ones for `components`, the plain ones for the others.
    """
    import torch
    from peft import get_peft_model

    from runner.training.data import derive_seed

    modules = {c.name: getattr(pipe, c.attr) for c in family.components}
    for module in [getattr(pipe, name) for name in family.other_modules] + list(modules.values()):
        module.requires_grad_(False)
        module.eval()
    # LoRA init draws from the global RNG: seed it so the same seed gives the same start.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "lora-init"))
        configs = {c.name: lora_config(c, lora_settings, modules[c.name]) for c in components}
        for c in components:  # all checked before any is wrapped: PEFT changes the modules in place
            targets = sorted(configs[c.name].target_modules or [])
            check_targets(c, lora_settings, targets, modules[c.name], key_of, say)
        try:
            for c in components:
                modules[c.name] = get_peft_model(modules[c.name], configs[c.name])
        except Exception:
            remove_lora(modules, gradient_checkpointing=False)  # the ones wrapped before the failure
            raise
    return modules


def check_targets(
    component,
    lora_settings,
    targets: list[str],
    model,
    key_of=lambda field: f"lora.{field}",
    say: Callable[[str, str, str], str] | None = None,
) -> None:
    """Some target names a module of `model` (as PEFT matches them: the whole path or its last parts).
    Where none does, PEFT fails in its own words; this says which key, and what the layers are named, as
    `say(key, what, fix)` words it (the project file and line, where the caller knows them).
    (A target that matches nothing beside one that does is allowed, as PEFT allows it: the default names
    both diffusers' current and older attention modules.)"""
    import torch

    if matched_targets(targets, model):
        return
    key = component.field_of(lora_settings, "target_modules")
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    names = sorted({_layer_name(p) for p, m in model.named_modules() if isinstance(m, layers)})
    listed = ", ".join(names[:24]) + (", ..." if len(names) > 24 else "")
    say = say or (lambda key, what, fix: f"{key}: {what} - {fix}")  # without the project file's place
    raise StepError(
        say(
            key_of(key),
            f"{', '.join(map(repr, targets)) or 'the list'} names no module of the {component.name} (its layers "
            f"are named {listed})",
            f"name some of those, or use a preset: {', '.join(TARGET_PRESETS)}",
        )
    )


def _layer_name(path: str) -> str:
    """A module's name as a target names it: its last part, with the one before where that is an index
    (`to_out.0`, not `0`)."""
    parts = path.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def trainable_parameters(modules: dict, components) -> dict[str, dict]:
    """component -> {name: parameter} of what trains, cast to fp32 (frozen weights keep their dtype)."""
    import torch

    trainable = {}
    for c in components:
        named = {}
        for name, param in modules[c.name].named_parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.float32)
                named[name] = param
        trainable[c.name] = named
    return trainable


def start_training(modules: dict, components, gradient_checkpointing: bool) -> None:
    for c in components:
        if gradient_checkpointing:
            set_checkpointing(modules[c.name].base_model.model, True)
    for c in components:
        modules[c.name].train()


def snapshot(pipe, family) -> Callable[[], None]:
    """Remember what training changes on a shared pipeline, and return the function that restores it."""
    names = [c.attr for c in family.components] + list(family.other_modules)
    modules = {name: getattr(pipe, name) for name in names}
    flags = {name: [(p, p.requires_grad) for p in module.parameters()] for name, module in modules.items()}
    modes = {name: module.training for name, module in modules.items()}

    def restore():
        for name, module in modules.items():
            setattr(pipe, name, module)
            for param, flag in flags[name]:
                param.requires_grad_(flag)
            module.train(modes[name])

    return restore


def remove_lora(modules: dict, gradient_checkpointing: bool) -> None:
    """Take the LoRA layers out of the (possibly shared) modules again, and gradient checkpointing off."""
    from peft import PeftModel

    for module in modules.values():
        if isinstance(module, PeftModel):
            base = module.unload()
            if gradient_checkpointing:
                set_checkpointing(base, False)


def set_checkpointing(model, enable: bool) -> None:
    """Gradient checkpointing on or off, for diffusers and transformers models alike."""
    if hasattr(model, "enable_gradient_checkpointing"):  # diffusers
        if enable:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
        return
    # transformers 5 renamed gradient checkpointing to activation checkpointing; 4.x has only the old name.
    if enable:
        kwargs = {"use_reentrant": False}  # reentrant checkpoints drop LoRA gradients of frozen inputs
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
