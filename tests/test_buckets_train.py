"""Aspect-ratio buckets in training: the bucketed data order, what a bucketed crop keeps, SDXL's size
conditioning, and `dbl build` with buckets (mixed sizes, a prior of another shape) resuming to the bytes
of an uninterrupted run after a SIGKILL."""

from __future__ import annotations

import signal
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

from runner import lockfile
from runner.project.schema import Subject, TrainSettings
from runner.training.buckets import bucket_sizes
from runner.training.data import BucketOrder, read_images
from runner.training.latents import LatentCache
from tests.real_builds import adapter_bytes, build_here, stop_during_training
from tests.steps_fixtures import DREAMBENCH

pytestmark = pytest.mark.torch


def test_every_block_holds_one_bucket_and_every_image_comes_each_epoch():
    buckets = [(64, 48), (48, 64), (64, 48), (56, 56), (64, 48), (48, 64), (56, 56)]
    order = BucketOrder(seed=3, instance_buckets=buckets, class_buckets=[], block=2)
    stream = order.streams[0]
    assert stream.length == 2 + 2 + 4  # each bucket's images, filled up to whole blocks
    for epoch in range(3):
        seen = [order(epoch * stream.length + offset)[0] for offset in range(stream.length)]
        assert set(seen) == set(range(len(buckets)))
        for start in range(0, len(seen), 2):
            assert buckets[seen[start]] == buckets[seen[start + 1]], seen
        assert all(order(epoch * stream.length)[1] == -1 for _ in range(1))
    # A pure function of (seed, position): a fresh order, asked in another order, agrees.
    fresh = BucketOrder(seed=3, instance_buckets=buckets, class_buckets=[], block=2)
    positions = list(range(40))
    assert [fresh(p) for p in reversed(positions)] == [order(p) for p in reversed(positions)]
    other = BucketOrder(seed=4, instance_buckets=buckets, class_buckets=[], block=2)
    assert [other(p) for p in positions] != [order(p) for p in positions]


def test_class_images_are_a_stream_of_their_own():
    order = BucketOrder(1, [(64, 64)] * 3, [(48, 80), (80, 48), (48, 80)], block=1)
    classes = [order(p)[1] for p in range(order.streams[1].length)]
    assert sorted(classes) == [0, 1, 2]


def _stripes(path, width, height):
    """An image with a red first and a blue last row/column band along its long side."""
    from PIL import Image

    pixels = np.full((height, width, 3), 128, np.uint8)
    if height > width:
        pixels[:4], pixels[-4:] = (255, 0, 0), (0, 0, 255)
    else:
        pixels[:, :4], pixels[:, -4:] = (255, 0, 0), (0, 0, 255)
    Image.fromarray(pixels).save(path)


class _StubVae:
    """Records what it is asked to encode; latents are the pixels' 4x4-pooled first channels."""

    config = SimpleNamespace(
        scaling_factor=1.0, shift_factor=None, block_out_channels=(8, 8, 8), latent_channels=4
    )

    def __init__(self):
        self.seen = []

    def parameters(self):
        import torch

        return iter([torch.zeros(1)])

    def encode(self, pixels):
        import torch.nn.functional as F

        self.seen.extend(pixels)
        mean = F.avg_pool2d(pixels, 4)[:, :1].repeat(1, 4, 1, 1)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=mean * 0 + 0.1))


def _job(tmp_path, **train):
    settings = TrainSettings(**{"resolution": 64, "steps": 1, "center_crop": True, **train})
    subject = Subject(name="dog", images=str(tmp_path / "dog"), instance_prompt="sks dog", train=settings)
    return SimpleNamespace(subject=subject, prior=None, class_dir=None), settings


