"""What the benchmarks share: drawn pictures to train on, SD 1.5's architecture saved with random weights,
and the peak memory of a process tree."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path


def draw_discs(path: Path, rng, size: int, discs: int = 6, **save) -> None:
    """One `size` px square picture: `discs` coloured discs on a plain background, colours and places
    drawn from `rng` (a numpy Generator); `save` goes to PIL's `Image.save` (e.g. quality=90)."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size]
    img = np.broadcast_to(rng.uniform(0, 255, 3), (size, size, 3)).copy()
    for _ in range(discs):
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(size / 16, size / 4)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    Image.fromarray(img.astype(np.uint8)).save(path, **save)


def peak_rss(process, interval_s: float = 0.05) -> int:
    """Wait for a `subprocess.Popen` to exit; the largest sum of its process tree's RSS seen meanwhile,
    in bytes (sampled every `interval_s`)."""
    import psutil

    watched, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            tree = [watched, *watched.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:  # a child that ended between the listing and the reading
            pass
        time.sleep(interval_s)
    return peak


def saved_sd15_random(folder: Path, device: str, seed: int = 0) -> Path:
    """SD 1.5's architecture with seeded random weights (runner.models.sd15_random_pipeline), saved in fp16
    as a diffusers folder: made on `device` (fast on a GPU) the first time, and kept. Saved beside it and
    renamed, so that a killed save leaves no folder that looks whole."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch

    from runner.models import sd15_random_pipeline

    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    pipe = sd15_random_pipeline(device=device, dtype=torch.float16, seed=seed)
    pipe.save_pretrained(partial, safe_serialization=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, folder)
    return folder
