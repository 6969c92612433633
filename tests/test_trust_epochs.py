"""Entries a fix no longer trusts (made in an epoch before the one their step restores from, see
runner.store.EPOCH): `dbl gc` drops them, as it does the entries no lockfile refers to, and `dbl check` says
how many there are."""

from __future__ import annotations

import json
import shutil

import pytest

from runner import store
from runner.cli import main
from tests.cache_trust_fixtures import by_step, manifests, unstamp

RENDERS = {"render:park", "render:mixed", "render:base"}


@pytest.fixture
def distrusted(proj, build, monkeypatch):
    """A project built before a fix (epoch 0) that distrusts the render steps' entries made before epoch 2."""
    assert build(proj)[0].ok
    unstamp(proj)
    monkeypatch.setattr(store, "EPOCH", 2)
    monkeypatch.setattr(store, "DISTRUSTED", ((2, lambda kind, inputs: kind == "render"),))
    return proj


def test_gc_drops_the_entries_no_build_restores_and_dry_run_lists_them(distrusted, capsys):
    proj = distrusted
    recorded = by_step(proj)
    assert main(["gc", "--dry-run", str(proj.path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("would drop 3 cache entries") and "kept 4" in out
    for sid in sorted(RENDERS):
        fp = recorded[sid]
        assert f"would drop the entry of {sid} ({fp[:12]}, made before entries were stamped, epoch 0)" in out
    assert "restores no entry of it made before epoch 2" in out
    assert set(manifests(proj)) == set(recorded.values())  # dry: nothing dropped
    assert main(["gc", str(proj.path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dropped 3 cache entries") and "kept 4" in out
    assert out.count("dropped the entry of render:") == 3
    assert set(manifests(proj)) == {fp for sid, fp in recorded.items() if sid not in RENDERS}
    assert main(["gc", str(proj.path)]) == 0
    assert capsys.readouterr().out.startswith("dropped 0 cache entries, 0.0 MB; kept 4\n")


def test_gc_keeps_the_entries_of_the_epoch_their_step_trusts(distrusted, capsys, monkeypatch):
    proj = distrusted
    recorded = by_step(proj)
    monkeypatch.setattr(store, "DISTRUSTED", ((2, lambda kind, inputs: kind == "eval"),))  # none in pets
    assert main(["gc", str(proj.path)]) == 0
    assert capsys.readouterr().out == "dropped 0 cache entries, 0.0 MB; kept 7\n"
    monkeypatch.setattr(store, "DISTRUSTED", ((1, lambda kind, inputs: kind == "render"),))
    for fp, meta in manifests(proj).items():  # made in epoch 1: trusted by a rule from epoch 1
        meta["made_by"] = {"dbl": "0.1.0", "epoch": 1}
        (proj.root / ".dbl" / "cache" / fp / "manifest.json").write_text(json.dumps(meta))
    assert main(["gc", str(proj.path)]) == 0
    assert capsys.readouterr().out == "dropped 0 cache entries, 0.0 MB; kept 7\n"
    assert set(manifests(proj)) == set(recorded.values())


def test_check_counts_the_entries_no_build_restores_and_names_what_made_each(distrusted, capsys, monkeypatch):
    proj = distrusted
    assert main(["check", str(proj.path)]) == 0  # no file differs: the entries are as they were made
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("all ") and out[0].endswith(" files match the lockfile")
    assert out[1].startswith("3 run-cache entries the lockfile refers to are of an epoch this dbl no longer")
    assert "`dbl gc` drops them" in out[1]
    assert out[2:] == [f"  {sid}: made before entries were stamped, epoch 0" for sid in sorted(RENDERS)]
    monkeypatch.setattr(store, "DISTRUSTED", ())  # nothing distrusted: the one line as before
    assert main(["check", str(proj.path)]) == 0
    assert capsys.readouterr().out.splitlines() == out[:1]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_gc_judges_the_entries_of_other_branches_lockfiles_by_their_records(proj, build, capsys, monkeypatch):
    from tests.lockfile_fixtures import git, snow_branch

    env = snow_branch(proj, build)
    snow_park = by_step(proj)["render:park"]
    git(proj.root, "checkout", "-q", "main", env=env)
    assert snow_park not in by_step(proj).values()  # the snow branch's lockfile alone refers to it
    unstamp(proj)
    monkeypatch.setattr(store, "EPOCH", 2)
    monkeypatch.setattr(store, "DISTRUSTED", ((2, lambda kind, inputs: kind == "render"),))
    assert main(["gc", str(proj.path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dropped 4 cache entries") and out.count("dropped the entry of render:park") == 2
    assert f"dropped the entry of render:park ({snow_park[:12]}," in out
    assert set(manifests(proj)) == {fp for sid, fp in by_step(proj).items() if sid not in RENDERS}


def test_what_made_an_entry_is_said_from_any_stamp():
    assert store.maker({"dbl": "0.1.0", "epoch": 1}) == "made by dbl 0.1.0, epoch 1"
    assert store.maker(None) == store.maker({}) == "made before entries were stamped, epoch 0"
    assert store.maker({"epoch": 3}) == "made in epoch 3"
    assert store.maker("x") == "made before entries were stamped, epoch 0"
