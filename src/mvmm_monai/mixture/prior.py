"""The spatial prior: probabilistic atlas, class proportions pi_k and a mean-field MRF.

``pi_kx = pi_k A_k(x) / sum_j pi_j A_j(x)`` (log space throughout). Shapes: atlas and prior
``[B, K, *spatial]``, ``log_pi`` ``[B, K]``.
"""

from __future__ import annotations

import torch
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
    return torch.log_softmax(log_atlas + log_pi.reshape(shape), dim=1)


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
    # A_k / sum_j pi_j A_j = softmax_k(log A + log pi) / pi_k
    prior_mass = (torch.softmax(log_atlas + log_pi[..., None], dim=1) * mask[:, None]).sum(-1)
    return log_pi_from_sums((posterior * mask[:, None]).sum(-1), prior_mass, log_pi, min_proportion)


def log_pi_from_sums(posterior_mass: Tensor, prior_mass: Tensor, log_pi: Tensor, min_proportion: float = 0.0) -> Tensor:
    """:func:`update_log_pi` from its two sums over the mask, ``[B, K]`` each: of the posterior
    ``P_kx``, and of the atlas prior ``pi_kx`` of the current ``log_pi`` (for callers that
    accumulate them in chunks)."""
    tiny = torch.finfo(posterior_mass.dtype).tiny
    denom = prior_mass / torch.exp(log_pi)
    pi = posterior_mass.clamp_min(tiny) / denom.clamp_min(tiny)
    pi = (pi / pi.sum(dim=1, keepdim=True)).clamp_min(max(min_proportion, tiny))
    return torch.log(pi / pi.sum(dim=1, keepdim=True))


def neighbour_field(posterior: Tensor, neighbourhood: str = "inplane", out: Tensor | None = None, alpha: float | Tensor = 1.0) -> Tensor:
    """``sum_{y in N(x)} P_ky`` ``[B, K, *S]``: the posterior summed over each voxel's neighbours
    (zero beyond the border). ``neighbourhood='inplane'`` (default) uses the 4 in-plane
    neighbours: the third spatial axis of a short-axis stack is the thick slice axis. ``'full'``
    adds the through-plane neighbours in 3D.

    The sum is 2 shifted additions per axis (a separable [1, 0, 1] kernel, no convolution). With
    ``out``, ``alpha`` times it (``alpha`` a number or ``[B]``) is added into ``out`` in place and
    ``out`` is returned.
    """
    ndim = posterior.ndim - 2
    if ndim not in (2, 3):
        raise ValueError(f"mrf: expected a posterior [B, K, H, W[, D]], got {tuple(posterior.shape)}")
    if neighbourhood not in ("inplane", "full"):
        raise ValueError(f"mrf neighbourhood must be 'inplane' or 'full', got {neighbourhood!r}")
    if out is None:
        out, alpha = torch.zeros_like(posterior), 1.0
    src = posterior * _per_subject(alpha, posterior) if torch.is_tensor(alpha) else posterior
    scale = 1.0 if torch.is_tensor(alpha) else float(alpha)
    for axis in range(2, 2 + (ndim if neighbourhood == "full" else 2)):
        n = posterior.shape[axis]
        if n > 1:
            out.narrow(axis, 1, n - 1).add_(src.narrow(axis, 0, n - 1), alpha=scale)
            out.narrow(axis, 0, n - 1).add_(src.narrow(axis, 1, n - 1), alpha=scale)
    return out


def _per_subject(beta: float | Tensor, like: Tensor) -> float | Tensor:
    """``beta`` as a float, or a ``[B]`` tensor shaped to broadcast against ``like`` ``[B, K, *S]``."""
    if not torch.is_tensor(beta):
        return float(beta)
    return beta.to(like).reshape(-1, *([1] * (like.ndim - 1)))


def mrf_log_potential(posterior: Tensor, beta: float | Tensor, neighbourhood: str = "inplane") -> Tensor:
    """Mean-field Potts term ``beta * sum_{y in N(x)} P_ky`` ``[B, K, *S]`` (log space, unnormalised);
    ``beta`` a number or one per subject (``[B]``).

    It equals ``-beta * sum_y sum_{j != k} P_jy`` up to a constant over ``k`` (posteriors sum to
    one), so it is the DESIGN's ``exp(-beta sum_y sum_{j!=k} P_jy)`` once the prior is renormalised.
    """
    if not torch.is_tensor(beta) and beta < 0:  # an estimate (a tensor) is kept >= 0 by update_mrf: no host sync here
        raise ValueError(f"mrf beta must be >= 0, got {beta}")
    return _per_subject(beta, posterior) * neighbour_field(posterior, neighbourhood)


