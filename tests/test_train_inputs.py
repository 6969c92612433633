"""What the train step on tiny-sd says of its inputs: an image it cannot read, copies of one image, pictures
in formats dbl does not read, what Pillow warns about, a prior of loss weight 0; images read in parallel,
in file order."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.steps_fixtures import draw_images, make_prior, make_subject, train_context

pytestmark = pytest.mark.torch


def test_a_prior_of_loss_weight_0_is_named_in_a_warning(tmp_path):
    from runner.training import data
    from runner.training.job import job_from_context

    folder = draw_images(tmp_path / "dog", 1)
    prior = make_prior(loss_weight=0.0)
    subject = make_subject(folder, prior="dog")
    job = job_from_context(
        train_context(tmp_path, subject, prior=prior, class_dir=draw_images(tmp_path / "class", 1, seed=5))
    )
    said = []
    assert data.read_images(job, said.append)[1] == 0.0
    assert said == [
        "warning: priors.dog.loss_weight = 0: its class images cost every step and preserve nothing; "
        'remove prior = "dog" from [subjects.dog] to train without them'
    ]


def test_copies_of_instance_images_are_named_in_a_warning(tmp_path):
    """A photo saved twice trains twice as often; a subject's photo among the class images (the prior's
    images pointed at the subject's folder) trains the subject on the class prompt. Both said."""
    import shutil

    from runner.training import data
    from runner.training.job import job_from_context

    folder = draw_images(tmp_path / "dog", 3)
    shutil.copyfile(folder / "01.png", folder / "01 (1).png")
    classes = draw_images(tmp_path / "class", 2, seed=5)
    shutil.copyfile(folder / "02.png", classes / "0002.png")
    job = job_from_context(
        train_context(tmp_path, make_subject(folder, prior="dog"), prior=make_prior(), class_dir=classes)
    )
    said = []
    images, _ = data.read_images(job, said.append)
    assert len(images.instance) == 4 and len(images.classes) == 3  # trained as given
    assert said == [
        f"warning: {folder / '01.png'} is a copy of {folder / '01 (1).png'}: the image trains once for each copy",
        f"warning: class image {classes / '0002.png'} is the instance image {folder / '02.png'}: prior "
        "preservation trains the subject's photo on the class prompt; keep the subject's photos out of the "
        "prior's images",
    ]
    assert data.copies(images.instance_files, []) == [said[0].removeprefix("warning: ")]
    assert data.copies(images.instance_files[:1], images.class_files[:2]) == []


def test_pictures_in_formats_dbl_does_not_read_are_named_in_a_warning(tmp_path):
    """A .jfif (how Windows saves web images), a phone's .heic: skipped, as the fingerprint skips them,
    but said, so that a folder of them does not train on a part of the photos unnoticed."""
    from runner.training import data
    from runner.training.job import job_from_context

    folder = draw_images(tmp_path / "dog", 2)
    draw_images(folder / "phone", 2, suffix=".JFIF")
    (folder / "phone" / "IMG_1.heic").write_bytes(b"not decoded")
    (folder / "notes.md").write_text("where the photos were taken")
    said = []
    images, _ = data.read_images(job_from_context(train_context(tmp_path, make_subject(folder))), said.append)
    assert [p.name for p in images.instance_files] == ["00.png", "01.png"]
    assert said == [
        f"warning: {folder}: not read, as dbl reads .jpg .jpeg .png .webp .bmp .tif .tiff .gif only: "
        "phone/00.JFIF, phone/01.JFIF, phone/IMG_1.heic; convert them to .jpg or .png to train on them"
    ]


