"""Read a project file, validate every key, resolve defaults and paths, and report all problems at once."""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from runner import families
from runner.imagefiles import list_images
from runner.models import PICKLE_SUFFIXES
from runner.project import schema
from runner.project.lines import LineIndex, duplicate_keys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NAME = re.compile(r"^[A-Za-z0-9_-]+$")
RESERVED_ADAPTERS = ("none",)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a project file: where, what, and how to fix it."""

    key: str  # dotted key, e.g. "subjects.rex.lora"
    message: str
    line: int | None = None
    fix: str = ""

    def __str__(self) -> str:
        where = f" (line {self.line})" if self.line else ""
        fix = f" - {self.fix}" if self.fix else ""
        key = f"{self.key}: " if self.key else ""
        return f"{key}{self.message}{where}{fix}"


class ProjectError(Exception):
    """A project file that cannot be used; str() is the full report, one problem a line."""

    def __init__(self, path: Path | str, problems: list[Problem]):
        self.path = Path(path)
        self.problems = problems
        super().__init__(self.report())

    def report(self) -> str:
        count = len(self.problems)
        head = f"{_display(self.path)}: {count} problem{'s' if count != 1 else ''}"
        return "\n".join([head] + [f"  {p}" for p in self.problems])


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


class _Checker:
    """Collects problems while reading the raw TOML data into schema dataclasses."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.lines = LineIndex(text)
        self.problems: list[Problem] = []

    def problem(self, key: tuple[str, ...], message: str, fix: str = "") -> None:
        self.problems.append(Problem(".".join(key), message, self.lines.line(key), fix))

    # -- values -------------------------------------------------------------------------------------

    def value(self, key: tuple[str, ...], raw: Any, f) -> tuple[bool, Any]:
        """Check one value against its field; returns (ok, converted value)."""
        kind: str = f.metadata["type"]
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        expected = schema.TYPES[kind]
        if raw is None and optional:
            return True, None
        ok = True
        value = raw
        if kind == "str":
            ok = isinstance(raw, str)
        elif kind == "int":
            ok = isinstance(raw, int) and not isinstance(raw, bool)
        elif kind == "float":
            ok = isinstance(raw, (int, float)) and not isinstance(raw, bool)
            value = float(raw) if ok else raw
        elif kind == "bool":
            ok = isinstance(raw, bool)
        elif kind in ("list[str]", "list[int]"):
            item = str if kind == "list[str]" else int
            ok = isinstance(raw, list) and all(isinstance(x, item) and not isinstance(x, bool) for x in raw)
            if ok and not raw:
                self.problem(
                    key, "must not be empty", f"give at least one value, e.g. {f.name} = {_example(kind)}"
                )
                return False, raw
            value = list(raw) if ok else raw
        elif kind == "weights":
            ok = isinstance(raw, dict) and all(
                isinstance(w, (int, float)) and not isinstance(w, bool) for w in raw.values()
            )
            if ok and not raw:
                self.problem(key, "names no adapter", "e.g. adapters = { dog = 1.0, toy = 0.8 }")
                return False, raw
            value = tuple((name, float(w)) for name, w in raw.items()) if ok else raw
        if not ok:
            self.problem(
                key, f"expected {expected}, got {_describe(raw)}", f"e.g. {f.name} = {_example(kind)}"
            )
            return False, raw
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            self.problem(key, f"'{value}' is not one of {', '.join(map(str, choices))}", f"{hint}".strip())
            return False, value
        minimum = f.metadata.get("minimum")
        if minimum is not None and isinstance(value, (int, float)) and value < minimum:
            self.problem(key, f"must be at least {minimum}, got {value}")
            return False, value
        return True, value

    def table(self, key: tuple[str, ...], raw: Any, cls, base=None, extra: dict | None = None, nested=()):
        """Read a TOML table into dataclass `cls`, on top of `base` (an instance) when given."""
        if not isinstance(raw, dict):
            self.problem(key, f"expected a table, got {_describe(raw)}", f"write it as [{'.'.join(key)}]")
            return None
        known = {f.name: f for f in schema.keys_of(cls)}
        values: dict[str, Any] = {}
        ok = True
        for name, item in raw.items():
            if name in nested:
                continue
            f = known.get(name)
            if f is None:
                self._unknown(key, name, list(known) + list(nested))
                ok = False
                continue
            good, value = self.value(key + (name,), item, f)
            ok &= good
            values[name] = value
        if base is None:
            for name, f in known.items():
                if schema.is_required(f) and name not in raw:
                    self.problem(
                        key, f"missing required key '{name}' ({f.metadata['doc']})", f"add {name} = ..."
                    )
                    ok = False
        if not ok:
            return None
        if base is not None:
            return replace(base, **values)
        return cls(**(extra or {}), **values)

    def _unknown(self, key: tuple[str, ...], name: str, known: list[str]) -> None:
        close = difflib.get_close_matches(name, known, n=1)
        fix = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
        self.problems.append(
            Problem(".".join(key), f"unknown key '{name}'", self.lines.line(key + (name,)), fix)
        )


