"""Decide what to build: (project, lockfile, file facts) -> ordered steps, each stale one with reasons.

Pure apart from reading files through `Facts`: no torch, no rich, no writing. The executor calls
`step_inputs` again just before running a step, once its upstream steps have produced their outputs,
so that a rebuild producing identical bytes stops there.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Protocol

from runner import lockfile, store
from runner import steps as step_kinds
from runner.errors import DblError, UsageError
from runner.fingerprint import fingerprint
from runner.project.schema import Project
from runner.reasons import explain

FRESH = "fresh"
STALE = "stale"


@dataclass
class Step:
    """One step of the build graph."""

    id: str
    kind: str
    name: str
    spec: object
    deps: list[str]  # upstream step ids, in a stable order

    @property
    def output_dir(self) -> str:
        return f"{step_kinds.get(self.kind).output_dir}/{self.name}"


@dataclass
class PlannedStep:
    step: Step
    status: str  # FRESH | STALE
    reasons: list[str] = field(default_factory=list)
    inputs: dict | None = None  # None while an upstream step is stale
    fingerprint: str | None = None
    restorable: bool = False  # the run-cache holds outputs for this fingerprint
    behind: list[str] = field(default_factory=list)  # the upstream steps that were stale

    @property
    def id(self) -> str:
        return self.step.id

    @property
    def stale(self) -> bool:
        return self.status == STALE


class Facts(Protocol):
    """What the planner needs to know about the file system."""

    def images(self, folder: str) -> dict[str, str]:
        """{relative path: sha256} of the images in an absolute folder."""

    def captions(self, folder: str, extension: str) -> dict[str, str]:
        """{relative path: sha256} of the caption files (`extension`) beside the images of a folder."""

    def base_model(self) -> dict:
        """The base model's identity."""

    def outputs_intact(self, record: dict, output_dir: str) -> str | None:
        """None when every recorded output exists with its recorded hash, in the step's output folder
        (`output_dir` under the project's `out`), else why not."""

    def restores(self, fingerprint: str, unhashed: dict | None = None, since: int = 0) -> str | None:
        """The output hash a restore of this fingerprint gives, or None when the run-cache cannot (with
        `unhashed`, the values out of the fingerprint its outputs depend on: when it holds none made
        under them; with `since`, none made in that epoch or later, see runner.store.EPOCH)."""

    def has_outputs(self, output_dir: str) -> bool:
        """Whether the step's output folder (`output_dir` under the project's `out`) holds anything."""

    def resumable(self, step: Step, fingerprint: str) -> str | None:
        """What an interrupted run of the step left for the next one to go on from, where its work folder was
        made for `fingerprint` (StepKind.resumable), or None."""


# --- the graph -------------------------------------------------------------------------------------


def graph(project: Project) -> list[Step]:
    """Every step of the project in execution order: kind by kind in the registry's order (prior,
    train, blend, render), each step after the steps it depends on (a blend after its parent blends)."""
    declared: dict[str, Step] = {}
    for kind in step_kinds.kinds():
        for name, spec in project.tables.get(kind.name, {}).items():
            sid = kind.step_id(name)
            declared[sid] = Step(sid, kind.name, name, spec, list(kind.deps(project, spec)))
    result: list[Step] = []
    placed: set[str] = set()

    # Depth first on a stack of its own, each step after its deps in their order: a chain of blends
    # written parent after child (c999 first) went past Python's recursion limit.
    for first in declared.values():
        if first.id in placed:
            continue
        path, deps, on_path = [first], [iter(first.deps)], {first.id}
        while path:
            dep = next((d for d in deps[-1] if d in declared and d not in placed), None)
            if dep is None:
                done = path.pop()
                deps.pop()
                on_path.discard(done.id)
                placed.add(done.id)
                result.append(done)
            elif dep in on_path:  # the loader rejects cycles; never loop on one
                raise ValueError(f"step {dep} depends on itself")
            else:
                on_path.add(dep)
                path.append(declared[dep])
                deps.append(iter(declared[dep].deps))
    return result


