"""Step kinds: a registry of `StepKind`s, one per module of this package (prior, train, blend, render).

A kind declares everything the rest of dbl needs to know about it: the project-file tables it reads
(`[<table>.<name>]`, with their schema), the steps it depends on, the inputs that make up its
fingerprint, where its outputs go, its version, and its `run` function. The loader, the planner, the
docs, the watcher and the displays iterate over the registry; none of them lists the kinds by hand.

A kind's `run(ctx: StepContext) -> dict` writes its outputs into `ctx.out` (an empty folder laid out
like the step's output folder, e.g. `adapters/<subject>/`) and returns a small dict of metrics that the
lockfile records. It raises `StepError` for a failure the user can fix, and `StepInterrupted` when
`ctx.should_stop()` asked it to stop early (after saving what lets it resume). Step modules import
torch inside `run`, so that importing this package stays cheap for `dbl plan`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from runner.errors import StepError, StepInterrupted  # noqa: F401 - re-exported


@dataclass
class StepContext:
    """Everything a running step needs; made by the executor's backend from a plain job."""

    step_id: str  # "train:dog"
    kind: str  # "train"
    name: str  # "dog"
    spec: Any  # the step's resolved table (Prior, Subject, Blend, Render ...)
    project: Any  # the whole runner.project.schema.Project
    work: Path  # .dbl/tmp/<stem>/<kind>-<name>/: kept across attempts of the same fingerprint (checkpoints)
    out: Path  # empty folder inside `work`; write outputs here
    inputs: dict[str, Path]  # upstream step id -> folder holding its committed outputs
    models: Any  # runner.models.ModelCache, shared by the steps a backend runs in one process
    fingerprint: str = ""
    num_processes: int = 1
    devices: tuple[str, ...] = ()  # devices given to this step; empty: the project's `device`
    progress: Callable[..., None] = lambda done, total, **metrics: None
    log: Callable[[str], None] = lambda message: None
    should_stop: Callable[[], bool] = lambda: False
    extra: dict = field(default_factory=dict)
    # The step's outputs of its previous inputs, when its kind's `reuses` says they serve these ones.
    earlier: Path | None = None
    # The lockfile's record of those outputs (their inputs and metrics), as the build found it.
    earlier_record: dict | None = None
    # What the step's fingerprint is made of (its kind's `inputs`), as the lockfile will record it: to compare
    # with earlier_record's inputs.
    fingerprint_inputs: dict | None = None
    # Outputs of other steps that this one made on the way (a train step's snapshots): step id ->
    # (folder, metrics). The scheduler keeps them in the run-cache, where those steps find them.
    extras: dict = field(default_factory=dict)


class StepFunction(Protocol):
    def __call__(self, ctx: StepContext) -> dict: ...


class Inputs:
    """What a kind's `inputs` function may read to make a step's fingerprint inputs.

    Keys starting with '_' in the dict it returns are shown in the lockfile and in reasons, not hashed.
    """

    def __init__(self, project, step, facts, upstream: dict[str, str], num_processes: int | None = None):
        self.project = project
        self.step = step
        self.spec = step.spec
        self.facts = facts
        self.upstream = upstream  # upstream step id -> its output hash
        self._num_processes = num_processes

    @property
    def settings(self):
        return self.project.settings

    @property
    def num_processes(self) -> int:
        """The processes a train step runs with: `--num-processes`, else the project's setting."""
        return self._num_processes or self.project.settings.num_processes

    def base_model(self) -> dict:
        return self.facts.base_model()

    def images(self, folder: str) -> dict:
        """An images folder as an input: its place (shown) and every image's hash."""
        return {"_folder": relative(self.project, folder), "files": self.facts.images(folder)}

    def captions(self, folder: str, extension: str) -> dict:
        """The caption files beside a folder's images as an input (empty when there are none)."""
        files = self.facts.captions(folder, extension)
        return {"_folder": relative(self.project, folder), "files": files} if files else {}

    def caption_texts(self, folder: str, extension: str) -> dict[str, str | None]:
        """The words of each caption file beside a folder's images, as `captions` names them ("" for an
        empty one, whose image trains on a fallback prompt; None for one the train step cannot read)."""
        return {
            name: _words(Path(folder) / name, sha)
            for name, sha in self.facts.captions(folder, extension).items()
        }

    def output(self, step_id: str) -> str:
        return self.upstream[step_id]

    def fields(self, obj, exclude: tuple[str, ...] = ()) -> dict:
        """The fingerprinted settings of a schema dataclass, as plain data; unset (None) ones left out,
        as the lockfile's TOML cannot hold them."""
        from runner.project.schema import fingerprinted_fields

        return {k: v for k, v in fingerprinted_fields(obj).items() if k not in exclude}