def _describe(raw: Any) -> str:
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, str):
        return f"the string {raw!r}"
    if isinstance(raw, dict):
        return "a table"
    if isinstance(raw, list):
        return "a list"
    return f"{type(raw).__name__} {raw!r}"


def _example(kind: str) -> str:
    return {
        "str": '"..."',
        "int": "10",
        "float": "1.0",
        "bool": "true",
        "list[str]": '["..."]',
        "list[int]": "[0, 1]",
        "weights": "{ dog = 1.0 }",
    }[kind]


TOP_LEVEL = ("project", "train", "lora", "priors", "subjects", "blends", "renders")


def load_project(path: Path | str) -> schema.Project:
    """Load and validate a project file. Raises ProjectError listing every problem found."""
    path = Path(path)
    if not path.is_file():
        raise ProjectError(path, [Problem("", "no such project file", None, "run `dbl init` to start one")])
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProjectError(path, _syntax_problems(text, exc)) from None
    return _validate(path.resolve(), text, data)


def _syntax_problems(text: str, exc: Exception) -> list[Problem]:
    """A TOML syntax error as a located problem; a key set twice is named, with both of its lines."""
    twice = duplicate_keys(text)
    if twice:
        return [
            Problem(".".join(key), f"set twice, first on line {first}", second, "keep one of them")
            for key, first, second in twice
        ]
    found = re.search(r"^(.*?)\s*\(at line (\d+), column (\d+)\)$", str(exc))
    if found:
        message, line = f"{found.group(1)} at column {found.group(3)}", int(found.group(2))
    else:  # "(at end of document)"
        message = re.sub(r"\s*\(at end of document\)$", " at the end of the file", str(exc))
        line = max(1, len(text.splitlines()))
    return [Problem("", f"invalid TOML: {message}", line, "fix the syntax")]


def _validate(path: Path, text: str, data: dict) -> schema.Project:
    check = _Checker(path, text)
    for key in data:
        if key not in TOP_LEVEL:
            check._unknown((), key, list(TOP_LEVEL))

    settings = check.table(("project",), data.get("project", {}), schema.ProjectSettings)
    train = check.table(("train",), data.get("train", {}), schema.TrainSettings) or schema.TrainSettings()
    lora = check.table(("lora",), data.get("lora", {}), schema.LoraSettings) or schema.LoraSettings()

    priors = _named(
        check,
        data,
        "priors",
        lambda key, name, raw: check.table(key, raw, schema.Prior, extra={"name": name}),
    )

    def subject(key, name, raw):
        if not isinstance(raw, dict):
            return check.table(key, raw, schema.Subject)
        sub_train, sub_lora = train, lora
        if "train" in raw:
            sub_train = check.table(key + ("train",), raw["train"], schema.TrainSettings, base=train)
        if "lora" in raw:
            sub_lora = check.table(key + ("lora",), raw["lora"], schema.LoraSettings, base=lora)
        extra = {"name": name, "train": sub_train or train, "lora": sub_lora or lora}
        return check.table(key, raw, schema.Subject, extra=extra, nested=("train", "lora"))

    subjects = _named(check, data, "subjects", subject)
    blends = _named(
        check,
        data,
        "blends",
        lambda key, name, raw: check.table(key, raw, schema.Blend, extra={"name": name}),
    )
    renders = _named(
        check,
        data,
        "renders",
        lambda key, name, raw: check.table(key, raw, schema.Render, extra={"name": name}),
    )

    if settings is not None:
        _check_base_model(check, path.parent, settings)
    priors = {n: _resolve_images(check, path.parent, ("priors", n), p) for n, p in priors.items()}
    subjects = {n: _resolve_images(check, path.parent, ("subjects", n), s) for n, s in subjects.items()}
    _check_references(check, priors, subjects, blends, renders)
    _check_sizes(check, subjects, priors, renders)

    if check.problems or settings is None:
        raise ProjectError(path, check.problems)
    return schema.Project(path, settings, train, lora, priors, subjects, blends, renders)


