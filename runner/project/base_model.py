"""[project]'s base model: its path or hub id, its single file's configs, its family, and the [lora] keys
that only some families have. Cheap facts only (names, paths, a safetensors header, model_index.json):
no weights are read, and nothing here imports torch.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path

from runner import families
from runner.imagefiles import few
from runner.models import (
    NOT_LOADED,
    PICKLE_SUFFIXES,
    SINGLE_FILE_SUFFIXES,
    BaseModel,
    local_path,
    looks_local,
)
from runner.project import schema

LORA_KEYS = ("rank", "alpha", "dropout", "bias", "target_modules", "use_dora", "use_rslora")
INDEX = "model_index.json"


def check_base_model(check, project_dir: Path, settings: schema.ProjectSettings, data: dict) -> None:
    """Add the problems of base_model and base_model_config, and set `check.family` when it is known."""
    before = len(check.problems)
    _check_value(check, project_dir, settings)
    _check_config(check, project_dir, settings)
    _check_revision(check, project_dir, settings)
    if len(check.problems) > before:
        return
    base = BaseModel.of(settings, project_dir)
    family = _family(check, base)
    if family is None:
        return
    check.family = family.name
    _check_components(check, base)
    _check_hidden(check, base)
    _check_linked(check, base)
    _check_config_family(check, base, family)
    _check_family_settings(check, base, family, data)
    _check_native_size(check, base, family, data)


def _check_value(check, project_dir: Path, settings: schema.ProjectSettings) -> None:
    value = settings.base_model
    key = ("project", "base_model")
    local = value.startswith((".", "/", "~")) or value.endswith((".safetensors",) + PICKLE_SUFFIXES)
    path = local_path(value, project_dir)
    # Read as a path, an empty value named the project's own folder: "... is not a diffusers folder".
    if not value.strip():
        check.problem(
            key,
            "is empty",
            "name the model the adapters train on: a hub id, a local diffusers folder, a single-file checkpoint "
            f"or a built-in ({', '.join(families.builtin_names())})",
        )
    elif value.lower().endswith(PICKLE_SUFFIXES) and not settings.allow_pickle:
        check.problem(
            key,
            f"'{value}' is a pickle checkpoint, which can run arbitrary code when loaded",
            "convert it to .safetensors, or set allow_pickle = true in [project] if you trust it",
        )
    elif local and not path.exists():
        check.problem(key, f"no such file or folder: {path}", "check the path (relative to the project file)")
    elif path.exists() and not path.is_dir() and not path.is_file():  # /dev/null, a named pipe
        check.problem(key, f"{path} is not a regular file", _GIVE_A_MODEL)
    elif path.is_file() and not value.lower().endswith(SINGLE_FILE_SUFFIXES) and not _checkpoint_bytes(path):
        check.problem(key, f"{path} is not a model checkpoint (.safetensors, .ckpt ...)", _GIVE_A_MODEL)
    elif path.is_dir() and not (path / INDEX).is_file():
        adapter = families.is_adapter_folder(path) or (path / families.PEFT_CONFIG).is_file()
        check.problem(
            key,
            f"{path} is {'a LoRA adapter folder' if adapter else 'not a diffusers folder'} (it has no {INDEX})",
            "give the base model the adapters train on: a diffusers folder (model_index.json, unet/, vae/ ...), "
            "a single-file checkpoint or a hub id",
        )
    elif not local and not path.exists() and value not in families.builtin_names():
        if value != value.strip() and (
            value.strip() in families.builtin_names() or _hub_id_shaped(value.strip())
        ):
            check.problem(key, f"'{value}' has spaces around the name", f'base_model = "{value.strip()}"')
        elif not _hub_id_shaped(value):
            check.problem(
                key, f"'{value}' is neither a folder nor a hub id (owner/name)", "check the path or id"
            )
        elif (meant := _builtin_typo(value, settings.revision)) is not None:
            check.problem(
                key,
                f"'{value}' is not a built-in model, nor a hub model in the local cache (a hub id has an owner: "
                "owner/name)",
                f'did you mean base_model = "{meant}"?',
            )


def _builtin_typo(value: str, revision: str | None) -> str | None:
    """The built-in model that `value`, a name without an owner that the Hugging Face cache does not hold,
    looks mistyped from (`tiny_sdxl`, `Tiny-SD`); None where it looks like none."""
    if "/" in value:
        return None
    names = families.builtin_names()
    plain = {name.replace("_", "-").lower(): name for name in names}
    meant = plain.get(value.replace("_", "-").lower()) or next(
        iter(difflib.get_close_matches(value, names, n=1, cutoff=0.8)), None
    )
    if meant is None or families.cached_hub_index(value, revision).is_file():
        return None
    return meant


_GIVE_A_MODEL = (
    "give the base model the adapters train on: a single-file checkpoint, a diffusers folder or a hub id"
)


def _checkpoint_bytes(path: Path) -> bool:
    """Whether the file at `path` begins as a checkpoint does, whatever its name: a safetensors header (its
    length, then JSON), a zip archive (torch.save) or a pickle."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return True  # said where it is read, with why
    return head[8:9] == b"{" or head.startswith((b"PK\x03\x04", b"\x80"))


