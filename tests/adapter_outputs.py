"""tiny-sd's pipeline, and what its denoiser and text encoder give for fixed inputs: adapters are compared by
those outputs, for the adapter tests.

Import by name (`from tests.adapter_outputs import denoiser_outputs, tiny_sd_pipeline`)."""

from __future__ import annotations

from tests.steps_fixtures import model_cache


def tiny_sd_pipeline():
    """A fresh tiny-sd pipeline (no adapter loaded)."""
    from runner.models import load_pipeline

    return load_pipeline(model_cache().base)


def denoiser_outputs(unet, te):
    """The UNet's prediction and the text encoder's hidden states for one fixed random latent, timestep and
    prompt."""
    import torch

    g = torch.Generator().manual_seed(0)
    x, t, ids = (
        torch.randn(1, 4, 16, 16, generator=g),
        torch.tensor([321]),
        torch.randint(0, 400, (1, 77), generator=g),
    )
    with torch.no_grad():
        hidden = te(ids)[0]
        return unet(x, t, hidden).sample, hidden
