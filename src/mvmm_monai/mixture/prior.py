"""The spatial prior: probabilistic atlas, class proportions pi_k and a mean-field MRF.

``pi_kx = pi_k A_k(x) / sum_j pi_j A_j(x)`` (log space throughout). Shapes: atlas and prior
``[B, K, *spatial]``, ``log_pi`` ``[B, K]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def log_atlas_from_prob(atlas: Tensor, floor: float) -> Tensor:
    """Probabilities ``[B, K, *S]`` -> log probabilities, floored at ``floor`` and renormalised.

    The floor keeps every class possible everywhere (a misplaced atlas must not forbid the truth),
    and keeps gradients with respect to the atlas deformation finite.
    """
    if not 0.0 < floor < 1.0 / atlas.shape[1]:
        raise ValueError(f"log_atlas_from_prob: floor must be in (0, 1/K), got {floor}")
    logp = torch.log(atlas.clamp_min(floor))
    return logp - torch.logsumexp(logp, dim=1, keepdim=True)


def atlas_log_prior(log_atlas: Tensor, log_pi: Tensor) -> Tensor:
    """``log pi_kx`` ``[B, K, *S]`` from the log atlas ``[B, K, *S]`` and ``log_pi`` ``[B, K]``."""
    shape = log_pi.shape + (1,) * (log_atlas.ndim - 2)
    joint = log_atlas + log_pi.reshape(shape)
    return joint - torch.logsumexp(joint, dim=1, keepdim=True)


def update_log_pi(
    posterior: Tensor, log_atlas: Tensor, log_pi: Tensor, mask: Tensor, min_proportion: float = 0.0
) -> Tensor:
    """One fixed-point (minorise-maximise) update of the class proportions.

    ``pi_k <- sum_x P_kx / sum_x (A_kx / sum_j pi_j A_jx)`` over the voxels in ``mask``, then
    normalised. It never decreases the expected complete log-likelihood: ``-log z`` is minorised
    by its tangent at the current ``z = sum_j pi_j A_jx`` and the surrogate is maximised in closed
    form; ``pi_kx`` does not depend on the scale of ``pi``, so normalising changes nothing.

    Args:
        posterior: ``[B, K, V]`` class posteriors (linear space).
        log_atlas: ``[B, K, V]`` log atlas.
        log_pi: ``[B, K]`` current log proportions.
        mask: ``[B, V]`` voxels of Omega (covered by at least one image).

    Returns:
        ``[B, K]`` new log proportions, each at least ``min_proportion`` (a class without any
        mass keeps a tiny proportion instead of ``-inf``).
    """
    log_z = torch.logsumexp(log_atlas + log_pi[..., None], dim=1, keepdim=True)
    denom = (torch.exp(log_atlas - log_z) * mask[:, None]).sum(-1)
    numer = (posterior * mask[:, None]).sum(-1)
    tiny = torch.finfo(posterior.dtype).tiny
    pi = numer.clamp_min(tiny) / denom.clamp_min(tiny)
    pi = (pi / pi.sum(dim=1, keepdim=True)).clamp_min(max(min_proportion, tiny))
    return torch.log(pi / pi.sum(dim=1, keepdim=True))


def _neighbour_kernel(k: int, ndim: int, neighbourhood: str, like: Tensor) -> Tensor:
    """Depthwise kernel ``[K, 1, 3, ...]`` counting the neighbours of a voxel (centre excluded)."""
    if neighbourhood not in ("inplane", "full"):
        raise ValueError(f"mrf neighbourhood must be 'inplane' or 'full', got {neighbourhood!r}")
    kernel = torch.zeros((3,) * ndim, dtype=like.dtype, device=like.device)
    centre = (1,) * ndim
    axes = range(ndim) if (neighbourhood == "full" or ndim == 2) else range(2)
    for axis in axes:
        for step in (0, 2):
            idx = list(centre)
            idx[axis] = step
            kernel[tuple(idx)] = 1.0
    return kernel.expand(k, 1, *kernel.shape).contiguous()


def mrf_log_potential(posterior: Tensor, beta: float, neighbourhood: str = "inplane") -> Tensor:
    """Mean-field Potts term ``beta * sum_{y in N(x)} P_ky`` ``[B, K, *S]`` (log space, unnormalised).

    It equals ``-beta * sum_y sum_{j != k} P_jy`` up to a constant over ``k`` (posteriors sum to
    one), so it is the DESIGN's ``exp(-beta sum_y sum_{j!=k} P_jy)`` once the prior is renormalised.
    ``neighbourhood='inplane'`` (default) uses the 4 in-plane neighbours: the third spatial axis of a
    short-axis stack is the thick slice axis. ``'full'`` adds the through-plane neighbours in 3D.
    """
    if beta < 0:
        raise ValueError(f"mrf beta must be >= 0, got {beta}")
    k, ndim = posterior.shape[1], posterior.ndim - 2
    if ndim not in (2, 3):
        raise ValueError(f"mrf_log_potential: expected [B, K, H, W[, D]], got {tuple(posterior.shape)}")
    conv = F.conv2d if ndim == 2 else F.conv3d
    weight = _neighbour_kernel(k, ndim, neighbourhood, posterior)
    return beta * conv(posterior, weight, padding=1, groups=k)
