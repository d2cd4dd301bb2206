"""Gaussian subtype densities and their sufficient statistics (pure torch, log space).

Every image n has, for every class k, ``counts[n, k]`` Gaussian subtypes. Parameters are stored
padded to ``C = counts.max()`` subtypes as ``[B, N, K, C]`` tensors; a padded slot has
``log_tau = -inf`` so it never contributes, and :func:`subtype_mask` tells which slots are real.
"""

from __future__ import annotations

import math

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
