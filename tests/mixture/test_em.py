"""Outcome tests of the EM engine against known truth."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from mvmm_monai.mixture import (
    EMConfig,
    MixtureParams,
    atlas_log_prior,
    e_step,
    em_step,
    fit_em,
    initialise_from_atlas,
    log_atlas_from_prob,
    log_likelihood,
    m_step,
    mrf_log_potential,
    posterior_without,
    update_log_pi,
)
from tests.conftest import smooth_atlas

DTYPE = torch.float64


def sample_mixture(spatial, counts, seed=0):
    """Labels from the atlas, subtypes from tau, intensities from well-separated Gaussians."""
    g = torch.Generator().manual_seed(seed)
    n, k = counts.shape
    atlas = smooth_atlas(spatial, k, g)
    labels = torch.multinomial(atlas[0].reshape(k, -1).T, 1, generator=g)[:, 0]
    c = int(counts.max())
    valid = torch.arange(c)[None, None] < counts[..., None]
    # class means on a grid per image, subtypes well apart, small variances
    base = torch.linspace(0.1, 0.9, k, dtype=DTYPE)
    perm = [torch.randperm(k, generator=g) for _ in range(n)]
    mean = torch.zeros(n, k, c, dtype=DTYPE)
    var = torch.full((n, k, c), 1.0, dtype=DTYPE)
    tau = torch.zeros(n, k, c, dtype=DTYPE)
    for i, kk in itertools.product(range(n), range(k)):
        m = int(counts[i, kk])
        mean[i, kk, :m] = base[perm[i][kk]] + torch.linspace(-0.06, 0.06, m, dtype=DTYPE) * (m > 1)
        var[i, kk, :m] = (0.012 + 0.004 * torch.rand(m, generator=g, dtype=DTYPE)) ** 2
        tau[i, kk, :m] = torch.full((m,), 1.0 / m, dtype=DTYPE) + 0.2 * torch.linspace(-1, 1, m, dtype=DTYPE) / m
    tau = torch.where(valid, tau, 0.0)
    tau = tau / tau.sum(-1, keepdim=True)
    v = labels.numel()
    images = torch.empty(n, v, dtype=DTYPE)
    for i in range(n):
        sub = torch.multinomial(tau[i, labels], 1, generator=g)[:, 0]
        mu = mean[i, labels, sub]
        sd = var[i, labels, sub].sqrt()
        images[i] = mu + sd * torch.randn(v, generator=g, dtype=DTYPE)
    truth = MixtureParams(
        log_pi=torch.full((1, k), -torch.log(torch.tensor(float(k), dtype=DTYPE))),
        log_tau=torch.where(valid, torch.log(tau), -torch.inf)[None],
        mean=mean[None],
        var=var[None],
    )
    return images.reshape(1, n, *spatial), atlas, labels.reshape(spatial), truth


def dice(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    return torch.stack([2 * ((a == c) & (b == c)).sum() / ((a == c).sum() + (b == c).sum()) for c in range(1, k)])


@pytest.mark.parametrize("spatial", [(128, 128), (40, 40, 10)])
def test_recovers_known_mixture_and_bayes_dice(spatial):
    counts = torch.tensor([[3, 2, 1, 2], [2, 1, 2, 1]])
    images, atlas, labels, truth = sample_mixture(spatial, counts)
    coverage = torch.ones_like(images)
    log_atlas = log_atlas_from_prob(atlas, 1e-6)
    fit = fit_em(images, coverage, log_atlas, counts, EMConfig(min_variance=1e-6), max_iter=300, tol=1e-9)
    assert fit.converged
    valid = truth.valid[0]
    for i, kk in itertools.product(range(2), range(4)):
        m = int(counts[i, kk])
        got_mu, order = torch.sort(fit.params.mean[0, i, kk, :m])
        got_var = fit.params.var[0, i, kk, :m][order]
        want_mu, order_t = torch.sort(truth.mean[0, i, kk, :m])
        want_var = truth.var[0, i, kk, :m][order_t]
        assert torch.allclose(got_mu, want_mu, atol=6e-3), (i, kk, got_mu, want_mu)
        assert torch.allclose(got_var.sqrt(), want_var.sqrt(), rtol=0.15), (i, kk, got_var, want_var)
    assert torch.equal(fit.params.valid[0], valid)
    bayes = e_step(images, coverage, atlas_log_prior(log_atlas, truth.log_pi), truth)
    bayes_dice = dice(bayes.log_posterior[0].argmax(0), labels, 4).mean()
    fit_dice = dice(fit.log_posterior[0].argmax(0), labels, 4).mean()
    assert fit_dice >= bayes_dice - 0.01, (fit_dice, bayes_dice)


@pytest.mark.parametrize("update_pi", [True, False])
def test_em_never_decreases_log_likelihood(update_pi):
    # a misspecified model (one subtype where the data have three) on correlated images
    counts = torch.tensor([[1, 1, 1, 1], [2, 1, 1, 1], [1, 2, 2, 1]])
    images, atlas, _, _ = sample_mixture((48, 48, 6), torch.tensor([[3, 2, 2, 2]] * 3), seed=3)
    coverage = torch.ones_like(images)
    coverage[:, 2, :, :, :2] = 0  # hetero-coverage too
    log_atlas = log_atlas_from_prob(atlas.roll(5, dims=2), 1e-4)  # a misplaced atlas
    params = initialise_from_atlas(images, coverage, log_atlas.exp(), counts)
    cfg = EMConfig(update_pi=update_pi)
    trace, posterior = [], None
    for _ in range(40):
        params, est = em_step(images, coverage, log_atlas, params, cfg, posterior)
        if posterior is not None:  # previous ll <= F(q_prev, params) <= current ll
            assert trace[-1] - 1e-9 <= float(est.lower_bound) <= float(est.log_likelihood) + 1e-9
        posterior = est.posterior
        trace.append(float(est.log_likelihood))
    diffs = torch.diff(torch.tensor(trace))
    assert (diffs > -1e-10).all(), diffs.min()
    assert trace[-1] > trace[0] + 0.05


def test_coverage_excludes_uncovered_voxels():
    counts = torch.tensor([[2, 2, 1, 1], [2, 1, 2, 1]])
    images, atlas, _, _ = sample_mixture((64, 64), counts, seed=1)
    coverage = torch.ones_like(images)
    coverage[:, 1, :, 40:] = 0
    log_atlas = log_atlas_from_prob(atlas, 1e-4)
    a = images.clone()
    b = images.clone()
    a[:, 1, :, 40:] = 0.0
    b[:, 1, :, 40:] = 1e3 * torch.rand_like(b[:, 1, :, 40:])
    with pytest.warns(UserWarning, match="did not converge"):
        fa = fit_em(a, coverage, log_atlas, counts, max_iter=30, tol=0)
    with pytest.warns(UserWarning, match="did not converge"):
        fb = fit_em(b, coverage, log_atlas, counts, max_iter=30, tol=0)
    for key, val in fa.params.as_dict().items():
        assert torch.allclose(val, fb.params.as_dict()[key], equal_nan=False), key
    assert torch.allclose(fa.log_posterior, fb.log_posterior)
    # where only image 0 covers, the posterior is the single-image posterior of image 0
    single = e_step(
        images[:, :1], coverage[:, :1], atlas_log_prior(log_atlas, fa.params.log_pi), MixtureParams(
            fa.params.log_pi, fa.params.log_tau[:, :1], fa.params.mean[:, :1], fa.params.var[:, :1]
        )
    )
    multi = e_step(a, coverage, atlas_log_prior(log_atlas, fa.params.log_pi), fa.params)
    assert torch.allclose(single.log_posterior[..., 40:], multi.log_posterior[..., 40:])
    assert not torch.allclose(single.log_posterior[..., :40], multi.log_posterior[..., :40])
    # image 1's statistics sum only over its own coverage
    assert torch.isclose(multi.mass[0, 1].sum(), coverage[0, 1].sum())


def test_empty_class_and_subtypes_stay_finite():
    counts = torch.tensor([[3, 2, 2, 3]])
    images, atlas, _, _ = sample_mixture((32, 32), torch.tensor([[2, 1, 1, 1]]), seed=2)
    atlas = atlas.clone()
    atlas[:, 3] = 0.0  # the RV channel is empty
    atlas = atlas / atlas.sum(1, keepdim=True)
    images[..., :, :] = images.clamp(0.2, 0.3)  # flat data: subtypes starve
    fit = fit_em(images, torch.ones_like(images), log_atlas_from_prob(atlas, 1e-8), counts, max_iter=100, tol=1e-5)
    for key, val in fit.params.as_dict().items():
        assert not torch.isnan(val).any(), key
    assert torch.isfinite(fit.log_posterior).all()
    assert fit.params.var.min() >= EMConfig().min_variance
    assert fit.params.log_pi[0, 3].exp() >= EMConfig().min_proportion * 0.99


def test_pi_update_is_a_fixed_point_of_the_truth_and_increases_the_objective():
    g = torch.Generator().manual_seed(0)
    atlas = smooth_atlas((40, 40), 4, g).reshape(1, 4, -1)
    log_atlas = log_atlas_from_prob(atlas, 1e-6)
    true_log_pi = torch.log(torch.tensor([[0.4, 0.1, 0.3, 0.2]], dtype=DTYPE))
    post = atlas_log_prior(log_atlas, true_log_pi).exp()
    mask = torch.ones(1, post.shape[-1], dtype=DTYPE)
    start = torch.log(torch.full((1, 4), 0.25, dtype=DTYPE))
    objective = lambda lp: (post * atlas_log_prior(log_atlas, lp)).sum()  # noqa: E731
    new = update_log_pi(post, log_atlas, start, mask)
    assert objective(new) > objective(start)
    cur = start
    for _ in range(500):
        cur = update_log_pi(post, log_atlas, cur, mask)
    assert torch.allclose(cur.exp(), true_log_pi.exp(), atol=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_mrf_potential_counts_neighbours(ndim):
    spatial = (5,) * ndim
    post = torch.zeros(1, 2, *spatial, dtype=DTYPE)
    post[:, 0] = 1.0
    centre = (0, slice(None)) + (2,) * ndim
    post[centre] = torch.tensor([0.0, 1.0], dtype=DTYPE)
    pot = mrf_log_potential(post, beta=0.5, neighbourhood="inplane")
    # the centre voxel sees 4 in-plane neighbours of class 0
    assert pot[(0, 0) + (2,) * ndim] == pytest.approx(0.5 * 4)
    assert pot[(0, 1) + (2,) * ndim] == 0.0
    if ndim == 3:
        full = mrf_log_potential(post, beta=1.0, neighbourhood="full")
        assert full[(0, 0, 2, 2, 2)] == pytest.approx(6.0)


def test_mrf_removes_isolated_errors():
    counts = torch.tensor([[1, 1, 1, 1]])
    g = torch.Generator().manual_seed(4)
    atlas = smooth_atlas((64, 64), 4, g)
    labels = atlas[0].argmax(0)
    means = torch.tensor([0.1, 0.4, 0.7, 1.0], dtype=DTYPE)
    images = (means[labels] + 0.16 * torch.randn(labels.shape, generator=g, dtype=DTYPE))[None, None]
    flat = torch.full_like(atlas, 0.25)
    d = {}
    for beta in (0.0, 1.0):
        fit = fit_em(images, torch.ones_like(images), log_atlas_from_prob(flat, 1e-3), counts,
                     EMConfig(beta=beta, update_pi=False), max_iter=300, tol=1e-5,
                     params=initialise_from_atlas(images, torch.ones_like(images), atlas, counts))
        d[beta] = float(dice(fit.log_posterior[0].argmax(0), labels, 4).mean())
    assert d[1.0] > d[0.0] + 0.05, d


def test_chunking_does_not_change_the_e_step_and_matches_the_differentiable_likelihood():
    counts = torch.tensor([[3, 2, 2, 2], [2, 2, 1, 1]])
    images, atlas, _, _ = sample_mixture((30, 20, 3), counts, seed=5)
    coverage = torch.ones_like(images)
    coverage[:, 1, ..., 0] = 0
    log_atlas = log_atlas_from_prob(atlas, 1e-4)
    params = initialise_from_atlas(images, coverage, atlas, counts)
    lp = atlas_log_prior(log_atlas, params.log_pi)
    a = e_step(images, coverage, lp, params, levels=0, chunk_voxels=17)
    b = e_step(images, coverage, lp, params, levels=0, chunk_voxels=10**6)
    for f in ("log_posterior", "log_likelihood", "mass", "sum_x", "sum_xx"):
        assert torch.allclose(getattr(a, f), getattr(b, f)), f
    ll = log_likelihood(images, coverage, log_atlas, params, EMConfig())
    assert torch.allclose(ll, a.log_likelihood)


def test_a_sequence_weight_as_soft_coverage_tempers_its_likelihood():
    """Coverage w for image n gives ``P_k ~ pi_k p_0k(I_0) p_1k(I_1)^w`` (the fit's
    ``model.sequence_weights``), while each image's subtype moments stay its own: a weighted
    M-step gives the same means and variances as weights 1 do for the same posterior."""
    from mvmm_monai.mixture import component_log_densities, voxel_log_likelihood

    counts = torch.tensor([[2, 2, 1, 1], [2, 1, 2, 1]])
    images, atlas, _, _ = sample_mixture((20, 20, 2), counts, seed=3)
    log_atlas = log_atlas_from_prob(atlas, 1e-4)
    params = initialise_from_atlas(images, torch.ones_like(images), atlas, counts)
    lp = atlas_log_prior(log_atlas, params.log_pi)
    w = 0.3
    cov = torch.ones_like(images)
    cov[:, 1] = w
    est = e_step(images, cov, lp, params, levels=0)
    log_class = torch.logsumexp(component_log_densities(images.reshape(1, 2, -1), params.log_tau, params.mean, params.var), dim=3)
    joint = lp.reshape(1, 4, -1) + log_class[:, 0] + w * log_class[:, 1]
    expected = torch.log_softmax(joint, dim=1).reshape(est.log_posterior.shape)
    assert torch.allclose(est.log_posterior, expected, atol=1e-10)
    ll = voxel_log_likelihood(images, cov, log_atlas, params, EMConfig())
    assert torch.allclose(ll.flatten(), torch.logsumexp(joint, dim=1).flatten(), atol=1e-10)
    # every statistic of image 1 carries the factor w (its responsibilities sum to w per voxel), so
    # its means and variances, ratios of these sums, are still image 1's own posterior-weighted moments
    v = images[0, 0].numel()
    assert float(est.mass[0, 0].sum()) == pytest.approx(v)
    assert float(est.mass[0, 1].sum()) == pytest.approx(w * v)
    with pytest.raises(ValueError, match="sequence_weights must be 2 positive numbers"):
        from mvmm_monai.pipeline.module import MvMMFit
        from mvmm_monai.registration import Registration
        from tests.registration.test_registration import tiny_subject

        subject, tiny_atlas = tiny_subject(dtype=torch.float32)
        MvMMFit(subject, Registration(subject, tiny_atlas), torch.ones(2, 4, dtype=torch.long),
                sequence_weights=torch.tensor([1.0, 0.0]))


def test_bad_shapes_raise_clear_errors():
    images = torch.zeros(1, 2, 8, 8)
    with pytest.raises(ValueError, match="coverage shape"):
        e_step(images, torch.ones(1, 1, 8, 8), torch.zeros(1, 4, 8, 8), None)
    with pytest.raises(ValueError, match="counts must be"):
        initialise_from_atlas(images, torch.ones_like(images), torch.full((1, 4, 8, 8), 0.25), torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="min_variance"):
        EMConfig(min_variance=0)


def _integer_images(counts, levels, seed):
    """Synthetic images rounded onto ``levels`` equally spaced values spanning their range, so
    quantising them onto that many levels changes nothing."""
    images, atlas, _, _ = sample_mixture((24, 20, 3), counts, seed=seed)
    lo = images.amin(dim=(-3, -2, -1), keepdim=True)
    hi = images.amax(dim=(-3, -2, -1), keepdim=True)
    step = (hi - lo) / (levels - 1)
    return lo + step * torch.round((images - lo) / step), atlas


@pytest.mark.parametrize("weight", [1.0, 0.4])
def test_look_up_tables_give_the_exact_e_step_of_quantised_images(weight):
    """With images that already sit on the level grid, the look-up-table E-step (posterior,
    log-likelihood, moments, lower bound) equals the per-voxel reference, with partial coverage and
    a sequence weight."""
    counts = torch.tensor([[3, 2, 2, 2], [2, 2, 1, 1]])
    images, atlas = _integer_images(counts, 64, seed=11)
    coverage = torch.ones_like(images)
    coverage[:, 1] = weight
    coverage[:, 1, ..., 0] = 0  # image 1 misses a slice
    log_atlas = log_atlas_from_prob(atlas, 1e-4)
    params = initialise_from_atlas(images, coverage, atlas, counts)
    lp = atlas_log_prior(log_atlas, params.log_pi)
    q = torch.softmax(torch.randn(atlas.shape, dtype=atlas.dtype, generator=torch.Generator().manual_seed(0)), dim=1)
    exact = e_step(images, coverage, lp, params, levels=0, previous_posterior=q)
    tables = e_step(images, coverage, lp, params, levels=64, previous_posterior=q)
    for f in ("posterior", "log_likelihood", "mass", "sum_x", "sum_xx", "lower_bound"):
        assert torch.allclose(getattr(tables, f), getattr(exact, f), rtol=1e-9, atol=1e-9), f


@pytest.mark.filterwarnings("ignore::mvmm_monai.mixture.em.ConvergenceWarning")  # 30 iterations on purpose
def test_look_up_tables_on_continuous_intensities_match_the_reference_closely():
    """4096 levels on continuous intensities: the fitted means within one quantisation step (about
    2.5e-4 here) and the same labels at > 99.9 % of the voxels after a whole EM fit. (The three
    background subtypes overlap and still trade voxels after 30 iterations: their means move by
    1e-4-2e-4 with the float32 summation order of the CPU, so a tighter bound tests the machine.)"""
    counts = torch.tensor([[3, 2, 2, 2], [2, 2, 1, 1], [2, 1, 2, 1]])
    images, atlas, labels, _ = sample_mixture((40, 36, 4), counts, seed=2)
    images, atlas = images.float(), atlas.float()
    log_atlas = log_atlas_from_prob(atlas, 1e-4)
    fits = {lv: fit_em(images, torch.ones_like(images), log_atlas, counts, EMConfig(beta=0.5, intensity_levels=lv), max_iter=30, tol=0)
            for lv in (0, 4096)}
    ok = fits[0].params.valid
    step = float((images.amax(dim=(2, 3, 4)) - images.amin(dim=(2, 3, 4))).max()) / 4095
    assert float((fits[0].params.mean - fits[4096].params.mean)[ok].abs().max()) < step
    agree = (fits[0].log_posterior.argmax(1) == fits[4096].log_posterior.argmax(1)).float().mean()
    assert float(agree) > 0.999


def test_intensity_levels_is_checked():
    with pytest.raises(ValueError, match="intensity_levels"):
        EMConfig(intensity_levels=1)


@pytest.mark.parametrize("spatial", [(26, 22, 3), (30, 28)])
def test_the_fused_iteration_equals_prior_e_step_and_m_step_in_turn(spatial):
    """The one-pass iteration (slabs, on a pool of threads) gives the parameters, posterior,
    log-likelihood and lower bound of log_prior + e_step + m_step, for two subjects at once, with
    the MRF on and pi updated, whatever the slab size."""
    from mvmm_monai.mixture.em import log_prior
    from mvmm_monai.mixture.gaussian import quantise

    counts = torch.tensor([[3, 2, 2, 2], [2, 2, 1, 1]])
    pairs = [sample_mixture(spatial, counts, seed=s) for s in (4, 5)]
    images = torch.cat([p[0] for p in pairs]).float()
    atlas = torch.cat([p[1] for p in pairs]).float()
    coverage = torch.ones_like(images)
    coverage[:, 1] = 0.5
    coverage[1, 1, :3] = 0  # the second subject's image 1 misses some rows
    log_atlas = log_atlas_from_prob(atlas, 1e-4)
    params = initialise_from_atlas(images, coverage, atlas, counts)
    posterior = torch.softmax(log_atlas + 0.3 * torch.randn(log_atlas.shape, generator=torch.Generator().manual_seed(1)), dim=1)
    config = EMConfig(beta=0.7, update_pi=True)
    q = quantise(images, coverage, config.intensity_levels)
    est = e_step(images, coverage, log_prior(log_atlas, params, posterior, config), params, quantised=q, previous_posterior=posterior)
    expected = m_step(images, coverage, log_atlas, est, params, config)
    threads = torch.get_num_threads()
    try:
        for n_threads, chunk in ((1, 10**6), (1, 50), (2, 50), (2, 200)):
            torch.set_num_threads(n_threads)
            got, fused = em_step(images, coverage, log_atlas, params, replace(config, chunk_voxels=chunk), posterior)
            for f in ("posterior", "log_likelihood", "lower_bound", "mass", "sum_x", "sum_xx"):
                assert torch.allclose(getattr(fused, f), getattr(est, f), rtol=1e-5, atol=1e-6), (f, n_threads, chunk)
            change = (est.posterior - posterior).abs().sum(1).flatten(1).mean(-1) / 2  # every voxel is in Omega
            assert torch.allclose(fused.posterior_change, change, rtol=1e-5), (n_threads, chunk)
            for name, value in expected.as_dict().items():
                assert torch.allclose(got.as_dict()[name], value, rtol=1e-5, atol=1e-6), (name, n_threads, chunk)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("levels, tol", [(0, 1e-10), (4096, 1e-3)])
def test_held_voxel_log_likelihood_equals_the_full_computation_as_sequences_change(levels, tol):
    """The slice-motion search's cached likelihood: after one sequence, then another, changes, its
    values are those of voxel_log_likelihood on the same images (with an MRF posterior held):
    exactly without look-up tables, within 1e-3 nats per voxel from the tables of 4096 levels, also
    where a moved sequence's intensities leave the range it held."""
    from mvmm_monai.mixture import HeldVoxelLogLikelihood, voxel_log_likelihood

    counts = torch.tensor([[3, 2, 2, 2], [2, 2, 1, 1], [2, 1, 2, 1]])
    images, atlas, _, _ = sample_mixture((20, 18, 3), counts, seed=4)
    coverage = torch.ones_like(images)
    coverage[:, 2, ..., 0] = 0  # sequence 2 misses a slice
    log_atlas = log_atlas_from_prob(atlas, 1e-4)
    params = initialise_from_atlas(images, coverage, atlas, counts)
    em = EMConfig(beta=0.7, intensity_levels=levels)
    posterior = torch.softmax(torch.randn(atlas.shape, dtype=atlas.dtype, generator=torch.Generator().manual_seed(1)), dim=1)
    held = HeldVoxelLogLikelihood(images, coverage, log_atlas, params, em, posterior)
    g = torch.Generator().manual_seed(2)
    moved = images.clone()
    for n in (1, 1, 2, 0):
        moved[:, n] = moved[:, n].roll(1, dims=-2) + 0.01 * torch.randn(moved[:, n].shape, dtype=moved.dtype, generator=g)
        want = voxel_log_likelihood(moved, coverage, log_atlas, params, em, posterior)
        assert torch.allclose(held(moved), want, rtol=0, atol=tol)
    assert torch.allclose(held(images), voxel_log_likelihood(images, coverage, log_atlas, params, em, posterior), rtol=0, atol=tol)
    spread = images[:, 0].amax() - images[:, 0].amin()
    moved[:, 0] = images[:, 0] + 0.2 * spread  # beyond the held range, within the tables' margin
    assert torch.allclose(held(moved), voxel_log_likelihood(moved, coverage, log_atlas, params, em, posterior), rtol=0, atol=tol)


