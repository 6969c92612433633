"""A caption of megabytes is tokenized for the tokens the text encoder reads, not all of it, and every
caption trains on the token ids it did when all of it was tokenized."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from runner import families


def _tokenizers():
    """The built-in models' tokenizers: tiny-sd's (a token a character, 77 kept) and tiny-shapes' (real
    BPE merges, 24 kept)."""
    from transformers import CLIPTokenizer

    from runner.families import sd1, tiny_shapes

    return {
        "tiny-sd": CLIPTokenizer(vocab=sd1._tiny_tokenizer_vocab(), merges=[], model_max_length=77),
        "tiny-shapes": tiny_shapes.make_tokenizer(),
    }


def _captions(limit: int) -> list[str]:
    """Normal captions and ones at every edge of where a huge one is cut."""
    rng = random.Random(0)
    words = ["a", "photo", "of", "sks", "dog", "on", "the", "beach,", "circle", "red", "2024", "!!", "'s"]
    odd = [
        "ΟΔΟΣ",
        "ΣΑΣ",
        "狗的照片",
        "e\u0301",
        "\u0301x",
        "a\x1cb",
        "\x07",
        "\U0001f436",
        "&amp;",
        "x\u00a0y",
    ]
    captions = ["", "a photo of sks dog", "a  photo\tof\nsks dog ", " lead", "trail ", "ΣΑΣ ΟΔΟΣ"]
    edge, huge = 8 * limit, families.COUNTED_CHARS  # where a cut is looked for, and from what length
    for length in [*range(edge - 3, edge + 4), *range(huge - 3, huge + 4), huge + edge, 2 * huge, 5 * huge]:
        for pool in (words, words + odd):
            text = ""
            while len(text) < length:
                text += rng.choice(pool) + rng.choice([" ", " ", " ", "  ", ""])
            captions.append(text[:length])
    captions.append("x" * (huge + 3 * edge))  # no space to cut at
    captions.append(" " * (huge + 3 * edge) + "dog " * edge)  # no token before the first cut
    captions.append(
        "\x1c " * (huge + 3 * edge) + "dog " * edge
    )  # a character the tokenizer drops, many times
    captions.append("dog " * (huge // 4) + "x" * (3 * huge))  # the cut in the last word of the start
    return captions


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-shapes"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_captions_train_on_the_token_ids_of_the_whole_caption(name, family):
    tokenizer = _tokenizers()[name]
    pipe = SimpleNamespace(tokenizer=tokenizer, tokenizer_2=tokenizer)
    captions = _captions(tokenizer.model_max_length)
    assert sum(families.read_part(tokenizer, c) != c for c in captions) > 10  # cut: the case to prove
    ids = families.get(family).tokenize(pipe, captions, "cpu")
    whole = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    for got in ids if isinstance(ids, tuple) else (ids,):
        assert got.tolist() == whole.tolist()


def test_a_caption_of_megabytes_is_tokenized_in_part(tmp_path):
    """A 2 MB caption was tokenized whole four times (its warning's token count, three times, and its
    token ids): seconds with tiny-sd's tokenizer, half a minute with a real one."""
    from runner.training.captions import long_captions

    tokenizer = _tokenizers()["tiny-sd"]
    read = []

    def counting(text, **kwargs):
        read.append(sum(map(len, text)) if isinstance(text, list) else len(text))
        return tokenizer(text, **kwargs)

    counting.model_max_length = tokenizer.model_max_length
    pipe = SimpleNamespace(tokenizer=counting)
    caption = "a photo of sks dog on the beach " * 65_536  # 2 MB
    family = families.get("sd1")
    said = long_captions(family, pipe, {tmp_path / "00.txt": caption})
    ids = family.tokenize(pipe, [caption], "cpu")
    start = caption[:2_000]  # 2,000 characters are more than 77 tokens of tiny-sd's, a character each
    assert ids.tolist() == [tokenizer(start, max_length=77, padding="max_length", truncation=True).input_ids]
    assert said == [
        f"warning: caption {tmp_path / '00.txt'} is over 7504 tokens; the text encoder reads 77, so the end is "
        f"cut off: {caption[-40:]!r}"
    ]
    assert read and max(read) < 20_000, read