@pytest.mark.parametrize("size", [(60, 100), (100, 60)])
def test_a_portrait_or_landscape_photo_keeps_its_whole_content(tmp_path, size):
    (tmp_path / "dog").mkdir()
    _stripes(tmp_path / "dog" / "0.png", *size)

    def crop(**train):
        job, settings = _job(tmp_path, **train)
        images, _ = read_images(job, print)
        vae = _StubVae()
        LatentCache(vae, images, settings, "cpu", None)
        (pixels,) = vae.seen
        return pixels

    def bands(pixels):  # red at the start and blue at the end of the long side
        long = 1 if size[1] > size[0] else 2
        first, last = pixels.narrow(long, 0, 1), pixels.narrow(long, pixels.shape[long] - 1, 1)
        return bool((first[0] > 0.9).all() and (first[2] < -0.9).all()), bool(
            (last[2] > 0.9).all() and (last[0] < -0.9).all()
        )

    square = crop()
    assert tuple(square.shape[1:]) == (64, 64)
    assert bands(square) == (False, False)  # a square crop cuts both bands off: the test can tell
    bucketed = crop(buckets=True)
    height, width = bucketed.shape[1:]
    assert (height > width) == (size[1] > size[0]) and height * width <= 64 * 64
    assert bands(bucketed) == (True, True)


@pytest.mark.parametrize("bucketed, length", [(False, 600), (True, 3000)])
def test_a_line_of_pixels_is_refused_by_name_not_blown_up_to_gigabytes(tmp_path, bucketed, length):
    """1 x 600 at 256 px would be 256 x 153600 pixels kept for the whole run (1 x 10000: 7 GB); in a
    bucket (at least 128 px wide at 256 px) 1 x 3000 would be 128 x 384000."""
    from PIL import Image

    from runner.errors import ImageError

    (tmp_path / "dog").mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "dog" / "0.png")
    Image.new("RGB", (1, length), (20, 30, 200)).save(tmp_path / "dog" / "line.png")
    job, _ = _job(tmp_path, resolution=256, buckets=bucketed)
    with pytest.raises(
        ImageError, match=rf"line\.png: 1x{length} pixels \(an aspect ratio of {length}:1\) would be "
    ):
        read_images(job, print)
    (tmp_path / "dog" / "line.png").unlink()
    Image.new("RGB", (1, 64), (20, 30, 200)).save(tmp_path / "dog" / "thin.png")  # odd, and fine
    images, _ = read_images(job, print)
    assert len(images.instance) == 2


def test_an_aspect_ratio_beyond_the_buckets_is_named_with_what_its_crop_loses(tmp_path):
    """Between neighbouring buckets the crop is a few percent; a panorama wider than the widest bucket
    loses most of itself, which is said."""
    from PIL import Image

    (tmp_path / "dog").mkdir()
    _stripes(tmp_path / "dog" / "0.png", 60, 100)
    Image.new("RGB", (640, 40), (20, 30, 200)).save(tmp_path / "dog" / "wide.png")
    said = []
    read_images(_job(tmp_path, buckets=True)[0], said.append)
    assert said[0] == (
        f"warning: {tmp_path / 'dog' / 'wide.png'}: 640x40 pixels fills its nearest bucket, 128x32, only with "
        "75% of it cropped away; crop it to the subject, or widen the buckets with bucket_min_side and "
        "bucket_max_side"
    )
    assert len(said) == 2 and said[1].startswith("instance buckets: ")  # the portrait fits: nothing said


def test_an_aspect_ratio_far_from_square_is_named_with_what_the_square_crop_loses(tmp_path):
    from PIL import Image

    (tmp_path / "dog").mkdir()
    _stripes(tmp_path / "dog" / "0.png", 60, 100)  # 3:5 loses 40%, as a photo does: nothing said
    Image.new("RGB", (640, 40), (20, 30, 200)).save(tmp_path / "dog" / "wide.png")
    said = []
    images, _ = read_images(_job(tmp_path)[0], said.append)
    assert said == [
        f"warning: {tmp_path / 'dog' / 'wide.png'}: 640x40 pixels fills the square, 64x64, only with 94% of "
        "it cropped away; crop it to the subject, or train with buckets = true"
    ]
    assert images.buckets("instance") == [(64, 64), (64, 64)]