def test_the_tabulated_likelihood_and_its_gradient_match_the_exact_ones():
    """The registration's objective from look-up tables: its value and its gradient with respect to
    the images and the atlas are those of every subtype evaluated at every voxel, closely."""
    counts = torch.tensor([[3, 2, 2, 2], [2, 2, 1, 1]])
    images, atlas, _, _ = sample_mixture((24, 20, 2), counts, seed=5)
    coverage = torch.ones_like(images)
    params = initialise_from_atlas(images, coverage, atlas, counts)
    em = EMConfig(beta=0.5, intensity_levels=4096)
    grads = []
    for tabulated in (False, True):
        x = images.clone().requires_grad_(True)
        log_atlas = log_atlas_from_prob(atlas, 1e-4).requires_grad_(True)
        value = log_likelihood(x, coverage, log_atlas, params, em, tabulated=tabulated).sum()
        value.backward()
        grads.append((float(value.detach()), x.grad, log_atlas.grad))
    (v0, gx0, ga0), (v1, gx1, ga1) = grads
    assert v1 == pytest.approx(v0, abs=1e-4)
    assert torch.allclose(ga1, ga0, atol=1e-6)
    # the table's slope against the density's derivative, within 1 % of the largest
    assert (gx1 - gx0).abs().max() <= 0.01 * gx0.abs().max()