def adapter_step(project: Project, name: str) -> str:
    return step_kinds.adapter_step(project, name)


def dependents(steps: list[Step], roots: set[str]) -> set[str]:
    """Ids of the steps that depend on any of `roots`, transitively (roots excluded)."""
    found: set[str] = set()
    for step in steps:  # execution order: parents come first
        if any(d in roots or d in found for d in step.deps):
            found.add(step.id)
    return found


def upstream(steps: list[Step], targets: set[str]) -> set[str]:
    """`targets` and every step they need, transitively."""
    by_id = {s.id: s for s in steps}
    needed, todo = set(), list(targets)
    while todo:
        sid = todo.pop()
        if sid in needed or sid not in by_id:
            continue
        needed.add(sid)
        todo += by_id[sid].deps
    return needed


# --- the inputs that make each step's fingerprint ---------------------------------------------------


def relative(project: Project, path) -> str:
    """`path` relative to the project file's folder, with forward slashes (lockfile and reasons)."""
    return step_kinds.relative(project, path)


def step_inputs(
    project: Project,
    step: Step,
    facts: Facts,
    upstream_hashes: dict[str, str],
    num_processes: int | None = None,
) -> dict:
    """Exactly the inputs that change a step's result, as its kind declares them. Keys starting with
    '_' are shown, not hashed. `num_processes` overrides the project's (`--num-processes`)."""
    context = step_kinds.Inputs(project, step, facts, upstream_hashes, num_processes)
    return step_kinds.get(step.kind).inputs(context)


def reads_outputs(
    project: Project, step: Step, facts: Facts, hashes: dict, deps, fp: str, num_processes
) -> bool:
    """Whether the step's inputs hold the output of one of `deps` (a snapshot's hold its subject's
    settings, not the adapter of its train step): whether its fingerprint `fp` changes with them."""
    for dep in deps:
        other = {**hashes, dep: ""}
        if fingerprint(step_inputs(project, step, facts, other, num_processes)) != fp:
            return True
    return False


# --- the plan --------------------------------------------------------------------------------------


def plan(
    project: Project,
    lock: dict[str, dict],
    facts: Facts,
    force: set[str] | None = None,
    num_processes: int | None = None,
) -> list[PlannedStep]:
    """Every step in execution order, fresh or stale with reasons. `force` ids are stale regardless;
    `num_processes` is the build's `--num-processes`, if given."""
    force = force or set()
    planned: dict[str, PlannedStep] = {}
    known: dict[str, str] = {}  # step id -> its output hash after the build, where the plan can tell
    for step in graph(project):
        record = lock.get(step.id)
        stale_deps = [d for d in step.deps if planned[d].stale]
        if stale_deps:
            item = PlannedStep(step, STALE, [f"upstream {d} stale" for d in stale_deps], behind=stale_deps)
            if step.id not in force:
                reasons, after = _behind_stale(
                    project, step, stale_deps, record, lock, known, facts, num_processes
                )
                item.reasons += reasons
                item.restorable = reasons[-1:] == [RESTORABLE]
                if after is not None:
                    known[step.id] = after
            else:
                item.reasons.insert(0, "forced")
            planned[step.id] = item
            continue
        hashes = {d: lock[d]["output_hash"] for d in step.deps}
        inputs = step_inputs(project, step, facts, hashes, num_processes)
        fp = fingerprint(inputs)
        item = PlannedStep(step, FRESH, [], inputs, fp)
        if step.id in force:
            item.status, item.reasons = STALE, ["forced"]
        elif record is None:
            item.status, item.reasons = STALE, [unrecorded(step, facts)]
        elif record["fingerprint"] != fp:
            item.status, item.reasons = STALE, explain(record.get("inputs", {}), inputs, base=project.dir)
        else:
            problem = record_problem(facts, step, record, inputs)
            if problem:
                item.status, item.reasons = STALE, [problem]
        if not item.stale:
            known[step.id] = record["output_hash"]
        elif step.id not in force and (restored := _restores(facts, step, fp, inputs)) is not None:
            item.restorable = True
            if item.reasons == [NEVER_BUILT]:  # built, under another name or in another checkout
                item.reasons = [NOT_RECORDED]
            item.reasons.append(RESTORABLE)
            known[step.id] = restored
        elif step.id not in force and (left := facts.resumable(step, fp)):  # an interrupted run's work
            item.reasons.append(left)
        planned[step.id] = item
    return list(planned.values())


