"""What a command does to the file system grows with the project no faster than the project: each file is
stat'ed and read at most once, and what nothing changed is not written again."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from runner import executor


@pytest.fixture
def stats(monkeypatch):
    """Every os.stat of the test, by path (Path.is_file and Path.stat go through it too)."""
    seen: Counter = Counter()
    real = os.stat

    def counting(path, *args, **kwargs):
        seen[str(path)] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting)
    return seen


def test_a_plan_stats_each_output_and_image_once(proj, build, stats):
    build(proj)
    lock = executor.Workspace(proj.load()).plan()[0]
    outputs = {str(proj.root / rel) for record in lock.values() for rel in record["outputs"]}
    images = {str(p) for p in (proj.root / "data").rglob("*.png")}
    stats.clear()
    _, planned = executor.Workspace(proj.load()).plan()
    assert not any(p.stale for p in planned)
    assert len(outputs) > 10 and len(images) == 5
    assert {path: stats[path] for path in outputs | images} == dict.fromkeys(outputs | images, 1)


class _CountingToml:
    """runner.lockfile's tomllib, counting the texts it parses."""

    def __init__(self):
        import tomllib

        self.TOMLDecodeError = tomllib.TOMLDecodeError
        self._loads = tomllib.loads
        self.parsed = 0

    def loads(self, text):
        self.parsed += 1
        return self._loads(text)


def _records_text(lock: dict) -> str:
    """The records as JSON in their order (NaN != NaN, and == on dicts ignores order)."""
    import json

    return json.dumps(lock)


def test_an_unchanged_lockfile_is_parsed_once(proj, build, monkeypatch):
    from runner import lockfile

    build(proj)
    parsed = lockfile.read(proj.lock)
    executor.Workspace(proj.load()).plan()  # parses it, and keeps the parse
    toml = _CountingToml()
    monkeypatch.setattr(lockfile, "tomllib", toml)
    lock, planned = executor.Workspace(proj.load()).plan()
    assert not any(p.stale for p in planned)
    assert _records_text(lock) == _records_text(parsed)
    result, _ = build(proj)
    assert {e.status for e in result.steps} == {"fresh"}
    assert toml.parsed == 0


