"""A build of the fake steps that records what it said and which steps ran, and the run-cache entries'
manifests, for the run-cache tests.

Import by name (`from tests.cache_trust_fixtures import build_with`)."""

from __future__ import annotations

import json

from runner import lockfile
from runner.store import RunCache
from tests.conftest import FakeBackend, FakeSteps, Proj, Recorder, use_backend

ALL = ["prior:dog", "train:dog", "train:toy", "blend:mix", "render:park", "render:mixed", "render:base"]


def build_with(p: Proj, wrap=None, **options):
    """Build `p` with the fake steps (each wrapped by `wrap`) and `options`: the result, a Recorder of the
    display events, the ids of the steps that ran."""
    from runner import executor

    fake = FakeSteps()
    undo = use_backend(lambda project: FakeBackend(fake, wrap))
    try:
        rec = Recorder()
        result = executor.build(p.load(), executor.BuildOptions(**options), rec)
    finally:
        undo()
    return result, rec, fake.ran


def manifests(p: Proj) -> dict[str, dict]:
    """{fingerprint: manifest} of every entry of the project's run-cache."""
    cache = RunCache(p.root / ".dbl" / "cache")
    return {fp: json.loads((cache.entry(fp) / "manifest.json").read_text()) for fp in cache.entries()}


def by_step(p: Proj) -> dict[str, str]:
    """{step id: fingerprint} as the lockfile records them."""
    return {sid: record["fingerprint"] for sid, record in lockfile.read(p.lock).items()}


def unstamp(p: Proj) -> None:
    """Make every entry look as an earlier version of dbl wrote it."""
    cache = RunCache(p.root / ".dbl" / "cache")
    for fp, meta in manifests(p).items():
        del meta["made_by"]
        (cache.entry(fp) / "manifest.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
