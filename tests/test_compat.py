"""Projects and lockfiles written by the previous version stay valid: building them runs nothing."""

from __future__ import annotations

import shutil

import pytest

from runner import lockfile
from runner.fingerprint import fingerprint
from runner.project import load_project
from tests.conftest import HERE, Recorder

pytestmark = pytest.mark.torch

FIXTURES = HERE / "fixtures" / "v1"


def build_copy(name, tmp_path):
    from runner import executor

    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    path = folder / f"{name}.toml"
    before = lockfile.read(path.with_suffix(".lock"))
    rec = Recorder()
    result = executor.build(load_project(path), executor.BuildOptions(), rec)
    assert result.ok, rec.events
    ran = sorted(sid for kind, sid, *rest in rec.events if kind == "start")
    return before, lockfile.read(path.with_suffix(".lock")), ran, rec


def test_a_demo_built_by_the_previous_version_is_fresh(tmp_path):
    before, after, ran, rec = build_copy("demo", tmp_path)
    assert ran == []
    assert rec.final and all(status == "fresh" for _, status in rec.final)
    assert {sid: r["fingerprint"] for sid, r in after.items()} == {
        sid: r["fingerprint"] for sid, r in before.items()
    }
    assert after == before  # not a record rewritten


def test_a_half_precision_project_reruns_only_its_priors_and_renders(tmp_path):
    """The half-precision fix: priors and renders now key on mixed_precision; trains and blends do not
    rerun where the prior (computed in fp32 on a CPU) gives the very same bytes, which it does on a CPU
    whose kernels round as the fixture's did; on another, their fingerprints change only by its output."""
    import torch

    # The fixture's bytes were computed with two intra-op threads; a CPU's sums split over another
    # number of threads round differently, so the rebuild uses two whatever the machine has.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        before, after, ran, rec = build_copy("pets", tmp_path)
    finally:
        torch.set_num_threads(threads)
    reasons = dict((sid, reasons) for sid, _, reasons in rec.planned)
    assert "mixed_precision set to 'fp16'" in reasons["prior:dog"]
    assert after["train:toy"]["fingerprint"] == before["train:toy"]["fingerprint"]  # it has no prior
    if after["prior:dog"]["output_hash"] == before["prior:dog"]["output_hash"]:
        # This CPU rounds as the one that built the fixture did: the rerun prior gives its very bytes.
        assert ran == ["prior:dog", "render:base", "render:mixed", "render:park"]
        for sid in ("train:dog", "blend:mix"):
            assert after[sid]["fingerprint"] == before[sid]["fingerprint"], sid
        for sid in ran:  # rerun, and the very bytes the previous version wrote: a render with one adapter too
            assert after[sid]["output_hash"] == before[sid]["output_hash"], sid
        return
    # Another CPU's kernels round the prior's images otherwise, and what reads them reruns. Their
    # fingerprints still hold what they held: with the prior's earlier output, the earlier fingerprint.
    assert ran == ["blend:mix", "prior:dog", "render:base", "render:mixed", "render:park", "train:dog"]
    dog = after["train:dog"]["inputs"]
    assert dog["prior"]["output"] == after["prior:dog"]["output_hash"]
    dog["prior"]["output"] = before["prior:dog"]["output_hash"]
    assert fingerprint(dog) == before["train:dog"]["fingerprint"]
    mix = after["blend:mix"]["inputs"]
    for parent in mix["adapters"]:
        parent["output"] = before[f"train:{parent['_name']}"]["output_hash"]
    assert fingerprint(mix) == before["blend:mix"]["fingerprint"]