def test_a_lockfile_changed_in_place_is_parsed_again(proj, build):
    """Same size, same times: only its content tells, and its content is what the kept parse is keyed by."""
    import os

    from runner import lockfile

    build(proj)
    executor.Workspace(proj.load()).plan()
    st = proj.lock.stat()
    text = proj.lock.read_text()
    record = lockfile.read(proj.lock)["render:park"]
    old = record["fingerprint"]
    proj.lock.write_text(text.replace(old, old[::-1]))
    os.utime(proj.lock, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert proj.lock.stat().st_size == st.st_size
    with pytest.warns(lockfile.LockfileWarning, match="render:park"):
        lock, planned = executor.Workspace(proj.load()).plan()
    assert "render:park" not in lock
    assert [p.id for p in planned if p.stale] == ["render:park"]
    with pytest.warns(lockfile.LockfileWarning, match="render:park"):  # said again from the kept parse
        executor.Workspace(proj.load()).plan()


def _blend_ladder(depth: int, dora: bool = False) -> str:
    """Blends each of the two before it (b2 = b1 + b0, b3 = b2 + b1, ...): every blend reaches the
    subjects along as many paths as a Fibonacci number."""
    lines = [
        '[project]\nbase_model = "tiny-sd"\n',
        '[subjects.dog]\nimages = "data/dog"\ninstance_prompt = "a photo of sks dog"\ntrigger = "sks"\n',
        '[subjects.toy]\nimages = "data/toy"\ninstance_prompt = "a toy"\n'
        + ("[subjects.toy.lora]\nuse_dora = true\n" if dora else ""),
        '[blends.b0]\nadapters = { dog = 0.5, toy = 0.5 }\nmethod = "linear"\n',
        '[blends.b1]\nadapters = { b0 = 0.5, dog = 0.5 }\nmethod = "linear"\n',
    ]
    for k in range(2, depth):
        lines.append(f'[blends.b{k}]\nadapters = {{ b{k - 1} = 0.5, b{k - 2} = 0.5 }}\nmethod = "linear"\n')
    lines.append(f'[renders.r]\nadapter = "b{depth - 1}"\nprompts = ["[trigger] on a beach"]\n')
    return "\n".join(lines)


def test_blends_of_blends_that_share_parents_are_checked_in_polynomial_time(tmp_path, monkeypatch):
    """Each check of a blend walked every path to its subjects: a ladder of 22 blends took seconds to load,
    of 30 a minute, of 40 hours."""
    from runner.project import adapter_checks, load_project
    from tests.conftest import write_image

    write_image(tmp_path / "data/dog/00.png")
    write_image(tmp_path / "data/toy/00.png")
    calls = Counter()
    for name in ("lora_keys", "_lora_unread", "subjects_of", "adapter_ranks"):
        real = getattr(adapter_checks, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(adapter_checks, name, counting)
    path = tmp_path / "p.toml"
    path.write_text(_blend_ladder(22))
    with pytest.warns(UserWarning, match="rendered as written"):
        project = load_project(path)
    assert len(project.tables["blend"]) == 22
    assert sum(calls.values()) < 50_000, calls  # before: 1,060,000, 2.6 times as many every two blends more


def test_a_ladder_of_blends_over_a_dora_adapter_names_it_as_before(tmp_path):
    """What the checks say of blends of blends is what they said before they kept what they found."""
    from runner.project import ProjectError, load_project
    from tests.conftest import write_image

    write_image(tmp_path / "data/dog/00.png")
    write_image(tmp_path / "data/toy/00.png")
    path = tmp_path / "p.toml"
    path.write_text(_blend_ladder(5, dora=True))
    with pytest.raises(ProjectError) as info:
        load_project(path)
    said = [str(p) for p in info.value.problems if "DoRA" in str(p)]
    assert [s.split(":")[0] for s in said] == [
        "blends.b0.adapters.toy",
        "blends.b1.adapters.b0",
        "blends.b2.adapters.b1",
        "blends.b2.adapters.b0",
        "blends.b3.adapters.b2",
        "blends.b3.adapters.b1",
        "blends.b4.adapters.b3",
        "blends.b4.adapters.b2",
    ]
    assert "'b1' is a DoRA adapter (a blend of b0)" in said[2]


def _blend_chain(depth: int, child_first: bool) -> str:
    """Blends each of the one before (c1 = c0 + dog, c2 = c1 + dog ...), written c0 first or last."""
    lines = [
        '[project]\nbase_model = "tiny-sd"\n',
        '[subjects.dog]\nimages = "data/dog"\ninstance_prompt = "a photo of sks dog"\n',
        '[subjects.toy]\nimages = "data/toy"\ninstance_prompt = "a toy"\n',
    ]
    order = reversed(range(depth)) if child_first else range(depth)
    for k in order:
        parent = "toy" if k == 0 else f"c{k - 1}"
        lines.append(f"[blends.c{k}]\nadapters = {{ {parent} = 0.9, dog = 0.1 }}\n")
    lines.append(f'[renders.r]\nadapter = "c{depth - 1}"\nprompts = ["sks dog on a beach"]\n')
    return "\n".join(lines)


@pytest.mark.parametrize("child_first", [False, True])
def test_a_chain_of_blends_deeper_than_the_stack_loads_and_plans(tmp_path, child_first):
    """A chain of about 330 blends, each on the one before, ended `dbl plan` in a RecursionError: the
    checks of blends and the ordering of steps walked the chain one call deeper per blend. The stack is
    cut to 150 frames more than the test's own here, so that 200 blends are deeper than it."""
    import inspect
    import sys

    from runner import planner
    from runner.project import load_project
    from tests.conftest import write_image

    write_image(tmp_path / "data/dog/00.png")
    write_image(tmp_path / "data/toy/00.png")
    path = tmp_path / "p.toml"
    path.write_text(_blend_chain(200, child_first))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack(0)) + 150)
    try:
        project = load_project(path)
        steps = planner.graph(project)
    finally:
        sys.setrecursionlimit(limit)
    order = [step.id for step in steps]
    assert len(project.tables["blend"]) == 200
    assert (
        order.index("blend:c0")
        < order.index("blend:c1")
        < order.index("blend:c199")
        < order.index("render:r")
    )


@pytest.mark.skipif(__import__("shutil").which("git") is None, reason="needs git")
def test_gc_reads_a_lockfile_that_many_branches_hold_once(proj, build, monkeypatch, capsys):
    """gc keeps what every local branch's lockfile refers to; branches that did not touch the lockfile
    hold the same one, which was fetched and parsed once per branch (minutes for many branches of a
    large project)."""
    from runner import lockfile
    from runner.cli import main
    from tests.lockfile_fixtures import built_on_main, git, git_env

    env = git_env()
    built_on_main(proj, build, env)
    for n in range(4):
        git(proj.root, "checkout", "-qb", f"idea-{n}", "main", env=env)
        (proj.root / "notes.txt").write_text(f"idea {n}\n")
        git(proj.root, "add", "notes.txt", env=env)
        git(proj.root, "commit", "-qm", f"idea {n}", env=env)
    toml = _CountingToml()
    monkeypatch.setattr(lockfile, "tomllib", toml)
    assert main(["gc", "--dry-run", str(proj.path)]) == 0
    assert "would drop 0 cache entries" in capsys.readouterr().out
    assert toml.parsed == 2  # the lockfile beside the project, and the one all five branches hold


