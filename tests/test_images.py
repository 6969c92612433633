"""Decoding training images: every odd file a user may drop into a folder, and the resize/crop maths."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from runner.images import ImageError, center_offsets, load_rgb, resize_shorter
from runner.steps import StepError
from tests.steps_fixtures import DREAMBENCH


def _jpeg_bytes(size=(64, 48), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_non_image_bytes_with_jpg_suffix_names_the_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are my notes, not a photo")
    with pytest.raises(ImageError, match="notes.jpg") as info:
        load_rgb(path)
    assert isinstance(info.value, StepError)


def test_a_git_lfs_pointer_says_to_fetch_the_image(tmp_path):
    # A clone without `git lfs pull` holds, in place of each photo, the text that points to it.
    path = tmp_path / "dog.png"
    path.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{'0' * 64}\nsize 5120\n")
    with pytest.raises(ImageError, match="dog.png: a Git LFS pointer, not the image.*`git lfs pull`"):
        load_rgb(path)


def test_truncated_jpeg_names_the_file(tmp_path):
    path = tmp_path / "cut.jpg"
    data = _jpeg_bytes((256, 256))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.jpg.*(damaged|truncated)"):
        load_rgb(path)


def test_zero_byte_file_names_the_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png.*empty"):
        load_rgb(path)


def test_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (200, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 200x200 > 2 x 100: Pillow's hard limit
    with pytest.raises(ImageError, match="huge.png.*too large"):
        load_rgb(path)


def test_exif_rotation_is_applied(tmp_path):
    # A landscape 60x30 picture whose EXIF says "rotate 90 degrees clockwise" (orientation 6).
    img = Image.new("RGB", (60, 30), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 30))  # a blue band on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif, quality=95)
    rgb = load_rgb(path)
    assert rgb.size == (30, 60)
    top = np.asarray(rgb)[2, 15]
    assert top[2] > 200 and top[0] < 60  # the left band is now at the top


def test_exif_rotation_is_applied_beside_a_malformed_tag(tmp_path):
    # Orientation 6 beside tag 0x0123 (GrayResponseCurve, numbers) that some software wrote as the text
    # "Cam": Pillow reads the block, but cannot write it back (struct.error), which exif_transpose does.
    exif = (
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x02"
        b"\x01\x23\x00\x02\x00\x00\x00\x04Cam\x00"
        b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00\x00\x00\x00\x00"
    )
    path = tmp_path / "phone.jpg"
    Image.new("RGB", (60, 30), (255, 0, 0)).save(path, exif=exif)
    assert load_rgb(path).size == (30, 60)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_comes_out_upright(tmp_path, orientation):
    upright = Image.new("RGB", (60, 30), (255, 255, 255))
    upright.paste((255, 0, 0), (0, 0, 10, 10))  # a red top-left corner
    stored = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }.get(orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"
    (upright if stored is None else upright.transpose(stored)).save(path, exif=exif)
    rgb = np.asarray(load_rgb(path))
    assert rgb.shape == (30, 60, 3)
    assert tuple(rgb[2, 2]) == (255, 0, 0) and tuple(rgb[27, 57]) == (255, 255, 255)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: Image.new("CMYK", (20, 10), (0, 255, 255, 0)), id="cmyk"),
        pytest.param(lambda: Image.new("L", (20, 10), 128), id="grayscale"),
        pytest.param(lambda: Image.new("RGB", (20, 10), (10, 200, 10)).convert("P"), id="palette"),
        pytest.param(lambda: Image.new("1", (20, 10), 1), id="bilevel"),
    ],
)
def test_modes_become_rgb(tmp_path, make):
    img = make()
    suffix = ".jpg" if img.mode == "CMYK" else ".png"
    path = tmp_path / f"x{suffix}"
    img.save(path)
    rgb = load_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (20, 10)


def test_cmyk_colors_survive(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=100)
    r, g, b = np.asarray(load_rgb(path))[8, 8]
    assert r > 200 and g < 60 and b < 60  # pure magenta + yellow ink is red


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.full((10, 10), 32768, dtype=np.uint16)  # mid gray in 16 bits
    path = tmp_path / "scan.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    gray = np.asarray(load_rgb(path))[5, 5]
    assert 120 <= gray[0] <= 135 and gray[0] == gray[1] == gray[2]


def test_a_sixteen_bit_grayscale_png_with_a_transparent_grey_is_composited_on_white(tmp_path):
    values = np.full((8, 8), 0, dtype=np.uint16)  # black, the grey the file calls transparent
    values[1, 1] = 32768
    path = tmp_path / "keyed16.png"
    Image.fromarray(values).save(path, transparency=0)
    with Image.open(path) as img:
        assert img.mode.startswith("I") and img.info.get("transparency") == 0
    rgb = np.asarray(load_rgb(path))
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    assert 120 <= rgb[1, 1, 0] <= 135


def test_rgba_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # fully transparent black
    img.putpixel((0, 0), (255, 0, 0, 255))
    path = tmp_path / "cutout.png"
    img.save(path)
    rgb = np.asarray(load_rgb(path))
    assert tuple(rgb[5, 5]) == (255, 255, 255)
    assert tuple(rgb[0, 0]) == (255, 0, 0)


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    path = tmp_path / "sticker.png"
    img.save(path, transparency=0)
    rgb = np.asarray(load_rgb(path))
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    assert tuple(rgb[1, 1]) == (0, 255, 0)


def test_an_rgb_png_with_a_transparent_colour_is_composited_on_white(tmp_path):
    img = Image.new("RGB", (8, 8), (0, 0, 0))  # black, the colour the file calls transparent
    img.putpixel((1, 1), (0, 255, 0))
    path = tmp_path / "keyed.png"
    img.save(path, transparency=(0, 0, 0))
    assert Image.open(path).mode == "RGB" and "transparency" in Image.open(path).info
    rgb = np.asarray(load_rgb(path))
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    assert tuple(rgb[1, 1]) == (0, 255, 0)


def test_tiny_images_warn(tmp_path):
    path = tmp_path / "thumb.png"
    Image.new("RGB", (40, 30)).save(path)
    warnings = []
    load_rgb(path, min_side=128, warn=warnings.append)
    assert len(warnings) == 1 and "thumb.png" in warnings[0] and "40x30" in warnings[0]
    load_rgb(path, min_side=16, warn=warnings.append)
    assert len(warnings) == 1


def _tiff_with_damaged_tags(path, tags):
    """An 8x8 TIFF whose `tags` (ASCII tags) claim more data than the file holds."""
    import struct

    from PIL import TiffImagePlugin

    info = TiffImagePlugin.ImageFileDirectory_v2()
    for tag in tags:
        info[tag] = "a value written out of line"
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(out, "TIFF", tiffinfo=info)
    data = bytearray(out.getvalue())
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack("<H", data[entry : entry + 2])[0] in tags:
            data[entry + 4 : entry + 8] = struct.pack("<I", 1 << 20)  # its count: a megabyte
    path.write_bytes(bytes(data))


def test_what_pillow_warns_about_a_damaged_file_is_said_once(tmp_path):
    # Pillow reads a TIFF's tags three times as it decodes it, and warns for each damaged tag each time.
    from runner.images import files_named_in_warnings

    path = tmp_path / "scan.tif"
    _tiff_with_damaged_tags(path, (270, 305))
    said = []
    with files_named_in_warnings():
        assert load_rgb(path, warn=said.append).size == (8, 8)
    assert said == [f"{path}: Pillow warns: Tag data larger than file. Skipping tag 270 (and 1 more like it)"]


def test_resize_shorter_side_and_center_crop_offsets():
    img = Image.new("RGB", (300, 200))
    resized = resize_shorter(img, 64)
    assert resized.size == (96, 64)
    assert center_offsets(64, 96, 64) == (0, 16)
    assert center_offsets(64, 64, 64) == (0, 0)


@pytest.mark.torch
def test_training_tensor_is_normalised_and_cropped(tmp_path):
    import torch

    from runner.images import crop, load_training_image, normalize, prepare, random_offsets

    path = tmp_path / "wide.png"
    array = np.zeros((100, 200, 3), dtype=np.uint8)
    array[:, :100] = 255  # left half white, right half black
    Image.fromarray(array).save(path)
    pixels = load_training_image(path, 32)
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (3, 32, 64)
    x = prepare(path, 32, center_crop=True)
    assert tuple(x.shape) == (3, 32, 32)
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x[:, :, 0].mean() > 0.9 and x[:, :, -1].mean() < -0.9  # the centre straddles both halves
    flipped = normalize(crop(pixels, 0, 16, 32, flip=True))
    assert torch.equal(flipped, x.flip(-1))
    g = torch.Generator().manual_seed(0)
    offsets = {random_offsets(32, 64, 32, g) for _ in range(20)}
    assert all(top == 0 and 0 <= left <= 32 for top, left in offsets) and len(offsets) > 1


@pytest.mark.skipif(not (DREAMBENCH / "dog").is_dir(), reason="no dreambench photos")
def test_real_photos_decode():
    from runner.imagefiles import list_images

    files = list_images(DREAMBENCH / "dog")
    assert files
    for path in files:
        assert load_rgb(path).mode == "RGB"


def _photo_jpeg(size=(256, 192), **save) -> bytes:
    """A JPEG of noise-like content, so that damage to its entropy-coded data is damage to pixels."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.stack([(xx * 7 + yy * 3) % 256, (xx * yy) % 256, (xx ^ yy) % 256], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    buf = io.BytesIO()
    (image.convert(save.pop("mode")) if "mode" in save else image).save(buf, format="JPEG", **save)
    return buf.getvalue()


