"""The built-in step kinds' cross-table checks of blends and renders (see runner.steps): the adapters
they name, blend cycles and methods, and the ranks and LoRA settings an adapter takes from its subjects.

Pure like the rest of the project package; the readers and the checks of subjects, priors and train
settings are in runner.project.checks.
"""

from __future__ import annotations

import json

from runner import families
from runner.project import schema, unused
from runner.project.checks import (
    RESERVED_ADAPTERS,
    TRIGGER,
    check_adapter_name,
    listed,
    unread,
    unread_references,
)


def _known_adapters(check, tables: dict, blend: str) -> str:
    """The parents blend `blend` may name: subjects and the other blends (itself would be a cycle)."""
    others = [name for name in listed(check, "blends", tables.get("blend", {})) if name != blend]
    return _adapter_listing(
        {"subjects": listed(check, "subjects", tables.get("train", {})), "blends": others}
    )


def adapter_tables(tables: dict) -> dict[str, dict]:
    """The tables of every kind that produces an adapter (subjects, blends ...), by their table name
    ("subjects"; "snapshots" for the derived kind), in build order: the names a render may use."""
    from runner import steps  # at call time: runner.steps imports this module

    found = {}
    for kind in steps.kinds():
        if kind.produces_adapter and (kind.table or tables.get(kind.name)):  # derived ones when there are
            found[kind.table or f"{kind.name}s"] = tables.get(kind.name, {})
    return found


def snapshot_of(name: str, subjects: dict) -> tuple[str, str] | None:
    """The subject and the step, as written, where `name` reads as a snapshot (dog@400) of one of
    `subjects`, whether or not the subject saves one at that step; None for any other name."""
    subject, at, step = name.partition("@")
    if at and step.isascii() and step.isdigit() and subject in subjects:  # not "²": int() refuses it
        return subject, step
    return None


def missing_snapshot(name: str, subjects: dict) -> tuple[str, str, int] | None:
    """Why snapshot `name` (dog@400) of one of `subjects` names no adapter, as (case, subject, step): 'zeros'
    (a saved step written with leading zeros), 'base' (step 0: the base model), 'last' (the last step: the
    subject's own adapter), 'past' (beyond the last) or 'unsaved' (a step not in save_steps). None where
    `name` is no snapshot of a subject."""
    snapshot = snapshot_of(name, subjects)
    if snapshot is None:
        return None
    subject, written = snapshot
    step, train = int(written), subjects[subject].train
    if str(step) != written and step in (train.save_steps or ()):
        case = "zeros"
    elif step == 0:
        case = "base"
    elif step == train.steps:
        case = "last"
    elif step > train.steps:
        case = "past"
    else:
        case = "unsaved"
    return case, subject, step


def _adapter_nouns(adapters: dict[str, dict]) -> str:
    """'subject or blend' for the tables {"subjects": ..., "blends": ...}."""
    nouns = [table.removesuffix("s") for table in adapters]
    return " or ".join(nouns) if len(nouns) < 3 else ", ".join(nouns[:-1]) + " or " + nouns[-1]


def _adapter_listing(adapters: dict[str, dict]) -> str:
    parts = [f"{table}: {', '.join(names)}" for table, names in adapters.items() if names]
    return "; ".join(parts) or "no subjects defined"


def check_blends(check, tables: dict) -> None:
    subjects, blends = tables.get("train", {}), tables.get("blend", {})
    adapters = list(subjects) + list(blends)
    in_cycles = set()
    unread_memo, ranks_memo, keys_memo = {}, {}, {}  # what each walk found, for the next blend's
    own = _own_blends(blends, subjects)
    for name, parent in unread_references(check, "blends", "adapters"):
        if parent not in adapters and not unread(check, parent, ("subjects", "blends")):
            check.problem(("blends", name, "adapters", parent), *_unknown_parent(check, parent, tables, name))
    for name, blend in blends.items():
        check_adapter_name(check, "blends", name)
        key = ("blends", name, "adapters")
        for parent, _ in blend.adapters:
            if parent not in adapters and not unread(check, parent, ("subjects", "blends")):
                check.problem(key + (parent,), *_unknown_parent(check, parent, tables, name))
        if name in own and name not in in_cycles and (cycle := _cycle(name, own)) is not None:
            in_cycles.update(cycle)  # one cycle is one problem, said at its first blend
            fix = f"remove {name} from its adapters" if len(cycle) == 2 else "remove the cycle between blends"
            check.problem(key, f"blend '{name}' depends on itself: {' -> '.join(cycle)}", fix)
        # A parent whose [lora] did not read has unknown ranks and kind of LoRA: its problem is said.
        unknown = {parent for parent, _ in blend.adapters if _lora_unread(check, parent, blends, unread_memo)}
        _check_blend_method(check, name, blend, subjects, blends, not unknown, ranks_memo)
        unused.note_blend(check, ("blends", name), blend)
        for parent in (parent for parent, _ in blend.adapters if parent not in unknown):
            for setting, flagged, what, why, fix in UNBLENDABLE:
                keys = lora_keys(
                    parent, subjects, blends, setting, flagged, keys_memo.setdefault(setting, {})
                )
                if keys:
                    check.problem(
                        key + (parent,),
                        f"'{parent}' is {what} ({', '.join(keys)}), {why}",
                        f"{fix}, or render '{parent}' on its own",
                    )


