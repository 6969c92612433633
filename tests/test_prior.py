"""The prior step: the user's class images kept byte for byte, the rest generated reproducibly."""

from __future__ import annotations

import pytest

from runner.steps import StepError, StepInterrupted
from tests.folders import folder_bytes
from tests.steps_fixtures import draw_images, make_prior, model_cache, prior_context

pytestmark = pytest.mark.torch


def _run(ctx):
    from runner.steps import prior

    return prior.run(ctx)


def test_generates_the_missing_images(tmp_path):
    progress = []
    ctx = prior_context(
        tmp_path, make_prior(num_images=3, batch_size=2), progress=lambda d, t, **m: progress.append((d, t))
    )
    assert _run(ctx) == {"generated": 3, "given": 0, "batch_size": 2}
    files = folder_bytes(ctx.out)
    assert list(files) == ["0000.png", "0001.png", "0002.png"]
    # after the given images, as the drawing begins, then once a batch
    assert progress == [(0, 3), (0, 3), (2, 3), (3, 3)]
    from PIL import Image

    with Image.open(ctx.out / "0000.png") as img:
        assert img.size == (64, 64)  # tiny-sd's native size
        assert img.text["parameters"].startswith(
            "a photo of dog\nSteps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: "
        )
    assert len(set(files.values())) == 3  # each image has its own seed


