"""Model families: what dbl needs to know about one kind of base model (SD 1.x/2.x, SDXL, ...).

A family names its pipeline class, the components that take a LoRA (with their default targets and
the project-file keys that configure them), how prompts are encoded and what extra conditioning the
denoiser gets, its kohya key names and metadata, how to recognise its single files and diffusers
folders, and its tiny built-in models. The rest of dbl asks the family instead of naming components.

    from runner import families
    family = families.detect(base)                  # a runner.models.BaseModel
    for component in family.components: ...

Families register themselves on import (`register`); sd1 is registered when this package is imported.
Nothing here imports torch, diffusers or transformers: the planner and `dbl plan` use this module.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import ModelError

PEFT_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class Component:
    """One model component that takes a LoRA, and how the project file configures it."""

    name: str  # the PEFT folder name inside an adapter folder, and the diffusers key prefix
    attr: str  # the pipeline attribute that holds it
    settings_prefix: str  # LoraSettings fields: f"{prefix}rank", f"{prefix}alpha", ... ("" for the denoiser)
    default_targets: tuple[str, ...]  # modules that get a LoRA by default (the schema's default)
    kohya_prefix: str  # "lora_unet_", "lora_te_", ...
    denoiser: bool = False  # the component every adapter has (the UNet or transformer)
    gate: str | None = None  # a TrainSettings flag that must be true for it to train ("train_text_encoder")
    learning_rate: str | None = None  # a TrainSettings field for its own learning rate (None: the default)
    text_model_level: str = ""  # a module level that some library versions add ("text_model.")
    # Modules beside that level, never under it (CLIPTextModelWithProjection's text_projection).
    beside_level: tuple[str, ...] = ()
    # Settings prefix to read when this component's own setting is left out (None in the project file).
    fallback_prefix: str | None = None
    # Projections of one attention block that kohya loaders want together: A1111 applies a LoRA to an
    # OpenCLIP attention only when q, k, v and out all have one, and diffusers recognises a kohya
    # text-encoder file only with out_proj. The kohya file completes a block with zero-valued entries.
    kohya_attention: tuple[str, ...] = ()
    # What each `target_modules` preset (runner.project.schema.TARGET_PRESETS) names on this component.
    # "all-linear" keeps only the names whose modules are linear layers (see runner.training.lora).
    target_presets: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def setting(self, key: str) -> str:
        """The LoraSettings field of `key` ("rank", "alpha", "dropout", "bias", "target_modules", ...)."""
        return f"{self.settings_prefix}{key}"

    def preset(self, name: str) -> tuple[str, ...]:
        """The module names of a `target_modules` preset."""
        for preset, names in self.target_presets:
            if preset == name:
                return names
        raise KeyError(f"the {self.name} has no target preset {name!r}")

    @property
    def rank_field(self) -> str:
        return self.setting("rank")

    def value(self, settings, key: str):
        """This component's `key` setting in LoraSettings `settings`, falling back when it is None."""
        return getattr(settings, self.field_of(settings, key))

    def field_of(self, settings, key: str) -> str:
        """The LoraSettings field that `value` reads: this component's own, or, left out, its fallback."""
        own = self.setting(key)
        if getattr(settings, own) is None and self.fallback_prefix is not None:
            return f"{self.fallback_prefix}{key}"
        return own

    def trains(self, train_settings) -> bool:
        """Whether this component gets a LoRA under these [train] settings."""
        return self.gate is None or bool(getattr(train_settings, self.gate))


