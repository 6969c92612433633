"""The run-cache and names: names are in the output layout, not in cached bytes, so a renamed subject,
image folder or output folder is restored under its new name, as a clean build names it."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import pytest

from runner import lockfile
from runner.store import RunCache
from tests.cache_trust_fixtures import ALL, build_with
from tests.conftest import PETS, Proj


def kohya_train(run):
    def step(ctx):
        result = run(ctx)
        if ctx.kind in ("train", "blend"):
            (ctx.out / "kohya.safetensors").write_text(f"weights of {ctx.fingerprint}")
        return result

    return step


def test_a_renamed_subject_is_restored_under_its_new_name(tmp_path, monkeypatch):
    monkeypatch.chdir(
        tmp_path
    )  # the project's folder, where the build's lines name its folders as written here
    p = Proj(tmp_path, PETS)
    build_with(p, kohya_train)
    assert (tmp_path / "build/pets/adapters/dog/dog.safetensors").is_file()
    text = p.path.read_text().replace("[subjects.dog]", "[subjects.rex]").replace("dog = 1.05", "rex = 1.05")
    p.path.write_text(text.replace('adapter = "dog"', 'adapter = "rex"'))
    result, rec, ran = build_with(p, kohya_train)
    assert ran == ["render:park"]  # restored, not trained; the render names its adapter in its images
    rex = tmp_path / "build/pets/adapters/rex"
    assert sorted(f.name for f in rex.iterdir()) == ["dbl.json", "rex.safetensors", "unet"]
    assert not (tmp_path / "build/pets/adapters/dog").exists()
    assert (
        "log",
        None,
        "removed build/pets/adapters/dog: train:dog is no longer in the project",
    ) in rec.events
    records = lockfile.read(p.lock)
    assert set(records) == set(ALL) - {"train:dog"} | {"train:rex"}
    # The blend did not run (the same parent bytes), and its record names the parent as it is now called.
    assert "blend:mix" not in ran
    assert {a["_name"] for a in records["blend:mix"]["inputs"]["adapters"]} == {"rex", "toy"}


def test_a_renamed_image_folder_is_what_the_lockfile_names_and_check_reads(tmp_path, capsys):
    from runner.cli import main

    p = Proj(tmp_path, PETS)
    build_with(p, kohya_train)
    before = p.lock.read_text()
    (tmp_path / "data" / "toy").rename(tmp_path / "data" / "toy2")
    p.edit('images = "data/toy"', 'images = "data/toy2"')
    assert main(["plan", str(p.path)]) == 0
    assert capsys.readouterr().out.startswith("all ")  # the same images: nothing is stale
    result, rec, ran = build_with(p, kohya_train)
    assert result.ok and ran == []
    assert lockfile.read(p.lock)["train:toy"]["inputs"]["images"]["_folder"] == "data/toy2"
    assert p.lock.read_text() != before and before.count("data/toy") > 0
    assert main(["check", str(p.path)]) == 0
    again = p.lock.read_text()
    build_with(p, kohya_train)
    assert p.lock.read_text() == again  # refreshed once, then left alone


@pytest.mark.parametrize("edit", ['name = "pets2"', 'out = "elsewhere"'])
def test_a_new_output_folder_gets_the_outputs_from_the_cache_and_the_lockfile_follows(tmp_path, capsys, edit):
    """[project] out and name are in no fingerprint: nothing reruns, but the outputs must be where they
    now belong, and the lockfile must say so (dbl ls, dbl check and the report read it)."""
    from runner.cli import main

    p = Proj(tmp_path, PETS)
    build_with(p, kohya_train)
    p.edit("[project]\n", f"[project]\n{edit}\n")
    folder = "build/pets2" if "name" in edit else "elsewhere"
    with contextlib.chdir(p.root):  # where the plan names folders as the lockfile does
        assert main(["plan", str(p.path)]) == 0
    out = capsys.readouterr().out
    reasons = {line.split()[0]: line.split(maxsplit=1)[1] for line in out.splitlines()[1:]}
    assert (
        reasons["train:toy"]
        == f"outputs in build/pets/adapters/toy, not {folder}/adapters/toy; restorable from cache"
    )
    assert reasons["render:base"].startswith(f"outputs in build/pets/renders/base, not {folder}/renders/base")
    result, rec, ran = build_with(p, kohya_train)
    assert result.ok and ran == []  # restored, not rebuilt
    records = lockfile.read(p.lock)
    assert set(records) == set(ALL)
    for record in records.values():
        assert record["outputs"] and all(rel.startswith(f"{folder}/") for rel in record["outputs"])
        assert all((tmp_path / rel).is_file() for rel in record["outputs"])
    assert main(["check", str(p.path)]) == 0
    assert main(["plan", str(p.path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"all {len(ALL)} steps are up to date"


def test_two_subjects_with_the_same_inputs_share_an_entry_and_keep_their_names(tmp_path):
    p = Proj(
        tmp_path,
        PETS + '\n[subjects.twin]\nimages = "data/toy"\ninstance_prompt = "a toy in the style of <1>"\n',
    )
    result, rec, ran = build_with(p, kohya_train)
    assert "train:toy" in ran and "train:twin" not in ran  # the second is a cache hit
    assert (tmp_path / "build/pets/adapters/twin/twin.safetensors").read_bytes() == (
        tmp_path / "build/pets/adapters/toy/toy.safetensors"
    ).read_bytes()


def naming_render(run):
    """The fake steps, with renders that name their adapters in their images, as the real one's Lora field
    and its per-adapter folders do."""

    def step(ctx):
        result = kohya_train(run)(ctx)
        if ctx.kind == "render":
            for image in ctx.out.glob("*.png"):
                image.write_text(f"{image.read_text()} Lora: {','.join(ctx.spec.adapter_names)}")
        return result

    return step


def _rename_dog(p: Proj, new: str) -> None:
    old = "dog" if new == "rex" else "rex"
    text = p.path.read_text().replace(f"[subjects.{old}]", f"[subjects.{new}]")
    text = text.replace(f"{old} = 1.05", f"{new} = 1.05")
    p.path.write_text(text.replace(f'adapter = "{old}"', f'adapter = "{new}"'))


def test_a_render_of_a_renamed_adapter_names_it_as_a_clean_build_does(tmp_path):
    """A render's images name their adapter, which is in no fingerprint: after a rename, keeping the
    render, or restoring the entry made under the old name, would keep images that name a subject the
    project no longer has. It runs again, and a rename back does too, to a clean build's bytes each time."""
    p = Proj(tmp_path, PETS)
    build_with(p, naming_render)
    image = tmp_path / "build/pets/renders/park/0-0.png"
    made = {"dog": image.read_bytes()}
    for turn, name in enumerate(("rex", "dog", "rex")):
        _rename_dog(p, name)
        result, rec, ran = build_with(p, naming_render)
        assert result.ok and ran == ["render:park"]  # the train step comes back from the run-cache
        reasons = {s: r for s, _, r in rec.planned}
        old = "dog" if name == "rex" else "rex"
        assert f"adapter {old!r} -> {name!r}, which its outputs name" in reasons["render:park"]
        assert image.read_text().endswith(f"Lora: {name}")
        made.setdefault(name, image.read_bytes())
        assert image.read_bytes() == made[name]
        clean = tmp_path / f"clean-{turn}"
        clean.mkdir()
        fresh = Proj(clean, p.path.read_text())
        build_with(fresh, naming_render)
        assert (clean / "build/pets/renders/park/0-0.png").read_bytes() == image.read_bytes()
        _, _, ran = build_with(p, naming_render)
        assert ran == []