RESTORABLE = "restorable from cache"
NEVER_BUILT = "never built"
NOT_RECORDED = "not in the lockfile"
UNCHANGED_AFTER_RESTORE = "up to date once its upstream steps are restored"


def record_problem(facts: Facts, step: Step, record: dict, inputs: dict) -> str | None:
    """Why the outputs a record of the same fingerprint as `inputs` names are not theirs: missing or
    altered, or made under other values out of the fingerprint (StepKind.unhashed); None when they are."""
    return facts.outputs_intact(record, step.output_dir) or step_kinds.unhashed_change(
        step_kinds.get(step.kind), record.get("inputs", {}), inputs
    )


def take_current(step: Step, record: dict, inputs: dict) -> bool:
    """Give the record of a fresh step the current values of what its fingerprint leaves out: renamed
    display keys, and unhashed values an older version did not record; whether it changed."""
    return lockfile.take_names(record, inputs) or step_kinds.take_unhashed(
        step_kinds.get(step.kind), record, inputs
    )


def _restores(facts: Facts, step: Step, fp: str, inputs: dict) -> str | None:
    unhashed = step_kinds.unhashed_of(step_kinds.get(step.kind), inputs)
    return facts.restores(fp, unhashed, store.trusted_since(step.kind, inputs))


def unrecorded(step: Step, facts: Facts) -> str:
    """Why a step the lockfile has no record of is stale: never built, unless outputs are in its folder (a
    merge left its record out, another lockfile was checked out)."""
    return NOT_RECORDED if facts.has_outputs(step.output_dir) else NEVER_BUILT


def not_read(deps: list[str]) -> str:
    return f"the output of {' and '.join(deps)} is not among its inputs"


def _behind_stale(
    project: Project,
    step: Step,
    stale_deps: list[str],
    record,
    lock: dict,
    known: dict[str, str],
    facts: Facts,
    num_processes,
) -> tuple[list[str], str | None]:
    """What the plan can tell of a step behind stale upstream steps, beside 'upstream ... stale': its
    reasons, and its output hash after the build where that is known.

    Where every upstream step is fresh or restorable, their outputs' hashes are known, and so are the
    step's inputs: it will be up to date (the build checks it again once they are restored: the step
    stays stale in the plan), restorable, or stale with its reasons. Otherwise its own changes are its
    inputs with the upstream outputs the lockfile records, against its record."""
    exact = all(d in known for d in step.deps)
    if exact:
        hashes = {d: known[d] for d in step.deps}
    elif record is not None and all("output_hash" in lock.get(d, {}) for d in step.deps):
        hashes = {d: lock[d]["output_hash"] for d in step.deps}
    else:
        return [], None
    try:
        inputs = step_inputs(project, step, facts, hashes, num_processes)
    except (DblError, OSError):  # said when the step itself is planned, once its upstream steps ran
        return [], None
    fp = fingerprint(inputs)
    changed = record and step_kinds.unhashed_change(
        step_kinds.get(step.kind), record.get("inputs", {}), inputs
    )
    if record is not None and record["fingerprint"] == fp and not changed:
        if not exact:  # its own inputs are unchanged: what changes is upstream, if it reads it
            if reads_outputs(project, step, facts, hashes, stale_deps, fp, num_processes):
                return [], None
            problem = facts.outputs_intact(record, step.output_dir)
            return [problem or f"up to date: {not_read(stale_deps)}"], None
        problem = facts.outputs_intact(record, step.output_dir)
        if problem is None:
            return [UNCHANGED_AFTER_RESTORE], record["output_hash"]
        reasons = [problem]
    elif changed:
        reasons = [changed]
    elif record is not None:
        said = {d.partition(":")[2] for d in stale_deps}  # a step id is kind:name
        reasons = explain(record.get("inputs", {}), inputs, said, base=project.dir)
    else:
        reasons = [unrecorded(step, facts)]
    if exact and (restored := _restores(facts, step, fp, inputs)) is not None:
        return [*([NOT_RECORDED] if record is None else reasons), RESTORABLE], restored
    return reasons, None