@pytest.mark.parametrize("bucketed", [False, True])
def test_many_images_that_lose_most_of_themselves_are_named_in_a_few_lines(tmp_path, bucketed):
    """A prior's 200 class images, all cropped, must not say 200 lines: three in full, then one line
    naming every other file, with what it loses."""
    from PIL import Image

    (tmp_path / "dog" / "more").mkdir(parents=True)
    names = [f"{i}.png" for i in range(5)] + ["more/5.png", "more/6.png"]
    for name in names:
        Image.new("RGB", (640, 40), (20, 30, 200)).save(tmp_path / "dog" / name)
    said = []
    read_images(_job(tmp_path, buckets=bucketed)[0], said.append)
    crops = [line for line in said if "cropped away" in line]
    fills = (
        "fills its nearest bucket, 128x32, only with 75%"
        if bucketed
        else "fills the square, 64x64, only with 94%"
    )
    assert [line.split(": ")[1] for line in crops[:3]] == [str(tmp_path / "dog" / name) for name in names[:3]]
    assert all(fills in line for line in crops[:3])
    lost = "75%" if bucketed else "94%"
    assert crops[3].startswith(f"warning: 4 more images in {tmp_path / 'dog'} fill ")
    assert crops[3].endswith(f": 3.png ({lost}), 4.png ({lost}), more/5.png ({lost}), more/6.png ({lost})")
    assert len(crops) == 4


def test_many_small_images_are_named_in_a_few_lines(tmp_path):
    from PIL import Image

    (tmp_path / "dog").mkdir()
    for i in range(6):
        Image.new("RGB", (12, 12 + i)).save(tmp_path / "dog" / f"{i}.png")
    said = []
    read_images(_job(tmp_path)[0], said.append)
    assert said[:3] == [
        f"warning: {tmp_path / 'dog' / f'{i}.png'}: 12x{12 + i} pixels is small for training at this resolution; "
        "it will be upscaled"
        for i in range(3)
    ]
    assert said[3:] == [
        f"warning: 3 more images in {tmp_path / 'dog'} are small for training at this resolution; they will be "
        "upscaled: 3.png (12x15), 4.png (12x16), 5.png (12x17)"
    ]


def test_sdxl_conditions_hold_the_files_size_and_the_crop_in_the_bucket(tmp_path):
    (tmp_path / "dog").mkdir()
    _stripes(tmp_path / "dog" / "0.png", 300, 500)
    job, settings = _job(tmp_path, buckets=True)
    images, _ = read_images(job, print)
    cache = LatentCache(_StubVae(), images, settings, "cpu", None)
    (target,) = images.buckets("instance")
    (shape,) = cache.shapes.values()
    top, left = (shape[0] - target[0] + 1) // 2, (shape[1] - target[1] + 1) // 2
    condition = cache._condition("instance", 0, False, cache._offsets("instance", 0))
    assert condition[:2] == (500, 300)  # the file's own size, not the resized one
    assert condition[4:] == target
    assert abs(condition[2] - top) <= 1 and abs(condition[3] - left) <= 1
    # Flipped: the crop's left edge mirrored in the resized image.
    flipped = cache._condition("instance", 0, True, cache._offsets("instance", 0))
    assert flipped[3] == shape[1] - condition[3] - target[1]


class _NanVae(_StubVae):
    def encode(self, pixels):
        out = super().encode(pixels)
        out.latent_dist.mean[0, 0, 0, 0] = float("nan")
        return out


