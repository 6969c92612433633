"""What a base model is, as the project file names it (BaseModel): a built-in, a hub id, a local diffusers
folder or a single-file checkpoint; and how a value reads as a path. Nothing here imports torch or diffusers:
the project checks and the planner use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from runner import families

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
SINGLE_FILE_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES


@dataclass(frozen=True)
class BaseModel:
    """Where a base model comes from, as the project file names it."""

    kind: str  # "builtin" | "hub" | "folder" | "file"
    ref: str  # builtin name, hub id, or absolute path
    revision: str | None = None
    allow_pickle: bool = False
    # A single file's component configs and tokenizers: a diffusers folder (absolute path) or a hub id,
    # passed to from_single_file as `config`. None: diffusers infers them (and reads them from the hub).
    config: str | None = None
    # The value as the project file writes it (a local path relative to the project file): what outputs
    # record, so that the same project in another folder writes the same bytes. Not part of equality.
    written: str = field(default="", compare=False)

    @classmethod
    def parse(
        cls,
        value: str,
        project_dir: Path,
        revision: str | None = None,
        allow_pickle: bool = False,
        config: str | None = None,
    ):
        if value in families.builtin_names():
            return cls("builtin", value, None, allow_pickle, written=value)
        path = local_path(value, project_dir)
        if path.is_dir():
            return cls("folder", str(path), None, allow_pickle, written=value)
        if path.is_file() or value.endswith(SINGLE_FILE_SUFFIXES):
            return cls("file", str(path), None, allow_pickle, config_ref(config, project_dir), written=value)
        return cls("hub", value, revision, allow_pickle, written=value)

    @classmethod
    def of(cls, settings, project_dir: Path):
        """The base model of a project's [project] settings (runner.project.schema.ProjectSettings)."""
        return cls.parse(
            settings.base_model,
            project_dir,
            settings.revision,
            settings.allow_pickle,
            settings.base_model_config,
        )

    @property
    def recorded(self) -> str:
        """What an adapter records as its base model (PEFT's `base_model_name_or_path`, dbl.json): a hub id
        or built-in name as it is, a local folder or file as the project file writes it."""
        return self.written if self.kind in ("folder", "file") and self.written else self.ref

    @property
    def display(self) -> str:
        if self.kind == "hub" and self.revision:
            return f"{self.ref}@{self.revision}"
        return self.ref


def local_path(value: str, project_dir: Path) -> Path:
    """`value` as a path: ~ expanded, relative to the project folder."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (project_dir / path).resolve()


def looks_local(value: str) -> bool:
    """Whether a base-model value is written as a path rather than a hub id (owner/name)."""
    return value.startswith((".", "/", "~")) or value.count("/") > 1


def config_ref(value: str | None, project_dir: Path) -> str | None:
    """A base_model_config value as from_single_file takes it: a folder's absolute path, or a hub id."""
    if value is None:
        return None
    path = local_path(value, project_dir)
    return str(path) if path.is_dir() or looks_local(value) else value