def test_a_run_cache_entry_restores_only_under_the_names_it_was_made_with(tmp_path):
    cache = RunCache(tmp_path / "cache")
    files, manifest = _files(tmp_path / "dog", "Lora: dog")
    cache.store("fp", files, manifest, {}, unhashed={"adapter": "dog"})
    assert cache.verify("fp", unhashed={"adapter": "dog"}) is not None
    assert cache.verify("fp", unhashed={"adapter": "rex"}) is None
    assert cache.verify("fp") is not None  # kept: a rename back restores it
    files, manifest = _files(tmp_path / "rex", "Lora: rex")
    assert cache.store("fp", files, manifest, {}, unhashed={"adapter": "rex"}) == ""  # replaced, unsaid
    assert cache.verify("fp", unhashed={"adapter": "rex"}) is not None
    assert (cache.entry("fp") / "files" / "a.bin").read_text() == "Lora: rex"
    # An entry made before names were kept with it holds unknown ones: it restores no render.
    del_names = json.loads((cache.entry("fp") / "manifest.json").read_text())
    del del_names["unhashed"]
    (cache.entry("fp") / "manifest.json").write_text(json.dumps(del_names))
    assert cache.verify("fp", unhashed={"adapter": "rex"}) is None


def test_an_entry_written_before_names_left_the_cache_fits_only_its_own_name(tmp_path):
    cache = RunCache(tmp_path / "cache")
    files = tmp_path / "files"
    files.mkdir()
    (files / "dog.safetensors").write_text("w")
    cache.store("fp", files, {"dog.safetensors": {"sha256": hashlib.sha256(b"w").hexdigest(), "size": 1}}, {})
    manifest = cache.entry("fp") / "manifest.json"
    meta = json.loads(manifest.read_text())
    del meta["version"]
    manifest.write_text(json.dumps(meta))
    assert cache.verify("fp", layout={"kohya.safetensors": "dog.safetensors"}) is not None
    assert cache.verify("fp", layout={"kohya.safetensors": "rex.safetensors"}) is None
    assert cache.verify("fp") is not None  # still intact: not dropped