class Family:
    """A model family. Subclass and set the attributes; register an instance with `register`.

    The methods that take live models (pipelines, modules, tensors) import torch themselves.
    """

    name: str = ""
    pipeline_class: str = ""  # diffusers class name, e.g. "StableDiffusionPipeline"
    components: tuple[Component, ...] = ()
    other_modules: tuple[str, ...] = ()  # frozen pipeline modules that training touches (the VAE)
    folder_classes: tuple[str, ...] = ()  # model_index.json `_class_name`s of this family
    builtins: dict[str, dict] = {}  # built-in model name -> keyword arguments of build_builtin
    builtin_version: int = 1  # bump when a built-in's recipe changes: part of the base model identity
    vae_fp32: bool = False  # encode training latents in fp32 whatever the compute dtype (fp16 overflows)
    # Bump when training on this family gives other bytes for the same inputs: a train step's input
    # (left out at 1, so the fingerprints made before it existed stay).
    training_version: int = 1
    # The image size the family's real models were trained at, where [train]'s default is not it.
    native_resolution: int | None = None
    # The UNet config's addition_embed_type of this family's models (SDXL's "text_time"; None: none).
    denoiser_addition: str | None = None

    # --- components -------------------------------------------------------------------------------

    @property
    def denoiser(self) -> Component:
        return next(c for c in self.components if c.denoiser)

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)

    def trained_components(self, train_settings) -> list[Component]:
        return [c for c in self.components if c.trains(train_settings)]

    # --- detection ----------------------------------------------------------------------------------

    def matches_folder(self, index: dict) -> bool:
        return index.get("_class_name") in self.folder_classes

    def matches_file(self, keys: set[str]) -> bool:
        """Whether a single-file checkpoint with these tensor names is of this family."""
        return False

    def refusal(self, index: dict | None = None, keys: set[str] | None = None) -> str | None:
        """Why a model of this family cannot be trained on, from a folder's model_index.json (`index`) or
        a single file's tensor names (`keys`): e.g. "an SDXL refiner (...)"; None when it can."""
        return None

    # --- built-in models ----------------------------------------------------------------------------

    def build_builtin(self, name: str, folder: Path) -> None:
        raise NotImplementedError

    def builtin_identity(self, name: str) -> dict:
        """What identifies a built-in model's weights (the base model identity's part beside its name)."""
        return {"version": self.builtin_version}

    def builtin_folder_name(self, name: str) -> str:
        """The folder a built-in model is made in, under dbl's home: a new one for other weights."""
        return f"{name}-v{self.builtin_version}"

    # --- loading --------------------------------------------------------------------------------------

    def load_pretrained(self, folder: str, **kwargs):
        import diffusers

        return getattr(diffusers, self.pipeline_class).from_pretrained(folder, **kwargs)

    def load_single_file(self, path: str, **kwargs):
        import diffusers

        return getattr(diffusers, self.pipeline_class).from_single_file(path, **kwargs)

    def native_size(self, pipe) -> int:
        """The pixel size the base model was trained at."""
        raise NotImplementedError

    # --- training -------------------------------------------------------------------------------------

    def tokenize(self, pipe, prompts: list[str], device):
        """Token ids of `prompts` for the pipeline's tokenizer(s), on `device`."""
        raise NotImplementedError

    def token_limit(self, pipe) -> int:
        """How many tokens of a prompt the text encoder reads (with its start and end tokens)."""
        return pipe.tokenizer.model_max_length

    def token_count(self, pipe, prompt: str) -> int:
        """How many tokens `prompt` is, start and end tokens included, before any truncation; for a
        prompt longer than COUNTED_CHARS, how many its first COUNTED_CHARS characters are (see
        tokens_said)."""
        return len(pipe.tokenizer(counted_part(prompt), truncation=False).input_ids)

    def tokens_said(self, pipe, prompt: str) -> str:
        """How many tokens `prompt` is, in words: "90 tokens", or "over 2000 tokens" where only a part
        of it is counted."""
        count = self.token_count(pipe, prompt) if prompt else 0
        return f"{count} tokens" if counted_part(prompt) == prompt else f"over {count} tokens"

    def long_prompts(self, pipe, prompts: dict[str, str], source=None) -> list[str]:
        """A warning for each prompt longer than the text encoder reads. `prompts` are by their key in the
        project file, whose `source` (runner.project.problems.Source) names the file and the key's line;
        without it, by what names them ("caption data/dog/0.txt")."""
        limit = self.token_limit(pipe)
        found = []
        for key, prompt in prompts.items():
            count = self.token_count(pipe, prompt) if prompt else 0
            if count > limit:
                said = f"{count}" if counted_part(prompt) == prompt else f"over {count}"
                what = f"is {said} tokens; the text encoder reads {limit}, so the end is cut off: {prompt[-40:]!r}"
                found.append(source.warning(key, what) if source is not None else f"warning: {key} {what}")
        return found

    def encode_prompts(self, modules: dict, token_ids):
        """Prompt embeddings from `tokenize`'s ids; `modules` maps component names to live modules."""
        raise NotImplementedError

    def denoiser_kwargs(self, prompts, batch: int, conditions=None) -> dict:
        """Extra keyword arguments of the denoiser call, from `prompts` (encode_prompts' result) for a
        batch of `batch` examples per prompt. None for sd1; SDXL adds `added_cond_kwargs` (the pooled
        prompt embeddings, and time ids from `conditions`: per example, in the batch's order,
        (original height, original width, crop top, crop left, target height, target width))."""
        return {}

    def predict(self, modules: dict, noisy, timesteps, prompts, batch: int, dtype, conditions=None):
        """The denoiser's prediction for `noisy` latents laid out [instance * batch, class * batch], with
        `prompts` from encode_prompts (one row per prompt) and the conditioning of `denoiser_kwargs`
        (`conditions`: see there; the training data loader passes them)."""
        raise NotImplementedError

    # --- kohya ---------------------------------------------------------------------------------------

    def kohya_name(self, component: str, path: str) -> str:
        c = self.component(component)
        if c.text_model_level and path.split(".", 1)[0] not in c.beside_level:
            path = c.text_model_level + path.removeprefix(c.text_model_level)
        return c.kohya_prefix + path.replace(".", "_")

    def kohya_metadata(self, configs: dict[str, dict], denoiser_base) -> dict[str, str]:
        """The `ss_*` metadata of a kohya file; `configs` maps component names to PEFT config dicts."""
        return {}

    def __repr__(self) -> str:
        return f"<family {self.name}>"


