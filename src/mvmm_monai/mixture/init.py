"""Initialisation of the mixture from the atlas (lecture notes, "Initialization")."""

from __future__ import annotations

import torch
from torch import Tensor

from mvmm_monai.mixture.gaussian import subtype_mask
from mvmm_monai.mixture.params import MixtureParams


def initialise_from_atlas(
    images: Tensor,
    coverage: Tensor,
    atlas: Tensor,
    counts: Tensor,
    *,
    spread: float = 1.0,
    min_variance: float = 1e-4,
) -> MixtureParams:
    """Atlas-weighted initial parameters.

    ``pi_k`` from the atlas mass over Omega; ``tau = 1/|C_nk|``; ``mu_nk``, ``s2_nk`` the atlas-
    weighted mean and variance of image n over the voxels it covers; subtype c of (n, k) starts at
    ``mu_nk + a_c * sigma_nk`` with ``a`` evenly spread over ``[-spread, spread]`` and variance
    ``|C_nk| * s2_nk``.

    Args:
        images: ``[B, N, *S]`` intensities.
        coverage: ``[B, N, *S]`` 1 where image n covers the voxel, else 0.
        atlas: ``[B, K, *S]`` class probabilities (linear space, summing to one over K).
        counts: ``[N, K]`` integer subtype counts.

    Returns:
        :class:`MixtureParams` with ``[B, N, K, C]`` subtype tensors.
    """
    b, n = images.shape[:2]
    k = atlas.shape[1]
    if counts.shape != (n, k):
        raise ValueError(f"initialise_from_atlas: counts must be [N={n}, K={k}], got {tuple(counts.shape)}")
    x = images.reshape(b, n, -1)
    cov = coverage.reshape(b, n, -1).to(x.dtype)
    a = atlas.reshape(b, k, -1).to(x.dtype)
    omega = (cov.amax(dim=1) > 0).to(x.dtype)

    mass_k = (a * omega[:, None]).sum(-1)
    log_pi = torch.log(mass_k.clamp_min(torch.finfo(x.dtype).tiny) / mass_k.sum(-1, keepdim=True))

    w = a[:, None] * cov[:, :, None]  # [B, N, K, V]
    wsum = w.sum(-1).clamp_min(torch.finfo(x.dtype).eps)
    mu_k = (w * x[:, :, None]).sum(-1) / wsum  # [B, N, K]
    var_k = (w * (x[:, :, None] - mu_k[..., None]) ** 2).sum(-1) / wsum
    var_k = var_k.clamp_min(min_variance)

    valid = subtype_mask(counts.to(x.device))  # [N, K, C]
    c = valid.shape[-1]
    cnt = counts.to(device=x.device, dtype=x.dtype)  # [N, K]
    # offsets a_c evenly spread in [-spread, spread] within each (n, k), 0 for a single subtype
    idx = torch.arange(c, device=x.device, dtype=x.dtype)
    offs = torch.where(cnt[..., None] > 1, -spread + 2 * spread * idx / (cnt[..., None] - 1).clamp_min(1), 0.0)
    mean = mu_k[..., None] + offs[None] * var_k.sqrt()[..., None]
    var = (cnt[None, ..., None] * var_k[..., None]).expand(b, n, k, c).clone()
    log_tau = torch.where(valid[None], -torch.log(cnt)[None, ..., None], -torch.inf).expand(b, n, k, c).clone()
    mean = torch.where(valid[None], mean, 0.0)
    var = torch.where(valid[None], var, 1.0)
    return MixtureParams(log_pi=log_pi, log_tau=log_tau, mean=mean, var=var)