def _named(check: _Checker, data: dict, group: str, read) -> dict:
    """Read the tables of one group ([subjects.*] ...), checking their names."""
    raw = data.get(group, {})
    if not isinstance(raw, dict):
        check.problem((group,), f"expected tables [{group}.<name>], got {_describe(raw)}")
        return {}
    result = {}
    for name, table in raw.items():
        key = (group, name)
        if not NAME.match(name):
            check.problem(
                key, f"name '{name}' may only hold letters, digits, '_' and '-'", "rename the table"
            )
            continue
        item = read(key, name, table)
        if item is not None:
            result[name] = item
    return result


def _check_base_model(check: _Checker, project_dir: Path, settings: schema.ProjectSettings) -> None:
    value = settings.base_model
    key = ("project", "base_model")
    local = value.startswith((".", "/", "~")) or value.endswith((".safetensors",) + PICKLE_SUFFIXES)
    path = Path(value).expanduser()
    path = path if path.is_absolute() else project_dir / path
    if value.lower().endswith(PICKLE_SUFFIXES) and not settings.allow_pickle:
        check.problem(
            key,
            f"'{value}' is a pickle checkpoint, which can run arbitrary code when loaded",
            "convert it to .safetensors, or set allow_pickle = true in [project] if you trust it",
        )
    elif local and not path.exists():
        check.problem(key, f"no such file or folder: {path}", "check the path (relative to the project file)")
    elif not local and not path.exists() and value not in families.builtin_names() and value.count("/") > 1:
        check.problem(key, f"'{value}' is neither a folder nor a hub id (owner/name)", "check the path or id")


def _resolve_images(check: _Checker, project_dir: Path, key: tuple[str, ...], item):
    """Make an images folder absolute and check it holds images."""
    folder = item.images
    if folder is None:
        return item
    path = (project_dir / Path(folder).expanduser()).resolve()
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        check.problem(key + ("images",), f"folder {folder} {what}", f"put the images in {path}")
    elif key[0] == "subjects" and not list_images(path):
        check.problem(
            key + ("images",),
            f"folder {folder} holds no images (.jpg, .png, .webp ...)",
            "add a few photos of the subject",
        )
    return replace(item, images=str(path))


def _check_references(check, priors, subjects, blends, renders) -> None:
    for name, subject in subjects.items():
        if subject.prior is not None and subject.prior not in priors:
            known = ", ".join(priors) or "none defined"
            check.problem(
                ("subjects", name, "prior"), f"'{subject.prior}' is not a prior", f"priors: {known}"
            )
    adapters = list(subjects) + list(blends)
    for name in set(subjects) & set(blends):
        check.problem(("blends", name), f"'{name}' is both a subject and a blend", "rename one of them")
    for name in list(subjects) + list(blends):
        if name in RESERVED_ADAPTERS:
            group = "subjects" if name in subjects else "blends"
            check.problem((group, name), f"'{name}' is reserved for rendering the base model", "rename it")

    def known_adapters() -> str:
        parts = []
        if subjects:
            parts.append("subjects: " + ", ".join(subjects))
        if blends:
            parts.append("blends: " + ", ".join(blends))
        return "; ".join(parts) or "no subjects defined"

    for name, blend in blends.items():
        key = ("blends", name, "adapters")
        for parent, _ in blend.adapters:
            if parent not in adapters:
                check.problem(key + (parent,), f"'{parent}' is not a subject or blend", known_adapters())
        if _in_cycle(name, blends):
            check.problem(key, f"blend '{name}' depends on itself", "remove the cycle between blends")
        _check_blend_method(check, name, blend, subjects, blends)
    for name, render in renders.items():
        if render.adapter not in adapters and render.adapter not in RESERVED_ADAPTERS:
            check.problem(
                ("renders", name, "adapter"),
                f"'{render.adapter}' is not a subject or blend",
                known_adapters() + "; or 'none'",
            )


