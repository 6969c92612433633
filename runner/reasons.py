"""Why a step is stale, in words: the differences between two records of a step's inputs.

Pure: no torch, no rich, no files. `planner.plan` and a step's start both explain a change with
`explain`, so that the plan and the build say the same thing.
"""

from __future__ import annotations

from collections.abc import Collection


class Naming(str):
    """A reason that names files or folders of the project. As a str, its words name them relative to the
    project file's folder, as the lockfile and `plan --json` record them; `template`, `paths` and `base`
    (the project file's folder) let a display name them as typed where it runs (runner.ui.plain.said_here).
    Made by `naming`."""

    template: str
    paths: tuple[str, ...]
    base: str

    def __new__(cls, template: str, paths: tuple[str, ...], base: str):
        self = super().__new__(cls, template.format(*paths))
        self.template, self.paths, self.base = template, tuple(paths), base
        return self

    def __reduce__(self):
        return type(self), (self.template, self.paths, self.base)


def naming(template: str, *paths: str, base=None) -> str:
    """`template` (with a `{}` for each path) with `paths`, relative to the project file's folder `base`:
    a Naming where `base` is given, else a plain str."""
    if base is None:
        return template.format(*paths)
    return Naming(template, paths, str(base))


def _short(value) -> str:
    text = (
        repr(value)
        if isinstance(value, str)
        else str(value).lower()
        if isinstance(value, bool)
        else str(value)
    )
    return text if len(text) <= 60 else text[:57] + "..."


def _changed(key: str, old, new) -> list[str]:
    """How one value changed; lists item by item ('prompts[1] 'a' -> 'b'')."""
    if isinstance(old, list) and isinstance(new, list):
        if len(old) == len(new):
            return [
                f"{key}[{i}] {_short(a)} -> {_short(b)}"
                for i, (a, b) in enumerate(zip(old, new, strict=True))
                if a != b
            ]
        added = [_short(v) for v in new if v not in old]
        removed = [_short(v) for v in old if v not in new]
        which = [
            f"{word} {', '.join(values)}"
            for word, values in (("added", added), ("removed", removed))
            if values
        ]
        # "+7" read as seven more seeds: the values added and removed are named as such
        more = f" ({'; '.join(which)})" if which else ""
        return [f"{key} {len(old)} -> {len(new)} item{'' if len(new) == 1 else 's'}{more}"]
    return [f"{key} {_short(old)} -> {_short(new)}"]


