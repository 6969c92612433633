"""How ComfyUI and A1111 read a kohya LoRA file into a checkpoint of the original layout, re-implemented
for tests: which weight each key lands on, and the change it makes there.

Both programs patch the weights of a model loaded from a single file (tests.single_file writes the
tiny models in those layouts). Each function below names the file and function of the program it
follows, in comfyanonymous/ComfyUI and in AUTOMATIC1111/stable-diffusion-webui; only what a LoRA of
`lora_down` / `lora_up` / `alpha` needs is re-implemented.

    deltas, unused = comfyui_deltas(lora, original, layout, unet_config)
    deltas, unused = a1111_deltas(lora, original, layout, blocks_per_level)

`original` is the checkpoint's state dict ({name: tensor}), `deltas` maps its weight names to the change
the loader adds at strength 1, and `unused` lists the file's keys the loader would skip (ComfyUI warns
"lora key not loaded"; A1111 logs them as failed to match, or drops an incomplete attention quietly).
"""

from __future__ import annotations

import re

LORA_PARTS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}


def lora_modules(lora: dict) -> dict[str, dict]:
    """{kohya module name: {"down", "up", "alpha"}} of a kohya file (a part missing: left out)."""
    found: dict[str, dict] = {}
    for key, value in lora.items():
        for part, short in LORA_PARTS.items():
            if key.endswith(part):
                found.setdefault(key[: -len(part)], {})[short] = value
    return found


