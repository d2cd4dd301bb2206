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


def neighbour_field(posterior: Tensor, neighbourhood: str = "inplane") -> Tensor:
    """``sum_{y in N(x)} P_ky`` ``[B, K, *S]``: the posterior summed over each voxel's neighbours,
    one depthwise convolution. ``neighbourhood='inplane'`` (default) uses the 4 in-plane neighbours:
    the third spatial axis of a short-axis stack is the thick slice axis. ``'full'`` adds the
    through-plane neighbours in 3D."""
    k, ndim = posterior.shape[1], posterior.ndim - 2
    if ndim not in (2, 3):
        raise ValueError(f"mrf: expected a posterior [B, K, H, W[, D]], got {tuple(posterior.shape)}")
    conv = F.conv2d if ndim == 2 else F.conv3d
    return conv(posterior, _neighbour_kernel(k, ndim, neighbourhood, posterior), padding=1, groups=k)


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
    if bool(torch.as_tensor(beta).lt(0).any()):
        raise ValueError(f"mrf beta must be >= 0, got {beta}")
    return _per_subject(beta, posterior) * neighbour_field(posterior, neighbourhood)


@torch.no_grad()
def update_beta(
    posterior: Tensor,
    base_log_prior: Tensor,
    beta: Tensor,
    mask: Tensor,
    neighbourhood: str = "inplane",
    beta_max: float = 4.0,
    newton_steps: int = 8,
    field: Tensor | None = None,
) -> Tensor:
    """The M-step of the MRF strength: ``beta`` ``[B]`` maximising the expected complete
    log-prior under the mean-field approximation,

    ``Q(beta) = sum_x sum_k P_kx log softmax_k(log pi_kx + beta n_kx)``, ``n_kx = sum_{y in N(x)} P_ky``,

    over the voxels in ``mask`` (each voxel's neighbours held at their posterior means: the
    mean-field pseudo-likelihood of Zhang (1992) and Celeux, Forbes and Peyrard (2003), as in the
    MvMM notes' ECM step). ``Q`` is concave in ``beta`` (a log-softmax of a function linear in
    it): safeguarded Newton steps from the current value, within ``[0, beta_max]``.

    Args:
        posterior: ``[B, K, *S]`` class posteriors of this E-step.
        base_log_prior: ``[B, K, *S]`` the prior without the MRF (atlas times proportions).
        beta: ``[B]`` current strength.
        mask: ``[B, *S]`` voxels of Omega.
        field: ``[B, K, *S]`` :func:`neighbour_field` of ``posterior``, when already computed.

    Returns:
        ``[B]`` new strength (float64 arithmetic, ``beta``'s dtype).
    """
    b, k = posterior.shape[:2]
    field = (neighbour_field(posterior, neighbourhood) if field is None else field).reshape(b, k, -1).double()
    post = posterior.reshape(b, k, -1).double()
    base = base_log_prior.reshape(b, k, -1).double()
    w = mask.reshape(b, -1).double()
    target = ((post * field).sum(1) * w).sum(-1)  # [B]: sum_x sum_k P_kx n_kx

    def objective(bt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits = base + bt[:, None, None] * field
        log_norm = torch.logsumexp(logits, dim=1)
        q = ((post * logits).sum(1) - log_norm) * w
        prob = torch.exp(logits - log_norm[:, None])
        mean_n = (prob * field).sum(1)
        var_n = (prob * field * field).sum(1) - mean_n * mean_n
        return q.sum(-1), target - (mean_n * w).sum(-1), -(var_n.clamp_min(0) * w).sum(-1)

    bt = beta.detach().double().clamp(0.0, beta_max)
    q, grad, hess = objective(bt)
    for _ in range(newton_steps):
        step = torch.where(hess < 0, -grad / hess.clamp_max(-1e-12), torch.zeros_like(grad))
        for _halving in range(20):  # Newton on a concave function may overshoot: halve until Q rises
            trial = (bt + step).clamp(0.0, beta_max)
            q_new, g_new, h_new = objective(trial)
            better = q_new >= q
            if bool(better.all()):
                break
            step = torch.where(better, step, step / 2)
        bt = torch.where(q_new >= q, trial, bt)
        q, grad, hess = torch.where(q_new >= q, q_new, q), torch.where(q_new >= q, g_new, grad), torch.where(q_new >= q, h_new, hess)
        if bool((step.abs() < 1e-6).all()):
            break
    return bt.to(beta.dtype)