def _files(root: Path, text: str) -> tuple[Path, dict]:
    root.mkdir()
    (root / "a.bin").write_text(text)
    return root, {"a.bin": {"sha256": hashlib.sha256(text.encode()).hexdigest(), "size": len(text)}}


def test_an_entry_another_build_stores_first_is_kept_not_replaced(tmp_path, monkeypatch):
    """Two builds store one fingerprint: the second looked before the first renamed its entry into place.
    The first build may be copying that entry into its outputs now, so it must stay where it is."""
    cache = RunCache(tmp_path / "cache")
    cache.store("fp", *_files(tmp_path / "first", "w"), {})
    inode = (cache.entry("fp") / "files" / "a.bin").stat().st_ino
    looked = []
    real = RunCache.manifest

    def not_there_yet(self, fingerprint):
        if not looked:  # the second build's first look: the entry was not there then
            looked.append(fingerprint)
            return None
        return real(self, fingerprint)

    monkeypatch.setattr(RunCache, "manifest", not_there_yet)
    assert cache.store("fp", *_files(tmp_path / "second", "w"), {}) == ""
    assert looked == ["fp"]  # the race really was staged
    assert (cache.entry("fp") / "files" / "a.bin").stat().st_ino == inode
    assert cache.verify("fp") is not None and not cache.leftovers()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["fp"]


def test_storing_over_an_entry_with_an_unreadable_manifest_replaces_it(tmp_path):
    cache = RunCache(tmp_path / "cache")
    cache.store("fp", *_files(tmp_path / "first", "w"), {})
    (cache.entry("fp") / "manifest.json").write_text("{")
    cache.store("fp", *_files(tmp_path / "second", "v"), {})
    assert cache.verify("fp")["outputs"]["a.bin"]["size"] == 1
    assert (cache.entry("fp") / "files" / "a.bin").read_text() == "v"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["fp"]
