"""Training data: images read once, the example order, and the VAE latent cache.

Randomness is a pure function of (seed, position): every example's timestep, noise, latent sample, crop,
flip and noise offset come from a generator seeded by its position in the data stream, and the data order of each
epoch from a generator seeded by the epoch. So a resumed run repeats exactly what an uninterrupted run
would have done, and N processes see the same examples as one process with N times the batch.

torch is imported inside functions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from runner.errors import StepError
from runner.imagefiles import list_images
from runner.training.captions import image_prompts


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


@dataclass
class Images:
    """The decoded training images (uint8 tensors), and the files they came from."""

    instance: list  # uint8 (3, H, W) tensors, shorter side == resolution
    classes: list
    instance_files: list = field(default_factory=list)
    class_files: list = field(default_factory=list)
    # The prompt of every image by kind ("instance", "class"): its caption, else the subject's prompt.
    prompts: dict = field(default_factory=dict)


def read_images(job, log) -> tuple[Images, float | None]:
    """The subject's instance images and its prior's class images, decoded once; and the prior loss
    weight (None without a prior)."""
    from runner.images import load_training_image

    subject = job.subject
    instance_files = list_images(Path(subject.images))
    if not instance_files:
        raise StepError(f"train:{subject.name}: no images in {subject.images}")
    class_files = list_images(job.class_dir) if job.class_dir else []
    if job.prior is not None:
        if not class_files:
            raise StepError(f"train:{subject.name}: the class images of prior '{job.prior.name}' are missing")
        class_files = class_files[: job.prior.num_images]
    weight = job.prior.loss_weight if job.prior is not None else None
    resolution = subject.train.resolution

    def read(files):
        return [load_training_image(f, resolution, warn=log) for f in files]

    # A prior step copies the captions of the user's class images beside their copies, as .txt.
    class_captions = ".txt" if job.prior is not None and job.prior.caption_extension else None
    prompts = {
        "instance": image_prompts(
            instance_files, subject.caption_extension, subject.instance_prompt, subject.trigger, log
        ),
        "class": image_prompts(class_files, class_captions, job.prior.class_prompt, subject.trigger, log)
        if job.prior is not None
        else [],
    }
    images = Images(read(instance_files), read(class_files), instance_files, class_files, prompts)
    return images, weight


def examples_at(positions, order: ExampleOrder, weight) -> list[tuple[str, int, int]]:
    """(kind, image index, position) of the examples at `positions`, laid out [instance..., class...]."""
    examples = [("instance", order(position)[0], position) for position in positions]
    if weight is not None:
        examples += [("class", order(position)[1], position) for position in positions]
    return examples


class LatentCache:
    """VAE latent moments (mean, std) of every image whose crop is fixed, both flips when flipping.

    An image's crop is fixed when crops are centred or the resized image is already square; other images
    (random crops of non-square images, or cache_latents = false) are encoded at each step. Sampling
    latent = mean + std * eps happens per example either way, with the example's own generator, so
    both paths draw the same numbers.
    """

    def __init__(self, vae, images: Images, ts, device, dtype, vae_fp32: bool = False):
        import torch

        self.vae, self.images, self.device, self.dtype = vae, images, device, dtype
        self.vae_fp32 = vae_fp32  # encode in fp32 whatever the compute dtype (SDXL's VAE overflows in fp16)
        self.resolution, self.center, self.flip = ts.resolution, ts.center_crop, ts.random_flip
        self.noise_offset = ts.noise_offset
        self.scale = vae.config.scaling_factor
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0
        self.moments: dict[tuple[str, int, bool], tuple] = {}
        self.encoded_per_step = 0
        # (height, width) of every image as read (before cropping): part of SDXL's conditioning.
        self.sizes = {
            (kind, index): tuple(image.shape[1:])
            for kind, pixels in (("instance", images.instance), ("class", images.classes))
            for index, image in enumerate(pixels)
        }
        # Per example of the last batch, in its order: (original h, original w, crop top, crop left,
        # target h, target w), the crop of the unflipped image mirrored when flipped.
        self.conditions: list[tuple[int, ...]] = []
        if ts.cache_latents:
            todo = []
            for kind, pixels in (("instance", images.instance), ("class", images.classes)):
                for index, image in enumerate(pixels):
                    if self.center or image.shape[1] == image.shape[2]:
                        for flip in (False, True) if self.flip else (False,):
                            todo.append((kind, index, flip))
            # VAE activations grow with the pixel count: a few images at a time at 64 px, one at 512 px.
            chunk = max(1, 512 * 512 // (self.resolution * self.resolution))
            for start in range(0, len(todo), chunk):
                keys = todo[start : start + chunk]
                crops = [self._crop(k, i, f, None)[0] for k, i, f in keys]
                mean, std = self._encode(torch.stack(crops))
                for n, key in enumerate(keys):
                    self.moments[key] = (mean[n], std[n])
        total = len(images.instance) + len(images.classes)
        cached = {(k, i) for k, i, _ in self.moments}
        self.cached_images, self.uncached_images = len(cached), total - len(cached)
        # Pixels of cached images are never read again: free them (200 class images at 512 px are 150 MB).
        for kind, index in cached:
            (images.instance if kind == "instance" else images.classes)[index] = None

    def describe(self) -> str:
        return f"latents cached for {self.cached_images} images, encoded per step for {self.uncached_images}"

    def _pixels(self, kind: str, index: int):
        return (self.images.instance if kind == "instance" else self.images.classes)[index]

    def _crop(self, kind, index, flip, g):
        """(pixels, (top, left)) of an image's crop; random when `g` is given and crops are not centred."""
        from runner.images import center_offsets, crop, random_offsets

        image = self._pixels(kind, index)
        _, h, w = image.shape
        if self.center or g is None:
            top, left = center_offsets(h, w, self.resolution)
        else:
            top, left = random_offsets(h, w, self.resolution, g)
        return crop(image, top, left, self.resolution, flip), (top, left)

    def _condition(self, kind, index, flip, offsets=None) -> tuple[int, ...]:
        from runner.images import center_offsets

        h, w = self.sizes[(kind, index)]
        top, left = offsets if offsets is not None else center_offsets(h, w, self.resolution)
        if flip:
            left = w - left - self.resolution
        return (h, w, top, left, self.resolution, self.resolution)

    def _encode(self, pixels_uint8):
        import torch

        from runner.images import normalize

        if not self.vae_fp32:
            with torch.no_grad():
                pixels = normalize(pixels_uint8).to(self.device, self.dtype)
                dist = self.vae.encode(pixels).latent_dist
                return dist.mean.float(), dist.std.float()
        # The VAE is cast to fp32 for the call and back, so a shared pipeline keeps its dtype.
        dtype = next(self.vae.parameters()).dtype
        with torch.no_grad():
            pixels = normalize(pixels_uint8).to(self.device, torch.float32)
            try:
                self.vae.to(torch.float32)
                dist = self.vae.encode(pixels).latent_dist
            finally:
                self.vae.to(dtype)
            return dist.mean.float(), dist.std.float()

    def batch(self, positions, order: ExampleOrder, seed: int, num_timesteps: int, weight):
        """(latents, noise, timesteps) for the examples at `positions`, laid out [instance..., class...]."""
        import torch

        examples = examples_at(positions, order, weight)

        eps, noise, timesteps, moments, pending, conditions = [], [], [], [], [], []
        for n, (kind, index, position) in enumerate(examples):
            g = generator(seed, "example", kind, position)
            timesteps.append(int(torch.randint(0, num_timesteps, (1,), generator=g)))
            shape = self._latent_shape()
            noise.append(torch.randn(shape, generator=g))
            eps.append(torch.randn(shape, generator=g))
            flip = bool(self.flip and torch.rand(1, generator=g).item() < 0.5)
            key = (kind, index, flip)
            if key in self.moments:
                moments.append(self.moments[key])
                conditions.append(self._condition(kind, index, flip))
            else:
                moments.append(None)
                pixels, offsets = self._crop(kind, index, flip, g)
                pending.append((n, pixels))
                conditions.append(self._condition(kind, index, flip, offsets))
            if self.noise_offset > 0:
                # Offset noise: one constant per channel. Drawn last, so that every other number of the
                # example is the one drawn without it.
                offset = torch.randn((shape[0], 1, 1), generator=g)
                noise[-1] = noise[-1] + self.noise_offset * offset
        self.conditions = conditions
        if pending:
            self.encoded_per_step += len(pending)
            mean, std = self._encode(torch.stack([crop for _, crop in pending]))
            for j, (n, _) in enumerate(pending):
                moments[n] = (mean[j], std[j])

        mean = torch.stack([m for m, _ in moments])
        std = torch.stack([s for _, s in moments])
        eps = torch.stack(eps).to(self.device)
        latents = ((mean + std * eps) - self.shift) * self.scale
        if not torch.isfinite(latents).all():
            raise StepError(
                "the VAE gave non-finite latents (NaN or inf); the VAE overflows in fp16 (SDXL's does): "
                "dbl encodes latents in fp32, so check the images and the base model's VAE weights"
            )
        return latents, torch.stack(noise).to(self.device), torch.tensor(timesteps, device=self.device)

    def _latent_shape(self):
        if not hasattr(self, "_shape"):
            factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            side = self.resolution // factor
            self._shape = (self.vae.config.latent_channels, side, side)
        return self._shape
