"""E-step, M-step and the EM loop of the MvMM (pure torch, log space, 2D and 3D alike).

Shapes: images and coverage ``[B, N, *S]``, log atlas / prior / posterior ``[B, K, *S]``,
subtype parameters ``[B, N, K, C]`` (:class:`MixtureParams`). The convergence measure is the
per-voxel mean log-likelihood over Omega (voxels covered by at least one image), so a tolerance
does not depend on the image size.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from mvmm_monai.mixture.gaussian import component_log_densities, intensity_features
from mvmm_monai.mixture.init import initialise_from_atlas
from mvmm_monai.mixture.params import EMConfig, MixtureParams
from mvmm_monai.mixture.prior import atlas_log_prior, mrf_log_potential, update_log_pi, update_mrf

__all__ = [
    "EMConfig",
    "EMFitResult",
    "EStepResult",
    "MixtureParams",
    "e_step",
    "em_step",
    "fit_em",
    "relative_change",
    "log_likelihood",
    "log_prior",
    "m_step",
    "voxel_log_likelihood",
]


class ConvergenceWarning(UserWarning):
    """EM stopped at ``max_iter`` before the tolerance was met."""


@dataclass(frozen=True)
class EStepResult:
    """What an E-step computes.

    Attributes:
        log_posterior: ``[B, K, *S]`` log class posteriors ``log P_kx``.
        log_likelihood: ``[B]`` per-voxel mean of ``log p(I(x))`` over Omega.
        mass, sum_x, sum_xx: ``[B, N, K, C]`` sums over the voxels image n covers of the subtype
            responsibilities ``P_nkcx`` times ``1``, ``I_n(x)`` and ``I_n(x)^2``.
        lower_bound: ``[B]`` EM lower bound of the previous posterior under these parameters
            (per-voxel mean), when the previous posterior was given.
    """

    log_posterior: Tensor
    log_likelihood: Tensor
    mass: Tensor
    sum_x: Tensor
    sum_xx: Tensor
    lower_bound: Tensor | None = None

    @property
    def posterior(self) -> Tensor:
        return torch.exp(self.log_posterior)


@dataclass(frozen=True)
class EMFitResult:
    """Result of :func:`fit_em`: final parameters, posterior, the log-likelihood trace."""

    params: MixtureParams
    log_posterior: Tensor
    log_likelihoods: list[float]
    n_iter: int
    converged: bool


def _check_inputs(images: Tensor, coverage: Tensor, log_atlas: Tensor) -> None:
    if images.ndim not in (4, 5):
        raise ValueError(f"MvMM: images must be [B, N, H, W[, D]], got shape {tuple(images.shape)}")
    if coverage.shape != images.shape:
        raise ValueError(f"MvMM: coverage shape {tuple(coverage.shape)} != images shape {tuple(images.shape)}")
    if log_atlas.shape[0] != images.shape[0] or log_atlas.shape[2:] != images.shape[2:]:
        raise ValueError(
            f"MvMM: atlas must be [B={images.shape[0]}, K, {', '.join(map(str, images.shape[2:]))}], "
            f"got {tuple(log_atlas.shape)}"
        )


def log_prior(log_atlas: Tensor, params: MixtureParams, posterior: Tensor | None, config: EMConfig) -> Tensor:
    """``log pi_kx`` ``[B, K, *S]``: atlas times the proportions ``params.log_pi``, times the MRF of
    ``posterior`` (strength :meth:`MixtureParams.mrf_beta`) when there is one."""
    lp = atlas_log_prior(log_atlas, params.log_pi)
    if posterior is None:
        return lp
    beta = params.mrf_beta(config)
    if torch.is_tensor(beta) or beta > 0:
        lp = torch.log_softmax(lp + mrf_log_potential(posterior, beta, config.mrf_neighbourhood), dim=1)
    return lp


def e_step(
    images: Tensor,
    coverage: Tensor,
    log_prior_: Tensor,
    params: MixtureParams,
    *,
    chunk_voxels: int = 32768,
    previous_posterior: Tensor | None = None,
) -> EStepResult:
    """Posteriors, log-likelihood and subtype statistics of the current parameters (no gradient).

    ``log P_kx = log pi_kx + sum_{n in A(x)} log sum_c tau_nkc N(I_n(x)) - log p(I(x))``, where
    ``A(x)`` is the set of images covering x. The voxels are processed in chunks of
    ``chunk_voxels`` so every intermediate stays in cache; the subtype responsibilities
    ``P_nkcx = P_kx tau_nkc N(I_n(x)) / p_nk(I_n(x))`` are reduced to their weighted moments on the
    fly and never stored whole.

    Args:
        images: ``[B, N, *S]``; coverage: ``[B, N, *S]`` (0/1); log_prior_: ``[B, K, *S]``.
        params: current :class:`MixtureParams`.
        previous_posterior: ``[B, K, *S]`` class posteriors q of the previous E-step; when given,
            the EM lower bound ``F(q, params) = sum_x sum_k q_kx (log pi_kx p_k(I(x)) - log q_kx)``
            (per-voxel mean over Omega) is returned too: it lies between the previous and the
            current log-likelihood.
    """
    _check_inputs(images, coverage, log_prior_)
    b, n = images.shape[:2]
    k, c = params.mean.shape[2:]
    spatial = images.shape[2:]
    with torch.no_grad():
        x = images.reshape(b, n, -1)
        cov = coverage.reshape(b, n, -1).to(x.dtype)
        lp = log_prior_.reshape(b, k, -1)
        v = x.shape[-1]
        log_post = torch.empty_like(lp)
        log_norm = torch.empty((b, v), dtype=x.dtype, device=x.device)
        moments = torch.zeros((b, n, k * c, 3), dtype=x.dtype, device=x.device)
        q_prev = None if previous_posterior is None else previous_posterior.reshape(b, k, -1).to(x.dtype)
        bound = torch.zeros(b, dtype=x.dtype, device=x.device)
        for s in range(0, v, chunk_voxels):
            sl = slice(s, s + chunk_voxels)
            xs, cs = x[..., sl], cov[..., sl]
            dens = component_log_densities(xs, params.log_tau, params.mean, params.var)  # [B,N,K,C,v]
            peak = dens.amax(dim=3, keepdim=True)  # per-class max: exact logsumexp below
            dens = dens.sub_(peak).exp_()
            class_sum = dens.sum(dim=3)  # [B,N,K,v]
            log_class = class_sum.log().add_(peak.squeeze(3))
            log_joint = lp[..., sl] + (log_class * cs[:, :, None]).sum(1)
            ln = torch.logsumexp(log_joint, dim=1)
            if q_prev is not None:
                q = q_prev[..., sl]
                per_voxel = (q * log_joint).sum(1) - torch.special.xlogy(q, q).sum(1)
                bound += (per_voxel * (cs.amax(dim=1) > 0)).sum(-1)
            log_joint = log_joint.sub_(ln[:, None])
            log_post[..., sl] = log_joint
            log_norm[:, sl] = ln
            weight = torch.exp(log_joint)[:, None] * cs[:, :, None] / class_sum  # [B,N,K,v]
            resp = dens.mul_(weight[:, :, :, None])
            moments += torch.matmul(resp.reshape(b, n, k * c, -1), intensity_features(xs))
        omega = (cov.amax(dim=1) > 0).to(x.dtype)
        ll = (log_norm * omega).sum(-1) / omega.sum(-1).clamp_min(1.0)
        lower_bound = bound / omega.sum(-1).clamp_min(1.0) if q_prev is not None else None
    moments = moments.reshape(b, n, k, c, 3)
    return EStepResult(
        log_posterior=log_post.reshape(b, k, *spatial),
        log_likelihood=ll,
        mass=moments[..., 0],
        sum_x=moments[..., 1],
        sum_xx=moments[..., 2],
        lower_bound=lower_bound,
    )


def log_likelihood(
    images: Tensor,
    coverage: Tensor,
    log_atlas: Tensor,
    params: MixtureParams,
    config: EMConfig,
    posterior: Tensor | None = None,
) -> Tensor:
    """Per-voxel mean log-likelihood ``[B]`` over Omega, differentiable in images, coverage, atlas.

    The same quantity as :attr:`EStepResult.log_likelihood`, computed with autograd-friendly
    operations; the registration ascends it with the mixture parameters held.
    """
    log_norm = voxel_log_likelihood(images, coverage, log_atlas, params, config, posterior)
    omega = (coverage.detach().amax(dim=1) > 0).flatten(1).to(log_norm.dtype)
    return log_norm.flatten(1).sum(-1) / omega.sum(-1).clamp_min(1.0)


def voxel_log_likelihood(
    images: Tensor,
    coverage: Tensor,
    log_atlas: Tensor,
    params: MixtureParams,
    config: EMConfig,
    posterior: Tensor | None = None,
) -> Tensor:
    """``log p(I(x))`` ``[B, *S]`` at every voxel (0 where no image covers x); differentiable.

    ``log sum_k pi_kx prod_{n in A(x)} sum_c tau_nkc N(I_n(x))``: :func:`log_likelihood` is its mean
    over Omega; the slice-shift search sums it over the voxels of one slice.
    """
    lp = log_prior(log_atlas, params, posterior, config)
    _check_inputs(images, coverage, lp)
    b, n = images.shape[:2]
    x = images.reshape(b, n, -1)
    cov = coverage.reshape(b, n, -1).to(x.dtype)
    log_class = torch.logsumexp(component_log_densities(x, params.log_tau, params.mean, params.var), dim=3)
    log_norm = torch.logsumexp(lp.reshape(b, lp.shape[1], -1) + (log_class * cov[:, :, None]).sum(1), dim=1)
    omega = (cov.detach().amax(dim=1) > 0).to(x.dtype)
    return (log_norm * omega).reshape(b, *images.shape[2:])


def m_step(
    images: Tensor,
    coverage: Tensor,
    log_atlas: Tensor,
    estep: EStepResult,
    params: MixtureParams,
    config: EMConfig,
) -> MixtureParams:
    """New ``tau``, ``mu``, ``var`` (over each image's own coverage) and ``pi`` (fixed point); with
    ``beta="auto"``, ``pi`` and the MRF strength together
    (:func:`~mvmm_monai.mixture.prior.update_mrf`, on this E-step's posterior).

    Subtypes or classes whose mass is below ``config.min_mass`` keep their previous values, so an
    empty class never produces NaN; variances are floored at ``config.min_variance``.
    """
    b, n = images.shape[:2]
    x = images.reshape(b, n, -1)
    mass, sx, sxx = estep.mass, estep.sum_x, estep.sum_xx
    valid = params.valid
    ok = valid & (mass > config.min_mass)
    safe = mass.clamp_min(torch.finfo(mass.dtype).tiny)
    mean = torch.where(ok, sx / safe, params.mean)
    var = torch.where(ok, sxx / safe - mean * mean, params.var).clamp_min(config.min_variance)
    class_mass = torch.where(valid, mass, 0.0).sum(-1, keepdim=True)
    tau = (mass / class_mass.clamp_min(torch.finfo(mass.dtype).tiny)).clamp_min(config.min_weight)
    tau = tau / torch.where(valid, tau, 0.0).sum(-1, keepdim=True)
    log_tau = torch.where(class_mass > config.min_mass, torch.log(tau), params.log_tau)
    log_tau = torch.where(valid, log_tau, -torch.inf)
    log_pi = params.log_pi
    omega = (coverage.reshape(b, n, -1).amax(dim=1) > 0).to(x.dtype)
    k = log_atlas.shape[1]
    beta = params.beta
    if config.estimate_beta:  # pi and beta of the Potts prior together (mean-field EM)
        log_pi, beta = update_mrf(
            estep.posterior, log_atlas, log_pi, params.with_beta_start(config).beta, omega.reshape(b, *images.shape[2:]), config.mrf_neighbourhood,
            config.beta_max, config.update_pi, config.min_proportion,
        )
    elif config.update_pi:
        log_pi = update_log_pi(
            estep.posterior.reshape(b, k, -1), log_atlas.reshape(b, k, -1), log_pi, omega, config.min_proportion
        )
    return MixtureParams(log_pi=log_pi, log_tau=log_tau, mean=mean, var=var, beta=beta)


def em_step(
    images: Tensor,
    coverage: Tensor,
    log_atlas: Tensor,
    params: MixtureParams,
    config: EMConfig,
    posterior: Tensor | None = None,
) -> tuple[MixtureParams, EStepResult]:
    """One EM iteration. ``posterior`` (``[B, K, *S]``, linear) feeds the MRF when beta > 0.

    Returns the updated parameters and the E-step of the *incoming* parameters (its
    ``log_likelihood`` is that of ``params``).
    """
    lp = log_prior(log_atlas, params, posterior, config)
    estep = e_step(images, coverage, lp, params, chunk_voxels=config.chunk_voxels, previous_posterior=posterior)
    return m_step(images, coverage, log_atlas, estep, params, config), estep


def relative_change(previous: float, current: float) -> float:
    """The convergence measure of every fit loop in this package (EM alone and the ICM loop):
    ``|current - previous| / |previous|`` of the per-voxel mean log-likelihood (a mean, so the
    tolerance does not depend on the image size; relative, so not on the intensity scale)."""
    return abs(current - previous) / max(abs(previous), 1e-12)


def fit_em(
    images: Tensor,
    coverage: Tensor,
    log_atlas: Tensor,
    counts: Tensor,
    config: EMConfig = EMConfig(),
    *,
    max_iter: int = 100,
    tol: float = 1e-5,
    params: MixtureParams | None = None,
) -> EMFitResult:
    """EM with a fixed atlas until the per-voxel mean log-likelihood's :func:`relative_change`
    falls below ``tol`` (the measure the ICM loop's ``model.tol`` uses too).

    Args:
        images, coverage: ``[B, N, *S]``; log_atlas: ``[B, K, *S]``; counts: ``[N, K]`` subtypes.
        params: warm start; by default :func:`initialise_from_atlas`.
    """
    _check_inputs(images, coverage, log_atlas)
    if params is None:
        params = initialise_from_atlas(
            images, coverage, torch.exp(log_atlas), counts, min_variance=config.min_variance
        )
    params = params.with_beta_start(config)
    trace: list[float] = []
    posterior = None
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        params, estep = em_step(images, coverage, log_atlas, params, config, posterior)
        posterior = estep.posterior
        ll = float(estep.log_likelihood.mean())
        if not torch.isfinite(estep.log_likelihood).all():
            raise FloatingPointError(f"fit_em: non-finite log-likelihood at iteration {it}")
        if trace and relative_change(trace[-1], ll) < tol:
            trace.append(ll)
            converged = True
            break
        trace.append(ll)
    if not converged:
        warnings.warn(
            f"EM did not converge in {max_iter} iterations (last relative change "
            f"{relative_change(trace[-2], trace[-1]) if len(trace) > 1 else float('nan'):.2e} > tol={tol}); "
            "raise max_iter or tol, or check the atlas placement.",
            ConvergenceWarning,
            stacklevel=2,
        )
    final = e_step(images, coverage, log_prior(log_atlas, params, posterior, config), params)
    return EMFitResult(params, final.log_posterior, trace, it, converged)
