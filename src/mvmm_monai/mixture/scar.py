"""Scar from the fitted mixture: LGE myocardium voxels whose brightest subtype wins (pure torch).

The MvMM gives the myocardium of the LGE (or DE) sequence several Gaussian subtypes; scar
(enhanced myocardium) is the brightest of them. A voxel is scar when

1. its hard label (argmax of the class posterior) is the myocardium,
2. the LGE sequence covers it, and
3. among the myocardium subtypes of that sequence the brightest one (highest mean) has the largest
   responsibility ``tau_c N(I(x); mu_c, var_c) / sum_c' tau_c' N(I(x); mu_c', var_c')``.

Guard: a subject without scar still splits its myocardium into subtypes, one of which is
"brightest" (often the partial-volume voxels at the blood border). So the brightest subtype counts
as scar only when both

- it is clearly brighter than the next brightest: ``(mu_bright - mu_next) / sd_next >= min_contrast``
  (``sd_next`` the standard deviation of the next brightest subtype), and
- it is bright like enhanced tissue, not like a blood/muscle mix: ``(mu_bright - mu_next) /
  (mu_blood - mu_next) >= min_blood_fraction``, ``mu_blood`` the tau-weighted mean of the blood
  class (the LV) in the same sequence. Scar enhances to about the blood pool's brightness; the
  partial-volume subtype of a subject without scar lies about a third of the way there.

Otherwise, and with a single myocardium subtype, there is no scar (an empty mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mvmm_monai.mixture.gaussian import LOG_2PI, component_log_densities, log_normal
from mvmm_monai.mixture.params import MixtureParams

MYOCARDIUM = 1  # index of the myocardium in mvmm_monai.CLASS_NAMES
LV_BLOOD = 2  # index of the LV blood pool in mvmm_monai.CLASS_NAMES


@dataclass(frozen=True)
class ScarResult:
    """Scar of a batch of subjects, in the common space.

    Attributes:
        mask: ``[B, *S]`` bool, the scar voxels (all False where ``enabled`` is False).
        probability: ``[B, *S]`` soft scar probability ``P_myo(x) * r_bright(x)`` (linear space;
            ``r_bright`` the within-myocardium responsibility of the brightest subtype), zero where
            the sequence does not cover x or ``enabled`` is False.
        contrast: ``[B]`` ``(mu_bright - mu_next) / sd_next`` of the myocardium subtypes in the
            scar sequence (``-inf`` with a single subtype).
        blood_fraction: ``[B]`` ``(mu_bright - mu_next) / (mu_blood - mu_next)`` (``-inf`` with a
            single subtype).
        enabled: ``[B]`` bool, both guards passed.
        bright_subtype: ``[B]`` long, slot index of the brightest myocardium subtype.
    """

    mask: Tensor
    probability: Tensor
    contrast: Tensor
    blood_fraction: Tensor
    enabled: Tensor
    bright_subtype: Tensor


def subtype_contrast(
    params: MixtureParams, sequence_index: int, class_index: int = MYOCARDIUM, blood_index: int = LV_BLOOD
) -> tuple[Tensor, Tensor, Tensor]:
    """Brightest subtype ``[B]`` (long) and its contrasts ``[B]`` over the next brightest subtype.

    Among the real subtype slots of class ``class_index`` in image ``sequence_index``: the contrast
    ``(mu_bright - mu_next) / sqrt(var_next)`` and the blood fraction ``(mu_bright - mu_next) /
    (mu_blood - mu_next)`` (``mu_blood`` the tau-weighted mean of class ``blood_index``); both
    ``-inf`` when the class has one subtype.
    """
    tau_blood = torch.exp(params.log_tau[:, sequence_index, blood_index])  # padded slots: 0
    mu_blood = (tau_blood * torch.where(params.valid[:, sequence_index, blood_index], params.mean[:, sequence_index, blood_index], 0.0)).sum(-1)
    mu_blood = mu_blood / tau_blood.sum(-1)
    valid = params.valid[:, sequence_index, class_index]  # [B, C]
    mean = params.mean[:, sequence_index, class_index]
    var = params.var[:, sequence_index, class_index]
    ranked = torch.where(valid, mean, -torch.inf)
    order = ranked.argsort(dim=-1, descending=True)
    bright = order[:, 0]
    if mean.shape[-1] < 2:
        none = torch.full_like(mean[:, 0], -torch.inf)
        return bright, none, none
    nxt = order[:, 1]
    mu_b = mean.gather(-1, bright[:, None])[:, 0]
    mu_n = mean.gather(-1, nxt[:, None])[:, 0]
    sd_n = var.gather(-1, nxt[:, None])[:, 0].sqrt()
    has_two = valid.sum(-1) >= 2
    none = torch.full_like(mu_b, -torch.inf)
    contrast = torch.where(has_two, (mu_b - mu_n) / sd_n, none)
    gap = mu_blood - mu_n
    fraction = torch.where(gap > 0, (mu_b - mu_n) / gap.clamp_min(torch.finfo(gap.dtype).tiny), torch.inf)
    return bright, contrast, torch.where(has_two, fraction, none)


def scar_segmentation(
    images: Tensor,
    coverage: Tensor,
    posterior: Tensor,
    params: MixtureParams,
    *,
    sequence_index: int = 0,
    class_index: int = MYOCARDIUM,
    blood_index: int = LV_BLOOD,
    min_contrast: float = 2.0,
    min_blood_fraction: float = 0.45,
) -> ScarResult:
    """Scar voxels of the fitted mixture (see the module docstring for the rule).

    Args:
        images: ``[B, N, *S]`` common-space intensities (the images the mixture was fitted to).
        coverage: ``[B, N, *S]`` 0/1 coverage of every image.
        posterior: ``[B, K, *S]`` class posteriors (linear space).
        params: the fitted :class:`MixtureParams` (``[B, N, K, C]``).
        sequence_index: the scar sequence (LGE/DE) among the N images.
        class_index: the myocardium among the K classes; blood_index: the LV blood pool.
        min_contrast: the brightest subtype must exceed the next brightest by this many of the
            latter's standard deviations, else there is no scar.
        min_blood_fraction: ... and lie at least this fraction of the way from the next brightest
            subtype to the blood pool's mean (0 switches this guard off).
    """
    if images.ndim not in (4, 5) or coverage.shape != images.shape:
        raise ValueError(
            f"scar_segmentation: images and coverage must be the same [B, N, H, W[, D]], got "
            f"{tuple(images.shape)} and {tuple(coverage.shape)}"
        )
    if posterior.shape[0] != images.shape[0] or posterior.shape[2:] != images.shape[2:]:
        raise ValueError(
            f"scar_segmentation: posterior must be [B={images.shape[0]}, K, {', '.join(map(str, images.shape[2:]))}], "
            f"got {tuple(posterior.shape)}"
        )
    b, n = images.shape[:2]
    if not 0 <= sequence_index < n:
        raise ValueError(f"scar_segmentation: sequence_index {sequence_index} not in [0, {n})")
    if not 0 <= class_index < posterior.shape[1]:
        raise ValueError(f"scar_segmentation: class_index {class_index} not in [0, {posterior.shape[1]})")
    if not 0 <= blood_index < posterior.shape[1]:
        raise ValueError(f"scar_segmentation: blood_index {blood_index} not in [0, {posterior.shape[1]})")
    spatial = images.shape[2:]
    bright, contrast, fraction = subtype_contrast(params, sequence_index, class_index, blood_index)
    enabled = (contrast >= min_contrast) & (fraction >= min_blood_fraction)
    with torch.no_grad():
        x = images[:, sequence_index : sequence_index + 1].reshape(b, 1, -1)
        sl = slice(sequence_index, sequence_index + 1)
        dens = component_log_densities(
            x,
            params.log_tau[:, sl, class_index : class_index + 1],
            params.mean[:, sl, class_index : class_index + 1],
            params.var[:, sl, class_index : class_index + 1],
        )[:, 0, 0]  # [B, C, V]
        resp = torch.softmax(dens, dim=1)
        r_bright = resp.gather(1, bright[:, None, None].expand(-1, 1, resp.shape[-1]))[:, 0]  # [B, V]
        wins = dens.argmax(dim=1) == bright[:, None]
        covered = coverage[:, sequence_index].reshape(b, -1) > 0
        myo = posterior.argmax(dim=1).reshape(b, -1) == class_index
        on = enabled[:, None] & covered
        mask = myo & wins & on
        prob = torch.where(on, posterior[:, class_index].reshape(b, -1) * r_bright, torch.zeros_like(r_bright))
    return ScarResult(
        mask=mask.reshape(b, *spatial),
        probability=prob.reshape(b, *spatial),
        contrast=contrast,
        blood_fraction=fraction,
        enabled=enabled,
        bright_subtype=bright,
    )


def enhanced_subtype_bic_gain(values: Tensor, iterations: int = 300) -> float | None:
    """The model comparison "does the myocardium have an enhanced subtype?": the BIC of one Gaussian
    less the BIC of a mixture of two, both fitted by maximum likelihood to ``values`` (the LGE
    intensities of the labelled myocardium, any shape), per value. Above 0 the comparison prefers
    two subtypes; the normal wall alone is not one Gaussian (partial volume with the blood, noise),
    so real scar stands out by a margin (``model.scar.min_bic_gain``). None with fewer than 20
    values or no spread.

    The two-Gaussian fit is EM over the distinct values, each weighted by its count (an image's
    intensities take a few hundred values: ~10 ms a heart), in float64, started from the values
    below and above the median, with variances kept above 1e-3 of the values' variance.
    (scikit-learn's ``GaussianMixture`` fits the same model, but importing it costs 0.6 s, a
    seventh of a patient's fit.)
    """
    x = torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float64).flatten()
    n = x.numel()
    if n < 20 or not float(x.std(correction=0)) > 1e-9 * float(x.abs().max()):
        return None  # too few, or one value (to rounding)
    x = (x - x.mean()) / x.std(correction=0)  # the BIC difference does not depend on the scale
    one = -0.5 * n * (LOG_2PI + 1.0)  # one Gaussian at its maximum: variance 1
    x, count = torch.unique(x, return_counts=True)
    count = count.to(torch.float64)
    low = torch.cumsum(count, 0) <= 0.5 * n  # the values up to the median
    if not bool(low.any()) or bool(low.all()):
        low = x < x.max()
    resp = torch.stack((low, ~low), dim=1).to(torch.float64) * count[:, None]  # [values, 2] hard start
    two, before = -math.inf, -math.inf
    for _ in range(iterations):
        mass = resp.sum(0).clamp_min(1e-12)  # M-step
        weight, mean = mass / n, (resp * x[:, None]).sum(0) / mass
        var = ((resp * (x[:, None] - mean) ** 2).sum(0) / mass).clamp_min(1e-3)
        logp = torch.log(weight) + log_normal(x[:, None], mean, var)  # E-step, [values, 2]
        norm = torch.logsumexp(logp, dim=1)
        two = float((count * norm).sum())
        if two - before < 1e-9 * n:
            break
        before = two
        resp = torch.exp(logp - norm[:, None]) * count[:, None]
    return (2.0 * (two - one) - 3.0 * math.log(n)) / n  # 5 parameters against 2
