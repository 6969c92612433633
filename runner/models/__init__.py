"""Base models: what the project file names (identity), the built-in ones, the Hugging Face hub as loads
see it, and loading a pipeline (loading, with ModelCache). Every name is importable from here.

Everything here imports torch and diffusers inside functions, so that importing this package is cheap.
"""

from __future__ import annotations

from runner.errors import ModelError
from runner.families.sd1 import sd15_random_pipeline
from runner.models.builtin import dbl_home, ensure_builtin
from runner.models.hub import fetch_hub_index, hub_unreachable
from runner.models.identity import (
    PICKLE_SUFFIXES,
    SINGLE_FILE_SUFFIXES,
    BaseModel,
    config_ref,
    local_path,
    looks_local,
)
from runner.models.loading import (
    NOT_LOADED,
    ModelCache,
    check_all_loaded,
    folder_variant,
    load_pipeline,
    model_folder,
    quiet_libraries,
    resolve_device,
    resolve_dtype,
)

__all__ = [
    "NOT_LOADED",
    "PICKLE_SUFFIXES",
    "SINGLE_FILE_SUFFIXES",
    "BaseModel",
    "ModelCache",
    "ModelError",
    "check_all_loaded",
    "config_ref",
    "dbl_home",
    "ensure_builtin",
    "fetch_hub_index",
    "folder_variant",
    "hub_unreachable",
    "load_pipeline",
    "local_path",
    "looks_local",
    "model_folder",
    "quiet_libraries",
    "resolve_device",
    "resolve_dtype",
    "sd15_random_pipeline",
]