_WORDS: dict[str, str | None] = {}  # caption sha256 -> its words: a caption is read once per content


def _words(path: Path, sha: str) -> str | None:
    """A caption's words as the train step reads them (runner.training.captions.read_caption)."""
    from runner.training.captions import read_caption

    if sha not in _WORDS:
        try:
            _WORDS[sha] = read_caption(path, log=lambda message: None) or ""
        except StepError:  # not a caption the train step reads: it fails, naming it
            return None
    return _WORDS[sha]


def relative(project, path) -> str:
    """`path` relative to the project file's folder, with forward slashes (lockfile and reasons)."""
    return Path(os.path.relpath(path, project.dir)).as_posix()


@dataclass(frozen=True)
class StepKind:
    """One kind of step. Register it with `register`; the registry's order is the build order of kinds."""

    name: str  # "train": the first half of step ids, and the work folders' prefix
    table: str  # "subjects": its project-file tables are [subjects.<name>]
    spec: type  # frozen dataclass of one table; `name` is its first field, keys declared with schema.opt
    output_dir: str  # "adapters": a step's outputs are <out>/adapters/<name>/
    version: int  # bump when the kind's code changes the bytes it produces: every such step goes stale
    run: Callable[[StepContext], dict]  # a module-level function, so that worker processes import it
    inputs: Callable[[Inputs], dict]  # the inputs that make a step's fingerprint (plain, canonical data)
    deps: Callable[[Any, Any], list[str]] = lambda project, spec: []  # upstream step ids, stable order
    doc: str = ""  # what a step does, one line for the README
    produces_adapter: bool = False  # its tables share the adapter namespace (subjects, blends)
    read: Callable | None = None  # custom table reader (nested overrides), see runner.project.load
    check: Callable | None = None  # cross-table checks: check(checker, tables) adds problems
    folders: Callable[[Any], list[str]] = lambda spec: []  # input folders it reads: watched, and checked
    # decodes(project, spec): the user's images it decodes, as (folder, how many of its images by name;
    # None: all): the build checks that they decode before any step runs (runner.exec.preflight).
    decodes: Callable[[Any, Any], list[tuple[str, int | None]]] = lambda project, spec: []
    trains: Callable[[Any], Any] = lambda spec: None  # the subject (schema.Subject) whose LoRA it trains
    # missing(spec, device, source) -> why a step cannot run on this machine (a package not installed, no
    # CUDA device), as the step says it, or None; `device()` names the device the step would use (asking
    # may import torch); `source` (problems.Source) names the project file's keys and lines. The build asks
    # before any step runs.
    missing: Callable[[Any, Callable[[], str], Any], str | None] = lambda spec, device, source: None
    # Its steps load the base model on the project's `device`: a build checks that this machine has that
    # device before any step runs (runner.exec.preflight).
    loads_model: bool = True
    layout: Callable[[str], dict[str, str]] | None = None  # output files named after the step: cache -> out
    # What its progress counts, and the rate's unit; "" for none: a count of unequal stages has no rate or eta.
    unit: tuple[str, str] = ("images", "img/s")
    writes_images: bool = False  # its outputs are image files, which an image folder around them would read
    # A kind whose steps come from other kinds' tables, not from a table of its own (`table` is ""):
    # derive(tables) -> {name: spec}, given the tables of the kinds registered before it.
    derive: Callable[[dict], dict] | None = None
    # reuses(previous inputs, inputs): whether the outputs of the previous inputs can save work for the
    # new ones (a prior's class images after a change of count); the step finds them in ctx.earlier.
    reuses: Callable[[dict, dict], bool] | None = None
    # unhashed(inputs) -> {what: value}: display values among its inputs (`_` keys, in no fingerprint) that
    # its outputs depend on all the same: a render's images name its adapters; a train step reads its
    # prior's class prompt for class images without captions, where the prior's outputs do not hold it.
    # Outputs made under other values are stale though the fingerprint is the same (the plan says
    # "<what> <old> -> <new>, <unhashed_use(what)>"), and the run-cache restores an entry only under its own.
    unhashed: Callable[[dict], dict] | None = None
    # unhashed_use(what): how its outputs depend on that value, said after a change of it
    unhashed_use: Callable[[str], str] = lambda what: "which its outputs name"
    # resumable(work folder, spec, project): what an interrupted run of the step's inputs left in its work
    # folder for the next one to go on from, in a few words for the plan ("resumes from its checkpoint at
    # step 400"), or None. Asked only of a work folder made for the fingerprint the step has now.
    resumable: Callable[[Path, Any, Any], str | None] | None = None

    def step_id(self, name: str) -> str:
        return f"{self.name}:{name}"

    @property
    def run_ref(self) -> str:
        """'module:function' of `run`, what a worker process imports."""
        return f"{self.run.__module__}:{self.run.__qualname__}"


