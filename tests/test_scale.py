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

