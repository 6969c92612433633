"""A run-cache entry says what made it (`made_by` in its manifest), so that a fix that finds some entries
were made wrong can skip those made before it; entries made before stamps restore as they always did."""

from __future__ import annotations

import shutil

import runner
from runner import store
from runner.cli import main
from tests.cache_trust_fixtures import by_step, manifests, unstamp
from tests.conftest import Proj


def as_a_fresh_clone(p: Proj) -> None:
    """No outputs, no lockfile: every step restores from the run-cache, or runs."""
    p.lock.unlink()
    shutil.rmtree(p.root / "build")


def test_a_new_entry_says_which_dbl_made_it_and_in_which_epoch(proj, build):
    result, _ = build(proj)
    assert result.ok
    stamps = [meta["made_by"] for meta in manifests(proj).values()]
    assert len(stamps) == 7 and all(s == {"dbl": runner.__version__, "epoch": store.EPOCH} for s in stamps)
    assert all(meta["version"] == store.MANIFEST_VERSION == 2 for meta in manifests(proj).values())
    assert "made_by" not in proj.lock.read_text()  # the lockfile is as before


def test_an_entry_without_a_stamp_restores_checks_and_is_kept_as_before(proj, build, capsys):
    build(proj)
    unstamp(proj)
    recorded = by_step(proj)
    as_a_fresh_clone(proj)
    assert main(["plan", str(proj.path)]) == 0
    assert capsys.readouterr().out.count("restorable from cache") == 7
    result, rec = build(proj)
    assert result.ok and {status for _, status in rec.final} == {"cached"}
    assert by_step(proj) == recorded
    assert all("made_by" not in meta for meta in manifests(proj).values())  # restored, not rewritten
    assert main(["check", str(proj.path)]) == 0
    assert main(["gc", str(proj.path)]) == 0
    assert set(manifests(proj)) == set(recorded.values())


def test_a_fix_that_distrusts_older_entries_reruns_only_the_steps_it_names(
    proj, build, fake_steps, monkeypatch
):
    build(proj)
    unstamp(proj)  # epoch 0: made before the fix below
    renders = {"render:park", "render:mixed", "render:base"}
    as_a_fresh_clone(proj)
    monkeypatch.setattr(store, "EPOCH", 2)
    monkeypatch.setattr(store, "DISTRUSTED", ((2, lambda kind, inputs: kind == "render"),))
    result, rec = build(proj)
    assert result.ok
    planned = {sid: reasons for sid, _, reasons in rec.planned}
    assert [sid for sid in planned if "restorable from cache" in planned[sid]] == [
        sid for sid in planned if sid not in renders
    ]
    assert set(fake_steps.ran) == renders
    assert {sid for sid, status in rec.final if status == "cached"} == set(planned) - renders
    # The renders' entries were made anew, under the new epoch; the others are as they were.
    stamps = {fp: meta.get("made_by") for fp, meta in manifests(proj).items()}
    for sid, fp in by_step(proj).items():
        assert stamps[fp] == ({"dbl": runner.__version__, "epoch": 2} if sid in renders else None), sid
    # Entries of the new epoch restore under the rule.
    as_a_fresh_clone(proj)
    result, rec = build(proj)
    assert result.ok and fake_steps.ran == [] and {s for _, s in rec.final} == {"cached"}


def test_the_epoch_rule_reads_any_stamp(tmp_path):
    assert store.epoch_of({}) == 0
    assert store.epoch_of({"made_by": {"dbl": "9.0", "epoch": 3}}) == 3
    for odd in ("x", {"epoch": "3"}, {"epoch": True}, {"dbl": "9.0"}, None):
        assert store.epoch_of({"made_by": odd}) == 0
    assert store.made_under({"made_by": {"epoch": 1}}, None, 1)
    assert not store.made_under({"made_by": {"epoch": 1}}, None, 2)
    assert store.trusted_since("render", {}) == 0  # no fix distrusts any entry yet
