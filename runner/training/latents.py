"""The VAE latent cache, and the noised examples of a batch.

Every random number of an example (timestep, noise, latent sample, flip, crop, noise offset) comes from a generator
seeded by its position in the data stream (runner.training.data), so a resumed run draws exactly what
an uninterrupted run would have drawn. torch is imported inside functions.
"""

from __future__ import annotations

from dataclasses import dataclass

from runner.errors import StepError
from runner.host import to_device
from runner.training.data import ExampleOrder, Images, examples_at, generator


@dataclass
class Group:
    """Examples of a batch that share one size, noised and ready for one denoiser call."""

    latents: object
    noise: object
    timesteps: object
    # Per example: (original h, original w, crop top, crop left, target h, target w), the crop of the
    # unflipped image mirrored when flipped (SDXL's size and crop conditioning).
    conditions: list
    examples: slice  # which of the batch's examples, laid out [instance..., class...]


class LatentCache:
    """VAE latent moments (mean, std) of every image whose crop is fixed, both flips when flipping.

    An image's crop is fixed when crops are centred or the resized image is already its target size
    (square, or its bucket); other images (random crops, or cache_latents = false) are encoded at each
    step. Sampling latent = mean + std * eps happens per example either way, with the example's own
    generator, so both paths draw the same numbers.
    """

    def __init__(self, vae, images: Images, ts, device, dtype, vae_fp32: bool = False):
        import torch

        self.vae, self.images, self.device, self.dtype = vae, images, device, dtype
        self.vae_fp32 = vae_fp32  # encode in fp32 whatever the compute dtype (SDXL's VAE overflows in fp16)
        self.center, self.flip = ts.center_crop, ts.random_flip
        self.noise_offset = ts.noise_offset
        self.scale = vae.config.scaling_factor
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.moments: dict[tuple[str, int, bool], tuple] = {}
        self.encoded_per_step = 0
        # Whether every latent encoded at a step so far was finite: a flag on the device, read by check().
        self.all_finite = None
        # The shape of every image as read (pixels of cached images are freed below).
        self.shapes = {
            (kind, index): tuple(image.shape[1:])
            for kind, pixels in (("instance", images.instance), ("class", images.classes))
            for index, image in enumerate(pixels)
        }
        if ts.cache_latents:
            todo = []
            for key, shape in self.shapes.items():
                if self.center or shape == images.targets[key]:
                    for flip in (False, True) if self.flip else (False,):
                        todo.append((*key, flip))
            # Encoded a few at a time, images of one size together (see images_per_encode).
            for size in dict.fromkeys(images.targets[(k, i)] for k, i, _ in todo):
                keys = [key for key in todo if images.targets[key[:2]] == size]
                chunk = images_per_encode(size, str(device))
                for start in range(0, len(keys), chunk):
                    part = keys[start : start + chunk]
                    mean, std = self._encode(torch.stack([self._crop(k, i, f, None)[0] for k, i, f in part]))
                    for n, key in enumerate(part):
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

    def _offsets(self, kind, index, g=None) -> tuple[int, int]:
        """(top, left) of an image's crop: centred, or random when `g` is given and crops are not."""
        from runner.images import crop_offsets

        height, width = self.shapes[(kind, index)]
        target_h, target_w = self.images.targets[(kind, index)]
        return crop_offsets(height, width, target_h, target_w, None if self.center else g)

    def _crop(self, kind, index, flip, g):
        """(pixels, (top, left)) of an image's crop."""
        top, left = self._offsets(kind, index, g)
        target_h, target_w = self.images.targets[(kind, index)]
        out = self._pixels(kind, index)[:, top : top + target_h, left : left + target_w]
        return (out.flip(-1) if flip else out), (top, left)

    def _condition(self, kind, index, flip, offsets) -> tuple[int, ...]:
        """SDXL's conditioning, as its training script computes it: the file's own size, and the crop's
        offsets in the resized image."""
        original_h, original_w = self.images.originals[(kind, index)]
        _, width = self.shapes[(kind, index)]
        target_h, target_w = self.images.targets[(kind, index)]
        top, left = offsets
        if flip:
            left = width - left - target_w
        return (original_h, original_w, top, left, target_h, target_w)

    def _encode(self, pixels_uint8, defer: bool = False):
        """Latent (mean, std) of a stack of images, checked for non-finite values: at once when the cache is
        made, and at check() for the latents encoded at each step (deferred, so that a step never waits
        for the device). A latent is mean + std * eps with a finite eps, so the batches need no check."""
        import torch

        from runner.images import normalize

        with torch.no_grad():
            pixels = to_device(normalize(pixels_uint8), self.device)
            if not self.vae_fp32:
                dist = self.vae.encode(pixels.to(self.dtype)).latent_dist
            else:
                # The VAE is cast to fp32 for the call and back, so a shared pipeline keeps its dtype.
                dtype = next(self.vae.parameters()).dtype
                try:
                    self.vae.to(torch.float32)
                    dist = self.vae.encode(pixels).latent_dist
                finally:
                    self.vae.to(dtype)
        mean, std = dist.mean.float(), dist.std.float()
        finite = torch.isfinite(mean).all() & torch.isfinite(std).all()
        if not defer:
            _raise_unless(bool(finite))
        else:
            self.all_finite = finite if self.all_finite is None else self.all_finite & finite
        return mean, std

    def check(self) -> None:
        """Raise the VAE's error if a latent encoded at a step since the last check was not finite (one wait
        for the device; the training loop calls it where it reads the losses back)."""
        if self.all_finite is not None:
            finite, self.all_finite = bool(self.all_finite), None
            _raise_unless(finite)

    def batch(self, positions, order: ExampleOrder, seed: int, num_timesteps: int, weight) -> list[Group]:
        """The examples at `positions`, laid out [instance..., class...], noised: one group when they
        share a size, else the instance and the class examples apart (buckets)."""
        import torch

        examples = examples_at(positions, order, weight)
        eps, noise, timesteps, moments, pending, conditions = [], [], [], [], [], []
        for n, (kind, index, position) in enumerate(examples):
            g = generator(seed, "example", kind, position)
            timesteps.append(int(torch.randint(0, num_timesteps, (1,), generator=g)))
            target_h, target_w = self.images.targets[(kind, index)]
            shape = (self.vae.config.latent_channels, target_h // self.factor, target_w // self.factor)
            noise.append(torch.randn(shape, generator=g))
            eps.append(torch.randn(shape, generator=g))
            flip = bool(self.flip and torch.rand(1, generator=g).item() < 0.5)
            key = (kind, index, flip)
            if key in self.moments:
                moments.append(self.moments[key])
                conditions.append(self._condition(kind, index, flip, self._offsets(kind, index)))
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
        if pending:
            self.encoded_per_step += len(pending)
            for size in dict.fromkeys(tuple(pixels.shape) for _, pixels in pending):
                part = [(n, pixels) for n, pixels in pending if tuple(pixels.shape) == size]
                mean, std = self._encode(torch.stack([pixels for _, pixels in part]), defer=True)
                for j, (n, _) in enumerate(part):
                    moments[n] = (mean[j], std[j])

        half = len(positions)
        same = len({tuple(e.shape) for e in eps}) == 1
        spans = [slice(0, len(examples))] if same else [slice(0, half), slice(half, len(examples))]
        groups = []
        for span in spans:
            mean = torch.stack([m for m, _ in moments[span]])
            std = torch.stack([s for _, s in moments[span]])
            latents = (
                (mean + std * to_device(torch.stack(eps[span]), self.device)) - self.shift
            ) * self.scale
            groups.append(
                Group(
                    latents,
                    to_device(torch.stack(noise[span]), self.device),
                    to_device(timesteps[span], self.device),
                    conditions[span],
                    span,
                )
            )
        return groups


def images_per_encode(size: tuple[int, int], device: str) -> int:
    """How many images of `size` (height, width) the VAE encodes in one call when the cache is made. Its
    activations grow with the pixel count, about 330 MB an image at 512 px in fp16: on a CPU, where a
    bigger batch saves no time, a few images at a time at 64 px and one at 512 px; a GPU, which one image
    leaves mostly idle, takes twice as many (2 at 512 px, 1 at SDXL's 1024 px). More would save a few tens
    of milliseconds and make the cache, not the training step, the run's peak of memory (8 at 512 px took
    5.2 GB on an H200 where the SD 1.5 step then needs less)."""
    budget = 512 * 512 * (2 if device.startswith("cuda") else 1)  # pixels a call
    return max(1, budget // (size[0] * size[1]))


def _raise_unless(finite: bool) -> None:
    if not finite:
        raise StepError(
            "the VAE gave non-finite latents (NaN or inf); the VAE overflows in fp16 (SDXL's does): "
            "dbl encodes latents in fp32, so check the images and the base model's VAE weights"
        )