def _agreement(q: Tensor, mask: Tensor, neighbourhood: str) -> Tensor:
    """``[B]`` mean over ``mask`` of ``sum_k q_kx sum_{y in N(x)} q_ky``: the expected number of
    neighbours that share a voxel's class."""
    agree = (q * neighbour_field(q, neighbourhood)).sum(1).flatten(1)
    w = mask.flatten(1).to(agree)
    return (agree * w).sum(-1) / w.sum(-1).clamp_min(1.0)


def prior_mean_field(base_log_prior: Tensor, beta: Tensor, neighbourhood: str = "inplane", iterations: int = 20,
                     start: Tensor | None = None) -> Tensor:
    """The mean-field approximation ``q`` ``[B, K, *S]`` of the MRF prior alone (no image): the fixed
    point of ``q_kx = softmax_k(log pi_kx + beta sum_{y in N(x)} q_ky)``, iterated ``iterations``
    times from ``start`` (default: the prior without the MRF)."""
    b = _per_subject(beta, base_log_prior)
    q = torch.softmax(base_log_prior, dim=1) if start is None else start
    for _ in range(iterations):
        q = torch.softmax(base_log_prior + b * neighbour_field(q, neighbourhood), dim=1)
    return q


@torch.no_grad()
def update_mrf(
    posterior: Tensor,
    log_atlas: Tensor,
    log_pi: Tensor,
    beta: Tensor,
    mask: Tensor,
    neighbourhood: str = "inplane",
    beta_max: float = 4.0,
    update_pi: bool = True,
    min_proportion: float = 0.0,
    iterations: int = 20,
    max_step: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """One M-step of the MRF prior's parameters, the proportions ``pi`` and the strength ``beta``,
    in the mean-field EM of Zhang (1992).

    The prior is a Potts field with the atlas and ``pi`` as external field. With the posterior and
    the prior's partition function both in the mean-field approximation, the free energy's
    gradient is ``sum_x (P_kx - q*_kx)`` in ``log pi_k`` and ``a(P) - a(q*)`` in ``beta``, where ``q*``
    is the mean-field approximation of the prior alone (:func:`prior_mean_field`) and ``a(q)`` the
    mean over ``mask`` of ``sum_k q_kx sum_{y in N(x)} q_ky``, the expected number of agreeing
    neighbours, which grows with ``beta``. So ``pi`` takes the iterative-scaling step
    ``pi_k <- pi_k sum_x P_kx / sum_x q*_kx`` (with ``beta = 0`` the pi fixed point of
    :func:`update_log_pi`), and ``beta`` one Newton step towards the root of ``a(q*) = a(P)``, its
    slope by a finite difference, at most ``max_step``, within ``[0, beta_max]``; the EM's iterations
    take both to the root. (The pseudo-likelihood, which holds the neighbours at their posterior
    instead, has no finite optimum on anatomy: a heart's labels are far smoother than a Potts field of
    moderate strength, and its estimate runs to any bound.)

    Args:
        posterior: ``[B, K, *S]`` class posteriors of this E-step.
        log_atlas: ``[B, K, *S]`` log atlas; log_pi: ``[B, K]``; beta: ``[B]`` current values.
        mask: ``[B, *S]`` voxels of Omega.
        iterations: mean-field iterations of the prior at ``beta`` (half as many again at
            ``beta + 0.05``, from there).

    Returns:
        ``(log_pi [B, K], beta [B])``, the new values.
    """
    b, k = posterior.shape[:2]
    base = atlas_log_prior(log_atlas, log_pi)
    bt = beta.detach().to(posterior.dtype).clamp(0.0, beta_max)
    q = prior_mean_field(base, bt, neighbourhood, iterations)
    if update_pi:
        w = mask.reshape(b, 1, -1).to(posterior)
        tiny = torch.finfo(posterior.dtype).tiny
        ratio = (posterior.reshape(b, k, -1) * w).sum(-1).clamp_min(tiny) / (q.reshape(b, k, -1) * w).sum(-1).clamp_min(tiny)
        pi = torch.exp(log_pi) * ratio
        pi = (pi / pi.sum(dim=1, keepdim=True)).clamp_min(max(min_proportion, tiny))
        log_pi = torch.log(pi / pi.sum(dim=1, keepdim=True))
    target, at = _agreement(posterior, mask, neighbourhood), _agreement(q, mask, neighbourhood)
    delta = 0.05
    ahead = _agreement(prior_mean_field(base, bt + delta, neighbourhood, max(iterations // 2, 1), q), mask, neighbourhood)
    slope = ((ahead - at) / delta).clamp_min(1e-6)
    step = ((target - at) / slope).clamp(-max_step, max_step)
    return log_pi, (bt + step).clamp(0.0, beta_max).to(beta.dtype)
