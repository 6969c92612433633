"""min-SNR weighting and offset noise, against the formulas worked out by hand."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.torch


def test_min_snr_weights_by_hand():
    import torch

    from runner.training.losses import min_snr_weights, snr

    # alpha_bar = 0.8, 0.5, 0.1 at timesteps 0, 1, 2: SNR = 4, 1, 1/9.
    alphas_cumprod = torch.tensor([0.8, 0.5, 0.1])
    t = torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(snr(alphas_cumprod, t), torch.tensor([4.0, 1.0, 1 / 9, 4.0]))
    gamma = 2.0
    # epsilon: min(SNR, 2) / SNR = 2/4, 1/1, (1/9)/(1/9)
    eps = min_snr_weights(alphas_cumprod, t, gamma, "epsilon")
    torch.testing.assert_close(eps, torch.tensor([0.5, 1.0, 1.0, 0.5]))
    # v-prediction: min(SNR, 2) / (SNR + 1) = 2/5, 1/2, (1/9)/(10/9)
    v = min_snr_weights(alphas_cumprod, t, gamma, "v_prediction")
    torch.testing.assert_close(v, torch.tensor([0.4, 0.5, 0.1, 0.4]))
    # x0 (sample) prediction: min(SNR, 2)
    x0 = min_snr_weights(alphas_cumprod, t, gamma, "sample")
    torch.testing.assert_close(x0, torch.tensor([2.0, 1.0, 1 / 9, 2.0]))
    # A gamma above every SNR leaves epsilon prediction unweighted.
    torch.testing.assert_close(min_snr_weights(alphas_cumprod, t, 100.0, "epsilon"), torch.ones(4))


def test_min_snr_weights_are_finite_at_zero_terminal_snr():
    """A schedule rescaled to zero terminal SNR: SNR is 0 at its last timestep, and min(SNR, gamma) / SNR
    tends to 1 there (a NaN weight made the loss NaN, and the run fail, for one example in 1000)."""
    import torch
    from diffusers import DDPMScheduler

    from runner.training.losses import min_snr_weights

    alphas_cumprod = DDPMScheduler(rescale_betas_zero_snr=True).alphas_cumprod
    t = torch.tensor([0, 500, 999])
    plain = min_snr_weights(alphas_cumprod, t[:2], 5.0, "epsilon")
    eps = min_snr_weights(alphas_cumprod, t, 5.0, "epsilon")
    assert eps[2] == 1.0 and torch.equal(eps[:2], plain)  # the other timesteps' weights as they were
    for prediction_type in ("v_prediction", "sample"):  # min(SNR, gamma) is 0 there: no weight
        assert min_snr_weights(alphas_cumprod, t, 5.0, prediction_type)[2] == 0.0


def test_weighted_loss_weights_each_example_before_each_half_s_mean():
    import torch

    from runner.training.losses import prior_preservation_loss

    target = torch.zeros(4, 1, 2, 2)
    # [instance, instance, class, class]: squared errors per example 1, 4, 9, 16.
    pred = torch.stack([torch.full((1, 2, 2), v) for v in (1.0, 2.0, 3.0, 4.0)])
    weights = torch.tensor([0.5, 1.0, 2.0, 0.25])
    total, instance, prior = prior_preservation_loss(pred, target, 0.5, weights)
    assert instance.item() == pytest.approx((0.5 * 1 + 1.0 * 4) / 2)
    assert prior.item() == pytest.approx((2.0 * 9 + 0.25 * 16) / 2)
    assert total.item() == pytest.approx(instance.item() + 0.5 * prior.item())
    # Without a prior the whole batch is one mean.
    _, instance, prior = prior_preservation_loss(pred, target, None, weights)
    assert instance.item() == pytest.approx((0.5 * 1 + 4 + 2 * 9 + 0.25 * 16) / 4) and prior.item() == 0
    # Weights of one give the plain mean.
    plain = prior_preservation_loss(pred, target, 0.5)
    ones = prior_preservation_loss(pred, target, 0.5, torch.ones(4))
    for a, b in zip(plain, ones, strict=True):
        assert a.item() == pytest.approx(b.item())


def _cache(noise_offset: float, random_flip: bool = False):
    import dataclasses

    import torch

    from runner.families.sd1 import tiny_vae
    from runner.project.schema import TrainSettings
    from runner.training.data import Images
    from runner.training.latents import LatentCache

    torch.manual_seed(0)
    vae = tiny_vae().eval()
    g = torch.Generator().manual_seed(1)
    pixels = [torch.randint(0, 256, (3, 64, 80), generator=g, dtype=torch.uint8) for _ in range(2)]
    classes = [torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8) for _ in range(2)]
    ts = dataclasses.replace(
        TrainSettings(),
        resolution=64,
        center_crop=False,
        random_flip=random_flip,
        noise_offset=noise_offset,
    )
    images = Images(pixels, classes)
    for kind, group in (("instance", pixels), ("class", classes)):
        for index, image in enumerate(group):
            images.originals[(kind, index)] = tuple(image.shape[1:])
            images.targets[(kind, index)] = (64, 64)
    return LatentCache(vae, images, ts, "cpu", torch.float32)


@pytest.mark.parametrize("random_flip", [False, True])
def test_noise_offset_is_each_example_s_last_draw(random_flip):
    """noise += offset * randn(channels, 1, 1) from the example's own generator, after its other draws:
    the timesteps, latents (crops, flips) and base noise are those drawn without it."""
    import torch

    from runner.training.data import ExampleOrder, generator

    order = ExampleOrder(seed=3, n_instance=2, n_class=2)
    positions = range(5, 7)
    (plain,) = _cache(0.0, random_flip).batch(positions, order, 3, 1000, 1.0)
    (offset,) = _cache(0.1, random_flip).batch(positions, order, 3, 1000, 1.0)
    torch.testing.assert_close(offset.latents, plain.latents, rtol=0, atol=0)
    assert torch.equal(offset.timesteps, plain.timesteps)
    # By hand: replay each example's draws (timestep, noise, latent sample, flip, crop) and take the next.
    expected = []
    for kind in ("instance", "class"):
        for position in positions:
            g = generator(3, "example", kind, position)
            torch.randint(0, 1000, (1,), generator=g)
            noise = torch.randn((4, 32, 32), generator=g)
            torch.randn((4, 32, 32), generator=g)
            if random_flip:
                torch.rand(1, generator=g)
            if kind == "instance":  # a random crop of a non-square image: its offset draws
                torch.randint(0, 80 - 64 + 1, (1,), generator=g)
            expected.append(noise + 0.1 * torch.randn((4, 1, 1), generator=g))
    torch.testing.assert_close(offset.noise, torch.stack(expected), rtol=0, atol=1e-7)
    shift = offset.noise - plain.noise
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)  # one value per channel
