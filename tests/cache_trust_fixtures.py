"""A build of the fake steps that records what it said and which steps ran, for the run-cache tests.

Import by name (`from tests.cache_trust_fixtures import build_with`)."""

from __future__ import annotations

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