def test_the_em_pool_threads_run_single_threaded_and_leave_the_caller_its_threads():
    """The fused iteration's slabs go to a pool whose threads run their operations on one thread;
    the caller keeps its count. (A worker that took the caller's count ran its own team of threads,
    and the whole process slowed down after the first pooled fit.)"""
    import mvmm_monai.mixture.em as em_module

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        em_module._POOL = None  # a fresh pool, made while the caller runs 2 threads
        pool = em_module._pool(2)
        assert torch.get_num_threads() == 2
        counts = list(pool.map(lambda _: (torch.ones(70000).exp().sum(), torch.get_num_threads())[1], range(8)))
        assert counts == [1] * 8
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_thread_choice_runs_the_faster_way_and_follows_a_change_of_load():
    """Timed with made-up seconds: each way is timed once, the faster runs, the other is tried after
    4 calls (then 8, ... while the choice holds), a jump in the faster way's time has the other
    tried at once, and a try that turns out faster takes over."""
    from mvmm_monai.mixture.em import _ThreadChoice

    choice, key = _ThreadChoice(), ("size",)
    seconds = {True: 0.05, False: 0.09}  # quiet: the pool is faster

    def run(n):
        ways = []
        for _ in range(n):
            way = choice.pick(key)
            choice.record(key, way, seconds[way])
            ways.append(way)
        return ways

    assert run(2) == [True, False]  # each way timed once
    assert run(13) == [True] * 3 + [False] + [True] * 7 + [False] + [True]  # tries after 4, then 8 calls
    seconds[True] = 0.33  # the machine became loaded: the pool is now slower than one thread
    assert run(3) == [True, False, False]  # the pool's running mean passes one thread's: one thread takes over
    # a smaller jump (the pool's 0.05 s to 0.085 s, its running mean still ahead of one thread's):
    # one thread is tried at the next call, long before the interval's try
    choice.state[key].update(mean={True: 0.05, False: 0.09}, calls=0, interval=16)
    seconds[True] = 0.085
    assert run(3) == [True, False, True]
    choice.state[key].update(mean={True: 0.33, False: 0.09}, calls=0, interval=4)
    seconds[True] = 0.05  # quiet again: found at the next try (after 4 calls)
    assert run(6) == [False] * 3 + [True, True, True]


