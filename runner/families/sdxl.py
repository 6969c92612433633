"""sdxl: Stable Diffusion XL (base 1.0 and fine-tunes of it), and the built-in tiny-sdxl model.

Components that take a LoRA: the UNet ([lora] rank, alpha, ...), the CLIP ViT-L text encoder
(text_encoder_rank, ...) and the OpenCLIP bigG text encoder with projection (text_encoder_2_rank, ...;
left out, each falls back to its text_encoder_* value). Both text encoders train when [train]
train_text_encoder is true.

The prompt is the concatenation of both encoders' penultimate hidden states; the denoiser also gets
`added_cond_kwargs`: the second encoder's pooled, projected output (`text_embeds`) and the time ids
(original height, original width, crop top, crop left, target height, target width) of each example.
Training latents are encoded in fp32: SDXL's VAE overflows in fp16. SDXL was trained at 1024 px; dbl's
[train] resolution default stays the project-wide one, so set resolution = 1024 for real SDXL models.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from runner.families import Family, read_part, register, sd1
from runner.families.sd1 import _tiny_tokenizer_vocab, kohya_lora_metadata, special_token_ids
from runner.host import to_device

# Bump when the tiny-sdxl recipe below changes: it is part of the base model identity.
TINY_SDXL_VERSION = 1

# The UNet as sd1 names it; the text encoders as SDXL's kohya files do (lora_te1_, lora_te2_).
UNET = sd1.UNET
TEXT_ENCODER = replace(sd1.TEXT_ENCODER, kohya_prefix="lora_te1_")
TEXT_ENCODER_2 = replace(
    sd1.TEXT_ENCODER,
    name="text_encoder_2",
    attr="text_encoder_2",
    settings_prefix="text_encoder_2_",
    kohya_prefix="lora_te2_",
    fallback_prefix="text_encoder_",
    beside_level=("text_projection",),
)
_UNUSED_KWARGS = ("safety_checker", "requires_safety_checker")
# The added-conditioning MLP (pooled text and time ids) under its original name: diffusers' kohya reader
# and A1111 drop the diffusers name `lora_unet_add_embedding_linear_1` (diffusers mangles it, A1111 finds
# no such layer), while both, and ComfyUI, map `lora_unet_label_emb_0_0`.
_KOHYA_UNET_NAMES = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


class SDXL(Family):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    components = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)
    other_modules = ("vae",)
    folder_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
    builtins = {"tiny-sdxl": {}}
    builtin_version = TINY_SDXL_VERSION
    vae_fp32 = True
    # 2: the size conditioning holds each image's size as read from its file, as SDXL was trained.
    training_version = 2
    denoiser_addition = "text_time"
    native_resolution = 1024

    def matches_file(self, keys: set[str]) -> bool:
        # The original (Stability "sgm") layout: two conditioner embedders, and the UNet's label_emb
        # (the pooled-text + time-id embedding). Refiner files have one embedder: they match, and
        # `refusal` says what they are.
        return any(k.startswith("conditioner.embedders.1.") for k in keys) or (
            any(k.startswith("model.diffusion_model.label_emb.") for k in keys)
            and any(k.startswith("conditioner.embedders.") for k in keys)
        )

    def refusal(self, index: dict | None = None, keys: set[str] | None = None) -> str | None:
        # The refiner has the second text encoder alone (model_index.json gives the first as null; its
        # file has one conditioner embedder), and its UNet is conditioned on an aesthetic score.
        if index is not None:
            entry = index.get(TEXT_ENCODER.attr, ())
            refiner = entry is None or None in entry
        else:
            refiner = not any(k.startswith("conditioner.embedders.1.") for k in keys or ())
        if refiner:
            return (
                "an SDXL refiner (it has no first text encoder, and its UNet is conditioned on an aesthetic "
                "score); dbl trains on SDXL base models and their fine-tunes"
            )
        return None

    def build_builtin(self, name: str, folder: Path) -> None:
        build_tiny_sdxl(folder, **self.builtins[name])

    def load_pretrained(self, folder: str, **kwargs):
        for key in _UNUSED_KWARGS:
            kwargs.pop(key, None)
        return super().load_pretrained(folder, **kwargs)

    def load_single_file(self, path: str, **kwargs):
        for key in _UNUSED_KWARGS:
            kwargs.pop(key, None)
        return super().load_single_file(path, **kwargs)

    def native_size(self, pipe) -> int:
        return pipe.unet.config.sample_size * pipe.vae_scale_factor

    def tokenize(self, pipe, prompts: list[str], device):
        return tuple(
            tokenizer(
                [read_part(tokenizer, prompt) for prompt in prompts],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            for tokenizer in (pipe.tokenizer, pipe.tokenizer_2)
        )

    def encode_prompts(self, modules: dict, token_ids):
        """(prompt embeddings, pooled embeddings), as StableDiffusionXLPipeline.encode_prompt makes them."""
        import torch

        ids_1, ids_2 = token_ids
        out_1 = modules[TEXT_ENCODER.name](ids_1, output_hidden_states=True)
        out_2 = modules[TEXT_ENCODER_2.name](ids_2, output_hidden_states=True)
        hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        return hidden, out_2[0]

    def denoiser_kwargs(self, prompts, batch: int, conditions=None) -> dict:
        _, pooled = prompts
        pooled = pooled.repeat_interleave(batch, dim=0)
        if conditions is None:
            raise ValueError("sdxl needs each example's size and crop (conditions)")
        time_ids = to_device(conditions, pooled.device, pooled.dtype)
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def predict(self, modules: dict, noisy, timesteps, prompts, batch: int, dtype, conditions=None):
        hidden, pooled = prompts
        embeddings = hidden.repeat_interleave(batch, dim=0).to(dtype)
        extra = self.denoiser_kwargs((hidden, pooled.to(dtype)), batch, conditions)
        return modules[UNET.name](noisy.to(dtype), timesteps, embeddings, **extra).sample

    def kohya_name(self, component: str, path: str) -> str:
        if component == UNET.name:
            path = _KOHYA_UNET_NAMES.get(path, path)
        return super().kohya_name(component, path)

    def kohya_metadata(self, configs: dict[str, dict], denoiser_base) -> dict[str, str]:
        encoders = {TEXT_ENCODER.name: "ss_text_encoder", TEXT_ENCODER_2.name: "ss_text_encoder_2"}
        return kohya_lora_metadata(configs, "sdxl_base_v1-0", False, encoders)


# --- tiny-sdxl -------------------------------------------------------------------------------------


def build_tiny_sdxl(folder: Path) -> None:
    """Make a seeded, randomly initialised SDXL pipeline of a few MB in `folder`, in a hub layout.

    The shapes are those of diffusers' own tiny SDXL test pipeline (text_time conditioning with
    8-wide time embeddings, 2 transformer layers in the second block, 64-wide cross attention from two
    32-wide text encoders, 80 = 6 * 8 + 32 added inputs). Native size: 64 x 64 pixels.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = _tiny_tokenizer_vocab()

    def text_config():
        return CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            layer_norm_eps=1e-5,
            hidden_act="gelu",
            projection_dim=32,
            **special_token_ids(vocab),
        )

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
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,
            cross_attention_dim=64,
            norm_num_groups=32,
        )
        torch.manual_seed(0)
        vae = sd1.tiny_vae()
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(text_config())
        torch.manual_seed(1)
        text_encoder_2 = CLIPTextModelWithProjection(text_config())
    sdxl_pipeline(unet, vae, text_encoder, text_encoder_2).save_pretrained(folder, safe_serialization=True)


def sdxl_pipeline(unet, vae, text_encoder, text_encoder_2):
    """A StableDiffusionXLPipeline of these modules with SDXL base's scheduler and, for both text encoders,
    tiny-sd's character-level tokenizer (the built-in and benchmark models)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    vocab = _tiny_tokenizer_vocab()
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
        tokenizer_2=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


FAMILY = register(SDXL())
