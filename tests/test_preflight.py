"""What a build finds before any step runs: broken images, named all at once, before a model loads."""

from __future__ import annotations

import os

import pytest

from runner.events import FAILED, SKIPPED
from runner.project.problems import display
from tests.conftest import step_ends, write_image


def _decoded(monkeypatch) -> list:
    """The files the build's check decodes, from now on."""
    from runner import images

    seen, decodes = [], images.decodes
    monkeypatch.setattr(images, "decodes", lambda path: seen.append(path.name) or decodes(path))
    return seen


def test_a_link_loop_and_an_empty_photo_are_named_by_one_build(proj, build):
    # The loop was found as the build planned, the empty photo only by the step: two builds to learn both.
    from runner.errors import ImageError

    toy, dog = proj.root / "data" / "toy", proj.root / "data" / "dog"
    os.symlink("b.png", toy / "a.png")
    os.symlink("a.png", toy / "b.png")
    (dog / "01.png").write_bytes(b"")
    (dog / "02.png").write_text("not a photo")
    with pytest.raises(ImageError) as info:
        build(proj)
    lines = str(info.value).split("\n  ")
    assert lines[0] == "4 images cannot be read; fix or remove each:"
    assert [line.split(": ")[0] for line in lines[1:]] == [
        str(toy / "a.png"),
        str(toy / "b.png"),
        str(dog / "01.png"),
        str(dog / "02.png"),
    ]
    assert "the file is empty (0 bytes)" in lines[3]


