"""Project file schema v1, its two tables of training settings: [train] and [lora] (also per subject, as
[subjects.<name>.train] and [subjects.<name>.lora]). runner.project.schema holds the others and names
these among its tables."""

from __future__ import annotations

from dataclasses import dataclass

from runner.project.fields import opt

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)


# The largest multiple of 8 whose square fits runner.images.MAX_RESIZED_PIXELS: at a larger resolution
# every image is too large to train on.
MAX_RESOLUTION = 5792


@dataclass(frozen=True)
class TrainSettings:
    """[train] and [subjects.<name>.train]: the training loop."""

    resolution: int = opt(
        512,
        "training image size in pixels (images are resized, then cropped square)",
        "int",
        minimum=8,
        maximum=MAX_RESOLUTION,
        multiple=8,
    )
    steps: int = opt(800, "optimizer steps (the recipe's max_train_steps)", "int", minimum=1)
    batch_size: int = opt(
        1, "instance images per step (as many class images are added with a prior)", "int", minimum=1
    )
    learning_rate: float = opt(
        1e-4, "learning rate (Prodigy: a factor on the step size it finds, usually 1.0)", "float", minimum=0
    )
    text_encoder_learning_rate: float | None = opt(
        None, "learning rate of the text encoder LoRA; default: learning_rate", "float?", minimum=0
    )
    lr_scheduler: str = opt("constant", "learning-rate schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = opt(
        0, "warm-up steps of the schedule (`constant` has none: use `constant_with_warmup`)", "int", minimum=0
    )
    lr_num_cycles: int = opt(1, "restarts of cosine_with_restarts", "int", minimum=1)
    lr_power: float = opt(1.0, "power of the polynomial schedule", "float")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step", "int", minimum=1)
    gradient_checkpointing: bool | str = opt(
        "auto",
        "recompute activations to save memory (slower, same result); auto: on only when a CUDA device's "
        "free memory would not hold the step without it",
        "switch",
        fingerprint=False,
    )
    compile: bool | str = opt(
        "auto",
        "compile the denoiser with torch.compile (fewer, fused kernels a step; same result to rounding); "
        "auto: off (compiling takes minutes, which a run of a few thousand steps does not earn back; "
        "true for long runs)",
        "switch",
        fingerprint=False,
    )
    cuda_graphs: bool | str = opt(
        "auto",
        "replay the denoiser's forward and backward, and the training text encoders', as CUDA graphs (one "
        "launch a pass; the eager result); auto: on on CUDA without buckets, gradient checkpointing, UNet "
        "LoRA dropout or compile = true",
        "switch",
        fingerprint=False,
    )
    train_text_encoder: bool = opt(True, "also train a LoRA on the text encoder", "bool")
    checkpoint_every: int = opt(
        200, "save a resumable checkpoint every N steps (0: never)", "int", minimum=0, fingerprint=False
    )
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: no clipping)", "float", minimum=0)
    optimizer: str = opt(
        "adamw",
        "the optimizer (adamw8bit needs bitsandbytes and CUDA, prodigy `pip install 'dbl[prodigy]'`)",
        choices=OPTIMIZERS,
        omit_default=True,
    )
    adam_beta1: float = opt(0.9, "AdamW (and Prodigy) beta1", "float", minimum=0)
    adam_beta2: float = opt(0.999, "AdamW (and Prodigy) beta2", "float", minimum=0)
    adam_weight_decay: float = opt(1e-2, "AdamW (and Prodigy) decoupled weight decay", "float", minimum=0)
    adam_epsilon: float = opt(1e-8, "AdamW (and Prodigy) epsilon", "float", minimum=0)
    use_8bit_adam: bool = opt(
        False, 'the same as optimizer = "adamw8bit" (kept for existing projects)', "bool"
    )
    # Prodigy's own keys (optimizer = "prodigy"); a value away from the default is an error otherwise.
    prodigy_d_coef: float = opt(
        1.0,
        "Prodigy: factor on its step-size estimate (0.5 to 2 are usual)",
        "float",
        minimum=0,
        omit_default=True,
    )
    prodigy_beta3: float | None = opt(
        None,
        "Prodigy: decay of its step-size estimate; default: sqrt(adam_beta2)",
        "float?",
        minimum=0,
        maximum=1,
        omit_default=True,
        example=0.99,
    )
    prodigy_use_bias_correction: bool = opt(
        False, "Prodigy: Adam's bias correction of the step size", "bool", omit_default=True
    )
    prodigy_safeguard_warmup: bool = opt(
        False, "Prodigy: leave the learning rate out of its estimate (warm-up)", "bool", omit_default=True
    )
    snr_gamma: float | None = opt(
        None,
        "min-SNR loss weighting (Hang et al. 2023) with this gamma, 5.0 is usual; 0 turns it off (a "
        "subject's, where [train] gives one); default: off",
        "float?",
        minimum=0,
        omit_default=True,
        off=0,
        example=5.0,
    )
    noise_offset: float = opt(
        0.0,
        "offset noise: add this times a random number per example and channel to the noise, e.g. 0.05",
        "float",
        minimum=0,
        omit_default=True,
    )
    center_crop: bool = opt(False, "center crop instead of random crop", "bool")
    random_flip: bool = opt(False, "flip images horizontally at random", "bool")
    caption_dropout: float | None = opt(
        None,
        "probability of training an example on the empty prompt; default: never",
        "float?",
        minimum=0,
        maximum=1,
        example=0.1,
    )
    buckets: bool = opt(
        False,
        "group images by aspect ratio into buckets of about resolution² pixels instead of cropping "
        "them square; each batch holds one bucket",
        "bool",
        omit_default=True,
    )
    bucket_min_side: int | None = opt(
        None,
        "shortest side of a bucket in pixels; default: resolution / 2",
        "int?",
        minimum=8,
        omit_default=True,
    )
    bucket_max_side: int | None = opt(
        None,
        "longest side of a bucket in pixels; default: resolution x 2",
        "int?",
        minimum=8,
        omit_default=True,
    )
    bucket_step: int | None = opt(
        None,
        "bucket sides are multiples of this (a multiple of 8); default: 64, or 8 when resolution is "
        "below 256 or not a multiple of 64",
        "int?",
        minimum=8,
        omit_default=True,
    )
    save_steps: list[int] | None = opt(
        None,
        "also keep the adapter at these steps, as adapters/<subject>@<step>/ (a render may name "
        "'<subject>@<step>'; [] keeps none, where [train] gives some); default: none",
        "list[int]?",
        minimum=1,
        fingerprint=False,
        omit_default=True,
        empty_is_none=True,
    )
    log: str | None = opt(
        None,
        "also write the per-step losses, learning rate and step time as TensorBoard event files under "
        '<out>/logs/<subject>/ (needs the tensorboard package); "none" turns it off (a subject\'s, where '
        "[train] sets it)",
        "str?",
        choices=("tensorboard",),
        off="none",
        fingerprint=False,
        omit_default=True,
    )
    cache_latents: bool = opt(
        True,
        "encode each image once and reuse its latents (the same result when crops are fixed, up to rounding:"
        " the cache encodes images in batches, which moves the weights by about 1e-6; on a GPU, where every"
        " image's latents are cached, the VAE's weights wait in host memory while the steps run)",
        "bool",
        fingerprint=False,
    )


