"""The notebook API says nothing of the libraries' own deprecations: in a notebook nothing hides them."""

from __future__ import annotations

import warnings

import pytest

from runner import api
from tests.blend_fixtures import adapters  # noqa: F401

pytestmark = pytest.mark.torch


def test_loading_adapters_again_and_again_shows_no_library_future_warning(adapters):  # noqa: F811
    """transformers' `is_gradient_checkpointing is deprecated`, raised by PEFT's wrapping of each text
    encoder, came with every load_pipeline of a loop."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            pipe = api.load_pipeline("tiny-sd", {"a": adapters["a"]}, device="cpu")
            api.load_adapter(pipe, adapters["b"], "b")
    assert api.loaded_adapters(pipe) == ["a", "b"]
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
