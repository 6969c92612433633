"""dbl: a declarative, incremental build tool for DreamBooth LoRA fine-tuning of Stable Diffusion."""

import os

__version__ = "0.1.0"

# A step's outputs are the same bytes run after run on one machine (the run-cache and `dbl check` rely on
# it). oneMKL, torch's CPU BLAS, promises that only with a thread count it does not change at run time
# ("Reproducibility Conditions" of its guide): MKL_DYNAMIC lets it use fewer threads than set. Read at
# MKL's first call, which no import makes; every process dbl starts inherits it. A value set wins.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("OMP_DYNAMIC", "FALSE")
