"""sd1: Stable Diffusion 1.x and 2.x (epsilon and v-prediction), and the built-in tiny-sd models.

Components that take a LoRA: the UNet (configured by [lora] rank, alpha, dropout, bias,
target_modules) and the CLIP text encoder (text_encoder_rank, text_encoder_alpha, ...; trained when
[train] train_text_encoder is true). The denoiser gets no conditioning beyond the prompt embeddings.
"""

from __future__ import annotations

import math
from pathlib import Path

from runner.families import Component, Family, read_part, register, tiny_shapes

# Bump when the tiny-sd recipe below changes: it is part of the base model identity.
TINY_SD_VERSION = 1

CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")

UNET = Component(
    name="unet",
    attr="unet",
    settings_prefix="",
    default_targets=("to_q", "to_v", "query", "value"),
    kohya_prefix="lora_unet_",
    denoiser=True,
    target_presets=(
        ("qv", ("to_q", "to_v", "query", "value")),  # the recipe's (query, value: older diffusers names)
        ("attention", UNET_ATTENTION),
        # The transformer blocks' feed-forward, and their input and output projections, which are
        # linear in SD 2.x and SDXL (use_linear_projection) and 1x1 convolutions in SD 1.x.
        ("all-linear", UNET_ATTENTION + ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")),
    ),
)
TEXT_ENCODER = Component(
    name="text_encoder",
    attr="text_encoder",
    settings_prefix="text_encoder_",
    default_targets=("q_proj", "v_proj"),
    kohya_prefix="lora_te_",
    gate="train_text_encoder",
    learning_rate="text_encoder_learning_rate",
    # transformers 4 nests CLIPTextModel's modules under `text_model.`; transformers 5 does not.
    # kohya / A1111 names always carry it.
    text_model_level="text_model.",
    kohya_attention=CLIP_ATTENTION,
    target_presets=(
        ("qv", ("q_proj", "v_proj")),
        ("attention", CLIP_ATTENTION),
        ("all-linear", CLIP_ATTENTION + ("fc1", "fc2")),
    ),
)


class SD1(Family):
    name = "sd1"
    pipeline_class = "StableDiffusionPipeline"
    components = (UNET, TEXT_ENCODER)
    other_modules = ("vae",)
    folder_classes = (
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
    )
    builtins = {
        "tiny-sd": {"prediction_type": "epsilon"},
        "tiny-sd-v": {"prediction_type": "v_prediction"},
        "tiny-shapes": {},  # trained weights: runner/families/tiny_shapes.py
    }
    builtin_version = TINY_SD_VERSION

    def matches_file(self, keys: set[str]) -> bool:
        # The original (CompVis / Stability) layout; SDXL files have `conditioner.` instead.
        return any(k.startswith("cond_stage_model.") for k in keys) and any(
            k.startswith("model.diffusion_model.") for k in keys
        )

    def build_builtin(self, name: str, folder: Path) -> None:
        if name == "tiny-shapes":
            tiny_shapes.build(folder)
        else:
            build_tiny_sd(folder, **self.builtins[name])

    def builtin_identity(self, name: str) -> dict:
        if name == "tiny-shapes":  # its weights are a file: their hash is who it is
            return {"version": tiny_shapes.VERSION, "weights_sha256": tiny_shapes.weights_sha256()}
        return super().builtin_identity(name)

    def builtin_folder_name(self, name: str) -> str:
        if name == "tiny-shapes":
            return f"{name}-v{tiny_shapes.VERSION}-{tiny_shapes.weights_sha256()[:12]}"
        return super().builtin_folder_name(name)

    def native_size(self, pipe) -> int:
        return getattr(pipe, UNET.attr).config.sample_size * pipe.vae_scale_factor

    def tokenize(self, pipe, prompts: list[str], device):
        return pipe.tokenizer(
            [read_part(pipe.tokenizer, prompt) for prompt in prompts],
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)

    def encode_prompts(self, modules: dict, token_ids):
        return modules[TEXT_ENCODER.name](token_ids)[0]

    def predict(self, modules: dict, noisy, timesteps, prompts, batch: int, dtype, conditions=None):
        # [instance prompt] * batch, then [class prompt] * batch: the order of the latents.
        embeddings = prompts.repeat_interleave(batch, dim=0)
        extra = self.denoiser_kwargs(prompts, batch, conditions)
        return modules[UNET.name](noisy.to(dtype), timesteps, embeddings.to(dtype), **extra).sample

    def kohya_metadata(self, configs: dict[str, dict], denoiser_base) -> dict[str, str]:
        cross_dim = getattr(getattr(denoiser_base, "config", None), "cross_attention_dim", 768)
        version = "sd_v2" if cross_dim == 1024 else "sd_v1"
        return kohya_lora_metadata(
            configs, version, cross_dim == 1024, {TEXT_ENCODER.name: "ss_text_encoder"}
        )


def kohya_lora_metadata(
    configs: dict[str, dict], version: str, v2: bool, encoders: dict[str, str]
) -> dict[str, str]:
    """The `ss_*` metadata kohya's loaders read, from a PEFT config per component: the UNet's rank and
    alpha, the base model's version, and each trained text encoder's rank and alpha under its stem in
    `encoders` (component name -> e.g. "ss_text_encoder")."""
    import json

    unet_config = configs[UNET.name]
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(unet_config["r"]),
        "ss_network_alpha": kohya_alpha(unet_config),
        "ss_base_model_version": version,
        "ss_v2": str(v2),
        "ss_network_args": json.dumps(
            {
                "conv_dim": None,
                "unet_rank_pattern": unet_config.get("rank_pattern") or {},
                "unet_alpha_pattern": unet_config.get("alpha_pattern") or {},
            },
            sort_keys=True,
        ),
    }
    for component, stem in encoders.items():
        if component in configs:
            metadata[f"{stem}_dim"] = str(configs[component]["r"])
            metadata[f"{stem}_alpha"] = kohya_alpha(configs[component])
    return metadata


