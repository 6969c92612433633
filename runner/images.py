"""Reading training images: decode once into RGB, resize, crop, normalise.

Whatever a camera or an editor wrote (EXIF rotation, grayscale, palette, alpha, CMYK, 16-bit) comes out
as an upright 8-bit RGB image; a file that is not a readable image is an `ImageError` naming it.
Pillow and numpy are imported here; torch only inside the functions that make tensors.
"""

from __future__ import annotations

import contextlib
import re
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from runner.errors import ImageError


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


# What Pillow warns about the file that this thread is decoding (under `files_named_in_warnings`).
_decoding = threading.local()


@contextlib.contextmanager
def files_named_in_warnings():
    """While open, a warning Pillow raises as load_rgb decodes a file (corrupt EXIF data ...) is said
    through that call's `warn`, with the file's path: shown as Pillow raises it, it names no file.
    Warning display is global, so this is entered once, around the threads that decode."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        said = getattr(_decoding, "said", None)
        if said is None:
            shown(message, category, filename, lineno, file, line)
        else:
            said.append(str(message))

    with warnings.catch_warnings():
        warnings.filterwarnings("always", module=r"PIL\.")  # each file's own, not once a session
        warnings.showwarning = show
        yield


def load_rgb(path: Path, *, min_side: int | None = None, warn: Callable[[str], None] = _warn) -> Image.Image:
    """Decode `path` into an upright 8-bit RGB image (transparent pixels composited on white).

    With `min_side`, an image whose shorter side is below it is reported through `warn` (it will be
    upscaled a lot, and look blurry to the model).
    """
    path = Path(path)
    _decoding.said = []
    try:
        rgb = _decode(path)
    finally:
        said, _decoding.said = _decoding.said, None
    for message in _distinct(said):
        warn(f"{path}: Pillow warns: {message}")
    if min_side and min(rgb.size) < min_side:
        warn(small_image(path, rgb.size))
    return rgb


def decodes(path: Path) -> tuple[int, int]:
    """The (width, height) of `path` upright, as load_rgb gives it; or the ImageError that load_rgb raises
    (what Pillow warns is not said). A JPEG is decoded at an eighth of its size: libjpeg's scaled decode
    reads every byte of the file, as a full decode does, and finds the same damage, in a third of the time
    (a photo of 800 x 800: 4 ms instead of 14). One that fails so is decoded in full, for load_rgb's error."""
    path = Path(path)
    try:
        size = _scaled_jpeg(path)
    except Exception:  # noqa: BLE001 - decoded in full below, which says what is wrong with it
        size = None
    return size if size is not None else _decode(path).size


# A JPEG smaller than this on a side is decoded in full: an eighth of it would be a few pixels.
_SCALED_FROM = 64
# The EXIF orientations whose upright picture is the file's turned on its side: width and height swap.
_SIDEWAYS = (
    Image.Transpose.TRANSPOSE,
    Image.Transpose.TRANSVERSE,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_270,
)