def to_json(planned: list[PlannedStep]) -> dict:
    """The documented shape of `dbl plan --json`."""
    return {
        "stale": [{"id": p.id, "kind": p.step.kind, "reasons": p.reasons} for p in planned if p.stale],
        "fresh": [p.id for p in planned if not p.stale],
    }


def option_name(field: str, api: bool) -> str:
    """How a message names the build option `field` (a BuildOptions field: only, force, gpus): as a script
    gave it (`only`), where `api`, else as the command line spells it (`--only`)."""
    return field if api else "--" + field.replace("_", "-")


def check_step_ids(planned: list[PlannedStep], api: bool = False, **ids: tuple[str, ...]) -> None:
    """Raise one UsageError naming every id given to an option (only=..., force=...) that is no step of
    the plan, each with what was likely meant (a name without its kind, a pattern, a typo). The options
    are named as the command line spells them (`--only`), or, where `api`, as BuildOptions does (`only`)."""
    known = [p.id for p in planned]
    problems = []
    for option, given in ids.items():
        option = option_name(option, api)
        unknown = [sid for sid in dict.fromkeys(given) if sid not in known]
        if unknown:
            named = ", ".join(f"'{sid}'{_step_hint(sid, known, option)}" for sid in unknown)
            problems.append(f"{option}: no step {named}")
    if problems:
        raise UsageError(f"{'; '.join(problems)}; steps: {', '.join(known) or 'none'}")
    _check_forced_are_selected(planned, ids.get("force") or (), ids.get("only") or (), api)


def _check_forced_are_selected(
    planned: list[PlannedStep], force: tuple[str, ...], only: tuple[str, ...], api: bool
) -> None:
    """A step forced outside what `only` selects would be skipped without a word: refuse it instead."""
    if not force or not only:
        return
    selected = upstream([p.step for p in planned], set(only))
    outside = [sid for sid in dict.fromkeys(force) if sid not in selected]
    if outside:
        f, o = option_name("force", api), option_name("only", api)
        them = ", ".join(outside)
        raise UsageError(
            f"{f}: {them} {'is' if len(outside) == 1 else 'are'} not among the steps {o} selects "
            f"({', '.join(dict.fromkeys(only))} and the steps {'it needs' if len(only) == 1 else 'they need'}), "
            f"so {'it' if len(outside) == 1 else 'they'} would not run; add {them} to {o}, or leave {o} out"
        )


def _step_hint(sid: str, known: list[str], option: str) -> str:
    if sid.endswith(".toml"):
        return (
            f" (the project file goes before {option})"
            if option.startswith("-")
            else " (a project file, not a step id)"
        )
    if any(c in sid for c in "*?["):
        matches = fnmatch.filter(known, sid)
        return (
            f" (a step id, not a pattern: {' '.join(matches)})" if matches else " (a step id, not a pattern)"
        )
    kind, colon, name = sid.rpartition(":")
    if not colon:
        same = [k for k in known if k.partition(":")[2] == sid]
        return f" (a step id is kind:name: {' or '.join(same)}?)" if same else ""
    # a misspelt name is compared with the names of its kind (every id of a kind shares its prefix)
    names = {k.partition(":")[2]: k for k in known if k.startswith(f"{kind}:")}
    close = (
        difflib.get_close_matches(name, names, n=1) if names else difflib.get_close_matches(sid, known, n=1)
    )
    return f" (did you mean {names.get(close[0], close[0])}?)" if close else ""