def test_non_finite_latents_are_caught_where_they_are_encoded(tmp_path):
    from runner.errors import StepError
    from runner.training.data import ExampleOrder

    (tmp_path / "dog").mkdir()
    _stripes(tmp_path / "dog" / "0.png", 100, 60)
    job, settings = _job(tmp_path)
    images, _ = read_images(job, print)
    with pytest.raises(StepError, match="non-finite latents"):  # cached: when the cache is made
        LatentCache(_NanVae(), images, settings, "cpu", None)
    # Random crops are encoded at each step: the batch keeps a flag on the device, and check() (where
    # the loop reads the losses back) raises, so a step never waits for the device.
    job, settings = _job(tmp_path, center_crop=False)
    images, _ = read_images(job, print)
    cache = LatentCache(_NanVae(), images, settings, "cpu", None)
    assert cache.cached_images == 0
    order = ExampleOrder(seed=0, n_instance=1, n_class=0)
    (group,) = cache.batch(range(1), order, 0, 1000, None)
    assert not group.latents.isfinite().all()  # the NaN really went in
    cache.batch(range(1, 2), order, 0, 1000, None)
    with pytest.raises(StepError, match="non-finite latents"):
        cache.check()
    cache.check()  # read and cleared
    # A finite VAE passes both ways.
    finite = LatentCache(_StubVae(), images, settings, "cpu", None)
    (group,) = finite.batch(range(1), order, 0, 1000, None)
    assert group.latents.isfinite().all()
    assert finite.all_finite is not None
    finite.check()
    assert finite.all_finite is None


def test_bucket_sizes_at_tiny_resolution_fit_the_tiny_models():
    # 64 px is not a multiple of 64 steps' worth of buckets: steps of 8, every side a multiple of 8.
    assert all(w % 8 == 0 and h % 8 == 0 for w, h in bucket_sizes(64))


PROJECT = """
[project]
base_model = "tiny-sd"

[train]
resolution = 64
steps = 24
batch_size = 2
checkpoint_every = 5
buckets = true
random_flip = true

[lora]
rank = 4
alpha = 8
text_encoder_rank = 4
text_encoder_alpha = 4

[priors.dog]
class_prompt = "a photo of dog"
num_images = 2
images = "classes"

[subjects.dog]
images = "dog"
instance_prompt = "a photo of sks dog"
prior = "dog"
"""


def project(folder):
    from tests.steps_fixtures import draw_images

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "p.toml").write_text(textwrap.dedent(PROJECT))
    draw_images(folder / "dog", 2, size=(56, 96), seed=1)  # portrait
    draw_images(folder / "dog" / "wide", 1, size=(96, 56), seed=2)  # landscape
    (folder / "dog" / "wide" / "00.png").rename(folder / "dog" / "wide.png")
    (folder / "dog" / "wide").rmdir()
    draw_images(folder / "dog" / "sq", 1, size=(70, 70), seed=3)
    (folder / "dog" / "sq" / "00.png").rename(folder / "dog" / "square.png")
    (folder / "dog" / "sq").rmdir()
    draw_images(folder / "classes", 2, size=(100, 60), seed=4)  # another shape than most instances
    return folder / "p.toml"


def test_buckets_train_and_resume_to_the_same_bytes_after_a_kill(tmp_path):
    reference = tmp_path / "uninterrupted"
    logs = build_here(project(reference))
    assert "train:dog instance buckets: 2 images 48x80, 1 image 64x64, 1 image 80x48" in logs, logs
    assert "train:dog class buckets: 2 images 80x48" in logs, logs

    killed = tmp_path / "killed"
    proc, seen = stop_during_training(project(killed), killed, "step 12/24")  # past checkpoint-10
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert "train:dog" not in lockfile.read(killed / "p.lock")

    # The kill lands once this process reads the line; on a loaded machine the build may have saved a
    # later checkpoint (every 5 steps) by then, and resuming from that one must give the same bytes too.
    logs = build_here(killed / "p.toml")
    resumed = [line for line in logs if "train:dog resuming from checkpoint-" in line]
    assert len(resumed) == 1 and resumed[0].rsplit("-", 1)[1] in ("10", "15", "20"), logs
    assert adapter_bytes(killed) == adapter_bytes(reference)