def kohya_alpha(config: dict) -> str:
    """The alpha a kohya loader needs for a PEFT config's scale: kohya scales by alpha / rank, and rsLoRA
    by alpha / sqrt(rank), so an rsLoRA adapter's kohya alpha is alpha * sqrt(rank)."""
    alpha = float(config["lora_alpha"])
    return _num(alpha * math.sqrt(config["r"]) if config.get("use_rslora") else alpha)


def _num(value) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


# --- tiny-sd ---------------------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    # The printable stand-ins that byte-level BPE tokenizers (GPT-2, CLIP) use for the 256 byte values.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_vocab() -> dict[str, int]:
    """The start of the built-in CLIP vocabularies: every byte, alone and at the end of a word."""
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for ch in _byte_alphabet():
            vocab[ch + suffix] = len(vocab)
    return vocab


def _tiny_tokenizer_vocab() -> dict[str, int]:
    # A character-level CLIP vocabulary. No merges are needed, so any prompt tokenizes, and no file has
    # to be downloaded.
    vocab = byte_vocab()
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def special_token_ids(vocab: dict[str, int]) -> dict[str, int]:
    """A CLIPTextConfig's start, end and padding token ids in `vocab` (CLIP pads with its end token)."""
    eos = vocab["<|endoftext|>"]
    return {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": eos, "pad_token_id": eos}


def clip_vit_l_config(vocab: dict[str, int]):
    """The configuration of CLIP ViT-L/14's text encoder: SD 1.x's, and SDXL's first (random weights)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        **special_token_ids(vocab),
    )


def sd_vae(sample_size: int, scaling_factor: float):
    """Stable Diffusion's VAE, with fresh weights (seed torch before calling): SD 1.x's and SDXL's share the
    architecture and differ in their native size and latent scaling factor."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=scaling_factor,
    )


def tiny_scheduler(prediction_type: str = "epsilon"):
    """The DDIM scheduler of the built-in SD 1.x models (tiny-sd, tiny-sd-v, tiny-shapes), with Stable
    Diffusion's noise schedule. Part of what those models are: change it with their versions."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def sd_pipeline(unet, vae, text_encoder, tokenizer, scheduler):
    """A StableDiffusionPipeline of these modules, with no safety checker (the built-in and benchmark
    models have none)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_vae():
    """The built-in models' VAE: 64 px images to 16 x 16 x 4 latents (seed torch before calling)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
    )


def build_tiny_sd(folder: Path, prediction_type: str = "epsilon") -> None:
    """Make a seeded, randomly initialised Stable Diffusion pipeline of a few MB in `folder`.

    The layout is a hub model's (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/),
    so loading it runs exactly the code that loads a real model. Native size: 64 x 64 pixels.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = _tiny_tokenizer_vocab()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        torch.manual_seed(0)
        vae = tiny_vae()
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                layer_norm_eps=1e-5,
                **special_token_ids(vocab),
            )
        )
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    pipe = sd_pipeline(unet, vae, text_encoder, tokenizer, tiny_scheduler(prediction_type))
    pipe.save_pretrained(folder, safe_serialization=True)


FAMILY = register(SD1())


# --- Stable Diffusion 1.5 shapes, random weights (benchmarks) ---------------------------------------


def sd15_random_pipeline(device: str = "cpu", dtype=None, seed: int = 0):
    """A pipeline with Stable Diffusion 1.5's architecture (860M-parameter UNet, its VAE and CLIP ViT-L/14
    text encoder) and seeded random weights: real memory and compute for benchmarks, no download.

    Built in memory on `device` (fast on a GPU). Its pictures are noise; the tokenizer is tiny-sd's
    character-level one, whose ids all fall inside CLIP's vocabulary.
    """
    import torch
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from runner.models.loading import quiet_libraries

    quiet_libraries()
    dtype = dtype or torch.float32
    vocab = _tiny_tokenizer_vocab()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=(
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        vae = sd_vae(sample_size=512, scaling_factor=0.18215)
        text_encoder = CLIPTextModel(clip_vit_l_config(vocab))
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    pipe = sd_pipeline(unet.to(dtype), vae.to(dtype), text_encoder.to(dtype), tokenizer, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe
