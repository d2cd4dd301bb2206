"""Partial volume of thick slabs: a sequence whose slices are thicker than the common space's
(pure torch).

A thick slab's intensity is the mean of the tissue it spans. In the common space (the reference
grid) the slab is seen by the ``r`` voxels of one in-plane position whose centres it contains; the
hetero-coverage likelihood of the lecture notes gives each of them the slab's intensity ``y`` as if
its own tissue alone had produced it. With the slab as a mean, ``y = (x_1 + ... + x_r) / r`` for
the voxels' own intensities ``x_u``, and a mean-field step takes each voxel's own intensity as

    x_a = r * y - sum over the slab's other voxels b of E[x_b],

``E[x_b] = sum_k q_b(k) mu_k`` (the class posterior of b and the sequence's class means, each the
``tau``-weighted mean of its subtypes). The mixture then fits these intensities instead of ``y``:
the partner voxels' expected share of the slab is taken out, so a slab spanning the blood pool of
one slice and the wall of the next no longer looks like a tissue between the two. Their spread
includes the partners' uncertainty, which the M-step's variances take up.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mvmm_monai.mixture.params import MixtureParams


def class_means(params: MixtureParams) -> Tensor:
    """``[B, N, K]`` each sequence's class means: its subtypes' means weighted by ``tau``."""
    tau = torch.exp(params.log_tau)  # padded slots: exp(-inf) = 0
    return (tau * torch.where(params.valid, params.mean, torch.zeros_like(params.mean))).sum(-1) / tau.sum(-1).clamp_min(1e-12)


def partial_volume_images(images: Tensor, coverage: Tensor, posterior: Tensor, params: MixtureParams, slabs: Tensor) -> Tensor:
    """The images with every thick slab's intensity turned into each voxel's own (module docstring).

    Args:
        images: ``[B, N, *S]`` the sequences in the common space (a slab's intensity at every voxel it covers).
        coverage: ``[B, N, *S]`` > 0 where a sequence counts at a voxel.
        posterior: ``[B, K, *S]`` the current class posterior (linear).
        params: the current mixture parameters.
        slabs: ``[B, N, *S]`` long, the slab of every voxel: voxels with one value share one slab
            and one in-plane position; -1 for a voxel alone in its slab or not covered.

    Returns:
        ``[B, N, *S]``: unchanged where a voxel is alone in its slab (among the covered voxels),
        else ``r y - (sum of the slab's expected intensities - the voxel's own)``, clamped to the
        sequence's covered intensity range.
    """
    if slabs.shape != images.shape:
        raise ValueError(f"partial_volume_images: slabs must be shaped as images {tuple(images.shape)}, got {tuple(slabs.shape)}")
    b, n = images.shape[:2]
    out = images.clone()
    means = class_means(params)  # [B, N, K]
    x, cov, ids = images.reshape(b, n, -1), coverage.reshape(b, n, -1), slabs.reshape(b, n, -1)
    q = posterior.reshape(b, posterior.shape[1], -1)
    flat = out.reshape(b, n, -1)
    for i in range(b):
        for c in range(n):
            member = (ids[i, c] >= 0) & (cov[i, c] > 0)
            if not bool(member.any()):
                continue
            key = ids[i, c][member]  # slab ids are small non-negative integers (data.common_space.slab_ids)
            count = torch.bincount(key).to(x.dtype)
            if not bool((count > 1).any()):
                continue
            expected = (means[i, c][:, None] * q[i][:, member]).sum(0)  # E[x] of every member voxel
            total = torch.zeros_like(count).index_add_(0, key, expected)
            y = x[i, c][member]
            own = count[key] * y - (total[key] - expected)
            seen = x[i, c][cov[i, c] > 0]
            flat[i, c][member] = own.clamp(float(seen.min()), float(seen.max()))
    return out
