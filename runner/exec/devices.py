"""Which devices a step may use when several run at once. Pure: no torch, no CUDA calls."""

from __future__ import annotations

import os


class DevicePool:
    """GPUs shared by running steps: each GPU takes at most `per_gpu` steps at once, and a step that
    needs `n` GPUs (a train step with num_processes = n) gets n different ones. No GPUs: every step
    gets none (they share the CPU cores)."""

    def __init__(self, devices: list[str] | tuple[str, ...], per_gpu: int = 1):
        if per_gpu < 1:
            raise ValueError("per_gpu must be at least 1")
        self.devices = list(dict.fromkeys(devices))
        self.per_gpu = per_gpu
        self.used = {d: 0 for d in self.devices}

    def fits(self, n: int) -> bool:
        """Could a step that needs n GPUs ever run here?"""
        return not self.devices or n <= len(self.devices)

    def acquire(self, n: int = 1) -> tuple[str, ...] | None:
        """n GPUs for one step (the least used first), or None when not enough are free now."""
        if not self.devices:
            return ()
        free = sorted((d for d in self.devices if self.used[d] < self.per_gpu), key=lambda d: self.used[d])
        if len(free) < n:
            return None
        taken = tuple(free[:n])
        for d in taken:
            self.used[d] += 1
        return taken

    def release(self, taken: tuple[str, ...]) -> None:
        for d in taken:
            self.used[d] -= 1


def parse_gpus(text: str | None) -> list[str]:
    """`--gpus 0,1,3` -> ['0', '1', '3']; None: the CUDA devices this machine shows (none on a CPU)."""
    if text is not None:
        return [g.strip() for g in text.split(",") if g.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    try:  # without importing torch: the driver's device nodes
        return sorted(
            (
                n[len("nvidia") :]
                for n in os.listdir("/dev")
                if n[len("nvidia") :].isdigit() and n.startswith("nvidia")
            ),
            key=int,
        )
    except OSError:
        return []


def gpus_problem(gpus: list[str]) -> str | None:
    """Why `--gpus` names something CUDA_VISIBLE_DEVICES would not take, or None. CUDA takes indices
    and UUIDs (`nvidia-smi -L`: GPU-..., MIG-...); it stops at the first entry it cannot read, and a
    step given no GPU would run on the CPU without a word."""
    for g in gpus:
        if not (g.isdigit() or g.startswith(("GPU-", "MIG-"))):
            return (
                f"--gpus: {g!r} is not a GPU; give indices or UUIDs (nvidia-smi -L), comma-separated, "
                "e.g. --gpus 0,1,3"
            )
    return None
