"""tiny-shapes: a small Stable Diffusion 1.x pipeline that draws the shapes world (runner.shapes).

Unlike tiny-sd it has trained weights: bench/train_tiny_shapes.py trains its VAE, CLIP text encoder
and UNet from scratch, from a seed, on captioned pictures of shapes, and writes WEIGHTS (fp16
safetensors, keys prefixed with the component name). The architecture and tokenizer are made here in
code; `build` puts them and the weights into a diffusers folder, so loading it runs the code that
loads any SD 1.x model. Native size 64 x 64 pixels; latents 8 x 8 x 4.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

WEIGHTS = Path(__file__).with_name("tiny_shapes.safetensors")
VERSION = 1  # bump when the architecture or tokenizer below changes
MAX_TOKENS = 24
UNET_CHANNELS = (64, 128)  # the longest prompt the text encoder reads, start and end tokens included

# Words of the shapes world, and of the prompts people write around them: one token each.
WORDS = (
    "a", "an", "on", "of", "the", "in", "with", "and", "photo", "picture", "drawing",
    "background", "shape", "small", "large", "big",
    "red", "green", "blue", "yellow", "white", "black",
    "circle", "square", "triangle",
)  # fmt: skip


def tokenizer_files() -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary and merges in which every word of WORDS is one token; any other word
    (the identifier "sks", a rare shape) falls apart into characters, which no training caption has."""
    from runner.families.sd1 import byte_vocab

    vocab = byte_vocab()
    ranks: dict[tuple[str, str], int] = {}
    pending = list(WORDS)
    while pending:  # add merges until BPE, which applies them by rank, makes each word one token
        word = pending.pop(0)
        symbols = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        if len(symbols) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
            vocab.setdefault(symbols[0] + symbols[1], len(vocab))
            pending.append(word)
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda item: item[1])]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word's symbols: merge the best-ranked adjacent pair until none is left."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), pair) for pair in zip(symbols, symbols[1:], strict=False)]
        rank, (a, b) = min(pairs)
        if rank == len(ranks):
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def make_tokenizer(folder: Path | None = None):
    """The CLIPTokenizer (written to `folder/tokenizer` when given, as a hub model has it)."""
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files()
    tokenizer = CLIPTokenizer(
        vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=MAX_TOKENS
    )
    if folder is not None:
        tokenizer.save_pretrained(folder / "tokenizer")
    return tokenizer


def make_modules(vocab_size: int, unet_channels: tuple[int, int] = UNET_CHANNELS):
    """(unet, vae, text_encoder) with fresh weights (seed torch before calling)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from runner.families.sd1 import special_token_ids

    vocab, _ = tokenizer_files()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=1,  # one group: a group per channel would take the colour of plain areas away
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            layer_norm_eps=1e-5,
            **special_token_ids(vocab),
        )
    )
    return unet, vae, text_encoder


def make_scheduler():
    """The scheduler it trains and ships with: the built-in SD 1.x models' DDIM."""
    from runner.families.sd1 import tiny_scheduler

    return tiny_scheduler()


def weights_sha256() -> str:
    """The weights file's hash: part of the base model's identity ("missing" without the file)."""
    try:
        stat = WEIGHTS.stat()
    except OSError:
        return "missing"
    return _sha256(str(WEIGHTS), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build(folder: Path) -> None:
    """Write the tiny-shapes pipeline, with its trained weights, to `folder` as a diffusers folder."""
    import torch
    from safetensors.torch import load_file

    from runner.errors import ModelError
    from runner.families.sd1 import sd_pipeline

    if not WEIGHTS.is_file():
        raise ModelError(
            f"tiny-shapes weights are missing ({WEIGHTS}); train them: python bench/train_tiny_shapes.py"
        )
    tokenizer = make_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet, vae, text_encoder = make_modules(len(tokenizer))
    state = load_file(str(WEIGHTS))
    meta = json.loads(_metadata(WEIGHTS).get("vae_scaling_factor", "1.0"))
    for prefix, module in (("unet.", unet), ("vae.", vae), ("text_encoder.", text_encoder)):
        part = {k.removeprefix(prefix): v.float() for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(part, strict=True)
    vae.register_to_config(scaling_factor=float(meta))
    pipe = sd_pipeline(unet, vae, text_encoder, tokenizer, make_scheduler())
    pipe.save_pretrained(folder, safe_serialization=True)


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}
