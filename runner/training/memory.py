"""Whether a train step fits the device's memory without gradient checkpointing (`gradient_checkpointing =
"auto"`). torch is imported inside functions.

Checkpointing recomputes activations in the backward pass: it saves memory and costs about a third more
time a step. "auto" turns it on only on a CUDA device whose free memory would not hold the step without it;
on a CPU or MPS it stays off (host memory is rarely what limits a step there, and time is).
"""

from __future__ import annotations

from runner.training import switches

# Activation bytes a training step keeps for its backward pass, per denoiser parameter, per latent pixel
# and per example, at 2 bytes a value (fp16/bf16). From SD 1.5's shapes (860M UNet parameters) at 512 px
# (64 x 64 latents): diffusers' script, which does not checkpoint, peaks about 4.2 GB above its 2.1 GB of
# weights with one instance and one class example, i.e. 2.1 GB an example.
ACTIVATION_BYTES = 2.1e9 / (860e6 * 64 * 64)
# Fraction of the free memory a step may plan to use: the allocator's fragmentation and the workspaces of
# the kernels need the rest.
HEADROOM = 0.85


def step_bytes(
    denoiser_parameters: int, latent_pixels: int, examples: int, value_bytes: int, trainable: int
) -> int:
    """Estimated memory a step needs beyond the frozen weights, without checkpointing: the denoiser's
    activations, and the trainable parameters' fp32 gradients and two AdamW moments."""
    activations = ACTIVATION_BYTES * denoiser_parameters * latent_pixels * examples * value_bytes / 2
    return int(activations + trainable * 4 * 3)


def checkpointing(setting, device: str, free: int | None = None, needed: int | None = None):
    """(on, why) for a `gradient_checkpointing` setting: true, false or "auto". With "auto", `free` and
    `needed` are the device's free bytes and the step's estimate (both known on CUDA only)."""
    switches.check(setting, "gradient_checkpointing")
    if setting != "auto":
        return setting, "set in [train]"
    kind = device.split(":")[0]
    if kind != "cuda" or free is None or needed is None:
        return False, f"auto: off on {kind}"
    gb = f"the step needs about {needed / 1e9:.1f} GB, {free / 1e9:.1f} GB free"
    if needed <= HEADROOM * free:
        return False, f"auto: {gb}"
    return True, f"auto: {gb}"


def describe(on: bool, why: str) -> str:
    """The log line of the choice."""
    return switches.describe("gradient checkpointing", on, why)


def choose(setting, device: str, pipe, denoiser, trainable: dict, examples: int, resolution: int, dtype):
    """(on, why) for this run: the device's free memory against the step's estimate on CUDA."""
    if setting != "auto" or not device.startswith("cuda"):
        return checkpointing(setting, device)
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    needed = step_bytes(
        sum(p.numel() for p in denoiser.parameters()),
        (resolution // factor) ** 2,
        examples,
        torch.tensor([], dtype=dtype).element_size(),
        sum(p.numel() for group in trainable.values() for p in group.values()),
    )
    return checkpointing(setting, device, free, needed)
