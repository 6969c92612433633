"""Renders with several adapters (`adapters = [...]`): dependencies, fingerprint and reasons, with fake
steps. The pixels are tested in test_render.py."""

from __future__ import annotations

import pytest

from runner import lockfile, planner
from runner.steps import kinds

GRID = """
[renders.grid]
adapters = ["dog", "mix", "none"]
prompts = ["sks dog in the snow"]
seeds = [0, 1]
"""


def test_deps_are_every_listed_adapters_step_in_order(proj):
    proj.path.write_text(proj.path.read_text() + GRID)
    graph = {step.id: step for step in planner.graph(proj.load())}
    assert graph["render:grid"].deps == ["train:dog", "blend:mix"]


def test_each_adapters_output_is_an_input(proj, build, fake_steps):
    proj.path.write_text(proj.path.read_text() + GRID)
    result, _ = build(proj)
    assert result.ok and "render:grid" in fake_steps.ran
    record = lockfile.read(proj.lock)["render:grid"]
    assert "adapter" not in record["inputs"]
    assert record["inputs"]["adapters"] == [
        {"_name": "dog", "output": lockfile.read(proj.lock)["train:dog"]["output_hash"]},
        {"_name": "mix", "output": lockfile.read(proj.lock)["blend:mix"]["output_hash"]},
        {"_name": "none", "output": "none"},
    ]


def test_a_listed_adapter_that_changes_reruns_the_render(proj, build, fake_steps):
    proj.path.write_text(proj.path.read_text() + GRID)
    build(proj)
    proj.edit("dog = 1.05", "dog = 1.1")
    result, rec = build(proj)
    assert result.ok and fake_steps.ran == ["blend:mix", "render:mixed", "render:grid"]
    reasons = dict((sid, r) for sid, _, r in rec.planned)
    assert reasons["render:grid"] == ["upstream blend:mix stale"]


def test_reasons_name_added_removed_and_reordered_adapters(proj, build, fake_steps):
    proj.path.write_text(proj.path.read_text() + GRID)
    build(proj)
    for old, new, reason in [
        ('["dog", "mix", "none"]', '["dog", "toy", "mix", "none"]', "adapters.toy added"),
        ('["dog", "toy", "mix", "none"]', '["dog", "none"]', "adapters.toy removed"),
        ('["dog", "none"]', '["none", "dog"]', "adapters reordered"),
    ]:
        proj.edit(old, new)
        result, rec = build(proj)
        assert result.ok and fake_steps.ran == ["render:grid"], (new, fake_steps.ran)
        assert dict((sid, r) for sid, _, r in rec.planned)["render:grid"][0] == reason


def test_switching_between_adapter_and_adapters_is_explained(proj, build, fake_steps):
    build(proj)
    proj.edit('adapter = "dog"', 'adapters = ["dog", "none"]')
    result, rec = build(proj)
    assert result.ok and fake_steps.ran == ["render:park"]
    assert dict((sid, r) for sid, _, r in rec.planned)["render:park"] == ["adapter dog -> adapters dog, none"]
    proj.edit('adapters = ["dog", "none"]', 'adapter = "dog"')
    result, rec = build(proj)
    assert result.ok and fake_steps.ran == []  # back from the run-cache
    assert dict((sid, r) for sid, _, r in rec.planned)["render:park"] == [
        "adapters dog, none -> adapter dog",
        "restorable from cache",
    ]


def test_any_adapter_producing_kind_may_be_listed(proj, build, fake_steps):
    """Render checks and dependencies ask the registry, not a list of kinds: a toy kind that produces
    adapters is accepted in `adapters`, and its step becomes a dependency."""
    from dataclasses import dataclass

    from runner import steps
    from runner.project.schema import opt

    @dataclass(frozen=True)
    class Copy:
        name: str
        source: str = opt(doc="a subject")

    kind = steps.StepKind(
        name="copy",
        table="copies",
        spec=Copy,
        output_dir="copies",
        version=1,
        run=lambda ctx: {},
        inputs=lambda i: {"version": 1, "source": i.spec.source},
        produces_adapter=True,
    )
    steps.register(kind)
    try:
        text = proj.path.read_text() + '\n[copies.twin]\nsource = "dog"\n' + GRID
        proj.path.write_text(text.replace('["dog", "mix", "none"]', '["twin", "none"]'))
        graph = {step.id: step for step in planner.graph(proj.load())}
        assert graph["render:grid"].deps == ["copy:twin"]
        assert [k.name for k in kinds() if k.produces_adapter] == ["train", "snapshot", "blend", "copy"]
    finally:
        steps.unregister("copy")


@pytest.mark.torch
def test_a_real_build_records_checks_and_restores_the_adapter_folders(tmp_path, capsys):
    """With the real render step: the images in <adapter>/ subfolders are recorded, checked by
    `dbl check` and restored from the run-cache like any other output."""
    from runner.cli import main

    path = tmp_path / "p.toml"
    path.write_text(
        '[project]\nbase_model = "tiny-sd"\n\n'
        '[renders.cmp]\nadapters = ["none"]\nprompts = ["a dog"]\nseeds = [3]\nsteps = 1\n'
    )
    assert main(["build", str(path), "--no-progress"]) == 0
    image = "build/p/renders/cmp/none/0-3.png"
    outputs = lockfile.read(path.with_suffix(".lock"))["render:cmp"]["outputs"]
    assert sorted(outputs) == ["build/p/renders/cmp/grid.png", image]
    assert main(["check", str(path)]) == 0
    good = (tmp_path / image).read_bytes()
    (tmp_path / image).write_bytes(b"not a png")
    capsys.readouterr()
    assert main(["check", str(path)]) == 1
    assert image in capsys.readouterr().out
    assert main(["build", str(path), "--no-progress"]) == 0
    assert (tmp_path / image).read_bytes() == good
