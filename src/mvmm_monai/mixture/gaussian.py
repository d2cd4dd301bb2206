"""Gaussian subtype densities and their sufficient statistics (pure torch, log space).

Every image n has, for every class k, ``counts[n, k]`` Gaussian subtypes. Parameters are stored
padded to ``C = counts.max()`` subtypes as ``[B, N, K, C]`` tensors; a padded slot has
``log_tau = -inf`` so it never contributes, and :func:`subtype_mask` tells which slots are real.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)


def subtype_mask(counts: Tensor) -> Tensor:
    """Boolean mask ``[N, K, C]`` of the real subtype slots for subtype counts ``[N, K]`` (>= 1)."""
    if counts.ndim != 2:
        raise ValueError(f"subtype_mask: counts must be [N, K], got shape {tuple(counts.shape)}")
    if int(counts.min()) < 1:
        raise ValueError(f"subtype_mask: every (image, class) needs >= 1 subtype, got {counts.tolist()}")
    c = int(counts.max())
    return torch.arange(c, device=counts.device)[None, None, :] < counts[..., None]


def log_normal(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """Elementwise Gaussian log density ``log N(x; mean, var)`` (broadcasting)."""
    return -0.5 * (LOG_2PI + torch.log(var) + (x - mean) ** 2 / var)


def intensity_features(images: Tensor) -> Tensor:
    """Per-voxel features ``[B, N, V]`` -> ``[B, N, V, 3]`` holding ``(1, x, x^2)`` per voxel."""
    return torch.stack((torch.ones_like(images), images, images * images), dim=-1)


def component_log_densities(images: Tensor, log_tau: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """``log(tau_nkc) + log N(I_n(x); mu_nkc, var_nkc)`` for every voxel.

    Args:
        images: ``[B, N, V]`` intensities (spatial dims flattened).
        log_tau, mean, var: ``[B, N, K, C]`` subtype parameters; padded slots have ``log_tau=-inf``.

    Returns:
        ``[B, N, K, C, V]`` log densities. The quadratic in ``x`` is evaluated as one batched
        matrix product ``[B, N, K*C, 3] @ [B, N, 3, V]`` so a pass over the voxels costs one GEMM.
    """
    b, n, k, c = mean.shape
    inv = 1.0 / var
    coeff = torch.stack(
        (
            log_tau - 0.5 * (LOG_2PI + torch.log(var) + mean * mean * inv),
            mean * inv,
            -0.5 * inv,
        ),
        dim=-1,
    ).reshape(b, n, k * c, 3)
    out = torch.matmul(coeff, intensity_features(images).transpose(-1, -2))
    return out.reshape(b, n, k, c, images.shape[-1])


class Quantised(NamedTuple):
    """Images on intensity levels (:func:`quantise`), as the look-up-table E-step reads them.

    Attributes:
        index: ``[B, N, V]`` int64, each voxel's level; ``levels`` (one past the last) where the
            image does not cover the voxel.
        values: ``[B, N, levels]`` the levels' intensities.
        weight: ``[B, N]`` each image's coverage value where it covers (1, or its sequence weight).
        omega: ``[B, V]`` 1 where at least one image covers the voxel, else 0.
    """

    index: Tensor
    values: Tensor
    weight: Tensor
    omega: Tensor


def quantise(images: Tensor, coverage: Tensor, levels: int) -> Quantised:
    """Each image's covered intensities on ``levels`` equally spaced values between its covered
    minimum and maximum (nearest level).

    The mixture then depends on an image only through which level each voxel holds, so the
    subtype densities are tabulated once per level instead of evaluated once per voxel (see
    :func:`level_tables`). 4096 levels are 12 bits, the depth MR scanners store; the rounding
    error is at most half a level step. Images and coverage stay fixed through the EM iterations of
    one registration state: quantise once, pass the result to every E-step.

    Args:
        images: ``[B, N, *S]``.
        coverage: ``[B, N, *S]``: 0 outside an image, else one value per image (its weight).
        levels: number of levels (>= 2).
    """
    b, n = images.shape[:2]
    x = images.reshape(b, n, -1)
    cov = coverage.reshape(b, n, -1)
    covered = cov > 0
    lo, hi = covered_range(x, cov)
    step = ((hi - lo) / (levels - 1)).clamp_min(torch.finfo(x.dtype).tiny)
    index = ((x - lo) / step).round_().clamp_(0, levels - 1).to(torch.int64).masked_fill_(~covered, levels)
    values = lo + step * torch.arange(levels, dtype=x.dtype, device=x.device)
    return Quantised(index, values, cov.amax(dim=-1).to(x.dtype), covered.any(dim=1).to(x.dtype))


def covered_range(x: Tensor, coverage: Tensor) -> tuple[Tensor, Tensor]:
    """``(lo, hi)`` ``[B, N, 1]``: each image's lowest and highest intensity of ``x`` ``[B, N, V]``
    where ``coverage`` ``[B, N, V]`` > 0 (both 0 for an image that covers nothing)."""
    covered = coverage > 0
    lo = torch.where(covered, x, torch.inf).amin(-1, keepdim=True)
    hi = torch.where(covered, x, -torch.inf).amax(-1, keepdim=True)
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))  # an image covering nothing
    return lo, torch.where(torch.isfinite(hi), hi, lo)


def level_tables(values: Tensor, log_tau: Tensor, mean: Tensor, var: Tensor, responsibilities: bool = True) -> tuple[Tensor, Tensor | None]:
    """The class log-densities and subtype responsibilities at every intensity level.

    Args:
        values: ``[B, N, L]`` level intensities (:attr:`Quantised.values`).
        log_tau, mean, var: ``[B, N, K, C]`` subtype parameters.
        responsibilities: also the subtypes' shares (``False``: ``None`` in their place).

    Returns:
        ``(log_class [B, N, K, L], within [B, N, K, C, L])``: ``log sum_c tau_nkc N(v; mu, var)``
        and each subtype's share ``tau_nkc N(v) / sum_c tau_nkc N(v)`` of it.
    """
    dens = component_log_densities(values, log_tau, mean, var)
    log_class = torch.logsumexp(dens, dim=3)
    return log_class, torch.exp(dens - log_class[:, :, :, None]) if responsibilities else None