def test_the_fused_iteration_gives_the_same_result_on_the_pool_and_on_one_thread():
    """Every operation of the iteration is single-threaded whichever way it runs: the pool, one of
    its threads and a one-thread process give the same bits."""
    import mvmm_monai.mixture.em as em_module

    counts = torch.tensor([[3, 2, 2, 2], [2, 2, 1, 1]])
    images, atlas, _, _ = sample_mixture((24, 20, 3), counts, seed=6)
    coverage = torch.ones_like(images)
    log_atlas = log_atlas_from_prob(atlas, 1e-4)
    params = initialise_from_atlas(images, coverage, atlas, counts)
    posterior = torch.softmax(log_atlas, dim=1)
    config = EMConfig(beta=0.7, update_pi=True, chunk_voxels=100)
    before, saved = torch.get_num_threads(), em_module._THREAD_CHOICE
    try:
        torch.set_num_threads(2)
        em_module._THREAD_CHOICE = em_module._ThreadChoice()  # fresh: the first call pools, the second runs on one thread
        (p1, e1), (p2, e2) = (em_step(images, coverage, log_atlas, params, config, posterior) for _ in range(2))
        assert [set(s["mean"]) for s in em_module._THREAD_CHOICE.state.values()] == [{True, False}]
        torch.set_num_threads(1)  # a one-thread process: no pool at all
        p3, e3 = em_step(images, coverage, log_atlas, params, config, posterior)
    finally:
        torch.set_num_threads(before)
        em_module._THREAD_CHOICE = saved
    for pp, ee in ((p2, e2), (p3, e3)):
        assert torch.equal(e1.posterior, ee.posterior) and torch.equal(e1.log_likelihood, ee.log_likelihood)
        for name, value in p1.as_dict().items():
            assert torch.equal(pp.as_dict()[name], value), name


