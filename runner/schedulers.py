"""Samplers by name: the `scheduler` key of renders and priors, and the names A1111 shows for them.

Importing this module is cheap; diffusers is imported only when a scheduler is made.
"""

from __future__ import annotations

import importlib.util
from typing import Any

# name -> (diffusers class, config overrides, A1111 sampler name). The A1111 names are what image
# browsers and the A1111 "PNG info" tab show, so a user recognises the sampler of a dbl image.
SAMPLERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "ddpm": ("DDPMScheduler", {}, "DDPM"),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PLMS"),
    "lms": ("LMSDiscreteScheduler", {}, "LMS"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "dpm++": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        "DPM++ 2M",
    ),
    "dpm++_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}

# A base model's own scheduler, by diffusers class name -> A1111 name (for renders without `scheduler`).
_CLASS_NAMES = {
    "DDIMScheduler": "DDIM",
    "DDPMScheduler": "DDPM",
    "PNDMScheduler": "PLMS",
    "LMSDiscreteScheduler": "LMS",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "HeunDiscreteScheduler": "Heun",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "UniPCMultistepScheduler": "UniPC",
}


def make_scheduler(name: str | None, base_config):
    """A new scheduler called `name`, built from the base model's scheduler config `base_config`
    (a config, or the base scheduler itself).

    The base config keeps what belongs to the model (beta schedule, prediction type, timestep spacing);
    the name only picks the sampling algorithm. With `name` None, the base model's own scheduler class
    is rebuilt from its config.
    """
    import diffusers

    own_class = None
    if hasattr(base_config, "config"):
        own_class, base_config = type(base_config), base_config.config
    if name is None:
        if own_class is None and "_class_name" in base_config:
            own_class = getattr(diffusers, base_config["_class_name"], None)
        if own_class is None:
            raise ValueError("the base scheduler config names no class; pass a scheduler name")
        return own_class.from_config(base_config)
    if name not in SAMPLERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(SAMPLERS)}")
    cls_name, overrides, _ = SAMPLERS[name]
    if why := missing(name):
        raise ValueError(why)
    cls = getattr(diffusers, cls_name)
    return cls.from_config(base_config, **overrides)


def too_many_steps(scheduler, steps: int) -> tuple[str, str] | None:
    """(what, fix) where `scheduler` cannot take `steps` denoising steps, else None. DDIM and DDPM take at
    most the model's training timesteps (1000 for Stable Diffusion) and said so only as the first image
    started, in diffusers' words; a copy is tried, so the pipeline's own scheduler is left as it is."""
    import copy

    try:
        copy.deepcopy(scheduler).set_timesteps(steps)
    except ValueError:
        limit = getattr(scheduler.config, "num_train_timesteps", None)
        return (
            f"{steps} steps are more than {sampler_name(None, scheduler)} takes: at most the {limit} "
            "timesteps the model was trained with",
            f'use at most {limit}, or scheduler = "euler", which takes more',
        )
    return None


def missing(name: str | None) -> tuple[str, str] | None:
    """(what, fix) where scheduler `name` cannot be made here (a package it needs is not installed), else
    None."""
    lms = name in SAMPLERS and SAMPLERS[name][0] == "LMSDiscreteScheduler"
    if lms and not _installed("scipy"):
        return "scheduler 'lms' needs scipy", "pip install scipy, or pick another scheduler"
    return None


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def sampler_name(name: str | None, scheduler=None) -> str:
    """The A1111 sampler name of scheduler `name`, or of the `scheduler` object when `name` is None."""
    if name is not None:
        return SAMPLERS[name][2]
    cls_name = type(scheduler).__name__ if scheduler is not None else ""
    if cls_name == "DPMSolverMultistepScheduler" and getattr(scheduler.config, "use_karras_sigmas", False):
        return "DPM++ 2M Karras"
    return _CLASS_NAMES.get(cls_name, cls_name.removesuffix("Scheduler") or "unknown")