def _unknown_parent(check, parent: str, tables: dict, blend: str) -> tuple[str, str]:
    """The problem and fix of a blend's parent that is no subject or blend. A snapshot its subject saves
    (dog@400, which a render may name) is said as one: that it is not listed among the subjects tells a
    user who wrote it nothing."""
    subjects = tables.get("train", {})
    snapshot = snapshot_of(parent, subjects)
    if snapshot is not None and int(snapshot[1]) in (subjects[snapshot[0]].train.save_steps or ()):
        subject = snapshot[0]
        return (
            f"'{parent}' is a snapshot of {subject}, and a blend combines subjects and blends only",
            f"blend '{subject}' (its last step), or render '{parent}' on its own",
        )
    return f"'{parent}' is not a subject or blend", _known_adapters(check, tables, blend)


def _lora_unread(check, name: str, blends: dict, memo: dict | None = None) -> bool:
    """Whether the [lora] settings of adapter `name`, or of a parent of it, did not read."""
    return fold_blends(
        name,
        blends,
        leaf=lambda n: check.did_not_read(("subjects", n, "lora"), ("lora",)),
        combine=lambda n, found: any(found),
        cut=False,
        memo=memo,
    )


def _own_blends(blends: dict, subjects: dict) -> dict:
    """The blends a walk from an adapter to its parents goes through: those not named like a subject. A
    blend named like one is a problem of its own (which one a parent `dog` means is unknown); a walk
    reads the name as the subject."""
    return {n: b for n, b in blends.items() if n not in subjects}


def fold_blends(name, blends: dict, leaf, combine, cut, memo: dict | None = None):
    """A value of adapter `name` found from its parents': leaf(n) for an adapter that is not in `blends`,
    combine(n, [the value of each parent, in order]) for one that is, and `cut` for a blend deeper than
    there are blends (a cycle, said on its own). On a stack of its own: a chain of a few hundred blends
    went past Python's recursion limit. `memo` keeps each blend's value for the next call with the same
    blends, leaf and combine (a check of every blend of a chain walked it once per blend)."""
    memo = {} if memo is None else memo
    todo, on_path = [(name, False)], set()
    while todo:
        n, parents_done = todo.pop()
        if n in memo:
            continue
        if n not in blends:
            memo[n] = leaf(n)
        elif parents_done:
            on_path.discard(n)
            memo[n] = combine(n, [memo[p] for p, _ in blends[n].adapters])
        elif n in on_path:  # a cycle: its values depend on how deep the walk goes
            return _fold_by_depth(name, blends, leaf, combine, cut)
        else:
            on_path.add(n)
            todo.append((n, True))
            todo += [(p, False) for p, _ in reversed(blends[n].adapters) if p not in memo]
    return memo[name]


def _fold_by_depth(name, blends: dict, leaf, combine, cut):
    """fold_blends through a cycle: each blend's value once per depth, down to as many as there are."""
    found: dict[tuple[str, int], object] = {}
    todo = [(name, 0)]
    while todo:
        n, depth = todo[-1]
        if (n, depth) in found:
            todo.pop()
        elif n not in blends:
            found[n, depth] = leaf(n)
            todo.pop()
        elif depth > len(blends):
            found[n, depth] = cut
            todo.pop()
        else:
            parents = [(p, depth + 1) for p, _ in blends[n].adapters]
            waiting = [p for p in parents if p not in found]
            if waiting:
                todo += reversed(waiting)  # the first parent first, as a recursive walk would
            else:
                found[n, depth] = combine(n, [found[p] for p in parents])
                todo.pop()
    return found[name, 0]