def test_em_steps_from_many_threads_at_once_finish_with_the_same_result():
    """Callers on several threads share the EM's pool: an iteration never waits for a helper the
    busy pool could not start (a deadlock otherwise, with more callers than pool threads)."""
    from concurrent.futures import ThreadPoolExecutor

    counts = torch.tensor([[3, 2, 2, 2], [2, 2, 1, 1]])
    images, atlas, _, _ = sample_mixture((24, 20, 3), counts, seed=7)
    coverage = torch.ones_like(images)
    log_atlas = log_atlas_from_prob(atlas, 1e-4)
    params = initialise_from_atlas(images, coverage, atlas, counts)
    config = EMConfig(beta=0.7, chunk_voxels=100)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        want = em_step(images, coverage, log_atlas, params, config, torch.softmax(log_atlas, dim=1))[1].posterior
        with ThreadPoolExecutor(max_workers=6) as callers:
            futures = [callers.submit(em_step, images, coverage, log_atlas, params, config, torch.softmax(log_atlas, dim=1))
                       for _ in range(12)]
            got = [f.result(timeout=60)[1].posterior for f in futures]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(g, want) for g in got)


def test_pi_iterations_holds_the_proportions_after_its_iterations():
    counts = torch.tensor([[2, 1, 1, 1], [1, 2, 1, 1]])
    images, atlas, _, _ = sample_mixture((40, 40, 4), counts, seed=5)
    coverage = torch.ones_like(images)
    log_atlas = log_atlas_from_prob(atlas.roll(4, dims=2), 1e-4)  # a misplaced atlas: pi has work to do
    params = initialise_from_atlas(images, coverage, log_atlas.exp(), counts)
    cfg = EMConfig(update_pi=True, pi_iterations=3)
    assert cfg.at_iteration(2).update_pi and not cfg.at_iteration(3).update_pi
    assert EMConfig(update_pi=True).at_iteration(10**6).update_pi  # null: every iteration
    pis, posterior = [], None
    for it in range(8):
        params, est = em_step(images, coverage, log_atlas, params, cfg.at_iteration(it), posterior)
        posterior = est.posterior
        pis.append(params.log_pi.clone())
    assert not torch.equal(pis[0], pis[2])  # they moved in the first three iterations ...
    for later in pis[3:]:
        assert torch.equal(later, pis[2])  # ... and hold after
    # fit_em follows the same rule
    with pytest.warns(UserWarning, match="did not converge"):
        fit = fit_em(images, coverage, log_atlas, counts, cfg, max_iter=8, tol=0.0)
    assert torch.allclose(fit.params.log_pi, pis[2], atol=1e-4)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="pi_iterations"):
            EMConfig(pi_iterations=bad)