def test_buckets_change_the_fingerprint_only_when_on(tmp_path):
    from runner import executor
    from runner.project import load_project

    path = project(tmp_path)
    text = path.read_text().replace('prior = "dog"\n', "")  # no upstream step: the fingerprint is known
    text = text[: text.index("[priors.dog]")] + text[text.index("[subjects.") :]  # and no prior left unused
    fingerprints = {}
    for name, keys in {
        "absent": "",
        "off": "buckets = false\nbucket_step = 16\n",
        "on": "buckets = true\n",
        "on, step 16": "buckets = true\nbucket_step = 16\n",
    }.items():
        path.write_text(text.replace("buckets = true\n", keys))
        if name == "off":  # said as the file loads, and kept out of the fingerprint
            with pytest.warns(UserWarning, match="train.bucket_step: has no effect: buckets are off"):
                project_now = load_project(path)
        else:
            project_now = load_project(path)
        _, planned = executor.Workspace(project_now).plan()
        fingerprints[name] = next(p.fingerprint for p in planned if p.id == "train:dog")
    assert fingerprints["absent"] == fingerprints["off"] is not None
    assert len({fingerprints["absent"], fingerprints["on"], fingerprints["on, step 16"]}) == 3


@pytest.mark.skipif(not (DREAMBENCH / "dog").is_dir(), reason="no dreambench photos")
@pytest.mark.parametrize("base", ["tiny-sd", "tiny-sdxl"])
def test_real_photos_of_mixed_shapes_with_captions_and_a_prior_train_in_buckets(tmp_path, base):
    """DreamBench photos cut to portrait, landscape and square, with captions, and class photos of
    another shape: every image in a bucket of its own shape, end to end through the build."""
    from PIL import Image

    from runner import executor
    from runner.project import load_project
    from tests.conftest import Recorder

    photos = sorted((DREAMBENCH / "dog").glob("*.jpg"))
    for folder, chosen, sizes in [
        ("dog", photos[:3], [(384, 512), (512, 384), (448, 448)]),
        ("classes", photos[3:5], [(512, 288), (512, 288)]),
    ]:
        (tmp_path / folder).mkdir()
        for photo, size in zip(chosen, sizes, strict=True):
            with Image.open(photo) as image:
                image.convert("RGB").resize(size).save(tmp_path / folder / photo.name)
    (tmp_path / "dog" / photos[0].with_suffix(".txt").name).write_text(
        "a photo of [trigger] lying on the floor"
    )
    (tmp_path / "dog" / photos[1].with_suffix(".txt").name).write_text("[trigger], close-up")
    path = tmp_path / "p.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [project]
            base_model = "{base}"
            [train]
            resolution = 64
            steps = 4
            batch_size = 2
            buckets = true
            checkpoint_every = 0
            [lora]
            rank = 4
            alpha = 4
            [priors.dog]
            class_prompt = "a photo of dog"
            num_images = 2
            images = "classes"
            [subjects.dog]
            images = "dog"
            instance_prompt = "a photo of sks dog"
            caption_extension = ".txt"
            trigger = "sks dog"
            prior = "dog"
            """
        )
    )
    rec = Recorder()
    result = executor.build(load_project(path), executor.BuildOptions(), rec)
    assert result.ok, rec.events
    logs = [e[2] for e in rec.events if e[0] == "log"]
    assert "instance buckets: 1 image 56x72, 1 image 64x64, 1 image 72x56" in logs, logs
    assert "class buckets: 2 images 80x48" in logs, logs
    assert any("distinct prompts" in m for m in logs), logs
    info = (tmp_path / "build" / "p" / "adapters" / "dog" / "dbl.json").read_text()
    assert '"buckets": true' in info


@pytest.mark.parametrize(
    "size, device, expected",
    [((64, 64), "cpu", 64), ((512, 512), "cpu", 1), ((1024, 1024), "cpu", 1), ((512, 512), "cuda", 2)]
    + [
        ((64, 64), "cuda", 128),
        ((1024, 1024), "cuda:1", 1),
        ((512, 256), "cuda", 4),
        ((2048, 2048), "cuda", 1),
        ((512, 512), "mps", 1),
    ],
)
def test_a_gpu_encodes_more_images_a_call_than_a_cpu(size, device, expected):
    from runner.training.latents import images_per_encode

    assert images_per_encode(size, device) == expected