def check_renders(check, tables: dict) -> None:
    """A render names one adapter (`adapter`) or several (`adapters`) of any kind that produces one."""
    produced = adapter_tables(tables)
    known = {name for names in produced.values() for name in names} | set(RESERVED_ADAPTERS)
    written = {table: listed(check, table, names) for table, names in produced.items()}
    for field in ("adapter", "adapters"):
        for name, adapter in unread_references(check, "renders", field):
            if adapter not in known and not unread(check, adapter, (*produced, "snapshots")):
                check.problem(
                    ("renders", name, field),
                    f"'{adapter}' is not a {_adapter_nouns(produced)}",
                    _adapter_fix(adapter, tables.get("train", {}), _adapter_listing(written) + "; or 'none'"),
                )
    for name, render in tables.get("render", {}).items():
        key = ("renders", name)
        if render.adapter is not None and render.adapters is not None:
            check.problem(
                key + ("adapters",),
                "adapter and adapters are both given",
                "keep adapter for one adapter, or adapters for one grid column per adapter",
            )
        elif render.adapter is None and render.adapters is None:
            check.problem(
                key,
                "missing required key 'adapter' or 'adapters'",
                "add adapter = \"...\" (a subject, a blend, or 'none' for the base model), or "
                'adapters = ["...", "..."] for one grid column per adapter',
            )
        field = "adapter" if render.adapters is None else "adapters"
        seen = set()
        for adapter in render.adapters or [render.adapter]:
            if adapter is None:
                continue
            if adapter not in known and not unread(check, adapter, (*produced, "snapshots")):
                check.problem(
                    key + (field,),
                    f"'{adapter}' is not a {_adapter_nouns(produced)}",
                    _adapter_fix(adapter, tables.get("train", {}), _adapter_listing(written) + "; or 'none'"),
                )
            elif adapter in seen:
                check.problem(key + (field,), f"'{adapter}' is listed twice", "list each adapter once")
            seen.add(adapter)
        _render_trigger(check, key, render, tables)
        unused.note_render(check, key, render)


def _render_trigger(check, key, render, tables: dict) -> None:
    """[trigger] in a render's prompt is drawn as written: only captions and instance prompts replace it."""
    if not any(TRIGGER in prompt for prompt in render.prompts):
        return
    subjects, blends = tables.get("train", {}), tables.get("blend", {})
    named = [s for a in render.adapters or [render.adapter] for s in subjects_of(a, subjects, blends)]
    words = next((subjects[s].trigger for s in named if subjects[s].trigger), None)
    check.note(
        key + ("prompts",),
        f"{TRIGGER} is rendered as written: only captions and instance prompts replace it",
        f"write the words it stands for, e.g. '{words}'" if words else "write the words it stands for",
    )


def subjects_of(name: str | None, subjects: dict, blends: dict) -> list[str]:
    """The subjects adapter `name` is trained from: itself, or the parents of a blend; each once, in the
    order its parents name them."""
    return fold_blends(
        name,
        _own_blends(blends, subjects),
        leaf=lambda n: [n] if n in subjects else [],  # else a snapshot or 'none'
        combine=lambda n, found: list(dict.fromkeys(s for names in found for s in names)),
        cut=[],
    )


def _adapter_fix(name: str, subjects: dict, listing: str) -> str:
    """The fix of an unknown adapter: the names there are, and for a snapshot (dog@400) of a subject that
    has none at that step, how to have it."""
    case, subject, step = missing_snapshot(name, subjects) or (None, None, None)
    if case == "zeros":
        return f"write it without leading zeros: '{subject}@{step}'"
    if case == "base":
        return f"step 0 is {subject}'s base model: write 'none' for the base model alone; {listing}"
    if case == "last":
        return f"step {step} is the last of {subject}: its adapter is '{subject}'"
    if case == "unsaved":
        return f"add {step} to the save_steps of {subject}; {listing}"
    return listing


def _cycle(start: str, blends: dict) -> list[str] | None:
    """The blends from `start` back to itself through their parents ([a, b, a]), or None."""
    # Each step on the way holds the one before it, (name, (name before, ...)): the path is spelled out
    # only for the cycle found (a copy of it at each step took seconds for a chain of 1000 blends).
    todo, seen = [(p, (start, None)) for p, _ in reversed(blends[start].adapters)], set()
    while todo:
        step = todo.pop()
        name = step[0]
        if name == start:
            path = []
            while step is not None:
                path.append(step[0])
                step = step[1]
            return path[::-1]
        if name in seen or name not in blends:
            continue
        seen.add(name)
        todo += [(p, step) for p, _ in reversed(blends[name].adapters)]
    return None


def _rank(lora, component: dict) -> int | None:
    rank = getattr(lora, component["rank_field"])
    if rank is None and component.get("rank_fallback"):
        rank = getattr(lora, component["rank_fallback"])
    return rank


