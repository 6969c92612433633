"""After a step, each byte of its outputs is read once: copied out of its work folder to be committed, and
hashed as it is copied, while the folder itself moves into the run-cache. A restore reads the entry once the
same way, and an entry whose bytes are not those it records is dropped, never restored."""

from __future__ import annotations

import builtins
import io
import os
import sys
from pathlib import Path

import pytest

from runner import events, lockfile

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")


class _Counted:
    """A binary file open for reading, whose reads add to a count."""

    def __init__(self, f, add):
        self._f, self._add = f, add

    def read(self, *args):
        data = self._f.read(*args)
        self._add(len(data))
        return data

    def readinto(self, buffer):
        n = self._f.readinto(buffer)
        self._add(n or 0)
        return n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.fixture
def bytes_read(tmp_path, monkeypatch):
    """{"n": bytes read from the files under tmp_path's .dbl/ and build/ folders}, through open() or the
    system's in-kernel copies."""
    count = {"n": 0}
    watched = (str(tmp_path / ".dbl") + os.sep, str(tmp_path / "build") + os.sep)

    def add(n: int) -> None:
        count["n"] += n

    real_open = builtins.open

    def counting_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        binary_read = "r" in mode and "b" in mode and "+" not in mode
        if binary_read and isinstance(file, (str, os.PathLike)) and os.fspath(file).startswith(watched):
            return _Counted(f, add)
        return f

    real_sendfile = os.sendfile

    def counting_sendfile(out_fd, in_fd, offset, count_, *args, **kwargs):
        sent = real_sendfile(out_fd, in_fd, offset, count_, *args, **kwargs)
        if os.readlink(f"/proc/self/fd/{in_fd}").startswith(watched):
            add(sent)
        return sent

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    monkeypatch.setattr(os, "sendfile", counting_sendfile)
    return count


def output_bytes(lock_path: Path, step_ids=None) -> int:
    lock = lockfile.read(lock_path)
    return sum(
        item["size"]
        for sid, record in lock.items()
        if step_ids is None or sid in step_ids
        for item in record["outputs"].values()
    )


def test_a_steps_outputs_are_read_once_after_it_ran_and_once_when_restored(proj, build, bytes_read):
    result, _ = build(proj)
    assert result.exit_code == 0
    made = output_bytes(proj.lock)
    assert made > 0
    assert bytes_read["n"] == made  # not hashed in the work folder, copied, then the copy hashed again

    proj.edit('prompts = ["a dog"]', 'prompts = ["a cat"]')
    build(proj)
    proj.edit('prompts = ["a cat"]', 'prompts = ["a dog"]')
    bytes_read["n"] = 0
    result, rec = build(proj)
    assert result.exit_code == 0
    assert ("end", "render:base", events.CACHED, "") in rec.events
    assert bytes_read["n"] == output_bytes(proj.lock, {"render:base"})  # not verified, copied, then hashed


def test_an_entry_altered_to_bytes_of_the_same_size_is_dropped_not_restored(proj, build, fake_steps):
    build(proj)
    fp = lockfile.read(proj.lock)["render:base"]["fingerprint"]
    proj.edit('prompts = ["a dog"]', 'prompts = ["a cat"]')
    build(proj)
    entry = proj.root / ".dbl" / "cache" / fp
    png = entry / "files" / "0-0.png"
    png.write_bytes(png.read_bytes()[::-1])  # the same size: only its bytes tell
    proj.edit('prompts = ["a cat"]', 'prompts = ["a dog"]')
    result, rec = build(proj)
    assert result.exit_code == 0
    assert fake_steps.ran == ["render:base"]  # it ran instead
    warned = [e[2] for e in rec.events if e[0] == "log" and e[1] == "render:base"]
    assert any("damaged" in m and str(entry) in m for m in warned), warned
    out = proj.root / "build" / "pets" / "renders" / "base" / "0-0.png"
    assert out.read_text() == f"a dog 0 {fp}"  # the step's bytes, not the altered entry's
