"""The training loss: mean squared error, split into the instance and the prior-preservation halves of a
batch, optionally weighted per example by min-SNR. torch is imported inside functions."""

from __future__ import annotations


def prior_preservation_loss(pred, target, weight: float | None, example_weights=None):
    """(total, instance, prior) losses in fp32 for a batch laid out [instance..., class...].

    Without a prior (`weight` None) the whole batch is instance examples and the prior loss is 0.
    `example_weights` (one per example, in the batch's order) weight each example's squared error
    before the mean of each half; None weights them all alike (the recipe's plain mean). `pred`, `target`
    (and `example_weights`) may also be lists of the two halves, [instance, class], when their sizes
    differ (aspect-ratio buckets).
    """
    import torch
    import torch.nn.functional as F

    def mse(p, t, w):
        p, t = p.float(), t.float()
        if w is None:
            return F.mse_loss(p, t, reduction="mean")
        per_example = F.mse_loss(p, t, reduction="none").mean(dim=tuple(range(1, p.dim())))
        return (per_example * w.float()).mean()

    if isinstance(pred, list):  # the two halves apart, as [instance, class] (their sizes differ)
        halves = example_weights if example_weights is not None else (None, None)
        (pred_instance, pred_class), (target_instance, target_class) = pred, target
    else:
        if weight is None:
            instance = mse(pred, target, example_weights)
            return instance, instance, torch.zeros((), device=pred.device)
        halves = example_weights.chunk(2, dim=0) if example_weights is not None else (None, None)
        pred_instance, pred_class = pred.chunk(2, dim=0)
        target_instance, target_class = target.chunk(2, dim=0)
    instance = mse(pred_instance, target_instance, halves[0])
    prior = mse(pred_class, target_class, halves[1])
    return instance + weight * prior, instance, prior


def snr(alphas_cumprod, timesteps):
    """The signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) of each timestep (fp32)."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1 - alpha_bar)


def min_snr_weights(alphas_cumprod, timesteps, gamma: float, prediction_type: str):
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy"), one per timestep: the weight that turns the prediction's MSE into min(SNR, gamma) times
    the MSE of x0. Epsilon prediction: min(SNR, gamma) / SNR; v-prediction: min(SNR, gamma) / (SNR + 1);
    sample (x0) prediction: min(SNR, gamma). A schedule rescaled to zero terminal SNR
    (`rescale_betas_zero_snr`) has SNR 0 at its last timestep, where epsilon's weight is its limit, 1."""
    import torch

    ratio = snr(alphas_cumprod, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    if prediction_type == "epsilon":
        return torch.where(ratio > 0, clipped / ratio, torch.ones_like(ratio))
    if prediction_type == "v_prediction":
        return clipped / (ratio + 1)
    return clipped
