"""Project file schema v1: every table and key, its type, default and meaning, declared once ([train] and
[lora] in runner.project.train_settings, named here with the others).

The loader validates against these dataclasses, the planner fingerprints them, and the README's
reference is checked against them by a test. Keys are declared with `opt` (runner.project.fields, which
says what a field's metadata holds and reads it back).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runner.project.fields import (  # noqa: F401 - re-exported: the schema's readers use them from here
    at_default,
    default_of,
    fingerprinted_fields,
    is_required,
    keys_of,
    opt,
    record,
)
from runner.project.train_settings import (  # noqa: F401 - re-exported: tables of the schema
    LR_SCHEDULERS,
    OPTIMIZERS,
    LoraSettings,
    TrainSettings,
)

SCHEMA_VERSION = 1

# TOML value kinds a field may take. "?" suffix: also allows being left out (None).
TYPES = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "list[str]": "a list of strings",
    "list[int]": "a list of integers",
    "weights": "a table of adapter = weight",
    "targets": "a list of module names, or a preset",
    "switch": 'true, false or "auto"',
    "prompts": "a string, or a list of strings",
}

# `target_modules` presets; each model family's components say which modules each one names.
TARGET_PRESETS = ("qv", "attention", "all-linear")

DEVICES = ("auto", "cuda", "mps", "cpu")
MAJORITY_SIGN_METHODS = ("total", "frequency")  # TIES' sign election (PEFT)
SCHEDULERS = ("ddim", "ddpm", "pndm", "lms", "euler", "euler_a", "heun", "dpm++", "dpm++_karras", "unipc")
BLEND_METHODS = (
    "cat",
    "svd",
    "linear",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
# Methods that combine A and B matrices position by position, so every parent must have the same rank.
EQUAL_RANK_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSITY_METHODS = tuple(m for m in BLEND_METHODS if m.startswith(("ties", "dare", "magnitude_prune")))


# TOML integers are 64-bit; seeds outside this range could not be written back to a lockfile.
INT64 = (-(2**63), 2**63 - 1)


def _generation_opt(key: str):
    """A generation setting that [priors.*] and [renders.*] both take, declared once for the two."""
    if key == "guidance_scale":
        return opt(7.5, "classifier-free guidance scale", "float", minimum=0)
    if key == "scheduler":
        return opt(
            None, "sampler; default: the base model's own ('lms' needs scipy)", "str?", choices=SCHEDULERS
        )
    assert key in ("width", "height"), key
    return opt(None, f"image {key}; default: the base model's native size", "int?", minimum=8, multiple=8)


@dataclass(frozen=True)
class ProjectSettings:
    """[project]: the base model and what applies to every step."""

    base_model: str = opt(
        doc="hub id, local diffusers folder, single-file checkpoint, or a built-in "
        "('tiny-sd', 'tiny-sd-v', 'tiny-shapes', 'tiny-sdxl')"
    )
    name: str | None = opt(None, "project name; default: the file's stem", "str?", fingerprint=False)
    revision: str | None = opt(
        None,
        "hub revision (branch, tag or commit) of a hub base_model (of another base model it is ignored, "
        "with a warning)",
        "str?",
    )
    base_model_config: str | None = opt(
        None,
        "for a single-file base_model: a local diffusers folder or hub id of the same kind of model, whose "
        "configs and tokenizers describe the file's components (a local folder loads offline); "
        "default: inferred by diffusers from the file and read from the hub",
        "str?",
    )
    device: str = opt("auto", "where to compute", choices=DEVICES, fingerprint=False)
    mixed_precision: str = opt(
        "no",
        "compute dtype of frozen weights (ignored with a warning on a CPU)",
        choices=("no", "fp16", "bf16"),
    )
    seed: int = opt(
        0,
        "seed for training, class-image generation and DARE pruning",
        "int",
        minimum=INT64[0],
        maximum=INT64[1],
    )
    out: str | None = opt(
        None, "output folder, relative to the project file; default: build/<name>", "str?", fingerprint=False
    )
    num_processes: int = opt(
        1, "processes for train steps (data parallel; NCCL on GPUs, gloo on a CPU)", "int", minimum=1
    )
    allow_pickle: bool = opt(
        False,
        "allow loading pickle checkpoints (.ckpt, .bin, .pt), which can run code",
        "bool",
        fingerprint=False,
    )


@dataclass(frozen=True)
class Prior:
    """[priors.<name>]: class images for prior preservation."""

    name: str
    class_prompt: str | list[str] = opt(
        doc="prompt that generates class images, e.g. 'a photo of dog'; a list: class image i is generated "
        "and trained with prompt i modulo its length",
        type="prompts",
    )
    num_images: int = opt(
        100,
        "class images used in training; missing ones are generated (a new count keeps the full batches generated before)",
        "int",
        minimum=1,
    )
    loss_weight: float = opt(1.0, "weight of the prior-preservation loss", "float", minimum=0)
    images: str | None = opt(
        None,
        "folder of your own class images, relative to the project file; the first num_images by name are used",
        "str?",
    )
    caption_extension: str | None = opt(
        None, "read each of your class images' prompt from the file beside it, e.g. '.txt'", "str?"
    )
    negative_prompt: str = opt("", "negative prompt for generation")
    steps: int = opt(50, "denoising steps per generated image", "int", minimum=1)
    guidance_scale: float = _generation_opt("guidance_scale")
    width: int | None = _generation_opt("width")
    height: int | None = _generation_opt("height")
    scheduler: str | None = _generation_opt("scheduler")
    batch_size: int = opt(4, "images generated at once", "int", minimum=1, fingerprint=False)

    @property
    def prompts(self) -> list[str]:
        """The class prompts: class image i's is prompts[i % len(prompts)]."""
        return [self.class_prompt] if isinstance(self.class_prompt, str) else list(self.class_prompt)

    def prompt_of(self, index: int) -> str:
        return self.prompts[index % len(self.prompts)]

    def prompt_keys(self) -> dict[str, str]:
        """The class prompts by where the project file writes them, for messages."""
        key = f"priors.{self.name}.class_prompt"
        if isinstance(self.class_prompt, str):
            return {key: self.class_prompt}
        return {f"{key}[{n}]": prompt for n, prompt in enumerate(self.class_prompt)}

    @property
    def has_captions(self) -> bool:
        """Whether the prior step writes captions beside class images (as .txt), for the train step."""
        return bool(self.caption_extension) or len(self.prompts) > 1