def _hub_id_shaped(value: str) -> bool:
    """Whether `value` can be a hub id: `name` or `owner/name` of letters, digits, `-`, `_` and `.`, each at
    most 96 characters (the hub's limit; a longer one names a cache folder too long for the file system to
    look up)."""
    return bool(_HUB_ID.fullmatch(value)) and all(len(part) <= 96 for part in value.split("/"))


_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?", re.ASCII)


KINDS = {
    "builtin": "a built-in model",
    "folder": "a diffusers folder",
    "hub": "a hub model",
    "file": "a single-file checkpoint",
}


def _check_revision(check, project_dir: Path, settings: schema.ProjectSettings) -> None:
    """A revision names a commit of a hub model; of any other base model it is ignored, which a project
    built so must still load: a warning."""
    if settings.revision is None or not settings.base_model.strip():
        return
    base = BaseModel.parse(settings.base_model, project_dir, settings.revision, settings.allow_pickle)
    if base.kind != "hub":
        check.note(
            ("project", "revision"),
            f"applies to a hub base_model only; '{settings.base_model}' is {KINDS[base.kind]}: it is ignored",
            "remove revision (nothing rebuilds)",
        )


def _check_config(check, project_dir: Path, settings: schema.ProjectSettings) -> None:
    value = settings.base_model_config
    if value is None:
        return
    key = ("project", "base_model_config")
    base = BaseModel.parse(settings.base_model, project_dir, settings.revision, settings.allow_pickle)
    if base.kind != "file":
        check.problem(
            key,
            f"applies to a single-file base_model only; '{settings.base_model}' is {KINDS[base.kind]}, "
            "which has its own configs",
            "remove base_model_config",
        )
        return
    path = local_path(value, project_dir)
    fix = "give the diffusers folder that holds model_index.json, unet/, text_encoder/ ..., or a hub id"
    if not path.exists() and value in families.builtin_names():
        check.problem(
            key,
            f"'{value}' is a built-in model, which describes only itself: a single file's config is read from a "
            "diffusers folder or a hub model",
            fix,
        )
        return
    if not path.exists() and not looks_local(value):
        return  # a hub id: known once it is downloaded
    if not path.exists():
        check.problem(key, f"no such folder: {path}", fix)
    elif not path.is_dir():
        check.problem(key, f"{path} is a file, not a diffusers folder", fix)
    elif not (path / INDEX).is_file():
        check.problem(key, f"{path} is not a diffusers folder (it has no {INDEX})", fix)


def _family(check, base: BaseModel):
    """The base model's family (runner.families.detect), or None when it is not known before a download. A
    model dbl cannot train (SD3, Flux) or cannot read is a problem of base_model."""
    if base.kind == "hub":
        index = families.cached_hub_index(base.ref, base.revision)
        if index is None or not index.is_file():
            return None
    try:
        return families.detect(base)
    except families.ModelError as exc:
        check.problem(("project", "base_model"), str(exc), "use a Stable Diffusion 1.x, 2.x or SDXL model")
        return None


def _check_hidden(check, base: BaseModel) -> None:
    """A local folder's hidden files are part of its identity: name those of a folder and its components
    (a git clone's .git/, the .cache/ of `hf download --local-dir`, Finder's .DS_Store), which change
    without the model changing, and retrain every step when they do."""
    for folder, key in _local_folders(base):
        entries = sorted(folder.iterdir())
        components = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
        hidden = [p.name for p in entries if p.name.startswith(".")]
        # sorted as paths are, part by part: a component's hidden files together, in the components' order
        hidden += [
            f"{c.name}/{p.name}" for c in components for p in sorted(c.iterdir()) if p.name.startswith(".")
        ]
        if hidden:
            check.note(
                key,
                f"{folder} holds hidden files and folders ({few(hidden)}), which count toward "
                "the model's identity: when they change (a git command, a new download, Finder), every step "
                "that uses the model runs again",
                "use a copy of the model folder without them",
            )


def _check_linked(check, base: BaseModel) -> None:
    """A folder linked into a local model folder (`vae -> ../sd-vae-ft-mse`) is loaded with the model, but
    its files are not part of the model's identity, which reads no linked folder: name those links, as a
    change behind one (another VAE linked in) runs no step again."""
    for folder, key in _local_folders(base):
        linked = [
            Path(root, name).relative_to(folder).as_posix()
            for root, dirs, _ in os.walk(folder)
            for name in sorted(dirs)
            if os.path.islink(os.path.join(root, name))
        ]
        if linked:
            check.note(
                key,
                f"{folder} links to folders ({few(sorted(linked))}) whose files are not part "
                "of the model's identity: when what they hold changes, no step that uses the model runs again",
                "put a copy of each linked folder in its place (cp -rL), or run the steps again with --force",
            )


