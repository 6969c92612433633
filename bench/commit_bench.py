"""What keeping a step's outputs costs after the step: copying them out to be committed, each file hashed as
it is copied (the one read of its bytes), and storing the step's folder in the run-cache (every file flushed
to disk).

    python bench/commit_bench.py                          # a render of 50 images, then of 400
    python bench/commit_bench.py --files 400 --size 20000 --repeat 5 [--json]
    python bench/commit_bench.py --files 1 --size 1000000000 --repeat 3     # one 1 GB adapter

Each file is SIZE random bytes (a 64 px PNG is about 10 kB, a LoRA adapter a few MB). A fresh folder is made
for every repeat, as a step makes one; the median of the repeats is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def once(files: int, size: int) -> tuple[float, float]:
    """Seconds to store a fresh folder of `files` files in the run-cache, and to copy it out and hash it."""
    from runner.fingerprint import FileHasher
    from runner.store import RunCache, stage

    with tempfile.TemporaryDirectory(prefix="dbl-commit-") as tmp:
        root = Path(tmp)
        out = root / "out"
        out.mkdir()
        block = os.urandom(min(size, 1 << 20))
        for i in range(files):
            with open(out / f"{i:04d}.png", "wb") as f:
                for start in range(0, size, len(block)):
                    f.write(block[: size - start])
        cache = RunCache(root / "cache")
        clock = time.perf_counter()
        manifest = stage(out, root / "staged", {}, FileHasher())
        copied = time.perf_counter() - clock
        clock = time.perf_counter()
        cache.store("f" * 64, out, manifest, {})
        return time.perf_counter() - clock, copied


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, action="append", help="files a step wrote (default: 50 and 400)")
    parser.add_argument("--size", type=int, default=20000, help="bytes a file")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv)
    figures = []
    for files in args.files or [50, 400]:
        runs = [once(files, args.size) for _ in range(args.repeat)]
        store = statistics.median(r[0] for r in runs)
        commit = statistics.median(r[1] for r in runs)
        print(
            f"{files} files of {args.size} bytes: store in the run-cache {store:.3f} s, copy and hash {commit:.3f} s"
        )
        figures.append({"files": files, "size": args.size, "store_s": store, "copy_and_hash_s": commit})
    if args.json:
        print(json.dumps({"commits": figures}, indent=2))


if __name__ == "__main__":
    main()
