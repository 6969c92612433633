"""The kohya layout of an adapter: one .safetensors file for A1111, Forge and ComfyUI.

Keys are `<kohya prefix><module path with _>.lora_down.weight`, `.lora_up.weight` and `.alpha`, with the
model family's prefixes (`lora_unet_`, `lora_te_`, ...) and `ss_*` metadata. kohya loaders scale by
alpha / rank, so `.alpha` holds the adapter's own scale times the rank: alpha for plain LoRA,
alpha * sqrt(rank) for rsLoRA (whose scale is alpha / sqrt(rank)), and rank and alpha patterns per module.

DoRA adapters get a `.dora_scale` per module, shaped (out_features, 1) for a linear layer ((out, 1, 1, 1)
for a convolution), the "output axis" layout that ComfyUI and Forge recognise by its first dimension.
Those loaders compute the weight as (W + delta) * dora_scale / ||W||, each output row divided by the
norm of the base weight's row, whereas DoRA (PEFT, the paper) divides by the norm of W + delta. So the
file holds magnitude * ||W|| / ||W + delta|| per row, which gives the trained weights exactly there.
Loaders that divide by ||W + delta|| (LyCORIS with wd_on_out) would need the magnitude itself; A1111's
built-in LoRA support decomposes on the input axis only: it divides by the column norms, shaped (1, in),
which torch broadcasts against this (out, 1) scale into a full matrix, so it applies these files with
scrambled weights and no error (runner.adapters warns when one is saved); diffusers 0.42 drops
`dora_scale` keys with a warning (load its own file, pytorch_lora_weights.safetensors, instead).

torch is imported inside functions.
"""

from __future__ import annotations

from pathlib import Path


def save(path: Path, parts: dict, denoiser_base, family) -> None:
    """Write the kohya file of an adapter: `parts` maps component names to what
    runner.adapters exports of each (config, layers); names and metadata come from the family."""
    import torch

    from runner.safetensors_io import write_safetensors

    tensors = {}
    for component, part in parts.items():
        for module, layer in part["layers"].items():
            name = family.kohya_name(component, module)
            rank = layer["A"].shape[0]
            # kohya scales by alpha / rank; storing scaling * rank keeps the strength for rslora and patterns.
            tensors[f"{name}.lora_down.weight"] = layer["A"].contiguous()
            tensors[f"{name}.lora_up.weight"] = layer["B"].contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(layer["scaling"] * rank, dtype=torch.float32)
            if "dora_scale" in layer:
                tensors[f"{name}.dora_scale"] = layer["dora_scale"].contiguous()
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


def dora_scale(layer, adapter_name: str):
    """The kohya `dora_scale` of a PEFT DoRA layer: its magnitude times ||W|| / ||W + delta|| per output
    row (see the module's docstring), fp32, shaped (out, 1, ...) like the layer's weight."""
    import torch

    weight = layer.get_base_layer().weight.detach().to("cpu", torch.float64)
    a = layer.lora_A[adapter_name].weight.detach().to("cpu", torch.float64)
    b = layer.lora_B[adapter_name].weight.detach().to("cpu", torch.float64)
    delta = (b.flatten(1) @ a.flatten(1)).reshape(weight.shape) * layer.scaling[adapter_name]
    magnitude = layer.lora_magnitude_vector[adapter_name].weight.detach().to("cpu", torch.float64).flatten()
    rows = weight.shape[0]
    scale = magnitude * weight.reshape(rows, -1).norm(dim=1) / (weight + delta).reshape(rows, -1).norm(dim=1)
    return scale.reshape(rows, *[1] * (weight.dim() - 1)).to(torch.float32)