# The kohya file of an adapter is named after its subject or blend in the outputs (`dog.safetensors`), but
# not in the run-cache, whose entries two steps of identical inputs and different names share.
KOHYA_STEM = "kohya"

_REGISTRY: dict[str, StepKind] = {}


def register(kind: StepKind) -> StepKind:
    """Add a kind (or replace one of the same name). Tables must not collide with another kind's."""
    for other in _REGISTRY.values():
        if other.name != kind.name and kind.table and other.table == kind.table:
            raise ValueError(f"step kind {kind.name!r}: table [{kind.table}] belongs to {other.name!r}")
    _REGISTRY[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def kinds() -> list[StepKind]:
    """Every registered kind, in build order."""
    return list(_REGISTRY.values())


def get(name: str) -> StepKind:
    """The kind named `name` (KeyError for an unknown one)."""
    return _REGISTRY[name]


def by_table(table: str) -> StepKind | None:
    return next((k for k in _REGISTRY.values() if k.table == table), None)


def output_dir(step_id: str) -> str:
    """'adapters/dog' for 'train:dog': where a step's outputs live under the project's `out`."""
    kind, name = step_id.split(":", 1)
    return f"{get(kind).output_dir}/{name}"


def adapter_step(project, name: str) -> str:
    """The id of the step that builds adapter `name` (a subject's train step, a blend ...)."""
    for kind in _REGISTRY.values():
        if kind.produces_adapter and name in project.tables.get(kind.name, {}):
            return kind.step_id(name)
    raise KeyError(f"no adapter named {name!r}")


def unhashed_of(kind: StepKind, inputs: dict) -> dict | None:
    """The values out of the fingerprint that a step's outputs depend on (see StepKind.unhashed); None
    where they depend on none (its run-cache entry then restores as every entry did before)."""
    return (kind.unhashed(inputs) or None) if kind.unhashed is not None else None


def unhashed_change(kind: StepKind, recorded: dict, inputs: dict) -> str | None:
    """Why outputs made from the `recorded` inputs are not those of `inputs`, of the same fingerprint: a
    value they depend on out of it changed ("adapter 'dog' -> 'rex', which its outputs name"). None when
    none did. A value the record does not hold (written by an older version) is taken as the current one."""
    if kind.unhashed is None:
        return None
    old, new = kind.unhashed(recorded), kind.unhashed(inputs)
    changed = [
        f"{key} {_listed(old[key])} -> {_listed(value)}, {kind.unhashed_use(key)}"
        for key, value in new.items()
        if old.get(key) is not None and None not in _as_list(old[key]) and old[key] != value
    ]
    return "; ".join(changed) or None


def take_unhashed(kind: StepKind, record: dict, inputs: dict) -> bool:
    """Give a record of these very inputs (the same fingerprint) the values out of it that its outputs
    depend on, where it lacks them (written by an older version, which is taken to have made them under
    the current ones); whether it did. From then on, a change of them is seen."""
    if kind.unhashed is None:
        return False
    old = kind.unhashed(record.get("inputs", {}))
    if all(old.get(key) is not None and None not in _as_list(old[key]) for key in kind.unhashed(inputs)):
        return False
    record["inputs"] = inputs
    return True


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _listed(value) -> str:
    return ", ".join(repr(v) for v in _as_list(value))


def load_run(ref: str) -> StepFunction:
    """Import a kind's run function from its 'module:function' reference."""
    module, _, func = ref.partition(":")
    return getattr(importlib.import_module(module), func)


# The built-in kinds, in build order; each module registers its kind on import.
from runner.steps import prior, train, snapshot, blend, render, evaluate  # noqa: E402, F401, I001