def test_same_images_whatever_the_batch_size(tmp_path):
    one = prior_context(tmp_path / "a", make_prior(num_images=3, batch_size=1))
    three = prior_context(tmp_path / "b", make_prior(num_images=3, batch_size=3))
    _run(one)
    _run(three)
    import numpy as np
    from PIL import Image

    for name in folder_bytes(one.out):
        a = np.asarray(Image.open(one.out / name), dtype=np.int16)
        b = np.asarray(Image.open(three.out / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, name  # batched matmuls may round the last bit differently


def test_given_images_are_kept_and_topped_up(tmp_path):
    given = draw_images(tmp_path / "mine", 2, suffix=".JPG")
    ctx = prior_context(tmp_path, make_prior(num_images=3, images=str(given), steps=1))
    assert _run(ctx) == {"generated": 1, "given": 2, "batch_size": 2}
    files = folder_bytes(ctx.out)
    assert list(files) == ["0000.jpg", "0001.jpg", "0002.png"]
    assert files["0000.jpg"] == (given / "00.JPG").read_bytes()
    assert files["0001.jpg"] == (given / "01.JPG").read_bytes()


def test_given_pictures_in_formats_dbl_does_not_read_are_named_in_a_warning(tmp_path):
    given = draw_images(tmp_path / "mine", 2)
    draw_images(given, 1, suffix=".avif")
    logs = []
    ctx = prior_context(tmp_path, make_prior(num_images=2, images=str(given)), log=logs.append)
    assert _run(ctx) == {"generated": 0, "given": 2}
    assert [line for line in logs if line.startswith("warning: ")] == [
        f"warning: {given}: not read, as dbl reads .jpg .jpeg .png .webp .bmp .tif .tiff .gif only: 00.avif; "
        "convert them to .jpg or .png to train on them"
    ]


def test_more_given_images_than_needed_generates_nothing(tmp_path):
    given = draw_images(tmp_path / "mine", 4)
    logs = []
    ctx = prior_context(tmp_path, make_prior(num_images=2, images=str(given)), log=logs.append)
    assert _run(ctx) == {"generated": 0, "given": 2}
    assert list(folder_bytes(ctx.out)) == ["0000.png", "0001.png"]
    assert logs == ["4 class images given, using the first 2 by name (num_images = 2)"]


def test_a_broken_given_image_names_the_file(tmp_path):
    given = draw_images(tmp_path / "mine", 1)
    (given / "zz.jpg").write_bytes(b"")
    with pytest.raises(StepError, match="zz.jpg"):
        _run(prior_context(tmp_path, make_prior(num_images=3, images=str(given))))


def test_what_pillow_warns_about_given_images_is_in_the_steps_log_in_a_few_lines(tmp_path):
    """Not printed outside the step's log (unmarked, and shown even with -q), and not a line per image."""
    from PIL import Image

    given = tmp_path / "mine"
    given.mkdir()
    exif = Image.Exif()
    exif[0x010F] = "Camera"
    for i in range(5):
        Image.new("RGB", (8, 8), (i, i, i)).save(given / f"{i}.jpg", exif=exif.tobytes()[:-6])
    logs = []
    _run(prior_context(tmp_path, make_prior(num_images=5, images=str(given)), log=logs.append))
    assert [line.split(": ")[:3] for line in logs[:3]] == [
        ["warning", str(given / f"{i}.jpg"), "Pillow warns"] for i in range(3)
    ]
    warns = logs[0].split(": ", 2)[2]
    assert logs[3:] == [f"warning: 2 more images in {given}: {warns}: 3.jpg, 4.jpg"]


@pytest.mark.parametrize(
    "first_size, size, killed, reused",
    [(1, 1, False, 2), (2, 2, True, 0), (1, 2, False, 0)],
    ids=["stopped", "killed in a batch", "another batch size"],
)
def test_an_interrupted_prior_resumes_from_the_whole_batches_it_drew_as_it_draws_them(
    tmp_path, first_size, size, killed, reused
):
    """Stopped after two images, a run at batch size 1 keeps them, and its next attempt draws the rest.
    An image's bytes depend on the batch it is drawn in: of a batch a SIGKILL cut short (one image of two
    saved), nothing is kept, and the rest of that batch is drawn again with it; nor is what was drawn at
    another batch size (in no fingerprint). Each ends with the bytes of an uninterrupted run."""
    settings = dict(num_images=4, steps=2, width=32, height=32)
    whole = prior_context(tmp_path / "a", make_prior(batch_size=size, **settings))
    _run(whole)
    work, calls = tmp_path / "b" / "work", []
    first = prior_context(
        tmp_path / "b",
        make_prior(batch_size=first_size, **settings),
        work=work,
        should_stop=lambda: calls.append(1) or len(calls) > 2 // first_size,  # after two images
    )
    with pytest.raises(
        StepInterrupted, match=r"^prior:dog stopped after 2 of 4 images; the next build keeps them"
    ):
        _run(first)
    assert sorted(p.name for p in (work / "generated").glob("*.png")) == ["0000.png", "0001.png"]
    if killed:
        (work / "generated" / "0001.png").unlink()  # what a kill as the batch was saved leaves
    logs = []
    again = prior_context(tmp_path / "b", make_prior(batch_size=size, **settings), work=work, log=logs.append)
    _run(again)
    assert [line for line in logs if "reusing" in line] == (
        [f"reusing {reused} class images generated by an interrupted run"] if reused else []
    )
    assert folder_bytes(again.out) == folder_bytes(whole.out)


def test_a_new_count_keeps_the_images_of_the_previous_build(tmp_path):
    import dataclasses

    earlier = tmp_path / "earlier"  # what the previous build, of num_images = 2, made
    earlier.mkdir()
    for path in sorted(draw_images(tmp_path / "drawn", 2).iterdir()):
        path.rename(earlier / f"00{path.name}")
    logs = []
    drawn_at = {"metrics": {"batch_size": 2}}  # the previous build's record
    more = prior_context(
        tmp_path,
        make_prior(num_images=3, steps=1, width=32, height=32),
        earlier=earlier,
        earlier_record=drawn_at,
        log=logs.append,
    )
    _run(more)
    assert logs[:2] == ["0 class images given, 3 to generate", "keeping 2 class images of the previous build"]
    files = folder_bytes(more.out)
    assert list(files) == ["0000.png", "0001.png", "0002.png"]
    assert files["0001.png"] == (earlier / "0001.png").read_bytes()

    class NoModel:  # fewer images are all there: the base model is not even loaded
        base = model_cache().base

        def pipeline(self):
            raise AssertionError("loaded the base model")

    fewer = prior_context(tmp_path / "c", make_prior(num_images=2), earlier=earlier, earlier_record=drawn_at)
    _run(dataclasses.replace(fewer, models=NoModel()))
    assert folder_bytes(fewer.out) == folder_bytes(earlier)


@pytest.mark.parametrize(
    "count, drawn_at, record, kept",
    [(3, 2, "as made", 2), (2, 1, "as made", 0), (2, 2, "none", 0)],
    ids=["a batch the counts do not share", "another batch size", "no batch size recorded"],
)
def test_a_new_count_keeps_only_the_images_drawn_as_it_draws_them(tmp_path, count, drawn_at, record, kept):
    """An image's bytes depend on the batch it is drawn in. The short last batch of count 3 ([2]) is not
    that of count 4 ([2, 3]): a grown prior gives what a prior of count 4 gives only by drawing it again.
    Images drawn at batch size 1 (in the previous build's record: the batch size is in no fingerprint), or
    by a build whose record does not say at which (a version that did not record it), are not kept."""
    settings = dict(steps=1, width=32, height=32)
    before = prior_context(tmp_path / "a", make_prior(num_images=count, batch_size=drawn_at, **settings))
    four = prior_context(tmp_path / "b", make_prior(num_images=4, batch_size=2, **settings))
    made, _ = _run(before), _run(four)
    logs = []
    grown = prior_context(
        tmp_path / "c",
        make_prior(num_images=4, batch_size=2, **settings),
        earlier=before.out,
        earlier_record={"metrics": made if record == "as made" else {}},
        log=logs.append,
    )
    _run(grown)
    assert [line for line in logs if "keeping" in line] == (
        [f"keeping {kept} class images of the previous build"] if kept else []
    )
    assert folder_bytes(grown.out) == folder_bytes(four.out)


def test_scheduler_is_swapped_and_restored(tmp_path):
    pipe = model_cache().pipeline()
    before = pipe.scheduler
    ctx = prior_context(tmp_path, make_prior(num_images=1, scheduler="euler_a", steps=2))
    _run(ctx)
    assert pipe.scheduler is before
    from PIL import Image

    with Image.open(ctx.out / "0000.png") as img:
        assert "Sampler: Euler a" in img.text["parameters"]


def test_every_broken_given_image_is_named_in_one_error(tmp_path):
    from runner.errors import ImageError

    given = draw_images(tmp_path / "mine", 2)
    (given / "a.png").write_bytes(b"")
    (given / "b.jpg").write_text("not a photo")
    (given / "c.png").write_bytes((given / "00.png").read_bytes()[:100])
    with pytest.raises(ImageError) as info:
        _run(prior_context(tmp_path, make_prior(num_images=5, images=str(given))))
    lines = str(info.value).split("\n  ")
    assert lines[0] == "3 images cannot be read; fix or remove each:"
    assert [line.split(": ")[0] for line in lines[1:]] == [
        str(given / name) for name in ("a.png", "b.jpg", "c.png")
    ]


@pytest.mark.filterwarnings("ignore:.*no subject uses this prior:UserWarning")
def test_the_plan_says_how_many_class_images_an_interrupted_run_left(tmp_path):
    """After a build stopped midway, `dbl plan` says what the next one keeps of the class images generated
    (past the one given); after an edit of the prior's inputs, nothing: that work folder is not resumed."""
    from runner import executor
    from runner.project import load_project
    from tests.conftest import Recorder, write_image

    write_image(tmp_path / "class" / "0.png", seed=1, size=32)
    path = tmp_path / "p.toml"
    text = (
        '[project]\nbase_model = "tiny-sd"\n\n[priors.dog]\nclass_prompt = "a photo of dog"\nimages = "class"\n'
        "num_images = 4\nsteps = 1\nwidth = 32\nheight = 32\nbatch_size = 1\n"
    )
    path.write_text(text)
    stop = []

    class StopAfterTwo(Recorder):
        def step_progress(self, step):
            if step.done >= 3:  # the given one and two generated
                stop.append(step.done)

    assert not executor.build(
        load_project(path), executor.BuildOptions(should_stop=lambda: bool(stop)), StopAfterTwo()
    ).ok

    def reasons():
        _, planned = executor.Workspace(load_project(path)).plan()
        return [p.reasons for p in planned]

    assert reasons() == [["never built", "keeps 2 of 3 class images an interrupted run generated"]]
    marker = next(tmp_path.glob(".dbl/tmp/p/prior-dog/generated/drawn-with.json"))
    drawn_with = marker.read_text()
    marker.write_text(drawn_with.replace('"tiny-sd"', '"another-model"'))  # drawn under another name
    assert reasons() == [["never built"]]
    marker.write_text(drawn_with)
    path.write_text(text.replace("num_images = 4", "num_images = 5"))
    assert reasons() == [["never built"]]