_registry: dict[str, Family] = {}
DEFAULT = "sd1"

# Families dbl recognises but cannot train yet: model_index.json class or single-file key -> name.
UNSUPPORTED_CLASSES = {
    "StableDiffusion3Pipeline": "SD3",
    "FluxPipeline": "Flux",
}
UNSUPPORTED_KEYS = (
    ("model.diffusion_model.joint_blocks.", "SD3"),
    ("joint_blocks.", "SD3"),
    ("model.diffusion_model.double_blocks.", "Flux"),
    ("double_blocks.", "Flux"),
)


# Characters of a prompt whose tokens are counted for the warning that it is longer than the text
# encoder reads (a caption of megabytes took seconds to count, several times over); a longer prompt is
# tokenized in part (read_part). Some 2,000 tokens: far beyond any caption written to be read.
COUNTED_CHARS = 10_000


def counted_part(prompt: str) -> str:
    """`prompt`, or its first COUNTED_CHARS characters (to the next space, or cut there)."""
    if len(prompt) <= COUNTED_CHARS:
        return prompt
    cut = prompt.find(" ", COUNTED_CHARS)
    return prompt[: cut if cut >= 0 else COUNTED_CHARS]


def read_part(tokenizer, prompt: str) -> str:
    """The start of `prompt` whose tokens are the prompt's first tokens, more of them than `tokenizer`
    keeps (model_max_length): so many, truncated, are the prompt's. A caption of megabytes took minutes
    to tokenize, for its first 77 tokens. Cut at a space, which no CLIP token spans and which its text
    cleaning keeps; the whole prompt where no such start is shorter, and for every prompt of up to
    COUNTED_CHARS characters, which keep their ids byte for byte whatever the tokenizer: with ftfy
    installed, CLIPTokenizer's mending of mojibake (cafÃ©) weighs the whole text, so a start of it could
    read otherwise."""
    if len(prompt) <= COUNTED_CHARS:
        return prompt
    limit = tokenizer.model_max_length
    size = 8 * limit
    while size < len(prompt):
        cut = prompt.find(" ", size)
        if cut < 0:
            break
        part = prompt[:cut]
        if len(tokenizer(part, truncation=False).input_ids) > limit:
            return part
        size = 2 * cut
    return prompt