def lora_delta(weights: dict, shape) -> object:
    """up @ down * alpha / rank, in `shape`: what both programs add for a plain LoRA (ComfyUI
    comfy/weight_adapter/lora.py calculate_weight; A1111 extensions-builtin/Lora/network.py calc_scale and
    network_lora.py calc_updown). Without an alpha the scale is 1."""
    up, down = weights["up"].float(), weights["down"].float()
    scale = float(weights["alpha"]) / down.shape[0] if "alpha" in weights else 1.0
    product = up.flatten(1) @ down.flatten(1)
    rows = shape[0]
    if tuple(product.shape) != (rows, _numel(shape) // rows):  # (out, in) against (out, in * kernel)
        raise ValueError(f"lora {tuple(product.shape)} does not fit a weight of shape {tuple(shape)}")
    return (product * scale).reshape(shape)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --- ComfyUI ------------------------------------------------------------------------------------------


def comfyui_model_weights(original: dict, layout: str) -> dict:
    """The checkpoint's weights under the names of ComfyUI's model: the UNet as `diffusion_model.*`, the text
    encoders in transformers' layout as clip_l / clip_h / clip_g (comfy/supported_models.py, SD15, SD20 and
    SDXL process_clip_state_dict; comfy/utils.py clip_text_transformers_convert splits OpenCLIP's fused
    in_proj into q/k/v)."""
    out = {}
    for key, value in original.items():
        if key.startswith("model.diffusion_model."):
            out[key.removeprefix("model.")] = value
    clip_prefixes = {
        "sd1": {"cond_stage_model.transformer.": ("clip_l.transformer.", False)},
        "sd2": {"cond_stage_model.model.": ("clip_h.transformer.", True)},
        "sdxl": {
            "conditioner.embedders.0.transformer.": ("clip_l.transformer.", False),
            "conditioner.embedders.1.model.": ("clip_g.transformer.", True),
        },
    }[layout]
    for source, (target, open_clip) in clip_prefixes.items():
        part = {k.removeprefix(source): v for k, v in original.items() if k.startswith(source)}
        if open_clip:
            part = _open_clip_as_transformers(part)
        out.update({target + k: v for k, v in part.items()})
    return out


_OPEN_CLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def _open_clip_as_transformers(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        match = re.match(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        fused = re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key)
        if fused:
            layer, kind = fused.groups()
            for i, chunk in enumerate(value.chunk(3, dim=0)):
                out[f"text_model.encoder.layers.{layer}.self_attn.{'qkv'[i]}_proj.{kind}"] = chunk
        elif match and match.group(2) in _OPEN_CLIP_LAYER:
            layer, name, kind = match.groups()
            out[f"text_model.encoder.layers.{layer}.{_OPEN_CLIP_LAYER[name]}.{kind}"] = value
        elif key == "text_projection":  # a plain parameter applied as x @ p: a Linear's weight transposed
            out["text_projection.weight"] = value.transpose(0, 1)
        else:
            out[key] = value  # embeddings, ln_final: no LoRA targets
    return out


def comfyui_unet_config(config: dict) -> dict:
    """The UNet description ComfyUI detects from a checkpoint (comfy/model_detection.py), from a diffusers
    UNet2DConditionModel config: residual blocks per level and transformer depth per input, middle and
    output block."""
    levels = len(config["down_block_types"])
    layers = config["layers_per_block"]
    per_level = config.get("transformer_layers_per_block") or 1
    per_level = [per_level] * levels if isinstance(per_level, int) else list(per_level)
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    depth = [per_level[x] if down_attn[x] else 0 for x in range(levels) for _ in range(layers)]
    up_depth = list(reversed(per_level))
    output = [up_depth[x] if up_attn[x] else 0 for x in range(levels) for _ in range(layers + 1)]
    mid = per_level[-1] if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") else 0
    return {
        "num_res_blocks": [layers] * levels,
        "transformer_depth": depth,
        "transformer_depth_output": output,  # output block order (ComfyUI stores and pops it reversed)
        "transformer_depth_middle": mid,
    }


_RESNET = {  # ComfyUI comfy/utils.py UNET_MAP_RESNET: diffusers name -> original name
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "norm1": "in_layers.0",
    "norm2": "out_layers.0",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_ATTENTION = ("proj_in", "proj_out", "norm")  # UNET_MAP_ATTENTIONS (weights)
_TRANSFORMER = (  # TRANSFORMER_BLOCKS (weights)
    *(f"norm{i}" for i in (1, 2, 3)),
    *(f"attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")),
    "ff.net.0.proj",
    "ff.net.2",
)
_BASIC = {  # UNET_MAP_BASIC (weights)
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def comfyui_unet_modules(unet_config: dict) -> dict[str, str]:
    """{diffusers module path: original module path} of the UNet's weights, as ComfyUI's
    comfy/utils.py unet_to_diffusers computes it from the detected config."""
    found = dict(_BASIC)

    def block(diffusers: str, original: str, depth: int | None) -> None:
        if depth is None:  # a residual block
            for new, old in _RESNET.items():
                found[f"{diffusers}.{new}"] = f"{original}.{old}"
            return
        for name in _ATTENTION:
            found[f"{diffusers}.{name}"] = f"{original}.{name}"
        for t in range(depth):
            for name in _TRANSFORMER:
                found[f"{diffusers}.transformer_blocks.{t}.{name}"] = (
                    f"{original}.transformer_blocks.{t}.{name}"
                )

    res, depth = unet_config["num_res_blocks"], unet_config["transformer_depth"]
    out_depth = unet_config["transformer_depth_output"]
    levels, n_in = len(res), 0
    for x in range(levels):
        n = 1 + (res[x] + 1) * x
        for i in range(res[x]):
            block(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n}.0", None)
            if depth[n_in]:
                block(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", depth[n_in])
            n_in += 1
            n += 1
        found[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    if unet_config["transformer_depth_middle"]:
        block("mid_block.attentions.0", "middle_block.1", unet_config["transformer_depth_middle"])
    for i, n in enumerate((0, 2)):
        block(f"mid_block.resnets.{i}", f"middle_block.{n}", None)
    res = list(reversed(res))
    for x in range(levels):
        n = (res[x] + 1) * x
        for i in range(res[x] + 1):
            block(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{n}.0", None)
            d = out_depth[n]
            if d:
                block(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", d)
            if i == res[x]:
                found[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{2 if d else 1}.conv"
            n += 1
    return found


_CLIP_LINEARS = (
    "mlp.fc1",
    "mlp.fc2",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
)


def comfyui_key_map(model_weights: dict, unet_config: dict) -> dict[str, str]:
    """{kohya module name: model weight name}, as comfy/lora.py model_lora_keys_unet (a UNet module under
    its original name and under its diffusers name) and model_lora_keys_clip (lora_te_ for the one text
    encoder of SD 1.x / 2.x, lora_te1_ / lora_te2_ for SDXL's two) build it."""
    key_map = {}
    for key in model_weights:
        if key.startswith("diffusion_model.") and key.endswith(".weight"):
            key_map["lora_unet_" + key[len("diffusion_model.") : -len(".weight")].replace(".", "_")] = key
    for diffusers, original in comfyui_unet_modules(unet_config).items():
        weight = f"diffusion_model.{original}.weight"
        key_map["lora_unet_" + diffusers.replace(".", "_")] = weight
    clip_l_present = False
    for b in range(32):
        for linear in _CLIP_LINEARS:
            name = f"text_model_encoder_layers_{b}_{linear.replace('.', '_')}"
            for clip in ("clip_h", "clip_l"):
                k = f"{clip}.transformer.text_model.encoder.layers.{b}.{linear}.weight"
                if k in model_weights:
                    key_map[f"lora_te_{name}"] = k
                    key_map[f"lora_te1_{name}"] = k
                    clip_l_present |= clip == "clip_l"
            k = f"clip_g.transformer.text_model.encoder.layers.{b}.{linear}.weight"
            if k in model_weights:
                key_map[f"lora_te2_{name}" if clip_l_present else f"lora_te_{name}"] = k
    if "clip_g.transformer.text_projection.weight" in model_weights:
        key_map["lora_te2_text_projection"] = "clip_g.transformer.text_projection.weight"
    return key_map


def comfyui_deltas(lora: dict, original: dict, layout: str, unet_config: dict) -> tuple[dict, list[str]]:
    """What ComfyUI's LoraLoader adds to each weight of the checkpoint (comfy/lora.py load_lora: a module
    counts when its `lora_up.weight` is in the file; its `alpha` beside it, if any), and the keys it does
    not load. Deltas are named as in `original`."""
    model = comfyui_model_weights(original, layout)
    key_map = comfyui_key_map(model, unet_config)
    back = _comfyui_to_original(original, layout)
    deltas, loaded = {}, set()
    for name, weights in lora_modules(lora).items():
        target = key_map.get(name)
        if target is None or "up" not in weights:
            continue
        loaded.update(name + part for part in LORA_PARTS if name + part in lora)
        source, rows = back[target]
        delta = lora_delta(weights, model[target].shape)
        if source.endswith("text_projection"):  # ComfyUI's weight is the checkpoint's transposed
            delta = delta.transpose(0, 1)
        full = deltas.setdefault(source, original[source].new_zeros(original[source].shape).float())
        full[rows] += delta
    return deltas, sorted(set(lora) - loaded)


def _comfyui_to_original(original: dict, layout: str) -> dict:
    """ComfyUI weight name -> (checkpoint weight name, rows): q/k/v of OpenCLIP are row slices of in_proj
    (and OpenCLIP's text_projection is the transpose of ComfyUI's weight: see comfyui_deltas)."""
    back = {}
    for key, value in original.items():
        model = comfyui_model_weights({key: value}, layout)
        names = list(model)
        if len(names) == 3:  # a fused in_proj, split in q, k, v
            step = value.shape[0] // 3
            for i, name in enumerate(sorted(names, key=lambda n: "qkv".index(n.split(".")[-2][0]))):
                back[name] = (key, slice(i * step, (i + 1) * step))
        for name in names if len(names) == 1 else []:
            back[name] = (key, slice(None))
    return back


# --- A1111 ----------------------------------------------------------------------------------------------


def a1111_layers(original: dict, layout: str) -> dict[str, dict]:
    """{network layer name: {parameter: checkpoint weight name}}: the modules of the loaded model as
    extensions-builtin/Lora/networks.py assign_network_names_to_compvis_modules names them (module path
    with '_' for '.'; the text encoder's wrapped module, and for SDXL `<embedder index>_` before it)."""
    layers: dict[str, dict] = {}
    text = "conditioner.embedders." if layout == "sdxl" else "cond_stage_model."
    for key in original:
        if key.startswith("model."):  # the DiffusionWrapper's diffusion_model
            path = key.removeprefix("model.")
        elif key.startswith(text):
            path = key.removeprefix(text)
        else:
            continue  # the VAE takes no LoRA
        module, _, param = path.rpartition(".")
        layers.setdefault(module.replace(".", "_"), {})[param] = key
    return layers


_A1111_RESNET = {  # networks.py suffix_conversion["resnets"]
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}


def a1111_convert(key: str, is_sd2: bool, blocks_per_level: int = 3) -> str:
    """networks.py convert_diffusers_name_to_compvis: a kohya name in diffusers terms -> the module's
    network layer name. A1111 hard-codes 3 blocks per level (2 residual blocks and a down- or upsampler,
    as in every SD 1.x, 2.x and SDXL UNet); `blocks_per_level` lets the tiny models' 1 + 1 be tested."""
    per = blocks_per_level

    def suffix(kind: str, rest: str) -> str:
        return _A1111_RESNET.get(rest, rest) if kind == "resnets" else rest

    m = re.match(r"lora_unet_conv_in(.*)", key)
    if m:
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    m = re.match(r"lora_unet_conv_out(.*)", key)
    if m:
        return f"diffusion_model_out_2{m[1]}"
    m = re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", key)
    if m:
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    m = re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_input_blocks_{1 + b * per + j}_{1 if kind == 'attentions' else 0}_{suffix(kind, rest)}"
    m = re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else j * 2}_{suffix(kind, rest)}"
    m = re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_output_blocks_{b * per + j}_{1 if kind == 'attentions' else 0}_{suffix(kind, rest)}"
    m = re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key)
    if m:
        return f"diffusion_model_input_blocks_{per + int(m[1]) * per}_0_op"
    m = re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key)
    if m:
        b = int(m[1])
        return f"diffusion_model_output_blocks_{per - 1 + b * per}_{2 if b > 0 else 1}_conv"
    m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        if is_sd2:
            return f"model_transformer_resblocks_{m[1]}_{_open_clip_name(m[2])}"
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    m = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        return f"1_model_transformer_resblocks_{m[1]}_{_open_clip_name(m[2])}"
    return key


def _open_clip_name(rest: str) -> str:
    if "mlp_fc1" in rest:
        return rest.replace("mlp_fc1", "mlp_c_fc")
    if "mlp_fc2" in rest:
        return rest.replace("mlp_fc2", "mlp_c_proj")
    return rest.replace("self_attn", "attn")


def a1111_match(lora: dict, layers: dict, blocks_per_level: int = 3) -> tuple[dict, list[str]]:
    """networks.py load_network: {network layer key: (layer name found, {"down", "up", "alpha"})} and the
    file keys that matched no layer. A q/k/v projection of OpenCLIP finds its MultiheadAttention through
    the `(.*)_([qkv]_proj)$` rule; SDXL's first encoder is found by renaming lora_te1_text_model."""
    is_sd2 = any(name.startswith("model_transformer_resblocks_") for name in layers)
    matched, failed = {}, []
    for key, value in lora.items():
        name, _, part = key.partition(".")
        found = a1111_convert(name, is_sd2, blocks_per_level)
        layer = found if found in layers else None
        if layer is None:
            m = re.match(r"(.*)_([qkv]_proj)$", found)
            if m and m[1] in layers:
                layer = m[1]
        if layer is None and "lora_unet" in name:
            found = name.replace("lora_unet", "diffusion_model")
            layer = found if found in layers else None
        elif layer is None and "lora_te1_text_model" in name:
            found = name.replace("lora_te1_text_model", "0_transformer_text_model")
            if found not in layers:
                found = name.replace("lora_te1_text_model", "transformer_text_model")
            layer = found if found in layers else None
        if layer is None:
            failed.append(key)
            continue
        weights = matched.setdefault(found, (layer, {}))[1]
        weights[LORA_PARTS["." + part]] = value
    return matched, failed


def a1111_deltas(
    lora: dict, original: dict, layout: str, blocks_per_level: int = 3
) -> tuple[dict, list[str]]:
    """What A1111 adds to each weight of the checkpoint (networks.py network_apply_weights): a Linear or
    Conv2d layer gets its LoRA; a MultiheadAttention (OpenCLIP) gets q, k, v stacked on in_proj_weight and
    out on out_proj.weight, and only when all four are in the file. Returns the deltas (named as in
    `original`) and the keys that changed nothing: unmatched, or part of an incomplete attention."""
    import torch

    layers = a1111_layers(original, layout)
    matched, unused = a1111_match(lora, layers, blocks_per_level)
    deltas = {}

    def add(name: str, delta) -> None:
        deltas[name] = deltas.get(name, 0) + delta

    attentions = {name for name, params in layers.items() if "in_proj_weight" in params}
    for key, (layer, weights) in matched.items():
        params = layers[layer]
        if layer in attentions or layer.removesuffix("_out_proj") in attentions:
            continue  # applied below, by the attention module
        if "weight" not in params:
            raise ValueError(f"{key}: layer {layer} has no weight")
        weight = params["weight"]
        add(weight, lora_delta(weights, original[weight].shape))
    for attn in sorted(attentions):
        parts = {p: matched.get(f"{attn}_{p}_proj") for p in ("q", "k", "v", "out")}
        present = [p for p, hit in parts.items() if hit is not None]
        if not present:
            continue
        if len(present) < 4:
            unused += [f"{attn}_{p}_proj" for p in present]
            continue
        in_proj = original[layers[attn]["in_proj_weight"]]
        rows = in_proj.shape[0] // 3, in_proj.shape[1]
        stacked = torch.cat([lora_delta(parts[p][1], rows) for p in "qkv"])
        add(layers[attn]["in_proj_weight"], stacked)
        out = layers[f"{attn}_out_proj"]["weight"]
        add(out, lora_delta(parts["out"][1], original[out].shape))
    return deltas, sorted(unused)