def test_the_check_decodes_a_jpeg_at_an_eighth_and_finds_what_a_full_decode_finds(tmp_path, monkeypatch):
    from PIL import ExifTags, JpegImagePlugin

    from runner.images import decodes

    scaled = []
    draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(
        JpegImagePlugin.JpegImageFile,
        "draft",
        lambda self, mode, size: scaled.append(size) or draft(self, mode, size),
    )
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # upright, the picture is on its side: 192 x 256
    good = {
        "baseline": _photo_jpeg(),
        "progressive": _photo_jpeg(progressive=True),
        "gray": _photo_jpeg(mode="L"),
        "cmyk": _photo_jpeg(mode="CMYK"),
        "sideways": _photo_jpeg(exif=exif),
    }
    for name, data in good.items():
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(data)
        assert decodes(path) == load_rgb(path).size, name
    assert scaled == [(32, 24)] * len(good)  # each decoded at an eighth of 256 x 192
    data = good["baseline"]
    scan = data.index(b"\xff\xda")
    broken = {
        "half": data[: len(data) // 2],
        "no-end": data[:-2],
        "header": data[: scan + 20],
        "garbage": data[: scan + 400] + bytes(range(256)) * 2 + data[scan + 912 :],
        "progressive-cut": good["progressive"][: len(good["progressive"]) * 3 // 4],
    }
    for name, data in broken.items():
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(data)
        with pytest.raises(ImageError) as full:
            load_rgb(path)
        with pytest.raises(ImageError) as checked:
            decodes(path)
        assert str(checked.value) == str(full.value), name