def _in_cycle(start: str, blends: dict) -> bool:
    seen, todo = set(), [p for p, _ in blends[start].adapters]
    while todo:
        name = todo.pop()
        if name == start:
            return True
        if name in seen or name not in blends:
            continue
        seen.add(name)
        todo += [p for p, _ in blends[name].adapters]
    return False


def adapter_ranks(name: str, subjects: dict, blends: dict, _depth: int = 0) -> dict[str, int | None]:
    """The LoRA rank of an adapter per component ('unet', 'text_encoder'; None: no such adapter)."""
    if name in subjects:
        s = subjects[name]
        return {
            "unet": s.lora.rank,
            "text_encoder": s.lora.text_encoder_rank if s.train.train_text_encoder else None,
        }
    blend = blends.get(name)
    if blend is None or _depth > len(blends):
        return {"unet": None, "text_encoder": None}
    parents = [adapter_ranks(p, subjects, blends, _depth + 1) for p, _ in blend.adapters]
    result = {}
    for component in ("unet", "text_encoder"):
        ranks = [r[component] for r in parents if r[component] is not None]
        if not ranks:
            result[component] = None
        elif blend.method == "cat":
            result[component] = sum(ranks)
        elif blend.method == "svd" or blend.method.endswith("_svd"):
            result[component] = blend.svd_rank or max(ranks)
        else:
            result[component] = ranks[0]
    return result


def _check_blend_method(check, name, blend, subjects, blends) -> None:
    key = ("blends", name)
    method = blend.method
    if method in schema.DENSITY_METHODS and blend.density is None:
        check.problem(
            key + ("method",),
            f"method '{method}' needs a density",
            "add density = 0.5 (fraction of weights kept)",
        )
    if blend.density is not None:
        if method not in schema.DENSITY_METHODS:
            check.problem(
                key + ("density",),
                f"density does not apply to method '{method}'",
                f"methods that use it: {', '.join(schema.DENSITY_METHODS)}",
            )
        elif not 0 < blend.density <= 1:
            check.problem(key + ("density",), f"must be in (0, 1], got {blend.density}")
    is_svd = method == "svd" or method.endswith("_svd")
    for option in ("svd_rank", "svd_clamp"):
        if getattr(blend, option) is not None and not is_svd:
            check.problem(
                key + (option,),
                f"{option} applies to svd methods only, not '{method}'",
                'remove it or use method = "svd"',
            )
    if method in schema.EQUAL_RANK_METHODS:
        parents = [p for p, _ in blend.adapters if p in subjects or p in blends]
        for component in ("unet", "text_encoder"):
            ranks = {p: adapter_ranks(p, subjects, blends)[component] for p in parents}
            ranks = {p: r for p, r in ranks.items() if r is not None}
            if len(set(ranks.values())) > 1:
                listed = ", ".join(f"{p} = {r}" for p, r in ranks.items())
                which = "rank" if component == "unet" else "text_encoder_rank"
                check.problem(
                    key + ("method",),
                    f"method '{method}' needs equal {component} ranks, got {listed}",
                    f'give the subjects the same lora.{which}, or use method = "cat" (exact) or "svd"',
                )


def _check_sizes(check, subjects, priors, renders) -> None:
    for name, subject in subjects.items():
        if subject.train.resolution % 8:
            check.problem(
                ("subjects", name, "train", "resolution"),
                f"must be a multiple of 8, got {subject.train.resolution}",
            )
    for group, items in (("priors", priors), ("renders", renders)):
        for name, item in items.items():
            for side in ("width", "height"):
                size = getattr(item, side)
                if size is not None and size % 8:
                    check.problem((group, name, side), f"must be a multiple of 8, got {size}")