def test_a_broken_photo_fails_its_step_before_the_prior_generates(proj, build, fake_steps):
    # Was found when train:dog read it, after prior:dog had loaded the model and generated class images.
    dog = proj.root / "data" / "dog"
    good = (dog / "00.png").read_bytes()
    (dog / "01.png").write_bytes(good[: len(good) // 2])
    (dog / "02.png").write_bytes(b"")
    result, rec = build(proj)
    assert not result.ok and result.exit_code == 1
    assert fake_steps.ran == []  # no step ran: not the prior, not the toy's train step
    ended = {event[1]: event[2:] for event in rec.events if event[0] == "end"}
    status, error = ended["train:dog"]
    assert status == FAILED
    assert error.split("\n  ")[0] == "2 images cannot be read; fix or remove each:"
    assert [line.split(": ")[0] for line in error.split("\n  ")[1:]] == [
        str(dog / "01.png"),
        str(dog / "02.png"),
    ]
    assert ended["render:park"] == (SKIPPED, "upstream train:dog failed")
    assert dict(rec.final)["prior:dog"] == SKIPPED


def test_with_keep_going_the_steps_that_do_not_need_a_broken_photo_run(proj, build, fake_steps):
    (proj.root / "data" / "dog" / "01.png").write_bytes(b"")
    result, rec = build(proj, keep_going=True)
    assert result.exit_code == 1
    assert fake_steps.ran == ["prior:dog", "train:toy", "render:base"]
    final = dict(rec.final)
    assert final["train:dog"] == FAILED
    assert final["blend:mix"] == final["render:mixed"] == final["render:park"] == SKIPPED


def test_images_a_build_read_before_are_not_decoded_again(proj, build, monkeypatch):
    decoded = _decoded(monkeypatch)
    assert build(proj)[0].ok
    assert sorted(decoded) == ["00.png", "00.png", "01.png", "01.png", "02.png"]  # dog's three, toy's two
    decoded.clear()
    proj.edit("rank = 4", "rank = 8")
    write_image(proj.root / "data" / "dog" / "03.png", seed=7)
    result, _ = build(proj)
    assert result.ok
    assert decoded == ["03.png"]  # only the new one: the others are in the lockfile's records


def test_given_class_images_are_checked_as_far_as_the_prior_reads_them(proj, build, fake_steps):
    given = proj.root / "class"
    write_image(given / "a.png")
    (given / "b.png").write_bytes(b"")  # the third by name: not read while num_images = 2
    write_image(given / "0.png", seed=3)
    proj.edit("num_images = 2", 'num_images = 2\nimages = "class"')
    result, _ = build(proj)
    assert result.ok  # b.png is not read: a build of it today succeeds
    proj.edit("num_images = 2", "num_images = 3")
    result, rec = build(proj)
    assert result.exit_code == 1 and "prior:dog" not in fake_steps.ran
    error = next(event[3] for event in rec.events if event[0] == "end" and event[1] == "prior:dog")
    assert error.startswith(f"{given / 'b.png'}: the file is empty")


def test_a_build_that_restores_every_step_decodes_no_image(proj, build, monkeypatch):
    assert build(proj)[0].ok
    proj.lock.unlink()  # no record vouches for the photos; the run-cache holds every step
    decoded = _decoded(monkeypatch)
    result, rec = build(proj)
    assert result.ok and all(status == "cached" for _, status in rec.final)
    assert decoded == []


EVAL = """
[evals.base]
render = "base"
subject = "dog"
"""
# The project warns that these evals score tiny-sd's renders, whose prompts do not name the identifier
# (tests/test_eval.py asserts both): what the tests with EVAL look at is which photos are read.
EVAL_WARNINGS = pytest.mark.filterwarnings(
    "ignore:.*evals score renders of the built-in tiny-shapes model:UserWarning",
    "ignore:.*so subject fidelity is not counted:UserWarning",
)


@EVAL_WARNINGS
def test_a_broken_photo_of_an_evals_subject_fails_it_before_its_render_runs(proj, build, fake_steps):
    # Was found when eval:base read the photos to score subject fidelity, after render:base had drawn.
    proj.edit("[renders.base]", EVAL + "\n[renders.base]")
    (proj.root / "data" / "dog" / "01.png").write_bytes(b"")
    result, rec = build(proj, only=("eval:base",))
    assert result.exit_code == 1
    assert fake_steps.ran == []
    status, error = step_ends(rec)["eval:base"]
    assert status == FAILED
    assert error.startswith(f"{proj.root / 'data' / 'dog' / '01.png'}: the file is empty")


@EVAL_WARNINGS
def test_a_broken_photo_fails_each_step_that_reads_it_and_skips_those_after_them(proj, build, fake_steps):
    """eval:base scores render:base (the base model) against dog's photos, which it reads itself: it does
    not wait for train:dog, so it fails on the photo too, or it would render and then fail. eval:park
    scores a render of dog's adapter: it is skipped after train:dog, and the photo is named once for it."""
    proj.edit("[renders.base]", EVAL + '\n[evals.park]\nrender = "park"\n\n[renders.base]')
    dog = proj.root / "data" / "dog"
    good = (dog / "00.png").read_bytes()
    (dog / "01.png").write_bytes(good[: len(good) // 2])
    result, rec = build(proj)
    assert result.exit_code == 1 and fake_steps.ran == []
    ended = step_ends(rec)
    said = f"{dog / '01.png'}: the image is damaged or truncated"
    assert ended["train:dog"][0] == ended["eval:base"][0] == FAILED
    assert ended["train:dog"][1].startswith(said) and ended["eval:base"][1].startswith(said)
    assert ended["eval:park"] == (SKIPPED, "upstream render:park skipped")


@EVAL_WARNINGS
def test_an_evals_photos_are_decoded_once_and_not_again_after_it_read_them(proj, build, monkeypatch):
    proj.edit("[renders.base]", EVAL + "\n[renders.base]")
    decoded = _decoded(monkeypatch)
    assert build(proj)[0].ok
    # dog's three photos, read by train:dog and eval:base, decoded once; toy's two
    assert sorted(decoded) == ["00.png", "00.png", "01.png", "01.png", "02.png"]
    proj.lock.unlink()
    decoded.clear()
    assert build(proj, only=("eval:base",), force=("eval:base",))[0].ok
    assert sorted(decoded) == ["00.png", "01.png", "02.png"]  # no record vouches for them now
    decoded.clear()
    proj.edit('subject = "dog"', 'subject = "dog"\nidentifier = "zwx"')
    assert build(proj, only=("eval:base",))[0].ok
    assert decoded == []  # the eval's record holds their hashes: it read them


@pytest.mark.torch  # makes the tiny model's modules, without weights
def test_lora_targets_that_name_no_module_fail_the_train_steps_before_any_step_runs(proj, build, fake_steps):
    # Were found when train:dog started: after prior:dog had loaded the model and generated class images.
    proj.edit("alpha = 8", 'alpha = 8\ntarget_modules = ["to_kk", "to_vv"]')
    proj.edit('prior = "dog"', 'prior = "dog"\n[subjects.dog.lora]\ntext_encoder_target_modules = ["q_prj"]')
    result, rec = build(proj)
    assert result.exit_code == 1 and fake_steps.ran == []
    ended = step_ends(rec)
    for subject in ("dog", "toy"):  # the first component found wrong, as the train step says it
        status, error = ended[f"train:{subject}"]
        assert status == FAILED
        line = proj.path.read_text().split("\n").index('target_modules = ["to_kk", "to_vv"]') + 1
        assert error.startswith(
            f"{display(proj.path)}: lora.target_modules: 'to_kk', 'to_vv' names no module of the unet (its "
            "layers are named "
        )
        assert f"(line {line}) - name some of those, or use a preset: qv, attention, all-linear" in error
        assert "to_out.0" in error and ", 0," not in error  # named as a target names them
    assert dict(rec.final)["prior:dog"] == SKIPPED


@pytest.mark.torch  # makes the tiny model's modules, without weights
def test_lora_targets_of_the_text_encoder_are_checked_as_well(proj, build, fake_steps):
    proj.edit('prior = "dog"', 'prior = "dog"\n[subjects.dog.lora]\ntext_encoder_target_modules = ["q_prj"]')
    result, rec = build(proj, keep_going=True)
    assert result.exit_code == 1
    status, error = step_ends(rec)["train:dog"]
    # The key the subject's own [subjects.dog.lora] sets, as the train step names it
    key = "subjects.dog.lora.text_encoder_target_modules"
    assert error.startswith(f"{display(proj.path)}: {key}: 'q_prj' names no module of the text_encoder")
    assert "train:toy" in fake_steps.ran and "train:dog" not in fake_steps.ran


@pytest.mark.torch  # makes the tiny model's modules, without weights
def test_lora_targets_that_name_some_module_build_as_they_did(proj, build, fake_steps):
    # PEFT allows a name that matches nothing beside one that does (the default names two generations of
    # attention modules): such a project trains today, and must not be refused.
    proj.edit(
        "alpha = 8", 'alpha = 8\ntarget_modules = ["to_q", "to_kk"]\ntext_encoder_target_modules = ["fc1"]'
    )
    result, _ = build(proj)
    assert result.ok and "train:dog" in fake_steps.ran


@pytest.mark.torch  # makes the tiny model's modules, without weights
def test_a_target_that_names_no_module_beside_one_that_does_is_warned_of_once(proj, build, fake_steps):
    # ["to_q", "to_kk"] trained to_q alone, without a word: a typo the user never learned of.
    proj.edit("alpha = 8", 'alpha = 8\ntarget_modules = ["to_q", "to_kk"]')
    result, rec = build(proj)
    assert result.ok and "train:dog" in fake_steps.ran
    warned = [e[2] for e in rec.events if e[0] == "log" and "names no module" in e[2]]
    line = proj.path.read_text().split("\n").index('target_modules = ["to_q", "to_kk"]') + 1
    assert warned == [  # both subjects read [lora]'s list: said once, as a warning of the file
        f"warning: {display(proj.path)}: lora.target_modules: 'to_kk' names no module of the unet, so it "
        f"trains nothing (the other names do) (line {line}) - check the spelling, or remove it"
    ]


@pytest.mark.torch  # makes the tiny model's modules, without weights
def test_a_rank_as_wide_as_every_targeted_layer_is_warned_of_with_its_line(proj, build, fake_steps):
    # tiny-sd's to_q layers are 64 x 64, its to_v layers 32 x 64 and 64 x 64; its q_proj layers 32 x 32.
    proj.edit("rank = 4", 'rank = 64\ntarget_modules = ["to_q", "to_v"]\ntext_encoder_rank = 32')
    proj.edit('prior = "dog"', 'prior = "dog"\n[subjects.dog.lora]\ntext_encoder_target_modules = ["q_proj"]')
    result, rec = build(proj)
    assert result.ok and "train:dog" in fake_steps.ran  # a warning: the adapters are still valid
    warned = [e[2] for e in rec.events if e[0] == "log" and "full rank" in e[2]]
    lines = proj.path.read_text().split("\n")
    assert [w.split(" is at least")[0] for w in warned] == [  # each key once, though two subjects read [lora]
        f"warning: {display(proj.path)}: lora.rank: 64",
        f"warning: {display(proj.path)}: lora.text_encoder_rank: 32",
    ]
    assert warned[0].endswith(
        "(at most 64): each update is full rank, with more parameters than the layer it adapts "
        f"(line {lines.index('rank = 64') + 1}) - use a rank below 64, or target wider layers"
    )
    assert f"(line {lines.index('text_encoder_rank = 32') + 1})" in warned[1]


@pytest.mark.torch  # makes the tiny model's modules, without weights
def test_a_rank_below_the_widest_targeted_layer_is_not_warned_of(proj, build, fake_steps):
    proj.edit("rank = 4", 'rank = 63\ntarget_modules = ["to_q", "to_v"]\ntext_encoder_rank = 31')
    proj.edit('prior = "dog"', 'prior = "dog"\n[subjects.dog.lora]\ntext_encoder_target_modules = ["q_proj"]')
    result, rec = build(proj)
    assert result.ok
    assert not [e for e in rec.events if e[0] == "log" and "full rank" in e[2]]


def test_default_targets_and_presets_load_no_model_configs(proj, build, monkeypatch):
    from runner.exec import preflight

    monkeypatch.setattr(
        preflight, "_skeletons", lambda *a: pytest.fail("made modules to check default targets")
    )
    proj.edit("alpha = 8", 'alpha = 8\ntarget_modules = ["to_q", "to_v", "query", "value"]')
    proj.edit('prior = "dog"', 'prior = "dog"\n[subjects.dog.lora]\ntarget_modules = "attention"')
    assert build(proj)[0].ok


def test_a_caption_the_train_step_cannot_read_fails_it_before_any_step_runs(proj, build, fake_steps):
    # Was found when train:dog read its captions: after prior:dog had generated class images.
    proj.edit('prior = "dog"', 'prior = "dog"\ncaption_extension = ".txt"')
    caption = proj.root / "data" / "dog" / "01.txt"
    caption.write_bytes(b"a photo of sks dog \xff on grass")
    result, rec = build(proj)
    assert result.exit_code == 1 and fake_steps.ran == []
    assert step_ends(rec)["train:dog"] == (
        FAILED,
        f"caption {caption} is not UTF-8 text (byte 19); save it as UTF-8",
    )
    caption.write_text("a photo of sks dog on grass")
    assert build(proj)[0].ok


def test_a_build_that_fails_before_any_step_records_how_it_ran(proj, build):
    # Recorded "jobs": null, which the report showed as "-j None".
    import json

    (proj.root / "data" / "dog" / "01.png").write_bytes(b"")
    assert build(proj)[0].exit_code == 1
    last = json.loads((proj.root / ".dbl" / "last-build-pets.json").read_text())
    assert (last["jobs"], last["exit_code"]) == (1, 1)


def test_a_photo_of_an_extreme_aspect_ratio_fails_its_train_step_before_any_step_runs(
    proj, build, fake_steps
):
    # Was found when train:dog resized it: after prior:dog had generated class images.
    from PIL import Image

    dog = proj.root / "data" / "dog"
    Image.new("RGB", (10000, 1)).save(dog / "01.png")  # 640000 x 64 at resolution 64
    (dog / "02.png").write_bytes(b"")
    result, rec = build(proj)
    assert result.exit_code == 1 and fake_steps.ran == []
    status, error = step_ends(rec)["train:dog"]
    lines = error.split("\n  ")
    assert lines[0] == "2 images cannot be read; fix or remove each:"
    assert lines[1] == (
        f"{dog / '01.png'}: 10000x1 pixels (an aspect ratio of 10000:1) would be 640000x64 pixels at resolution "
        "64, too large to train on; crop it to the part that shows the subject, or remove it"
    )
    assert lines[2].startswith(f"{dog / '02.png'}: the file is empty")


def test_with_buckets_the_size_of_its_bucket_is_checked(proj, build, fake_steps):
    from PIL import Image

    proj.edit("steps = 4", "steps = 4\nbuckets = true")
    photo = proj.root / "data" / "toy" / "01.png"
    Image.new("RGB", (10000, 1)).save(photo)  # fills a bucket of height 32: 320000 x 32, not too large
    assert build(proj)[0].ok
    Image.new("RGB", (40000, 1)).save(photo)  # 1280000 x 32
    result, rec = build(proj)
    status, error = step_ends(rec)["train:toy"]
    assert status == FAILED and error.startswith(
        f"{photo}: 40000x1 pixels (an aspect ratio of 40000:1) would be "
    )
    assert error.endswith("too large to train on; crop it to the part that shows the subject, or remove it")


def test_a_snapshot_that_fails_as_its_train_step_does_is_skipped_not_failed_again(proj, build, fake_steps):
    # snapshot:dog@2 reads the photos train:dog reads: the same error was said twice, word for word.
    proj.edit('prior = "dog"', 'prior = "dog"\n[subjects.dog.train]\nsave_steps = [2]')
    (proj.root / "data" / "dog" / "01.png").write_bytes(b"")
    result, rec = build(proj)
    assert result.exit_code == 1 and fake_steps.ran == []
    ended = step_ends(rec)
    assert ended["train:dog"][0] == FAILED and "01.png" in ended["train:dog"][1]
    assert ended["snapshot:dog@2"] == (SKIPPED, "upstream train:dog failed")
    assert [e[1] for e in rec.events if e[0] == "end" and e[2] == FAILED] == ["train:dog"]


def test_a_step_behind_a_failing_one_keeps_an_error_of_its_own(proj, build, fake_steps):
    # The prior's class image and the subject's photo are both broken: a build names both.
    given = proj.root / "class"
    write_image(given / "a.png")
    (given / "b.png").write_bytes(b"")
    proj.edit("num_images = 2", 'num_images = 2\nimages = "class"')
    (proj.root / "data" / "dog" / "01.png").write_bytes(b"")
    result, rec = build(proj)
    ended = step_ends(rec)
    assert ended["prior:dog"][0] == ended["train:dog"][0] == FAILED
    assert "01.png" in ended["train:dog"][1] and "b.png" in ended["prior:dog"][1]


@pytest.mark.torch  # makes the tiny model's modules, without weights
def test_a_target_typo_of_a_subject_with_snapshots_is_said_once(proj, build, fake_steps):
    proj.edit("alpha = 8", 'alpha = 8\ntarget_modules = ["to_kk"]')
    proj.edit("steps = 4", "steps = 4\nsave_steps = [2]")
    result, rec = build(proj)
    assert result.exit_code == 1 and fake_steps.ran == []
    ended = step_ends(rec)
    for subject in ("dog", "toy"):
        assert ended[f"train:{subject}"][0] == FAILED
        assert ended[f"train:{subject}"][1].startswith(
            f"{display(proj.path)}: lora.target_modules: 'to_kk' names no module"
        )
        assert ended[f"snapshot:{subject}@2"] == (SKIPPED, f"upstream train:{subject} failed")