def adapter_ranks(
    name: str, subjects: dict, blends: dict, family: str | None = families.DEFAULT, memo: dict | None = None
) -> dict[str, int | None]:
    """The LoRA rank of an adapter per component of its family (None: no LoRA on that component; family
    None: the components of every family)."""
    components = families.lora_components(family)
    none = {c["name"]: None for c in components}

    def leaf(n: str) -> dict[str, int | None]:
        if n not in subjects:
            return none
        s = subjects[n]
        return {
            c["name"]: _rank(s.lora, c) if c["gate"] is None or getattr(s.train, c["gate"]) else None
            for c in components
        }

    def combine(n: str, parents: list[dict]) -> dict[str, int | None]:
        blend, result = blends[n], {}
        for c in components:
            ranks = [r[c["name"]] for r in parents if r[c["name"]] is not None]
            if not ranks:
                result[c["name"]] = None
            elif len(ranks) == 1:  # PEFT blends a lone adapter linearly, any method: rank stays
                result[c["name"]] = ranks[0]
            elif blend.method == "cat":
                result[c["name"]] = sum(ranks)
            elif blend.method == "svd" or blend.method.endswith("_svd"):
                result[c["name"]] = blend.svd_rank or max(ranks)
            else:
                result[c["name"]] = ranks[0]
        return result

    return dict(fold_blends(name, _own_blends(blends, subjects), leaf, combine, cut=none, memo=memo))


def lora_keys(
    name: str, subjects: dict, blends: dict, setting: str, flagged, memo: dict | None = None
) -> list[str]:
    """The [lora] keys of `setting` ("use_dora", "bias") whose value `flagged` holds, for adapter `name`
    or a parent of it (a blend), e.g. ["lora.use_dora = true"]; empty when none. Any family's components
    count: a key of a component the base model has not is an error of its own."""

    def leaf(n: str) -> list[str]:
        if n not in subjects:
            return []
        subject = subjects[n]
        seen, found = set(), []
        for family in families.all():
            for c in family.components:
                key = c.setting(setting)
                if key in seen or not c.trains(subject.train):
                    continue
                seen.add(key)
                value = getattr(subject.lora, key)
                if value is not None and flagged(value):  # None falls back to a key counted already
                    found.append(f"lora.{key} = {json.dumps(value)}")
        return found

    def combine(n: str, found: list[list[str]]) -> list[str]:
        parents = [p for (p, _), keys in zip(blends[n].adapters, found, strict=True) if keys]
        return [f"a blend of {', '.join(parents)}"] if parents else []

    return list(fold_blends(name, _own_blends(blends, subjects), leaf, combine, cut=[], memo=memo))


# What rules an adapter out of a blend: the [lora] setting, when it does, and why.
UNBLENDABLE = (
    (
        "use_dora",
        lambda value: value is True,
        "a DoRA adapter",
        "which no blend method combines exactly: DoRA rescales every weight row, so its change is not a "
        "sum of low-rank deltas",
        "blend LoRA or rsLoRA adapters",
    ),
    (
        "bias",
        lambda value: value != "none",
        "trained with biases",
        "which PEFT blends with no other adapter: a trained bias is no low-rank delta",
        'blend adapters trained with bias = "none"',
    ),
)


def _check_blend_method(check, name, blend, subjects, blends, lora_known: bool, ranks_memo: dict) -> None:
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
    if method in schema.EQUAL_RANK_METHODS and lora_known:
        # Every component the base model's family trains (SDXL's text_encoder_2 too); when the family is
        # not known before a download, every family's.
        family = check.family
        parents = [p for p, _ in blend.adapters if p in subjects or p in blends]
        ranks_of = {p: adapter_ranks(p, subjects, blends, family, ranks_memo) for p in parents}
        components = families.lora_components(family)
        owner = {c["rank_field"]: c["name"] for c in components}
        for c in components:
            component = c["name"]
            ranks = {p: ranks_of[p][component] for p in parents}
            ranks = {p: r for p, r in ranks.items() if r is not None}
            fallback = owner.get(c.get("rank_fallback"))
            if fallback and ranks == {p: r for p, r in ((p, ranks_of[p][fallback]) for p in parents) if r}:
                continue  # the ranks it falls back to: said (or fine) for that component already
            if len(set(ranks.values())) > 1:
                listed = ", ".join(f"{p} = {r}" for p, r in ranks.items())
                which = c["rank_field"]
                check.problem(
                    key + ("method",),
                    f"method '{method}' needs equal {component} ranks, got {listed}",
                    f'give the subjects the same lora.{which}, or use method = "cat" (exact) or "svd"',
                )