def test_posterior_without_a_sequence_does_not_see_it():
    counts = torch.tensor([[2, 1, 1, 1], [1, 2, 1, 1]])
    images, atlas, _, _ = sample_mixture((32, 32, 3), counts, seed=7)
    coverage = torch.ones_like(images)
    log_atlas = log_atlas_from_prob(atlas, 1e-4)
    cfg = EMConfig(beta=0.7)
    params = initialise_from_atlas(images, coverage, atlas, counts)
    params, est = em_step(images, coverage, log_atlas, params, cfg, None)
    left_out = posterior_without(images, coverage, log_atlas, params, cfg, est.posterior, channel=1)
    scrambled = images.clone()
    scrambled[:, 1] = scrambled[:, 1].flip(1)  # what sequence 1 shows changes nothing left out
    assert torch.allclose(posterior_without(scrambled, coverage, log_atlas, params, cfg, est.posterior, channel=1), left_out, atol=1e-6)
    assert torch.allclose(left_out.sum(1), torch.ones(()).to(left_out), atol=1e-5)
    # with every sequence, it does see it
    assert not torch.allclose(posterior_without(images, coverage, log_atlas, params, cfg, est.posterior, channel=0),
                              posterior_without(scrambled, coverage, log_atlas, params, cfg, est.posterior, channel=0), atol=1e-3)
    with pytest.raises(ValueError, match="channel 2"):
        posterior_without(images, coverage, log_atlas, params, cfg, est.posterior, channel=2)