def test_images_are_read_in_parallel_in_file_order_with_their_warnings(tmp_path, monkeypatch):
    """Images are decoded by a thread pool: pixels, sizes and warnings come back in file order, as one
    thread reading them would give them."""
    import torch

    from runner.images import load_rgb, resize_shorter, to_uint8_tensor
    from runner.training import data
    from runner.training.job import job_from_context

    folder = draw_images(tmp_path / "dog", 6, size=(80, 64))
    draw_images(tmp_path / "small", 2, size=(10, 12))
    for name in ("00.png", "01.png"):  # two tiny ones between the others: warned about, in order
        (tmp_path / "small" / name).rename(folder / f"02{name[1]}-small.png")
    import threading

    import runner.images

    threads, original = [], runner.images.load_rgb

    def spy(path, **kwargs):  # read_images imports load_rgb when it runs: patched here, it is seen there
        threads.append(threading.get_ident())
        return original(path, **kwargs)

    monkeypatch.setattr(runner.images, "load_rgb", spy)
    monkeypatch.setattr(data, "DECODE_THREADS", 4)
    job = job_from_context(train_context(tmp_path, make_subject(folder)))
    said = []
    images, _ = data.read_images(job, said.append)
    files = images.instance_files
    assert len(files) == 8 and len(threads) == 8 and len(set(threads)) > 1  # really several threads
    assert [line.removeprefix("warning: ").split(":")[0] for line in said] == [
        str(p) for p in files if "small" in p.name
    ]
    assert all(line.startswith("warning: ") for line in said)  # shown without -v
    for path, pixels in zip(files, images.instance, strict=True):
        expected = to_uint8_tensor(resize_shorter(load_rgb(path), 64))
        assert torch.equal(pixels, expected), path


def test_what_pillow_warns_about_an_image_is_said_with_its_file(tmp_path, monkeypatch):
    """A JPEG whose EXIF block is cut short decodes, with a warning of Pillow's: it is one of the step's
    warnings, naming the file (each of two such files, read by threads at once)."""
    from PIL import Image

    from runner.training import data
    from runner.training.job import job_from_context

    folder = draw_images(tmp_path / "dog", 3)
    exif = Image.Exif()
    exif[0x010F] = "Camera"
    for grey, name in enumerate(("01.jpg", "02.jpg")):
        Image.new("RGB", (64, 64), (grey, grey, grey)).save(folder / name, exif=exif.tobytes()[:-6])
    monkeypatch.setattr(data, "DECODE_THREADS", 4)
    said = []
    data.read_images(job_from_context(train_context(tmp_path, make_subject(folder))), said.append)
    assert [line.split(": ")[:3] for line in said] == [
        ["warning", str(folder / name), "Pillow warns"] for name in ("01.jpg", "02.jpg")
    ]


def test_what_pillow_warns_about_many_images_is_said_in_a_few_lines(tmp_path):
    from PIL import Image

    from runner.training import data
    from runner.training.job import job_from_context

    folder = draw_images(tmp_path / "dog", 6)
    exif = Image.Exif()
    exif[0x010F] = "Camera"
    for i in range(6):
        (folder / f"{i:02d}.png").unlink()
        Image.new("RGB", (64, 64), (i, i, i)).save(folder / f"{i:02d}.jpg", exif=exif.tobytes()[:-6])
    said = []
    data.read_images(job_from_context(train_context(tmp_path, make_subject(folder))), said.append)
    assert [line.split(": ")[1] for line in said[:3]] == [str(folder / f"{i:02d}.jpg") for i in range(3)]
    warns = said[0].split(": ", 2)[2]  # Pillow warns: ...
    assert said[3:] == [f"warning: 3 more images in {folder}: {warns}: 03.jpg, 04.jpg, 05.jpg"]


def _break_three(folder: Path) -> list[str]:
    """An empty, a truncated and a not-an-image file among `folder`'s images; what the error says of each."""
    good = (folder / "00.png").read_bytes()
    (folder / "01.png").write_bytes(b"")
    (folder / "02.png").write_bytes(good[: len(good) // 2])
    (folder / "03.jpg").write_text("not a photo")
    return [
        f"{folder / '01.png'}: the file is empty",
        f"{folder / '02.png'}: the image is damaged or truncated",
        f"{folder / '03.jpg'}: not an image file",
    ]


def test_every_broken_photo_of_a_subject_is_named_in_one_error(tmp_path):
    # Was the first alone: fixing three photos took three builds, each loading the model first.
    from runner.errors import ImageError
    from runner.training import data
    from runner.training.job import job_from_context

    folder = draw_images(tmp_path / "dog", 5)
    (folder / "03.png").unlink()
    said = _break_three(folder)
    job = job_from_context(train_context(tmp_path, make_subject(folder)))
    with pytest.raises(ImageError) as info:
        data.read_images(job, print)
    lines = str(info.value).split("\n")
    assert lines[0] == "3 images cannot be read; fix or remove each:"
    assert [line.strip()[: len(start)] for line, start in zip(lines[1:], said, strict=True)] == said
