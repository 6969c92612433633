"""Damaged run-cache entries are reported once and rerun; a step's fingerprint holds the settings it really
ran with; a prompt longer than the text encoder reads is a warning."""

from __future__ import annotations

import shutil

import pytest

from runner import lockfile
from runner.store import RunCache
from tests.cache_trust_fixtures import build_with
from tests.conftest import PETS, Proj, Recorder


def test_a_damaged_manifest_is_reported_once_and_the_step_reruns(tmp_path):
    p = Proj(tmp_path, PETS)
    build_with(p)
    fp = lockfile.read(p.lock)["train:dog"]["fingerprint"]
    (tmp_path / ".dbl/cache" / fp / "manifest.json").write_text('{"outputs": [1, 2], "output_hash": 3}')
    shutil.rmtree(tmp_path / "build/pets/adapters/dog")
    _, rec, _ = build_with(p, dry_run=True)
    assert "restorable from cache" not in dict((s, r) for s, _, r in rec.planned)["train:dog"]
    result, rec, ran = build_with(p)
    assert result.ok and "train:dog" in ran
    warnings = [e for e in rec.events if e[0] == "log" and "damaged" in e[2]]
    assert len(warnings) == 1 and str(tmp_path / ".dbl/cache" / fp) in warnings[0][2]
    assert RunCache(tmp_path / ".dbl/cache").verify(fp) is not None  # stored afresh


def test_a_damaged_manifest_does_not_stop_a_forced_rerun(tmp_path):
    p = Proj(tmp_path, PETS)
    build_with(p)
    fp = lockfile.read(p.lock)["render:base"]["fingerprint"]
    (tmp_path / ".dbl/cache" / fp / "manifest.json").write_text("[]")
    result, rec, ran = build_with(p, force=("render:base",))
    assert result.ok and ran == ["render:base"], rec.events
    assert RunCache(tmp_path / ".dbl/cache").verify(fp) is not None


def test_missing_outputs_say_so_when_their_step_starts(tmp_path):
    """train:dog is planned behind its prior (whose outputs are gone too), and the plan says what the
    build finds once the prior is back with the same bytes: its missing output, not 'inputs changed'."""
    p = Proj(tmp_path, PETS)
    build_with(p)
    shutil.rmtree(tmp_path / "build/pets/priors/dog")
    shutil.rmtree(tmp_path / "build/pets/adapters/dog")
    _, rec, _ = build_with(p, dry_run=True)
    assert dict((s, r) for s, _, r in rec.planned)["train:dog"] == [
        "upstream prior:dog stale",
        "output build/pets/adapters/dog/dbl.json missing",
        "restorable from cache",
    ]
    result, rec, ran = build_with(p)
    assert ran == []
    train = next(ev for ev in result.steps if ev.id == "train:dog")
    assert train.status == "cached"
    assert train.reasons == ["output build/pets/adapters/dog/dbl.json missing"]


def test_num_processes_from_the_command_line_is_in_the_fingerprint(tmp_path):
    p = Proj(tmp_path, PETS)
    build_with(p, num_processes=2)
    assert lockfile.read(p.lock)["train:dog"]["inputs"]["num_processes"] == 2
    _, rec, ran = build_with(p)
    assert "train:dog" in ran and "train:toy" in ran
    reasons = dict((s, r) for s, _, r in rec.planned)
    assert reasons["train:dog"][0] == "num_processes 2 -> 1"
    _, rec, ran = build_with(p, num_processes=2)
    assert ran == [] and all(status == "cached" or status == "fresh" for _, status in rec.final)


@pytest.mark.parametrize("jobs", [None, 2])
def test_a_prompt_longer_than_the_text_encoder_reads_is_a_warning_with_its_token_count(tmp_path, jobs):
    """Named as the project file's warnings are, with the file and the line of the prompt, by a step in a
    worker process (-j 2) as by one in the build's own: from the file as it loaded (a line added above it
    since is not counted)."""
    pytest.importorskip("torch")
    from runner import executor
    from runner.project import load_project
    from runner.project.problems import display

    long = "a photo of a dog " * 8  # tiny-sd reads characters: 8 x 12 + start and end = 98 tokens
    path = tmp_path / "p.toml"
    path.write_text(
        f'[project]\nbase_model = "tiny-sd"\n[renders.base]\nadapter = "none"\nprompts = ["a dog", "{long}"]\nsteps = 1\n'
    )
    rec = Recorder()
    project = load_project(path)
    path.write_text("# a comment added since\n" + path.read_text())
    assert executor.build(project, executor.BuildOptions(jobs=jobs), rec).ok
    logged = [e[2] for e in rec.events if e[0] == "log" and "warning" in e[2]]
    assert logged == [
        f"warning: {display(path)}: renders.base.prompts[1]: is 98 tokens; the text encoder reads 77, so the "
        f"end is cut off: {long[-40:]!r} (line 5)"
    ]