@dataclass(frozen=True)
class Subject:
    """[subjects.<name>]: one subject to learn, with its instance images."""

    name: str
    images: str = opt(doc="folder of instance images, relative to the project file")
    instance_prompt: str = opt(doc="prompt with the subject's identifier, e.g. 'a photo of sks dog'")
    prior: str | None = opt(None, "name of a [priors.*] table for prior preservation", "str?")
    caption_extension: str | None = opt(
        None,
        "read each image's prompt from the file beside it with this extension, e.g. '.txt'; default: off",
        "str?",
    )
    trigger: str | None = opt(
        None, "what [trigger] in a caption or the instance prompt stands for, e.g. 'sks dog'", "str?"
    )
    train: TrainSettings = field(default_factory=TrainSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass(frozen=True)
class Blend:
    """[blends.<name>]: a weighted combination of trained adapters (PEFT add_weighted_adapter)."""

    name: str
    adapters: tuple[tuple[str, float], ...] = opt(
        doc="subjects or blends with their weights, e.g. { dog = 1.0, toy = 0.8 }", type="weights"
    )
    method: str = opt(
        "cat", "combination type; cat is exact, svd and the *_svd methods are lossy", choices=BLEND_METHODS
    )
    svd_rank: int | None = opt(
        None, "rank of svd methods; default: the largest parent rank", "int?", minimum=1
    )
    svd_clamp: float | None = opt(
        None, "quantile clamp of svd methods", "float?", minimum=0, maximum=1, example=0.99
    )
    density: float | None = opt(
        None, "fraction of weights kept (ties, dare_*, magnitude_prune)", "float?", minimum=0, example=0.5
    )
    majority_sign_method: str = opt("total", "sign election of ties methods", choices=MAJORITY_SIGN_METHODS)


# Keyword-only: `adapter` may be left out (for `adapters`), yet it reads best before the required `prompts`.
@dataclass(frozen=True, kw_only=True)
class Render:
    """[renders.<name>]: a batch of prompts x seeds rendered with one adapter, or with several side by side.

    Exactly one of `adapter` and `adapters` is given (the loader checks it)."""

    name: str
    adapter: str | None = opt(
        None, "a subject, a blend, or 'none' for the base model; give this or adapters", "str?"
    )
    adapters: list[str] | None = opt(
        None,
        "several adapters (or 'none'), each rendering every prompt and seed into a column of grid.png; "
        "give this or adapter (after a change, the images of those rendered with before are kept)",
        "list[str]?",
    )
    prompts: list[str] = opt(
        doc="prompts to render (after new prompts or seeds, the images of batches drawn before are kept)",
        type="list[str]",
    )
    negative_prompt: str = opt("", "negative prompt")
    steps: int = opt(50, "denoising steps", "int", minimum=1)
    guidance_scale: float = _generation_opt("guidance_scale")
    seeds: list[int] = opt(
        [0],
        "one image per prompt and seed (a repeated seed renders the same image again, and -1 is a seed, not"
        " a random one: a warning as the file loads)",
        "list[int]",
        minimum=INT64[0],
        maximum=INT64[1],
    )
    width: int | None = _generation_opt("width")
    height: int | None = _generation_opt("height")
    scheduler: str | None = _generation_opt("scheduler")
    batch_size: int = opt(
        1,
        "images per forward pass (the same pixels as one at a time, up to rounding)",
        "int",
        minimum=1,
        fingerprint=False,
    )
    lora_scale: float = opt(1.0, "strength of the adapter", "float")

    @property
    def adapter_names(self) -> list[str]:
        """The adapters it renders with, in column order ('none': the base model)."""
        return list(self.adapters) if self.adapters is not None else [self.adapter]


@dataclass(frozen=True, kw_only=True)
class Eval:
    """[evals.<name>]: fidelity scores of a render of the shapes world (base model tiny-shapes)."""

    name: str
    render: str = opt(doc="the render whose images are scored", type="str")
    subject: str | None = opt(
        None,
        "the subject whose photos the identifier stands for; default: the render's adapter, when a subject",
        "str?",
    )
    identifier: str = opt("sks", "the word of the render's prompts that stands for the subject")


@dataclass(frozen=True)
class Project:
    """A whole project file, validated and resolved (defaults applied, paths absolute)."""

    path: Any  # pathlib.Path of the project file
    settings: ProjectSettings
    train: TrainSettings
    lora: LoraSettings
    tables: dict[str, dict[str, Any]]  # step kind -> {name: its table}, in file order
    # The file as its warnings name it, with its keys' lines (problems.Source); None for one made by hand.
    # Not part of what the project says: two loads of one content compare equal wherever their keys sit.
    source: Any = field(default=None, compare=False, repr=False)

    @property
    def dir(self):
        return self.path.parent

    @property
    def name(self) -> str:
        return self.settings.name or self.path.stem

    @property
    def out(self):
        return (self.dir / (self.settings.out or f"build/{self.name}")).resolve()

    @property
    def state_dir(self):
        return self.dir / ".dbl"

    # The built-in kinds' tables, by their usual names.
    @property
    def priors(self) -> dict[str, Prior]:
        return self.tables.get("prior", {})

    @property
    def subjects(self) -> dict[str, Subject]:
        return self.tables.get("train", {})

    @property
    def blends(self) -> dict[str, Blend]:
        return self.tables.get("blend", {})

    @property
    def renders(self) -> dict[str, Render]:
        return self.tables.get("render", {})


# The tables that are not a step kind's, for the loader and the README (the kinds add their own).
TABLES = {
    "project": ProjectSettings,
    "train": TrainSettings,
    "lora": LoraSettings,
}


def home_of(key: tuple[str, ...], name: str) -> tuple[str, ...] | None:
    """The settings table a key written in table `key` belongs in, where it is one of another's keys:
    `steps` above every header or in [project] is a [train] key, `rank` in [subjects.dog] is one of
    [subjects.dog.lora]. None where it is no settings key, or `key` is no settings or subject table."""
    homes = {(table,): cls for table, cls in TABLES.items()}
    if len(key) in (2, 3) and key[0] == "subjects":  # a subject's own overrides first
        homes = {key[:2] + ("train",): TrainSettings, key[:2] + ("lora",): LoraSettings, **homes}
    elif len(key) > 1:
        return None
    for table, cls in homes.items():
        if table != key and any(f.name == name for f in keys_of(cls)):
            return table
    return None
