"""The kohya layout of an adapter: one .safetensors file for A1111, Forge and ComfyUI.

Keys are `<kohya prefix><module path with _>.lora_down.weight`, `.lora_up.weight` and `.alpha`, with the
model family's prefixes (`lora_unet_`, `lora_te_`, ...) and `ss_*` metadata. kohya loaders scale by
alpha / rank, so `.alpha` holds the adapter's own scale times the rank: alpha for plain LoRA,
alpha * sqrt(rank) for rsLoRA (whose scale is alpha / sqrt(rank)), and rank and alpha patterns per module.
torch is imported inside functions.
"""

from __future__ import annotations

from pathlib import Path


def save(path: Path, parts: dict, denoiser_base, family) -> None:
    """Write the kohya file of an adapter: `parts` maps component names to what
    runner.adapters exports of each (config, layers); names and metadata come from the family."""
    import torch

    from runner.adapters import write_safetensors

    tensors = {}
    for component, part in parts.items():
        for module, layer in part["layers"].items():
            name = family.kohya_name(component, module)
            rank = layer["A"].shape[0]
            # kohya scales by alpha / rank; storing scaling * rank keeps the strength for rslora and patterns.
            tensors[f"{name}.lora_down.weight"] = layer["A"].contiguous()
            tensors[f"{name}.lora_up.weight"] = layer["B"].contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(layer["scaling"] * rank, dtype=torch.float32)
        for module, sibling in _missing_attention(family.component(component), part["layers"]).items():
            # Zero matrices change no weight; the sibling's rank and alpha keep one rank and one alpha
            # per component, which loaders that read a single strength for it (diffusers) need.
            name, like = family.kohya_name(component, module), part["layers"][sibling]
            tensors[f"{name}.lora_down.weight"] = torch.zeros_like(like["A"]).contiguous()
            tensors[f"{name}.lora_up.weight"] = torch.zeros_like(like["B"]).contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(like["scaling"] * like["A"].shape[0], dtype=torch.float32)
    metadata = family.kohya_metadata({c: part["config"] for c, part in parts.items()}, denoiser_base)
    write_safetensors(path, tensors, metadata)


def _missing_attention(component, layers: dict) -> dict[str, str]:
    """{module path: a sibling's path} for the projections of attention blocks that have a LoRA on
    some of their projections but not on these (see Component.kohya_attention). The projections of a
    CLIP attention block are all hidden x hidden, so a sibling's shapes fit."""
    found = {}
    for module in layers:
        parent, _, leaf = module.rpartition(".")
        if leaf not in component.kohya_attention:
            continue
        for other in component.kohya_attention:
            path = f"{parent}.{other}"
            if path not in layers:
                found.setdefault(path, module)
    return dict(sorted(found.items()))