def register(family: Family) -> Family:
    """Add (or replace) a family; its built-in model names become valid `base_model` values."""
    _registry[family.name] = family
    return family


def unregister(name: str) -> None:
    _registry.pop(name, None)


def get(name: str) -> Family:
    try:
        return _registry[name]
    except KeyError:
        raise ModelError(f"unknown model family {name!r}; known: {', '.join(_registry)}") from None


def all() -> list[Family]:  # noqa: A001 - the registry's natural name
    return list(_registry.values())


def builtin_names() -> tuple[str, ...]:
    return tuple(name for family in _registry.values() for name in family.builtins)


def for_builtin(name: str) -> Family:
    for family in _registry.values():
        if name in family.builtins:
            return family
    raise ModelError(f"no built-in model {name!r}; built-in: {', '.join(builtin_names())}")


def detect(base) -> Family:
    """The family of a base model (a runner.models.BaseModel), from cheap facts only: a built-in's
    name, a folder's model_index.json, a single file's safetensors header. Hub models are sd1 unless
    their model_index.json is in the local Hugging Face cache and says otherwise."""
    if base.kind == "builtin":
        return for_builtin(base.ref)
    if base.kind == "folder":
        return _from_index(Path(base.ref) / "model_index.json", base.display)
    if base.kind == "file":
        path = Path(base.ref)
        if path.suffix.lower() == ".safetensors" and path.is_file():
            return _from_keys(safetensors_keys(path), base.display)
        return _registry[DEFAULT]
    return _from_index(cached_hub_index(base.ref, base.revision), base.display)


def _from_index(index_path: Path | None, display: str) -> Family:
    if index_path is None or not index_path.is_file():
        return _registry[DEFAULT]
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"base model {display}: cannot read {index_path}: {exc}") from None
    if not isinstance(index, dict):
        raise ModelError(
            f"base model {display}: {index_path} is not a diffusers model index (a JSON object with "
            f"_class_name and the pipeline's components), but a JSON {type(index).__name__}"
        )
    for family in _registry.values():
        if family.matches_folder(index):
            _check_denoiser(family, index_path, index, display)
            return _unless_refused(family, display, index=index)
    cls = str(index.get("_class_name", ""))
    kind = UNSUPPORTED_CLASSES.get(cls) or next(
        (k for k in ("XL", "StableDiffusion3", "Flux") if k in cls), None
    )
    if kind:
        raise _not_supported(display, f"a {cls} ({kind})")
    default = _registry[DEFAULT]
    missing = [m for m in (*(c.attr for c in default.components), *default.other_modules) if m not in index]
    if cls and missing:
        # Another kind of pipeline (Kandinsky, PixArt, DeepFloyd IF, ...): loading it as sd1 would fail
        # in the middle of a build with diffusers' complaint about components.
        raise _not_supported(display, f"a {cls}, without the {', '.join(missing)} of Stable Diffusion")
    return default


def _check_denoiser(family: Family, index_path: Path, index: dict, display: str) -> None:
    """The UNet beside model_index.json is conditioned as `family`'s are (`addition_embed_type`): a
    folder whose index names another pipeline (an SDXL UNet under StableDiffusionPipeline) would fail in
    the middle of training, in diffusers' words. A UNet config that is missing or unreadable is left to
    the loading, which names it."""
    config = index_path.parent / "unet" / "config.json"
    try:
        found = json.loads(config.read_text()).get("addition_embed_type")
    except (OSError, ValueError, AttributeError):
        return
    if found == family.denoiser_addition:
        return
    other = next((f for f in _registry.values() if f.denoiser_addition == found), None)
    raise ModelError(
        f"base model {display}: {index_path.name} names a {index.get('_class_name')} ({family.name}), but its "
        f"UNet ({config}) has addition_embed_type {found!r}"
        + (f", as {other.name} models have" if other else "")
        + f"; fix _class_name in {index_path}"
        + (f" ({other.pipeline_class} for {other.name})" if other else "")
    )


