"""What a command does to the file system grows with the project no faster than the project: each file is
stat'ed and read at most once, and what nothing changed is not written again."""

from __future__ import annotations

import os
from collections import Counter

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
