"""dbl: a declarative, incremental build tool for DreamBooth LoRA fine-tuning of Stable Diffusion."""

__version__ = "0.1.0"