def _local_folders(base: BaseModel) -> list[tuple[Path, tuple[str, str]]]:
    """The local folders whose content is the model's identity, each with the key that names it: the model
    folder (base_model) and a base_model_config folder."""
    folders = [(Path(base.ref), ("project", "base_model"))] if base.kind == "folder" else []
    if base.config is not None and Path(base.config).is_dir():
        folders.append((Path(base.config), ("project", "base_model_config")))
    return folders


def _check_components(check, base: BaseModel) -> None:
    """Every component a folder's model_index.json names must have its subfolder (a copy that left one out)."""
    if base.kind != "folder":
        return
    index = json.loads(Path(base.ref, INDEX).read_text())  # families.detect read it already
    for name, entry in sorted(index.items()):
        if name.startswith("_") or name in NOT_LOADED or not isinstance(entry, list) or None in entry:
            continue
        folder = Path(base.ref, name)
        if not folder.is_dir():
            check.problem(
                ("project", "base_model"),
                f"{base.ref} has no {name}/ folder, which its {INDEX} names ({entry[-1]})",
                "copy the whole model folder: every component its model_index.json names",
            )
        elif not base.allow_pickle and _pickle_weights_only(folder):
            check.problem(
                ("project", "base_model"),
                f"{folder} holds pickle weights (.bin) only, which can run arbitrary code when loaded",
                "convert the folder to .safetensors (save_pretrained), or set allow_pickle = true in [project] "
                "if you trust it",
            )


def _pickle_weights_only(folder: Path) -> bool:
    names = [p.name for p in folder.iterdir()]
    return any(n.endswith(".bin") for n in names) and not any(n.endswith(".safetensors") for n in names)


def _check_config_family(check, base: BaseModel, family) -> None:
    """A local base_model_config must describe a model of the single file's family."""
    if base.config is None or not Path(base.config, INDEX).is_file():
        return
    key = ("project", "base_model_config")
    try:
        other = families.detect(BaseModel("folder", base.config))
    except families.ModelError as exc:
        check.problem(key, str(exc).replace("base model ", "", 1), "give a folder of the base model's kind")
        return
    if other is not family:
        check.problem(
            key,
            f"{base.config} describes a {other.name} model, but base_model {base.display} is {family.name}",
            f"give the diffusers folder of a {family.name} model",
        )


def _check_native_size(check, base: BaseModel, family, data: dict) -> None:
    """A model of a family trained at another size than [train]'s default resolution (SDXL at 1024 px),
    trained by a subject that does not set resolution: a warning (the default stays, so that a project
    built so keeps its fingerprints). Built-in models are small and left alone."""
    native, default = family.native_resolution, schema.TrainSettings().resolution
    if native is None or base.kind == "builtin" or native == default:
        return
    train = data.get("train")
    if isinstance(train, dict) and "resolution" in train:
        return
    subjects = data.get("subjects")
    tables = (
        [t.get("train") for t in subjects.values() if isinstance(t, dict)]
        if isinstance(subjects, dict)
        else []
    )
    if all(isinstance(t, dict) and "resolution" in t for t in tables):
        return
    check.note(
        ("project", "base_model"),
        f"is an {family.name} model, trained at {native} px, and [train] resolution is "
        f"{default} px by default",
        f"set resolution = {native} in [train] (or the size the model was fine-tuned at)",
    )


def _check_family_settings(check, base: BaseModel, family, data: dict) -> None:
    """[lora] keys that configure a component the base model's family has not (text_encoder_2_rank on an
    SD 1.x model)."""
    own = {c.setting(k) for c in family.components for k in LORA_KEYS}
    foreign = {
        c.setting(k): (f.name, c.name)
        for f in families.all()
        for c in f.components
        for k in LORA_KEYS
        if c.setting(k) not in own
    }
    tables = [(("lora",), data.get("lora"))]
    subjects = data.get("subjects")
    if isinstance(subjects, dict):
        tables += [
            (("subjects", n, "lora"), t.get("lora")) for n, t in subjects.items() if isinstance(t, dict)
        ]
    for key, table in tables:
        if not isinstance(table, dict):
            continue
        for name in table:
            if name in foreign:
                other, component = foreign[name]
                check.problem(
                    key + (name,),
                    f"{name} configures the {component} of {other} models; base model {base.display} is "
                    f"{family.name}, which has no {component}",
                    f"remove {name}, or use an {other} base model",
                )
