"""What the benchmarks share: drawn pictures to train on, and the peak memory of a process tree."""

from __future__ import annotations

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
