"""Training data: images read once, the example order, and the VAE latent cache.

Randomness is a pure function of (seed, position): every example's timestep, noise, latent sample, crop,
flip and noise offset come from a generator seeded by its position in the data stream, and the data order of each
epoch from a generator seeded by the epoch. So a resumed run repeats exactly what an uninterrupted run
would have done, and N processes see the same examples as one process with N times the batch.

torch is imported inside functions.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from runner.errors import ImageError, StepError
from runner.events import WARNING
from runner.imagefiles import list_images, more_images, said_by_kind, scan, unreadable
from runner.training import buckets
from runner.training.captions import image_prompts, unnamed_subject, unread_files

# Images decoded at once when a train step reads its images.
DECODE_THREADS = min(8, os.cpu_count() or 1)


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts; stable across processes and Python versions (no hash())."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*parts):
    import torch

    return torch.Generator().manual_seed(derive_seed(*parts))


class ExampleOrder:
    """The data stream: position -> (instance index, class index), one shuffled epoch after another.

    An epoch has max(#instance, #class) examples (the recipe's dataset length); instance and class
    images cycle within it.
    """

    def __init__(self, seed: int, n_instance: int, n_class: int):
        self.seed, self.n_instance, self.n_class = seed, n_instance, n_class
        self.length = max(n_instance, n_class)
        self._perms: dict[int, list[int]] = {}

    def __call__(self, position: int) -> tuple[int, int]:
        import torch

        epoch, offset = divmod(position, self.length)
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = torch.randperm(
                self.length, generator=generator(self.seed, "epoch", epoch)
            ).tolist()
        k = self._perms[epoch][offset]
        return k % self.n_instance, (k % self.n_class if self.n_class else -1)


class BucketOrder:
    """The data stream with aspect-ratio buckets: position -> (instance index, class index), where every
    block of `block` positions (one micro-batch of every process) holds images of one bucket.

    Instance and class images are separate streams, each bucketed on its own. An epoch of a stream is
    its buckets' images shuffled within their bucket, cut into blocks (a bucket's last block filled up
    with its own images again), the blocks shuffled: all from generators seeded by (seed, kind, epoch).
    """

    def __init__(self, seed: int, instance_buckets: list, class_buckets: list, block: int):
        self.streams = [_BucketStream(seed, "instance", instance_buckets, block)]
        if class_buckets:
            self.streams.append(_BucketStream(seed, "class", class_buckets, block))

    def __call__(self, position: int) -> tuple[int, int]:
        instance = self.streams[0](position)
        return instance, (self.streams[1](position) if len(self.streams) > 1 else -1)


class _BucketStream:
    def __init__(self, seed: int, kind: str, buckets: list, block: int):
        self.seed, self.kind, self.block = seed, kind, block
        self.groups: dict = {}
        for index, bucket in enumerate(buckets):
            self.groups.setdefault(tuple(bucket), []).append(index)
        self.length = sum(-(-len(members) // block) * block for members in self.groups.values())
        self._epochs: dict[int, list[int]] = {}

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(position, self.length)
        if epoch not in self._epochs:
            if len(self._epochs) > 4:
                self._epochs.clear()
            self._epochs[epoch] = self._epoch(epoch)
        return self._epochs[epoch][offset]

    def _epoch(self, epoch: int) -> list[int]:
        import torch

        g = generator(self.seed, "buckets", self.kind, epoch)
        blocks = []
        for bucket in sorted(self.groups):
            members = self.groups[bucket]
            shuffled = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
            count = -(-len(members) // self.block) * self.block
            filled = [shuffled[i % len(shuffled)] for i in range(count)]
            blocks += [filled[i : i + self.block] for i in range(0, count, self.block)]
        order = torch.randperm(len(blocks), generator=g).tolist()
        return [index for b in order for index in blocks[b]]


@dataclass
class Images:
    """The decoded training images (uint8 tensors), and the files they came from."""

    instance: list  # uint8 (3, H, W) tensors, each covering its target size (see `targets`)
    classes: list
    instance_files: list = field(default_factory=list)
    class_files: list = field(default_factory=list)
    # The prompt of every image by kind ("instance", "class"): its caption, else the subject's prompt.
    prompts: dict = field(default_factory=dict)
    # (kind, index) -> (height, width) of the file as read (upright), before any resizing.
    originals: dict = field(default_factory=dict)
    # (kind, index) -> (height, width) of its training crop: resolution² square, or its bucket.
    targets: dict = field(default_factory=dict)

    def buckets(self, kind: str) -> list[tuple[int, int]]:
        """The target (height, width) of every image of a kind, in order."""
        count = len(self.instance if kind == "instance" else self.classes)
        return [self.targets[(kind, index)] for index in range(count)]


def read_images(job, log) -> tuple[Images, float | None]:
    """The subject's instance images and its prior's class images, decoded once; and the prior loss
    weight (None without a prior)."""
    from PIL import Image

    from runner.images import (
        check_resized,
        files_named_in_warnings,
        kept_warnings,
        load_rgb,
        resize_shorter,
        shorter_side_size,
        small_image,
        to_uint8_tensor,
    )

    subject = job.subject
    found = scan(Path(subject.images))
    instance_files = found.images
    source = getattr(job, "source", None)  # a Job made by hand may have none
    key = None if source is None else (source, f"subjects.{subject.name}.caption_extension")
    for warning in unread_files(found, instance_files, subject.caption_extension, "the instance prompt", key):
        log(warning)
    if not instance_files:
        raise StepError(f"train:{subject.name}: no images in {subject.images}")
    class_files = list_images(job.class_dir) if job.class_dir else []
    if job.prior is not None:
        if not class_files:
            raise StepError(f"train:{subject.name}: the class images of prior '{job.prior.name}' are missing")
        class_files = class_files[: job.prior.num_images]
    weight = job.prior.loss_weight if job.prior is not None else None
    if weight == 0:  # every step still encodes and denoises the class images, for a loss that counts nothing
        log(
            f"{WARNING}priors.{job.prior.name}.loss_weight = 0: its class images cost every step and preserve "
            f'nothing; remove prior = "{job.prior.name}" from [subjects.{subject.name}] to train without them'
        )
    for warning in copies(instance_files, class_files):
        log(WARNING + warning)
    ts = subject.train
    sizes = (
        buckets.bucket_sizes(ts.resolution, ts.bucket_min_side, ts.bucket_max_side, ts.bucket_step)
        if ts.buckets
        else None
    )
    originals, targets = {}, {}

    def read_one(path):
        """(original size, target size, pixels, warnings) of one image; run in a thread pool, so its
        warnings, (kind, file, warning, detail), are kept and said in order afterwards."""
        said: list[tuple[str, Path, str, str]] = []
        image = load_rgb(path, warn=kept_warnings(said, path))
        original = (image.height, image.width)
        if min(image.size) < max(1, ts.resolution // 4):
            said.append(("small", path, small_image(path, image.size), f"{image.width}x{image.height}"))
        if sizes is None:
            lost = buckets.cropped_fraction(image.size, (ts.resolution, ts.resolution))
            if lost > buckets.MAX_SQUARE_CROP:
                said.append(
                    (
                        "square",
                        path,
                        f"{path}: {image.width}x{image.height} pixels fills the square, {ts.resolution}x"
                        f"{ts.resolution}, only with {lost:.0%} of it cropped away; crop it to the subject, or train "
                        "with buckets = true",
                        f"{lost:.0%}",
                    )
                )
            check_resized(path, image.size, shorter_side_size(image.size, ts.resolution), ts.resolution)
            image = resize_shorter(image, ts.resolution)
            target = (ts.resolution, ts.resolution)
        else:  # resized to fill its bucket: each side at least the bucket's, the other cropped a little
            width, height = buckets.assign(image.size, sizes)
            lost = buckets.cropped_fraction(image.size, (width, height))
            if lost > buckets.MAX_CROP:  # an aspect ratio beyond the buckets': much more than a little
                said.append(
                    (
                        "bucket",
                        path,
                        f"{path}: {image.width}x{image.height} pixels fills its nearest bucket, {width}x{height}, "
                        f"only with {lost:.0%} of it cropped away; crop it to the subject, or widen the buckets "
                        "with bucket_min_side and bucket_max_side",
                        f"{lost:.0%}",
                    )
                )
            resized, _ = buckets.fill(image.size, (width, height))
            check_resized(path, image.size, resized, ts.resolution)
            if image.size != resized:
                image = image.resize(resized, Image.Resampling.BILINEAR)
            target = (height, width)
        return original, target, to_uint8_tensor(image), said

    def read_or_error(path):
        """read_one's result, or the ImageError that names `path`: the others are read on, so that one
        error names every broken image of the folder."""
        try:
            return read_one(path)
        except ImageError as exc:
            return exc

    def read(kind, files):
        # Pillow decodes and resizes without the GIL: the images of a step are read a few at a time.
        with files_named_in_warnings(), ThreadPoolExecutor(min(DECODE_THREADS, max(1, len(files)))) as pool:
            results = list(pool.map(read_or_error, files))
        errors = [str(result) for result in results if isinstance(result, ImageError)]
        if errors:
            raise ImageError(unreadable(errors))
        pixels, said = [], []
        for index, (original, target, tensor, warnings) in enumerate(results):
            said += warnings
            originals[(kind, index)], targets[(kind, index)] = original, target
            pixels.append(tensor)
        for message in said_by_kind(said, _more):
            log(WARNING + message)
        return pixels

    # A prior step copies the captions of the user's class images beside their copies, as .txt, and
    # writes them for images of several class prompts.
    class_captions = ".txt" if job.prior is not None and job.prior.has_captions else None
    prompts = {
        "instance": image_prompts(
            instance_files, subject.caption_extension, subject.instance_prompt, subject.trigger, log
        ),
        "class": image_prompts(
            class_files,
            class_captions,
            job.prior.prompts[0],
            subject.trigger,
            log,
            f"the class prompt '{job.prior.prompts[0]}'",
        )
        if job.prior is not None
        else [],
    }
    if subject.trigger is not None and subject.caption_extension:
        for warning in unnamed_subject(
            instance_files,
            prompts["instance"],
            subject.instance_prompt,
            subject.caption_extension,
            subject.trigger,
        ):
            log(warning)
    images = Images(
        read("instance", instance_files), read("class", class_files), instance_files, class_files, prompts
    )
    images.originals, images.targets = originals, targets
    if sizes is not None:
        log(f"instance {buckets.describe([(w, h) for h, w in images.buckets('instance')])}")
        if class_files:
            log(f"class {buckets.describe([(w, h) for h, w in images.buckets('class')])}")
    return images, weight


def _more(what: str, count: int, folder: Path) -> str:
    """How the line for the images past the first few that share a warning of read_images begins."""
    if what == "small":
        return f"{count} more images in {folder} are small for training at this resolution; they will be upscaled"
    if what == "square":
        return (
            f"{count} more images in {folder} fill the square only with over {buckets.MAX_SQUARE_CROP:.0%} of "
            "them cropped away (crop them to the subject, or train with buckets = true)"
        )
    if what == "bucket":
        return (
            f"{count} more images in {folder} fill their nearest bucket only with over {buckets.MAX_CROP:.0%} of "
            "them cropped away (crop them to the subject, or widen the buckets with bucket_min_side and "
            "bucket_max_side)"
        )
    return more_images(what, count, folder)  # what Pillow warns


def copies(instance_files: list[Path], class_files: list[Path], shown: int = 5) -> list[str]:
    """Warnings about byte-identical training images: an instance image that is a copy of another (it trains
    once for each copy), and a class image that is an instance image (prior preservation then trains the
    subject's photo on the class prompt). Only files of equal size are read and compared."""
    by_size: dict[int, list[tuple[str, Path]]] = {}
    for kind, files in (("instance", instance_files), ("class", class_files)):
        for path in files:
            by_size.setdefault(path.stat().st_size, []).append((kind, path))
    said = []
    for group in by_size.values():
        if len(group) < 2:
            continue
        first: dict[str, Path] = {}  # sha256 -> the first instance image with those bytes
        for kind, path in group:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest not in first:
                if kind == "instance":
                    first[digest] = path
            elif kind == "instance":
                said.append(f"{path} is a copy of {first[digest]}: the image trains once for each copy")
            else:
                said.append(
                    f"class image {path} is the instance image {first[digest]}: prior preservation trains the "
                    "subject's photo on the class prompt; keep the subject's photos out of the prior's images"
                )
    if len(said) > shown:
        said[shown:] = [f"{len(said) - shown} more images are copies of instance images"]
    return said


def examples_at(positions, order: ExampleOrder, weight) -> list[tuple[str, int, int]]:
    """(kind, image index, position) of the examples at `positions`, laid out [instance..., class...]."""
    examples = [("instance", order(position)[0], position) for position in positions]
    if weight is not None:
        examples += [("class", order(position)[1], position) for position in positions]
    return examples