def _from_keys(keys: set[str], display: str) -> Family:
    for family in _registry.values():
        if family.matches_file(keys):
            return _unless_refused(family, display, keys=keys)
    for prefix, kind in UNSUPPORTED_KEYS:
        if any(k.startswith(prefix) for k in keys):
            raise _not_supported(display, f"a {kind} checkpoint")
    if (
        keys
        and not any(k.startswith("model.diffusion_model.") for k in keys)
        and any(".lora_" in k or k.startswith("lora_") for k in keys)
    ):
        raise ModelError(
            f"base model {display} is a LoRA adapter file (its tensors are {min(keys)}, ...), not a model "
            "checkpoint; an adapter is trained on a base model, or loaded onto one"
        )
    return _registry[DEFAULT]


def _unless_refused(family: Family, display: str, **facts) -> Family:
    why = family.refusal(**facts)
    if why is not None:
        raise ModelError(f"base model {display} is {why}")
    return family


def _not_supported(display: str, what: str) -> ModelError:
    supported = ", ".join(f.name for f in _registry.values())
    return ModelError(
        f"base model {display} is {what}; this model family is not supported yet (supported: {supported}, "
        "i.e. Stable Diffusion 1.x, 2.x and SDXL)"
    )


def safetensors_keys(path: Path) -> set[str]:
    """The tensor names of a .safetensors file, from its JSON header alone."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 << 20:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise ModelError(f"{path}: not a readable .safetensors file ({exc})") from None
    return {k for k in header if k != "__metadata__"}


def cached_hub_index(repo_id: str, revision: str | None) -> Path:
    """Where a hub model's model_index.json is in the Hugging Face cache, for the commit its revision
    resolves to there (the file is not there when the model is not cached)."""
    import os

    from runner.fingerprint import hub_revision

    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(Path.home(), ".cache", "huggingface")), "hub"
    )
    commit = hub_revision(repo_id, revision)
    return Path(cache) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit / "model_index.json"


def of(pipe) -> Family:
    """The family of a loaded pipeline: the one that loaded it, else the first whose class matches."""
    family = getattr(pipe, "_dbl_family", None)
    if family is not None:
        return family
    cls = type(pipe).__name__
    for family in _registry.values():
        if family.pipeline_class == cls:
            return family
    return _registry[DEFAULT]


# --- adapter folders, for every family -------------------------------------------------------------


def adapter_components(folder: Path) -> list[str]:
    """Names of the components an adapter folder holds in the PEFT layout (any registered family)."""
    names = dict.fromkeys(c.name for f in _registry.values() for c in f.components)
    return [n for n in names if (Path(folder) / n / PEFT_CONFIG).is_file()]


def is_adapter_folder(folder: Path) -> bool:
    """Whether `folder` holds an adapter: the denoiser's PEFT layout of some family."""
    return any((Path(folder) / f.denoiser.name / PEFT_CONFIG).is_file() for f in _registry.values())


def component_names() -> set[str]:
    return {c.name for f in _registry.values() for c in f.components}


def lora_components(name: str | None = DEFAULT) -> list[dict[str, Any]]:
    """Per component of a family, torch-free: its name, the LoraSettings field of its rank, and the
    TrainSettings flag that must be on for it to train (None: always). For project validation.

    name None (a base model whose family is not known yet): the components of every family, once each."""
    found, seen = [], set()
    for family in [get(name)] if name is not None else list(_registry.values()):
        for c in family.components:
            if c.name in seen:
                continue
            seen.add(c.name)
            found.append({"name": c.name, "rank_field": c.rank_field, "gate": c.gate})
            if c.fallback_prefix is not None:  # the field to read when rank_field is None
                found[-1]["rank_fallback"] = f"{c.fallback_prefix}rank"
    return found


from runner.families import sd1, sdxl  # noqa: E402 - register themselves; need the names above

__all__ = [
    "Component",
    "Family",
    "register",
    "get",
    "all",
    "detect",
    "builtin_names",
    "sd1",
    "sdxl",
]