def _scaled_jpeg(path: Path) -> tuple[int, int] | None:
    """The upright (width, height) of a JPEG at least _SCALED_FROM pixels on a side, decoded (and made RGB,
    as _decode does) at an eighth of its size; None for any other file. Raises what Pillow raises."""
    with Image.open(path) as img:
        if img.format != "JPEG" or min(img.size) < _SCALED_FROM:
            return None
        size = img.size
        img.draft(img.mode, (size[0] // 8, size[1] // 8))  # its mode kept: the same conversion to RGB
        img.load()
        turn = _UPRIGHT.get(img.getexif().get(ExifTags.Base.Orientation, 1))
        _to_rgb(img if turn is None else img.transpose(turn))
    return (size[1], size[0]) if turn in _SIDEWAYS else size


def _distinct(messages: list[str]) -> list[str]:
    """Pillow's warnings about one file, each said once. Pillow reads a TIFF's tags three times while
    decoding it, warning each time, and warns once for each damaged tag of a file ('Skipping tag 270',
    'Skipping tag 305'): a damaged file said dozens of lines. Those that differ in their numbers alone are
    said once, with how many more there were."""
    alike: dict[str, list[str]] = {}
    for message in messages:
        message = " ".join(message.split())
        found = alike.setdefault(re.sub(r"\d+", "#", message), [])
        if message not in found:
            found.append(message)
    return [
        found[0] + (f" (and {len(found) - 1} more like it)" if len(found) > 1 else "")
        for found in alike.values()
    ]


def kept_warnings(said: list, path: Path) -> Callable[[str], None]:
    """A `warn` for load_rgb of `path` that keeps each warning in `said` as runner.imagefiles.said_by_kind
    takes it: its kind is what it says of the file, the same for each file it is said of."""
    return lambda warning: said.append((warning.removeprefix(f"{path}: "), path, warning, ""))


def small_image(path: Path, size: tuple[int, int]) -> str:
    """The warning about an image too small for the resolution (see load_rgb's `min_side`)."""
    return f"{path}: {size[0]}x{size[1]} pixels is small for training at this resolution; it will be upscaled"


# How the small text file that Git LFS checks out in place of a file it has not fetched begins.
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def _decode(path: Path) -> Image.Image:
    with named_errors(path):
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: the file is empty (0 bytes); remove it or replace it with the image")
        with Image.open(path) as img:
            img.seek(0)  # the first frame of an animated GIF / WebP
            img.load()  # decode now: a truncated file fails here, not later
            img = _upright(img)
            rgb = _to_rgb(img)
    return rgb


@contextlib.contextmanager
def named_errors(path: Path):
    """What reading `path` raises in the block, as the ImageError naming the file that load_rgb raises: for
    a reader that decodes an image its own way (Pillow's message alone, "image file is truncated", named
    no file)."""
    path = Path(path)
    try:
        yield
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"{path}: the image is too large to decode safely ({exc}); downscale it (a few megapixels is plenty)"
        ) from None
    except UnidentifiedImageError:
        with path.open("rb") as file:
            if file.read(len(_LFS_POINTER)) == _LFS_POINTER:
                raise ImageError(
                    f"{path}: a Git LFS pointer, not the image (this clone has not fetched it); run "
                    "`git lfs pull`"
                ) from None
        raise ImageError(
            f"{path}: not an image file Pillow can read (is it really a {path.suffix} file?)"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow reports truncated and corrupt data as OSError ("image file is truncated", "broken data stream").
        raise ImageError(
            f"{path}: the image is damaged or truncated ({exc}); re-export or remove it"
        ) from None


# EXIF orientation -> the transpose that makes the picture upright (as ImageOps.exif_transpose does).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says. Not ImageOps.exif_transpose: it also writes the
    EXIF block back without the tag, which fails (struct.error) on a block with one malformed tag
    that the camera or editor wrote, though the pixels are fine."""
    method = _UPRIGHT.get(img.getexif().get(ExifTags.Base.Orientation, 1))
    return img if method is None else img.transpose(method)


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:  # (an RGB PNG may name a transparent colour)
        return img.copy()
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit and 32-bit grayscale: Pillow's convert("L") clips at 255 instead of scaling.
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or values.max() > 255 else 255.0
        if mode == "F" and values.max() <= 1.0:
            top = 1.0
        gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        transparent = img.info.get("transparency")  # a PNG's one transparent grey (tRNS): on white, as below
        if isinstance(transparent, (int, float)) and not isinstance(transparent, bool):
            gray[values == transparent] = 255
        return Image.fromarray(gray, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        mode in ("P", "L", "RGB") and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # L, 1, P, CMYK, YCbCr, LAB, HSV: Pillow's own conversions.
    return img.convert("RGB")


# A training image is kept whole once resized (random crops are slices of it). Past this many pixels
# (100 MB as 8-bit RGB) the resized image is not a photo but an extreme aspect ratio: a 1 x 2000 line at
# 512 px would take 1.5 GB and seconds to resize, a 1 x 10000 one more memory than a machine has.
MAX_RESIZED_PIXELS = 1 << 25


def shorter_side_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    """(width, height) of an image of `size` resized so that its shorter side is `side` pixels."""
    w, h = size
    scale = side / min(w, h)
    return max(side, round(w * scale)), max(side, round(h * scale))


def check_resized(path: Path, size: tuple[int, int], resized: tuple[int, int], resolution: int) -> None:
    """Refuse an image whose resized (width, height) would exceed MAX_RESIZED_PIXELS, naming the file."""
    if resized[0] * resized[1] > MAX_RESIZED_PIXELS:
        long, short = max(size), max(1, min(size))
        raise ImageError(
            f"{path}: {size[0]}x{size[1]} pixels (an aspect ratio of {long / short:.0f}:1) would be "
            f"{resized[0]}x{resized[1]} pixels at resolution {resolution}, too large to train on; crop it "
            "to the part that shows the subject, or remove it"
        )


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resize (bilinear, antialiased) so that the shorter side is `size` pixels."""
    if min(img.size) == size:
        return img
    return img.resize(shorter_side_size(img.size, size), Image.Resampling.BILINEAR)


def to_uint8_tensor(img: Image.Image):
    """(3, H, W) uint8 tensor: a quarter of the memory of floats, for images kept during training."""
    import torch

    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def normalize(pixels):
    """uint8 (..., 3, H, W) -> float32 in [-1, 1], as the VAE expects."""
    return pixels.float().div(127.5).sub(1.0)


def load_training_image(path: Path, resolution: int, warn: Callable[[str], None] = _warn):
    """Decode and resize an image once: a (3, H, W) uint8 tensor with min(H, W) == resolution.

    Crops and flips are then cheap tensor slices (`crop`), so nothing is decoded again during training.
    """
    img = load_rgb(path, min_side=max(1, resolution // 4), warn=warn)
    check_resized(path, img.size, shorter_side_size(img.size, resolution), resolution)
    return to_uint8_tensor(resize_shorter(img, resolution))


def center_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of the centred size x size crop (rounded as torchvision's CenterCrop does)."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def random_offsets(height: int, width: int, size: int, generator) -> tuple[int, int]:
    """(top, left) of a uniformly random size x size crop, drawn from a torch.Generator."""
    import torch

    top = int(torch.randint(0, height - size + 1, (1,), generator=generator)) if height > size else 0
    left = int(torch.randint(0, width - size + 1, (1,), generator=generator)) if width > size else 0
    return top, left


def crop_offsets(height: int, width: int, target_h: int, target_w: int, generator=None) -> tuple[int, int]:
    """(top, left) of a target_h x target_w crop: centred, or uniformly random when a torch.Generator is
    given. For a square target, what center_offsets and random_offsets give."""
    if generator is None:
        return int(round((height - target_h) / 2.0)), int(round((width - target_w) / 2.0))
    import torch

    top = int(torch.randint(0, height - target_h + 1, (1,), generator=generator)) if height > target_h else 0
    left = int(torch.randint(0, width - target_w + 1, (1,), generator=generator)) if width > target_w else 0
    return top, left


def crop(image, top: int, left: int, size: int, flip: bool = False):
    """A size x size crop of a (3, H, W) tensor, mirrored left-right when `flip`."""
    out = image[:, top : top + size, left : left + size]
    return out.flip(-1) if flip else out


def prepare(path: Path, resolution: int, *, center_crop: bool = True, generator=None, flip: bool = False):
    """One training tensor in [-1, 1] from a file: decode, resize, crop (centre or random), optional flip."""
    image = load_training_image(path, resolution)
    _, h, w = image.shape
    if center_crop or generator is None:
        top, left = center_offsets(h, w, resolution)
    else:
        top, left = random_offsets(h, w, resolution, generator)
    return normalize(crop(image, top, left, resolution, flip))
