"""E-step, M-step and the EM loop of the MvMM (pure torch, log space, 2D and 3D alike).

Shapes: images and coverage ``[B, N, *S]``, log atlas / prior / posterior ``[B, K, *S]``,
subtype parameters ``[B, N, K, C]`` (:class:`MixtureParams`). The convergence measure is the
per-voxel mean log-likelihood over Omega (voxels covered by at least one image), so a tolerance
does not depend on the image size.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from mvmm_monai.mixture.gaussian import (
    Quantised,
    component_log_densities,
    covered_range,
    intensity_features,
    level_tables,
    quantise,
)
from mvmm_monai.mixture.init import initialise_from_atlas
from mvmm_monai.mixture.params import EMConfig, MixtureParams
from mvmm_monai.mixture.prior import (
    atlas_log_prior,
    log_pi_from_sums,
    neighbour_field,
    update_log_pi,
    update_mrf,
)

__all__ = [
    "EMConfig",
    "EMFitResult",
    "EStepResult",
    "MixtureParams",
    "e_step",
    "em_step",
    "fit_em",
    "log_likelihood",
    "log_prior",
    "m_step",
    "relative_change",
    "voxel_log_likelihood",
    "class_log_likelihood_table",
    "lookup_class_log_likelihood",
]


@functools.cache
def _log_tiny(dtype: torch.dtype) -> float:
    """``log`` of the smallest normal number of ``dtype`` (-87.3 in float32): ``exp`` of a smaller
    argument takes a slow path on x86 CPUs (measured 50-100x slower), and gives ~0 anyway."""
    return float(torch.log(torch.tensor(torch.finfo(dtype).tiny, dtype=torch.float64)))


def _logsumexp(x: Tensor, dim: int) -> Tensor:
    """``torch.logsumexp`` along ``dim``, differentiable, about twice as fast forward and backward
    on a CPU (measured on [1, 4, 1M] and [1, 3, 4, 3, 37k]): terms more than 87 below the largest
    are taken as ``exp(-87)`` instead of going through exp's slow underflow path (they add < 1e-37
    relative and no gradient); an all ``-inf`` slice gives a finite ~-85 instead of ``-inf``."""
    peak = x.detach().amax(dim, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    return (x - peak).clamp_min(_log_tiny(x.dtype)).exp().sum(dim).log() + peak.squeeze(dim)


class ConvergenceWarning(UserWarning):
    """EM stopped at ``max_iter`` before the tolerance was met."""


@dataclass(frozen=True)
class EStepResult:
    """What an E-step computes.

    Attributes:
        posterior: ``[B, K, *S]`` class posteriors ``P_kx`` (:attr:`log_posterior`: their log).
        log_likelihood: ``[B]`` per-voxel mean of ``log p(I(x))`` over Omega.
        mass, sum_x, sum_xx: ``[B, N, K, C]`` sums over the voxels image n covers of the subtype
            responsibilities ``P_nkcx`` times ``1``, ``I_n(x)`` and ``I_n(x)^2``.
        lower_bound: ``[B]`` EM lower bound of the previous posterior under these parameters
            (per-voxel mean), when the previous posterior was given.
        posterior_change: ``[B]`` how far the class posteriors moved from the previous ones
            (:func:`em_step` with a previous posterior): the mean over Omega of the total variation
            ``sum_k |P_kx - q_kx| / 2``, the fraction of each voxel's probability that changed class.
    """

    posterior: Tensor
    log_likelihood: Tensor
    mass: Tensor
    sum_x: Tensor
    sum_xx: Tensor
    lower_bound: Tensor | None = None
    posterior_change: Tensor | None = None

    @property
    def log_posterior(self) -> Tensor:
        """``[B, K, *S]`` ``log P_kx`` (computed on access)."""
        return torch.log(self.posterior)


@dataclass(frozen=True)
class EMFitResult:
    """Result of :func:`fit_em`: final parameters, posterior, the log-likelihood trace.

    ``log_likelihoods`` holds the batch mean per iteration; ``iterations`` and ``subject_converged``
    (``[B]``) say when each subject stopped and whether it met the tolerance; ``n_iter`` and
    ``converged`` are their largest value and their conjunction.
    """

    params: MixtureParams
    log_posterior: Tensor
    log_likelihoods: list[float]
    n_iter: int
    converged: bool
    iterations: Tensor | None = None
    subject_converged: Tensor | None = None


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
    beta = None if posterior is None else params.mrf_beta(config)
    if beta is None or not (torch.is_tensor(beta) or beta > 0):
        return atlas_log_prior(log_atlas, params.log_pi)
    # log A + log pi + beta * (neighbour sum), normalised once
    log_pi = params.log_pi.reshape(params.log_pi.shape + (1,) * (log_atlas.ndim - 2))
    joint = neighbour_field(posterior.to(log_atlas.dtype), config.mrf_neighbourhood, out=log_atlas + log_pi, alpha=beta)
    return torch.log_softmax(joint, dim=1)


def e_step(
    images: Tensor,
    coverage: Tensor,
    log_prior_: Tensor,
    params: MixtureParams,
    *,
    levels: int = 4096,
    chunk_voxels: int = 32768,
    previous_posterior: Tensor | None = None,
    quantised: Quantised | None = None,
) -> EStepResult:
    """Posteriors, log-likelihood and subtype statistics of the current parameters (no gradient).

    ``log P_kx = log pi_kx + sum_{n in A(x)} w_nx log sum_c tau_nkc N(I_n(x)) - log p(I(x))``,
    where ``A(x)`` is the set of images covering x and ``w_nx`` the coverage (1, or a sequence's
    weight). The subtype responsibilities ``P_nkcx = P_kx tau_nkc N(I_n(x)) / p_nk(I_n(x))`` are
    reduced to their weighted moments and never stored whole.

    With ``levels`` > 0 (default) each image is first put on that many intensity levels
    (:func:`~mvmm_monai.mixture.gaussian.quantise`; 4096 = 12 bits, an MR scanner's depth):
    the densities are tabulated per level, each voxel looks its class densities up, and the
    moments come from posterior-weighted histograms of the levels. Per voxel this costs N
    look-ups, one softmax over K and N histogram adds, whatever the subtype counts; the results
    are the exact EM of the quantised images. ``levels=0`` evaluates every subtype at every voxel
    instead, in chunks of ``chunk_voxels`` (the reference; slower).

    Args:
        images: ``[B, N, *S]``; coverage: ``[B, N, *S]``: 0 outside an image, else its weight,
            one value per image with ``levels`` > 0 (per voxel only with ``levels=0``);
            log_prior_: ``[B, K, *S]``.
        params: current :class:`MixtureParams`.
        previous_posterior: ``[B, K, *S]`` class posteriors q of the previous E-step; when given,
            the EM lower bound ``F(q, params) = sum_x sum_k q_kx (log pi_kx p_k(I(x)) - log q_kx)``
            (per-voxel mean over Omega) is returned too: it lies between the previous and the
            current log-likelihood.
        quantised: ``quantise(images, coverage, levels)`` when the caller keeps it across E-steps
            of the same images (computed here otherwise).
    """
    _check_inputs(images, coverage, log_prior_)
    if levels:
        if quantised is None:
            quantised = quantise(images, coverage, levels)
        return _e_step_levels(quantised, log_prior_, params, previous_posterior)
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
        log_tiny = _log_tiny(x.dtype)
        for s in range(0, v, chunk_voxels):
            sl = slice(s, s + chunk_voxels)
            xs, cs = x[..., sl], cov[..., sl]
            dens = component_log_densities(xs, params.log_tau, params.mean, params.var)  # [B,N,K,C,v]
            peak = dens.amax(dim=3, keepdim=True)  # per-class max: exact logsumexp below
            dens = dens.sub_(peak).clamp_min_(log_tiny).exp_()
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
        posterior=log_post.clamp_min_(log_tiny).exp_().reshape(b, k, *spatial),
        log_likelihood=ll,
        mass=moments[..., 0],
        sum_x=moments[..., 1],
        sum_xx=moments[..., 2],
        lower_bound=lower_bound,
    )


def _level_table(q: Quantised, params: MixtureParams) -> tuple[Tensor, Tensor]:
    """The look-up table ``[B, N, K, L+1]`` (each image's weighted class log-densities per level, 0
    at the extra level of the voxels it does not cover) and the subtype shares ``[B, N, K, C, L]``."""
    b, n = q.index.shape[:2]
    k = params.mean.shape[2]
    log_class, within = level_tables(q.values, params.log_tau, params.mean, params.var)
    table = torch.cat((log_class * q.weight[:, :, None, None], log_class.new_zeros(b, n, k, 1)), dim=-1)
    return table, within


def _voxel_pass(joint: Tensor, q: Quantised, table: Tensor, voxels: slice, previous: Tensor | None, lower_bound: bool):
    """The per-voxel work of an E-step on quantised images, for ``voxels`` of the flattened volume.

    Args:
        joint: ``[B, K, v]`` log prior of those voxels; the look-ups are added into it (in place).
        previous: ``[B, K, v]`` the previous posterior there, or ``None``.

    Returns:
        ``(posterior [B, K, v], sum of log p(I(x)), sum of the lower bound's terms (or None), sum
        of the total variation to ``previous`` (or None), level histograms [B, N, K, L+1])``, the
        sums over the voxels of Omega.
    """
    b, k, v = joint.shape
    index, om = q.index[:, :, voxels], q.omega[:, voxels]
    for j in range(index.shape[1]):  # sum_n w_n log p_nk(I_n(x)): one look-up per voxel and image
        joint += torch.gather(table[:, j], 2, index[:, j, None, :].expand(b, k, v))
    tiny = torch.finfo(joint.dtype).tiny
    post = torch.softmax(joint, dim=1).clamp_min_(tiny)  # no denormals: arithmetic on them is ~20x slower
    # log p(I(x)) = max_k joint - log max_k P_k (the softmax's largest term is 1 / its sum)
    ll = (joint.amax(dim=1).sub_(post.amax(dim=1).log_()) * om).sum(-1)
    bound = moved = None
    if previous is not None:
        moved = ((post - previous).abs().sum(1) * om).sum(-1)
        if lower_bound:  # F(q) = sum_k q_k (log pi p_k - log q_k); xlogy is 10x slower than log
            bound = ((previous * joint.sub_(previous.clamp_min(tiny).log_())).sum(1) * om).sum(-1)
    hist = torch.zeros((*table.shape[:3], table.shape[-1]), dtype=post.dtype, device=post.device)
    for j in range(index.shape[1]):  # the posterior summed over the voxels at each level
        hist[:, j].scatter_add_(2, index[:, j, None, :].expand(b, k, v), post)
    return post, ll, bound, moved, hist


def _level_moments(q: Quantised, within: Tensor, hist: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(mass, sum_x, sum_xx)`` ``[B, N, K, C]`` from the level histograms ``[B, N, K, L+1]``."""
    resp = within * (hist[..., :-1] * q.weight[:, :, None, None])[:, :, :, None, :]  # [B, N, K, C, L]
    return resp.sum(-1), (resp * q.values[:, :, None, None, :]).sum(-1), (resp * (q.values * q.values)[:, :, None, None, :]).sum(-1)


@torch.no_grad()
def _e_step_levels(q: Quantised, log_prior_: Tensor, params: MixtureParams, previous_posterior: Tensor | None) -> EStepResult:
    """:func:`e_step` on quantised intensities: per-level tables, look-ups and histograms.

    An image's coverage is 0 or its weight ``w_n``: uncovered voxels look up an extra level whose
    table entry is 0, and ``w_n`` scales the table and the histograms, so no pass over the voxels
    multiplies by the coverage.
    """
    b, _, v = q.index.shape
    k = params.mean.shape[2]
    table, within = _level_table(q, params)
    joint = log_prior_.reshape(b, k, v).to(q.values.dtype, copy=True)
    previous = None if previous_posterior is None else previous_posterior.reshape(b, k, v).to(q.values.dtype)
    post, ll, bound, _, hist = _voxel_pass(joint, q, table, slice(None), previous, lower_bound=True)
    n_omega = q.omega.sum(-1).clamp_min(1.0)
    mass, sum_x, sum_xx = _level_moments(q, within, hist)
    return EStepResult(
        posterior=post.reshape(b, k, *log_prior_.shape[2:]),
        log_likelihood=ll / n_omega,
        mass=mass,
        sum_x=sum_x,
        sum_xx=sum_xx,
        lower_bound=None if bound is None else bound / n_omega,
    )


def log_likelihood(
    images: Tensor,
    coverage: Tensor,
    log_atlas: Tensor,
    params: MixtureParams,
    config: EMConfig,
    posterior: Tensor | None = None,
    tabulated: bool = False,
) -> Tensor:
    """Per-voxel mean log-likelihood ``[B]`` over Omega, differentiable in images, coverage, atlas.

    The same quantity as :attr:`EStepResult.log_likelihood`, computed with autograd-friendly
    operations; the registration ascends it with the mixture parameters held (``tabulated``: see
    :func:`voxel_log_likelihood`).
    """
    log_norm = voxel_log_likelihood(images, coverage, log_atlas, params, config, posterior, tabulated)
    omega = (coverage.detach().amax(dim=1) > 0).flatten(1).to(log_norm.dtype)
    return log_norm.flatten(1).sum(-1) / omega.sum(-1).clamp_min(1.0)


def voxel_log_likelihood(
    images: Tensor,
    coverage: Tensor,
    log_atlas: Tensor,
    params: MixtureParams,
    config: EMConfig,
    posterior: Tensor | None = None,
    tabulated: bool = False,
) -> Tensor:
    """``log p(I(x))`` ``[B, *S]`` at every voxel (0 where no image covers x); differentiable.

    ``log sum_k pi_kx prod_{n in A(x)} sum_c tau_nkc N(I_n(x))``: :func:`log_likelihood` is its mean
    over Omega; the slice-shift search sums it over the voxels of one slice. ``tabulated`` (with
    ``config.intensity_levels``): each sequence's class log-likelihood read from a table of that
    many levels (:func:`class_log_likelihood_table`) instead of evaluating every subtype at every
    voxel; differentiable in the images, coverage and atlas, not in the parameters (what the
    registration's objective needs: it holds them).
    """
    lp = log_prior(log_atlas, params, posterior, config)
    _check_inputs(images, coverage, lp)
    b, n = images.shape[:2]
    x = images.reshape(b, n, -1)
    cov = coverage.reshape(b, n, -1).to(x.dtype)
    if tabulated and config.intensity_levels:
        log_class = lookup_class_log_likelihood(x, *class_log_likelihood_table(x, cov, params, config.intensity_levels))
    else:
        log_class = _logsumexp(component_log_densities(x, params.log_tau, params.mean, params.var), dim=3)
    log_norm = _logsumexp(lp.reshape(b, lp.shape[1], -1) + (log_class * cov[:, :, None]).sum(1), dim=1)
    omega = (cov.detach().amax(dim=1) > 0).to(x.dtype)
    return (log_norm * omega).reshape(b, *images.shape[2:])


@torch.no_grad()
def posterior_without(
    images: Tensor,
    coverage: Tensor,
    log_atlas: Tensor,
    params: MixtureParams,
    config: EMConfig,
    posterior: Tensor,
    channel: int,
    steps: int = 3,
) -> Tensor:
    """The class posterior ``[B, K, *S]`` (linear) of every sequence but ``channel``: ``steps``
    E-steps with that sequence's ``coverage`` zeroed, each with the MRF prior of the one before,
    from ``posterior`` ``[B, K, *S]``, the parameters held. ``images``, ``coverage``
    ``[B, N, *S]``; ``log_atlas`` ``[B, K, *S]`` (log space)."""
    if not 0 <= channel < images.shape[1]:
        raise ValueError(f"posterior_without: channel {channel} is not one of the {images.shape[1]} sequences")
    coverage = coverage.clone()
    coverage[:, channel] = 0
    quantised = quantise(images, coverage, config.intensity_levels) if config.intensity_levels else None
    for _ in range(steps):
        lp = log_prior(log_atlas, params, posterior, config)
        posterior = e_step(images, coverage, lp, params, levels=config.intensity_levels, chunk_voxels=config.chunk_voxels,
                           quantised=quantised).posterior
    return posterior


#: share of a sequence's intensity range tabulated beyond its lowest and highest intensity
#: (:func:`class_log_likelihood_table`): a moved slice brings in intensities its pose did not cover
TABLE_MARGIN = 0.25


def class_log_likelihood_table(x: Tensor, coverage: Tensor, params: MixtureParams, levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Every sequence's class log-likelihood ``log sum_c tau_nkc N(v; mu_nkc, s2_nkc)`` tabulated for
    :func:`lookup_class_log_likelihood`: ``(lo [B, N, 1], step [B, N, 1], table [B, N, K, levels])``
    on ``levels`` even levels from ``lo``, spanning the intensities of ``x`` ``[B, N, V]`` where
    ``coverage`` ``[B, N, V]`` > 0, widened by :data:`TABLE_MARGIN` of their range on either side.
    The parameters are read as they are (no gradient through the table)."""
    x = x.detach()
    lo, hi = covered_range(x, coverage)
    width = (hi - lo).clamp_min(1e-6)
    lo, hi = lo - TABLE_MARGIN * width, hi + TABLE_MARGIN * width
    step = (hi - lo) / (levels - 1)
    values = lo + step * torch.arange(levels, dtype=x.dtype, device=x.device)  # [B, N, L]
    p = params.detach()
    return lo, step, level_tables(values, p.log_tau, p.mean, p.var, responsibilities=False)[0]


def lookup_class_log_likelihood(x: Tensor, lo: Tensor, step: Tensor, table: Tensor) -> Tensor:
    """``[B, N, K, V]``: the class log-likelihood of intensities ``x`` ``[B, N, V]`` by linear
    interpolation in ``table`` (:func:`class_log_likelihood_table`), differentiable in ``x`` (the
    table's slope). The error is below 1e-3 nats at 4096 levels (tested); intensities beyond the
    table take its end."""
    levels = table.shape[-1]
    pos = ((x - lo) / step).clamp(0, levels - 1)
    i0 = pos.detach().floor().clamp_(max=levels - 2)
    frac = (pos - i0)[:, :, None]  # [B, N, 1, V]
    i0 = i0.long()[:, :, None].expand(-1, -1, table.shape[2], -1)  # [B, N, K, V]
    below = table.gather(3, i0)
    return below + (table.gather(3, i0 + 1) - below) * frac


class HeldVoxelLogLikelihood:
    """:func:`voxel_log_likelihood` for a series of images that differ from one call to the next in
    some sequences only (the slice-motion search moves one sequence's slices at a time): the prior
    is computed once, every sequence's class log-likelihood is kept from the last call, and a call
    recomputes only the sequences whose intensities changed since. ``coverage``, atlas, parameters
    and posterior are held. The same values as :func:`voxel_log_likelihood` (without gradients).

    With ``config.intensity_levels`` (the E-step's look-up tables) every sequence's class
    log-likelihood is tabulated once (:func:`class_log_likelihood_table`) and read by linear
    interpolation: a call then evaluates no Gaussian (the search scores some hundred poses per
    sequence; on a 192 x 192 slice a call took 4 ms, most of it ``exp``).
    """

    def __init__(self, images: Tensor, coverage: Tensor, log_atlas: Tensor, params: MixtureParams, config: EMConfig,
                 posterior: Tensor | None = None) -> None:
        with torch.no_grad():
            lp = log_prior(log_atlas, params, posterior, config)
            _check_inputs(images, coverage, lp)
            b, n = images.shape[:2]
            self.params, self.shape = params, images.shape
            self.images = images.detach().clone()
            self.cov = coverage.reshape(b, n, -1).to(images.dtype)
            self.log_prior = lp.reshape(b, lp.shape[1], -1)
            self.table = (
                class_log_likelihood_table(images.reshape(b, n, -1), self.cov, params, config.intensity_levels)
                if config.intensity_levels else None
            )
            self.log_class = self._log_class(images.reshape(b, n, -1), slice(None)) * self.cov[:, :, None]  # [B, N, K, V]
            self.omega = (self.cov.amax(dim=1) > 0).to(images.dtype)

    def _log_class(self, x: Tensor, seqs: slice | list[int]) -> Tensor:
        """``[B, n, K, V]`` class log-likelihood of the sequences ``seqs`` at their intensities ``x`` ``[B, n, V]``."""
        if self.table is None:
            p = self.params
            return _logsumexp(component_log_densities(x, p.log_tau[:, seqs], p.mean[:, seqs], p.var[:, seqs]), dim=3)
        return lookup_class_log_likelihood(x, *(t[:, seqs] for t in self.table))

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """``log p(I(x))`` ``[B, *S]`` of ``images`` (the held shape)."""
        if images.shape != self.shape:
            raise ValueError(f"HeldVoxelLogLikelihood: images of shape {tuple(images.shape)}, held {tuple(self.shape)}")
        b, n = images.shape[:2]
        changed = [i for i in range(n) if not torch.equal(images[:, i], self.images[:, i])]
        if changed:
            x = images.reshape(b, n, -1)[:, changed]
            self.log_class[:, changed] = self._log_class(x, changed) * self.cov[:, changed, None]
            self.images[:, changed] = images[:, changed]
        log_norm = _logsumexp(self.log_prior + self.log_class.sum(1), dim=1)
        return (log_norm * self.omega).reshape(b, *images.shape[2:])


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
    log_tau, mean, var = _subtype_update(estep, params, config)
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


def _subtype_update(estep: EStepResult, params: MixtureParams, config: EMConfig) -> tuple[Tensor, Tensor, Tensor]:
    """The M-step of the subtypes: ``(log_tau, mean, var)`` from the E-step's moments."""
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
    return torch.where(valid, log_tau, -torch.inf), mean, var


def em_step(
    images: Tensor,
    coverage: Tensor,
    log_atlas: Tensor,
    params: MixtureParams,
    config: EMConfig,
    posterior: Tensor | None = None,
    *,
    lower_bound: bool = True,
    quantised: Quantised | None = None,
) -> tuple[MixtureParams, EStepResult]:
    """One EM iteration. ``posterior`` (``[B, K, *S]``, linear) feeds the MRF when beta > 0 and,
    with ``lower_bound``, the EM lower bound (:attr:`EStepResult.lower_bound`, a diagnostic).
    ``quantised``: ``quantise(images, coverage, config.intensity_levels)``, kept by a caller that
    runs many iterations on the same images.

    With look-up tables (``config.intensity_levels`` > 0) and a fixed or no MRF strength, the
    whole iteration (prior, MRF, E-step, moments, the sums of the pi update) runs in one pass over
    the voxels, in slabs of about ``config.chunk_voxels`` voxels that the CPU threads take in turn
    (:func:`_fused_iteration`); otherwise prior, E-step and M-step run one after the other.

    Returns the updated parameters and the E-step of the *incoming* parameters (its
    ``log_likelihood`` is that of ``params``).
    """
    if config.intensity_levels and not config.estimate_beta:
        _check_inputs(images, coverage, log_atlas)
        if quantised is None:
            quantised = quantise(images, coverage, config.intensity_levels)
        return _fused_iteration(quantised, log_atlas, params, config, posterior, lower_bound)
    lp = log_prior(log_atlas, params, posterior, config)
    estep = e_step(
        images, coverage, lp, params, levels=config.intensity_levels, chunk_voxels=config.chunk_voxels,
        previous_posterior=posterior if lower_bound else None, quantised=quantised,
    )
    if posterior is not None:
        b = images.shape[0]
        omega = (coverage.reshape(b, images.shape[1], -1).amax(dim=1) > 0).to(estep.posterior.dtype)
        moved = (estep.posterior - posterior).abs().sum(1).reshape(b, -1)
        estep = replace(estep, posterior_change=(moved * omega).sum(-1) / (2 * omega.sum(-1).clamp_min(1.0)))
    return m_step(images, coverage, log_atlas, estep, params, config), estep


_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (process id, workers, pool)


def _single_threaded() -> None:
    """The pool's thread initializer: this thread's torch operations run on one thread. ATen gives
    a thread its OpenMP thread count from the process-wide setting at the thread's first parallel
    operation, so that first read happens here, before the count is set to 1; otherwise the
    caller's count, restored after the pool starts, reached the workers at their first operation
    and each ran its own team of threads (measured: 2 threads per worker on 2 cores, and every
    small operation of the process about 10x slower from then on)."""
    torch.get_num_threads()
    torch.set_num_threads(1)


def _pool(workers: int) -> ThreadPoolExecutor:
    """This process's pool of ``workers`` threads whose torch operations run single-threaded (made
    again when the count changes, or in a forked child, which inherits no threads)."""
    global _POOL
    if _POOL is None or _POOL[:2] != (os.getpid(), workers):
        threads = torch.get_num_threads()
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mvmm-em", initializer=_single_threaded)
        barrier = threading.Barrier(workers)
        list(pool.map(lambda _: barrier.wait(), range(workers)))  # start every worker (and its initializer) now
        torch.set_num_threads(threads)  # the initializer also set the default of threads made later: restore it
        _POOL = (os.getpid(), workers, pool)
    return _POOL[2]


class _ThreadChoice:
    """Whether the slabs of an iteration run on the whole pool or on one thread, chosen by timing
    both on this machine as it is now.

    On a loaded CPU the pool can lose badly to one thread (measured in ``benchmarks/em_speed.py``
    on 2 cores with 2 busy processes: the pool 2.6x the time of one thread; quiet, one thread 1.7x
    the pool's): a worker that the OS preempts while it holds Python's lock stalls the others. Per
    problem size (its voxels, to a power of two) the choice keeps a running mean of the seconds
    each way took and runs the faster; it tries the other way again after ``interval`` calls (4,
    doubling up to 64 while the choice holds, back to 4 when it changes), and at the next call when
    the faster way took more than 1.5x its running mean (the load changed); a try's time replaces
    that way's stale mean. Both ways run the same single-threaded operations and sum the slabs in
    the same order: the results are identical.
    """

    RATE, FIRST, LAST, JUMP = 0.5, 4, 64, 1.5

    def __init__(self) -> None:
        self.state: dict[tuple, dict] = {}
        self.lock = threading.Lock()

    def pick(self, key: tuple) -> bool:
        """True: the whole pool; False: one thread."""
        with self.lock:
            st = self.state.setdefault(key, {"mean": {}, "calls": 0, "interval": self.FIRST, "explore": False})
            mean = st["mean"]
            if True not in mean or False not in mean:
                return True not in mean  # each way timed once first
            best = mean[True] <= mean[False]
            st["calls"] += 1
            st["trying"] = st["explore"] or st["calls"] >= st["interval"]
            if st["trying"]:
                st["calls"], st["explore"] = 0, False
                return not best
            return best

    def record(self, key: tuple, pooled: bool, seconds: float) -> None:
        with self.lock:
            st = self.state[key]
            mean = st["mean"]
            before = mean[True] <= mean[False] if len(mean) == 2 else None
            jump = pooled == before and seconds > self.JUMP * mean[pooled]
            trying = st.pop("trying", False)
            # the way tried after a while: its earlier times are stale, this one replaces them
            mean[pooled] = seconds if trying or pooled not in mean else (1 - self.RATE) * mean[pooled] + self.RATE * seconds
            after = mean[True] <= mean[False] if len(mean) == 2 else None
            if trying:  # wait longer before the next try if the choice held
                st["interval"] = min(2 * st["interval"], self.LAST) if after == before else self.FIRST
            elif before is not None and after != before:  # the running means changed places
                st["interval"], st["calls"] = self.FIRST, 0
            elif jump:
                st["explore"] = True  # the faster way slowed down but is still ahead: try the other at the next call


_THREAD_CHOICE = _ThreadChoice()


def _fused_iteration(
    q: Quantised, log_atlas: Tensor, params: MixtureParams, config: EMConfig, posterior: Tensor | None, lower_bound: bool
) -> tuple[MixtureParams, EStepResult]:
    """One EM iteration on quantised images in a single pass over the voxels.

    The volume is cut into slabs along its first spatial axis; each slab's prior (atlas, pi and the
    MRF of the previous posterior, read one row beyond the slab), look-ups, posterior, histograms
    and partial sums are computed while it is in cache (:func:`_fused_pass`). On a CPU with more
    than one thread the iteration runs on a pool of ``torch.get_num_threads()`` threads, each
    running its operations single-threaded: one thread runs the iteration and shares the slabs
    with the others (:func:`_share_slabs`; a thread that the OS preempts on a loaded machine delays
    only its own slab instead of every operation's barrier), or takes them all itself where that
    is faster (a loaded machine; :class:`_ThreadChoice`). Every operation is single-threaded either
    way, so the result is the same, and the same as a one-thread process's. On other devices the
    volume is one slab.
    """
    threads = torch.get_num_threads() if log_atlas.device.type == "cpu" else 1
    if threads == 1:
        return _fused_pass(q, log_atlas, params, config, posterior, lower_bound, None)
    pool = _pool(threads)
    key = (threads, q.index.shape[0], params.mean.shape[2], q.index.shape[-1].bit_length())
    pooled = _THREAD_CHOICE.pick(key)
    t = time.perf_counter()
    out = pool.submit(_fused_pass, q, log_atlas, params, config, posterior, lower_bound, pool if pooled else None, threads - 1).result()
    _THREAD_CHOICE.record(key, pooled, time.perf_counter() - t)
    return out


def _share_slabs(slab, bounds: list[tuple[int, int]], pool: ThreadPoolExecutor, helpers: int) -> list:
    """``slab(s, e)`` of every bound, in their order, computed by this thread and up to ``helpers``
    threads of ``pool`` taking the next bound in turn. This thread never waits for a helper that
    has not started: one that the pool could not start (its threads busy, e.g. with iterations of
    other callers) is cancelled, so calls from many threads at once cannot deadlock the pool."""
    results: list = [None] * len(bounds)
    order = iter(range(len(bounds)))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                i = next(order, None)
            if i is None:
                return
            results[i] = slab(*bounds[i])

    started = [pool.submit(work) for _ in range(min(helpers, len(bounds) - 1))]
    try:
        work()
    finally:
        for f in started:
            f.cancel()  # not started yet: nothing left for it
        for f in started:
            if not f.cancelled():
                f.result()  # a running helper finishes its slab (and raises what it raised)
    return results


@torch.no_grad()
def _fused_pass(
    q: Quantised, log_atlas: Tensor, params: MixtureParams, config: EMConfig, posterior: Tensor | None, lower_bound: bool,
    slab_pool: ThreadPoolExecutor | None, helpers: int = 0,
) -> tuple[MixtureParams, EStepResult]:
    """:func:`_fused_iteration`'s work; the slabs are shared with ``helpers`` threads of
    ``slab_pool`` (None: this thread takes them one after the other)."""
    b, _, v = q.index.shape
    k = params.mean.shape[2]
    spatial = log_atlas.shape[2:]
    rows = spatial[0]
    per_row = v // rows
    dtype = q.values.dtype
    table, within = _level_table(q, params)
    beta = params.mrf_beta(config) if posterior is not None else 0.0
    mrf = torch.is_tensor(beta) or beta > 0
    log_pi = params.log_pi[:, :, None]
    new_post = torch.empty((b, k, *spatial), dtype=dtype, device=log_atlas.device)
    step = max(1, config.chunk_voxels // max(per_row * b, 1)) if log_atlas.device.type == "cpu" else rows

    def slab(s: int, e: int):
        vs = slice(s * per_row, e * per_row)
        om = q.omega[:, vs]
        base = log_atlas[:, :, s:e].reshape(b, k, -1).to(dtype) + log_pi
        prior_mass = (torch.softmax(base, dim=1) * om[:, None]).sum(-1) if config.update_pi else None
        if mrf:  # the neighbours of the slab's first and last rows lie one row beyond it
            lo, hi = max(s - 1, 0), min(e + 1, rows)
            field = neighbour_field(posterior[:, :, lo:hi].to(dtype), config.mrf_neighbourhood)
            field = field[:, :, s - lo:s - lo + e - s].reshape(b, k, -1)
            base = base.add_(field.mul_(beta.to(dtype).reshape(b, 1, 1)) if torch.is_tensor(beta) else field.mul_(beta))
        previous = None if posterior is None else posterior[:, :, s:e].reshape(b, k, -1).to(dtype)
        post, ll, bound, moved, hist = _voxel_pass(torch.log_softmax(base, dim=1), q, table, vs, previous, lower_bound)
        new_post[:, :, s:e] = post.reshape(b, k, e - s, *spatial[1:])
        post_mass = (post * om[:, None]).sum(-1) if config.update_pi else None
        return hist, ll, bound, prior_mass, post_mass, moved

    bounds = [(s, min(s + step, rows)) for s in range(0, rows, step)]
    if slab_pool is not None and len(bounds) > 1:
        parts = _share_slabs(slab, bounds, slab_pool, helpers)
    else:
        parts = [slab(s, e) for s, e in bounds]
    hist, ll, bound, prior_mass, post_mass, moved = (
        None if parts[0][i] is None else torch.stack([p[i] for p in parts]).sum(0) for i in range(6)
    )
    n_omega = q.omega.sum(-1).clamp_min(1.0)
    mass, sum_x, sum_xx = _level_moments(q, within, hist)
    est = EStepResult(
        posterior=new_post,
        log_likelihood=ll / n_omega,
        mass=mass,
        sum_x=sum_x,
        sum_xx=sum_xx,
        lower_bound=None if bound is None else bound / n_omega,
        posterior_change=None if moved is None else moved / (2 * n_omega),
    )
    log_tau, mean, var = _subtype_update(est, params, config)
    new_log_pi = log_pi_from_sums(post_mass, prior_mass, params.log_pi, config.min_proportion) if config.update_pi else params.log_pi
    return MixtureParams(log_pi=new_log_pi, log_tau=log_tau, mean=mean, var=var, beta=params.beta), est


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

    A batch of B subjects (e.g. :func:`~mvmm_monai.mixture.batch.pad_subjects`) is fitted at once,
    and each subject stops on its own: once its change falls below ``tol`` its parameters and
    posterior are held while the others go on, so every subject gets the fit it would get alone.

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
    quantised = quantise(images, coverage, config.intensity_levels) if config.intensity_levels else None
    b = images.shape[0]
    trace: list[float] = []
    posterior = None
    previous: list[float] | None = None
    active = [True] * b
    iterations = [0] * b
    converged = [False] * b
    it = 0
    for it in range(1, max_iter + 1):
        new_params, estep = em_step(images, coverage, log_atlas, params, config.at_iteration(it - 1), posterior, lower_bound=False,
                                    quantised=quantised)
        lls = estep.log_likelihood.tolist()  # the one host synchronisation per iteration
        if not all(math.isfinite(v) for v, a in zip(lls, active) if a):
            raise FloatingPointError(f"fit_em: non-finite log-likelihood at iteration {it}")
        if all(active):
            params, posterior = new_params, estep.posterior
        else:  # subjects that stopped keep their fit
            keep = torch.tensor(active, device=images.device)
            params = _where_subjects(keep, new_params, params)
            posterior = torch.where(keep.reshape(-1, *[1] * (posterior.ndim - 1)), estep.posterior, posterior)
        trace.append(sum(lls) / b)
        for i in range(b):
            if not active[i]:
                continue
            iterations[i] = it
            if previous is not None and relative_change(previous[i], lls[i]) < tol:
                active[i], converged[i] = False, True
        previous = lls
        if not any(active):
            break
    if not all(converged):
        warnings.warn(
            f"EM did not converge in {max_iter} iterations for {b - sum(converged)} of {b} subjects "
            f"(last relative change of the batch mean "
            f"{relative_change(trace[-2], trace[-1]) if len(trace) > 1 else float('nan'):.2e}, tol={tol}); "
            "raise max_iter or tol, or check the atlas placement.",
            ConvergenceWarning,
            stacklevel=2,
        )
    final = e_step(images, coverage, log_prior(log_atlas, params, posterior, config), params, levels=config.intensity_levels,
                   chunk_voxels=config.chunk_voxels, quantised=quantised)
    return EMFitResult(params, final.log_posterior, trace, it, all(converged),
                       torch.tensor(iterations), torch.tensor(converged))


def _where_subjects(keep: Tensor, new: MixtureParams, old: MixtureParams) -> MixtureParams:
    """``new`` for the subjects in ``keep`` (``[B]`` bool), ``old`` for the others."""
    def pick(a: Tensor | None, b: Tensor | None) -> Tensor | None:
        return None if a is None else torch.where(keep.reshape(-1, *[1] * (a.ndim - 1)), a, b)

    return MixtureParams(log_pi=pick(new.log_pi, old.log_pi), log_tau=pick(new.log_tau, old.log_tau),
                         mean=pick(new.mean, old.mean), var=pick(new.var, old.var), beta=pick(new.beta, old.beta))