@dataclass(frozen=True)
class LoraSettings:
    """[lora] and [subjects.<name>.lora]: the adapters' shape."""

    rank: int = opt(16, "UNet LoRA rank r", "int", minimum=1)
    alpha: float = opt(27, "UNet LoRA alpha (scale = alpha / rank)", "float", minimum=0)
    dropout: float = opt(0.0, "UNet LoRA dropout", "float", minimum=0, maximum=1)
    bias: str = opt("none", "UNet LoRA bias training", choices=("none", "all", "lora_only"))
    target_modules: list[str] | str = opt(
        ["to_q", "to_v", "query", "value"],
        "UNet modules that get a LoRA, or a preset: qv (these), attention (to_q, to_k, to_v, to_out.0), "
        "all-linear (attention and feed-forward, and proj_in/proj_out where they are linear)",
        "targets",
    )
    use_dora: bool = opt(
        False,
        "UNet LoRA as DoRA: a trained magnitude per output feature on top of the low-rank direction",
        "bool",
        omit_default=True,
    )
    use_rslora: bool = opt(
        False,
        "UNet LoRA scale alpha / sqrt(rank) instead of alpha / rank (rank-stabilised)",
        "bool",
        omit_default=True,
    )
    text_encoder_rank: int = opt(16, "text encoder LoRA rank", "int", minimum=1)
    text_encoder_alpha: float = opt(17, "text encoder LoRA alpha", "float", minimum=0)
    text_encoder_dropout: float = opt(0.0, "text encoder LoRA dropout", "float", minimum=0, maximum=1)
    text_encoder_bias: str = opt(
        "none", "text encoder LoRA bias training", choices=("none", "all", "lora_only")
    )
    text_encoder_target_modules: list[str] | str = opt(
        ["q_proj", "v_proj"],
        "text encoder modules that get a LoRA, or a preset: qv (these), attention (q, k, v and out_proj), "
        "all-linear (attention and the MLP's fc1, fc2)",
        "targets",
    )
    text_encoder_use_dora: bool = opt(False, "text encoder LoRA as DoRA", "bool", omit_default=True)
    text_encoder_use_rslora: bool = opt(
        False, "text encoder LoRA scale alpha / sqrt(rank)", "bool", omit_default=True
    )
    # SDXL's second text encoder; left out: the text_encoder_* value.
    text_encoder_2_rank: int | None = opt(
        None, "SDXL second text encoder LoRA rank; default: text_encoder_rank", "int?", minimum=1
    )
    text_encoder_2_alpha: float | None = opt(
        None, "SDXL second text encoder LoRA alpha; default: text_encoder_alpha", "float?", minimum=0
    )
    text_encoder_2_dropout: float | None = opt(
        None,
        "SDXL second text encoder LoRA dropout; default: text_encoder_dropout",
        "float?",
        minimum=0,
        maximum=1,
        example=0.0,
    )
    text_encoder_2_bias: str | None = opt(
        None,
        "SDXL second text encoder LoRA bias training; default: text_encoder_bias",
        "str?",
        choices=("none", "all", "lora_only"),
    )
    text_encoder_2_target_modules: list[str] | str | None = opt(
        None,
        "SDXL second text encoder modules that get a LoRA, or a preset; default: text_encoder_target_modules",
        "targets?",
    )
    text_encoder_2_use_dora: bool | None = opt(
        None,
        "SDXL second text encoder LoRA as DoRA; default: text_encoder_use_dora",
        "bool?",
        omit_default=True,
    )
    text_encoder_2_use_rslora: bool | None = opt(
        None,
        "SDXL second text encoder rsLoRA scale; default: text_encoder_use_rslora",
        "bool?",
        omit_default=True,
    )