def _flatten(value, prefix: str, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = value


def _file_changes(
    kind: str, old: dict | None, new: dict | None, folder: str, base=None
) -> tuple[list[str], str]:
    """'<kind> <folder>/<file> added/removed/changed' for each file of two hashed folders (a removed file in
    the folder it was in), and the folder. Files are compared by their names in the folder (a renamed folder
    changes nothing), so a project that names another image folder first gets a line that says so. `base`:
    the project file's folder, which the paths are relative to (see `naming`)."""
    old, new = old or {}, new or {}
    old_folder = old.get("_folder") or folder
    folder = new.get("_folder") or old_folder
    old_files, new_files = old.get("files", {}), new.get("files", {})
    lines = []
    for rel in sorted(set(old_files) | set(new_files)):
        where = old_folder if rel not in new_files else folder
        label = f"{where}/{rel}" if where else rel
        if rel not in old_files:
            lines.append(naming(f"{kind} {{}} added", label, base=base))
        elif rel not in new_files:
            lines.append(naming(f"{kind} {{}} removed", label, base=base))
        elif old_files[rel] != new_files[rel]:
            lines.append(naming(f"{kind} {{}} changed", label, base=base))
    if lines and kind == "image" and old_folder and old_folder != folder:  # captions follow their images
        lines.insert(0, naming("images {} -> {}", old_folder, folder, base=base))
    return lines, folder


# The inputs that name an upstream step and hold its output's hash: {"_name": ..., "output": ...}.
UPSTREAM_KEYS = ("prior", "adapter", "render")


def explain(old: dict, new: dict, said: Collection[str] = (), base=None) -> list[str]:
    """Readable differences between two steps' inputs, e.g. 'lora.rank 16 -> 8'. `said`: the names of
    upstream steps whose new outputs are said already ('upstream prior:dog stale'), not said again. `base`:
    the project file's folder, where the lines that name files say them from (see `naming`)."""
    # Images, then captions (in the images' folder unless they name their own): one line per file.
    reasons, folder = _file_changes("image", old.get("images"), new.get("images"), "", base)
    captions, _ = _file_changes("caption", old.get("captions"), new.get("captions"), folder, base)
    reasons += captions
    held: list[str] = []  # the changes of upstream outputs in `said`

    def upstream_changed(name: str, line: str) -> None:
        (held if name in said else reasons).append(line)

    # Upstream outputs: named, not hashed.
    for key in UPSTREAM_KEYS:
        o, n = old.get(key), new.get(key)
        if isinstance(o, dict) and isinstance(n, dict):
            if o.get("_name") != n.get("_name"):
                reasons.append(f"{key} {o.get('_name')} -> {n.get('_name')}")
            elif o.get("output") != n.get("output"):
                upstream_changed(n.get("_name"), f"upstream {key} {n.get('_name')} changed")
    if isinstance(old.get("adapters"), list) and isinstance(new.get("adapters"), list):
        old_named = {a.get("_name"): a for a in old["adapters"]}
        new_named = {a.get("_name"): a for a in new["adapters"]}
        for name, item in new_named.items():
            before = old_named.get(name)
            if before is None:
                reasons.append(f"adapters.{name} added")
            elif before.get("weight") != item.get("weight"):
                reasons.append(
                    f"adapters.{name} {_short(before.get('weight'))} -> {_short(item.get('weight'))}"
                )
            elif before.get("output") != item.get("output"):
                upstream_changed(name, f"upstream adapter {name} changed")
        reasons += [f"adapters.{name} removed" for name in old_named if name not in new_named]
        if (
            not reasons
            and not held
            and [a.get("_name") for a in old["adapters"]] != [a.get("_name") for a in new["adapters"]]
        ):
            reasons.append("adapters reordered")

    def rest(inputs: dict) -> dict:
        # What the lines above did not explain; an upstream's own settings (a prior's loss weight) stay.
        kept = {k: v for k, v in inputs.items() if k not in ("images", "adapters")}
        for key, explained in [*((k, "output") for k in UPSTREAM_KEYS), ("captions", "files")]:
            both = isinstance(old.get(key), dict) and isinstance(new.get(key), dict)
            kept[key] = {k: v for k, v in inputs[key].items() if k != explained} if both else {}
        return kept

    flat_old, flat_new = {}, {}
    _flatten(rest(old), "", flat_old)
    _flatten(rest(new), "", flat_new)
    changed = {
        k
        for k in set(flat_old) | set(flat_new)
        if flat_old.get(k, _NONE) != flat_new.get(k, _NONE) and not k.rsplit(".", 1)[-1].startswith("_")
    }
    for key in sorted(changed):
        if key in DBL_CHANGES:
            if not changed - set(DBL_CHANGES) - {"version"}:  # else the settings' lines say why
                reasons.append(DBL_CHANGES[key])
            continue
        if key == "base_model.family" and any(k.startswith("base_model.") for k in changed - {key}):
            continue  # another base model: its own line says so, the family follows
        if key not in flat_old:
            reasons.append(f"{key} set to {_short(flat_new[key])}")
        elif key not in flat_new:
            reasons.append(f"{key} removed (was {_short(flat_old[key])})")
        elif flat_old[key] != flat_new[key]:
            reasons += _changed(key, flat_old[key], flat_new[key])
    # A render that switched between one adapter and several (`adapters`): one line says so.
    switched = ("adapter" in old and isinstance(new.get("adapters"), list)) or (
        "adapter" in new and isinstance(old.get("adapters"), list)
    )
    if switched:
        reasons.append(f"{_rendered_with(old)} -> {_rendered_with(new)}")
    for key in ("prior", "adapter"):
        o, n = old.get(key), new.get(key)
        if key == "adapter" and switched:
            continue
        if (o is None) != (n is None) or (isinstance(o, str) or isinstance(n, str)) and o != n:
            label = lambda v: "none" if v in (None, "none") else v.get("_name") if isinstance(v, dict) else v  # noqa: E731
            reasons.append(f"{key} {label(o)} -> {label(n)}")
    return reasons or ([] if held else ["inputs changed"])


_NONE = object()

# Inputs that say how dbl makes a step's outputs (bumped when a fix gives other bytes), in words.
DBL_CHANGES = {
    "family_training": "dbl trains this model family differently now",
    "kohya_names": "the kohya file names the LoRA on text_projection as its loaders read it",
}


def _rendered_with(inputs: dict) -> str:
    """'adapter dog' or 'adapters dog, none': what a render's inputs render with."""
    if isinstance(inputs.get("adapters"), list):
        return "adapters " + ", ".join(str(a.get("_name")) for a in inputs["adapters"])
    value = inputs.get("adapter")
    return f"adapter {value.get('_name') if isinstance(value, dict) else value}"
