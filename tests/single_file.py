"""Tiny models written as single-file checkpoints in the original layouts: the inverse of diffusers'
single-file converters, for the shapes of the built-in tiny models.

    sd1     CompVis (SD 1.x): model.diffusion_model., first_stage_model., cond_stage_model.transformer.
    sd2     Stability SD 2.x: the same, with an OpenCLIP text encoder in cond_stage_model.model.
    sdxl    Stability "sgm": conditioner.embedders.0.transformer. (CLIP) and .1.model. (OpenCLIP)
"""

from __future__ import annotations

_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)


def _unet_to_original(unet) -> dict:
    """The inverse of diffusers' convert_ldm_unet_checkpoint, for tiny-sdxl's UNet."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = {
        **DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"],
        **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"],
    }
    per = unet.config.layers_per_block + 1
    attention_ups = [hasattr(b, "attentions") for b in unet.up_blocks]
    out = {}
    for key, value in unet.state_dict().items():
        if key in fixed:
            out[fixed[key]] = value
            continue
        parts = key.split(".")

        def resnet(rest):
            name = ".".join(rest)
            for new, old in _RESNET:
                name = name.replace(new, old)
            return name

        if parts[0] == "down_blocks":
            b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if kind == "resnets":
                name = f"input_blocks.{1 + b * per + j}.0.{resnet(rest)}"
            elif kind == "attentions":
                name = f"input_blocks.{1 + b * per + j}.1.{'.'.join(rest)}"
            else:  # downsamplers.0.conv.*
                name = f"input_blocks.{1 + b * per + per - 1}.0.op.{rest[-1]}"
        elif parts[0] == "up_blocks":
            b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if kind == "resnets":
                name = f"output_blocks.{b * per + j}.0.{resnet(rest)}"
            elif kind == "attentions":
                name = f"output_blocks.{b * per + j}.1.{'.'.join(rest)}"
            else:
                name = f"output_blocks.{b * per + per - 1}.{2 if attention_ups[b] else 1}.conv.{rest[-1]}"
        elif parts[0] == "mid_block":
            j, rest = int(parts[2]), parts[3:]
            if parts[1] == "resnets":
                name = f"middle_block.{2 * j}.{resnet(rest)}"
            else:
                name = f"middle_block.1.{'.'.join(rest)}"
        else:
            raise AssertionError(key)
        out[name] = value
    return {f"model.diffusion_model.{k}": v for k, v in out.items()}


def _vae_to_original(vae) -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n = len(vae.config.up_block_types)
    attention = (
        ("group_norm", "norm"),
        ("to_q", "q"),
        ("to_k", "k"),
        ("to_v", "v"),
        ("to_out.0", "proj_out"),
    )
    out = {}
    for key, value in vae.state_dict().items():
        name = fixed.get(key, key)
        for coder in ("encoder", "decoder"):
            name = name.replace(f"{coder}.mid_block.resnets.0.", f"{coder}.mid.block_1.")
            name = name.replace(f"{coder}.mid_block.resnets.1.", f"{coder}.mid.block_2.")
            if f"{coder}.mid_block.attentions.0." in name:
                name = name.replace(f"{coder}.mid_block.attentions.0.", f"{coder}.mid.attn_1.")
                for new, old in attention:
                    name = name.replace(f"attn_1.{new}.", f"attn_1.{old}.")
        for i in range(n):
            name = name.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            name = name.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            name = name.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.")
            name = name.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")
        out[f"first_stage_model.{name.replace('conv_shortcut', 'nin_shortcut')}"] = value
    return out


def _text_state(text_encoder) -> dict:
    """A CLIP text encoder's weights with their `text_model.` level, which transformers 5 dropped from
    CLIPTextModel (CLIPTextModelWithProjection keeps it)."""
    return {
        (k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
        for k, v in text_encoder.state_dict().items()
    }


def _open_clip_to_original(text_encoder, prefix: str) -> dict:
    """OpenCLIP's names: one fused in_proj per attention, mlp.c_fc / c_proj, ln_1 / ln_2."""
    import torch

    state = _text_state(text_encoder)
    out = {
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
    }
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].T.contiguous()
    for layer in range(text_encoder.config.num_hidden_layers):
        src, dst = f"text_model.encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [state[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"], dim=0
            )
            out[dst + f"attn.out_proj.{kind}"] = state[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = state[src + f"layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = state[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = state[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = state[src + f"mlp.fc2.{kind}"]
    return {prefix + k: v for k, v in out.items()}


def _clip_to_original(text_encoder, prefix: str) -> dict:
    """CLIP ViT-L keeps the transformers names, under `prefix`."""
    return {
        prefix + k: v for k, v in _text_state(text_encoder).items() if not k.startswith("text_projection")
    }


def original_state_dict(pipe, layout: str) -> dict:
    """The pipeline's weights named as in a single file of `layout` ("sd1", "sd2" or "sdxl")."""
    tensors = {**_unet_to_original(pipe.unet), **_vae_to_original(pipe.vae)}
    if layout == "sdxl":
        tensors.update(_clip_to_original(pipe.text_encoder, "conditioner.embedders.0.transformer."))
        tensors.update(_open_clip_to_original(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    elif layout == "sd2":
        tensors.update(_open_clip_to_original(pipe.text_encoder, "cond_stage_model.model."))
    elif layout == "sd1":
        tensors.update(_clip_to_original(pipe.text_encoder, "cond_stage_model.transformer."))
    else:
        raise ValueError(layout)
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def save_single_file(pipe, path, layout: str = "sdxl") -> None:
    from safetensors.torch import save_file

    save_file(original_state_dict(pipe, layout), str(path))


def build_wide_tiny_sdxl(folder) -> None:
    """tiny-sdxl with a 48-wide second text encoder, saved as a diffusers folder.

    diffusers' single-file loader tells SDXL's two encoders apart by their widths (768 and 1280); tiny-sdxl's
    are both 32 wide, so its single file loads the first encoder's weights into the second. This model is
    tiny-sdxl with the widths apart: cross attention 32 + 48 and 6 x 8 + 48 added inputs.
    """
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    from runner.models import ensure_builtin

    pipe = StableDiffusionXLPipeline.from_pretrained(ensure_builtin("tiny-sdxl"))
    config = pipe.text_encoder_2.config.to_dict()
    config.update(hidden_size=48, projection_dim=48)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        text_encoder_2 = CLIPTextModelWithProjection(type(pipe.text_encoder_2.config)(**config))
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(
            {**pipe.unet.config, "cross_attention_dim": 80, "projection_class_embeddings_input_dim": 96}
        )
    pipe.register_modules(text_encoder_2=text_encoder_2, unet=unet)
    pipe.save_pretrained(folder, safe_serialization=True)


def keys_only_file(path, keys):
    """A .safetensors file whose header names `keys` (one float each): what family detection reads."""
    import json
    import struct

    header = {
        k: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, k in enumerate(keys)
    }
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * (4 * len(keys)))
    return path
