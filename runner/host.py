"""Host-to-device copies that do not wait for the device. torch is imported inside functions.

A copy from ordinary (pageable) host memory to a CUDA device first waits until the device has finished
everything queued before it, so the host cannot run ahead: a training step would pay for its launches and
its arithmetic one after the other instead of at once. From pinned (page-locked) memory the copy is queued
like a kernel. torch's pinned-memory allocator keeps each block until the copies out of it are done, so a
temporary pinned tensor is safe to drop at once.
"""

from __future__ import annotations


def to_device(value, device, dtype=None):
    """`value` (a tensor on the host, or anything torch.tensor takes) on `device`, in `dtype` if given
    (converted on the host, where the numbers are the same)."""
    import torch

    tensor = torch.as_tensor(value, dtype=dtype)
    if str(device).startswith("cuda") and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