def test_gc_after_a_plan_parses_no_lockfile(proj, build, monkeypatch, capsys):
    """gc takes the fingerprints a lockfile refers to from the parse a plan kept of it."""
    from runner import lockfile
    from runner.cli import main

    build(proj)
    proj.edit("sks dog on a beach", "sks dog in the snow")
    build(proj)  # the beach render's entry stays in the run-cache, now referred to by nothing
    assert main(["plan", str(proj.path)]) == 0
    toml = _CountingToml()
    monkeypatch.setattr(lockfile, "tomllib", toml)
    assert main(["gc", "--dry-run", str(proj.path)]) == 0
    assert toml.parsed == 0
    monkeypatch.undo()
    assert "would drop 1 cache entry" in capsys.readouterr().out


def test_the_file_hash_cache_forgets_outputs_a_rebuild_removed(proj, build):
    """Each render of other seeds or prompts left the hashes of its old images in .dbl/state, which every
    command loads and every build writes: it grew with every file a project ever had."""
    import json

    build(proj)
    state = proj.root / ".dbl" / "state"
    old = {
        str(proj.root / rel) for rel in executor.Workspace(proj.load()).plan()[0]["render:park"]["outputs"]
    }
    assert old <= set(json.loads(state.read_text())["files"])
    proj.edit("seeds = [0, 1]", "seeds = [2, 3]")
    build(proj)
    kept = json.loads(state.read_text())["files"]
    assert [path for path in kept if not Path(path).exists()] == []
    now = executor.Workspace(proj.load()).plan()[0]["render:park"]["outputs"]
    assert {str(proj.root / rel) for rel in now} <= set(kept)
    proj.edit('[renders.base]\nadapter = "none"\nprompts = ["a dog"]\n', "")  # a step removed
    build(proj)
    kept = json.loads(state.read_text())["files"]
    assert [path for path in kept if not Path(path).exists()] == []


@pytest.mark.parametrize("values", [(1, 1.0, True, 1), (0.0, -0.0, 0, False)])
def test_a_lockfile_written_again_shows_each_value_as_it_is_now(tmp_path, values):
    """A write formats again only the records that changed; a value that changes to an equal one of
    another type (1 -> 1.0 -> true) or sign (0.0 -> -0.0) is a change."""
    from runner import lockfile

    path = tmp_path / "p.lock"
    for value in values:
        record = lockfile.record("train", "f" * 64, "h" * 64, {"x": value}, {}, {"m": value}, "now", 1.0)
        lockfile.write(path, {"train:dog": record})
        assert lockfile.read(path)["train:dog"]["inputs"]["x"] == value
        assert repr(lockfile.read(path)["train:dog"]["metrics"]["m"]) == repr(value)


def test_walks_of_blends_that_share_what_they_found_give_the_answers_of_a_walk_per_depth():
    """The checks of blends keep what one walk found for the next (a chain of 1000 blends took 8 s to
    load); through a cycle they walk as deep as there are blends, as they did."""
    import random
    from types import SimpleNamespace

    from runner.project.adapter_checks import _fold_by_depth, fold_blends

    rng = random.Random(0)
    for _ in range(300):
        names = [f"b{i}" for i in range(rng.randint(1, 7))]
        pool = names + ["s0", "s1"]
        blends = {
            n: SimpleNamespace(adapters=[(p, 1.0) for p in rng.sample(pool, rng.randint(1, 3))])
            for n in names
        }
        walks = (
            # counts paths: differs with how deep a cycle is walked
            (lambda n: 1, lambda n, found: sum(found) + 1, 0),
            (lambda n: [n], lambda n, found: list(dict.fromkeys(s for names in found for s in names)), []),
        )
        for leaf, combine, cut in walks:
            memo = {}
            for start in rng.sample(pool, len(pool)):
                expected = _fold_by_depth(start, blends, leaf, combine, cut)
                assert fold_blends(start, blends, leaf, combine, cut, memo) == expected, (blends, start)


def test_a_chain_of_blends_is_walked_once_for_the_checks_of_all_its_blends(tmp_path, monkeypatch):
    """Each blend's check walked the chain below it anew: a chain of 1000 blends took 8 s to load."""
    from runner.project import adapter_checks, load_project
    from tests.conftest import write_image

    write_image(tmp_path / "data/dog/00.png")
    write_image(tmp_path / "data/toy/00.png")
    combined = Counter()
    real = adapter_checks.fold_blends

    def counting(name, blends, leaf, combine, *args, **kwargs):
        def counted(n, found):
            combined[n] += 1
            return combine(n, found)

        return real(name, blends, leaf, counted, *args, **kwargs)

    monkeypatch.setattr(adapter_checks, "fold_blends", counting)
    path = tmp_path / "p.toml"
    path.write_text(_blend_chain(100, child_first=False))
    load_project(path)
    assert combined and max(combined.values()) <= 4, combined.most_common(3)  # a walk of each kind
