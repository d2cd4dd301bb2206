"""The MRF strength estimated within the EM (``model.em.beta=auto``), on labels drawn from a known
Potts field: the mean-field M-step recovers the beta the labels were sampled with."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from mvmm_monai import compose_config, fit
from mvmm_monai.data.synthetic import sample_potts
from mvmm_monai.mixture import EMConfig, fit_em
from mvmm_monai.mixture.prior import update_mrf

K, H, D = 4, 96, 3


def atlas() -> np.ndarray:
    """``[K, H, H, D]``: a blurred LV disc, myocardial ring and RV blob, each class at least 0.1."""
    yy, xx = np.mgrid[:H, :H]
    r = np.hypot(xx - H / 2, yy - H / 2)
    regions = np.zeros((H, H), int)
    regions[r < 26] = 1
    regions[r < 18] = 2
    regions[(np.hypot(xx - H / 2 + 24, yy - H / 2) < 16) & (r >= 26)] = 3
    a = np.stack([ndimage.gaussian_filter((regions == k).astype(float), 3) for k in range(K)])
    a = 0.1 + 0.6 * a
    return np.repeat((a / a.sum(0))[..., None], D, -1)


def draw(beta: float, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels from the Potts field with the atlas as external field, and two images of them."""
    labels = sample_potts(np.log(atlas()), beta, sweeps=150, seed=seed)
    means = np.array([[0.1, 0.35, 0.8, 0.6], [0.5, 0.2, 0.7, 0.9]])
    rng = np.random.default_rng(seed + 1)
    return labels, np.stack([m[labels] + noise * rng.standard_normal(labels.shape) for m in means])


@pytest.mark.parametrize("beta", [0.3, 1.3])
def test_mean_field_m_step_on_the_true_labels_recovers_beta_and_pi(beta):
    labels, _ = draw(beta, 0.0)
    onehot = torch.tensor(np.stack([labels == k for k in range(K)])[None], dtype=torch.float64)
    log_atlas = torch.log(torch.tensor(atlas()[None]))
    log_pi, est = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2]], dtype=torch.float64)), torch.tensor([1.0], dtype=torch.float64)
    for _ in range(12):
        log_pi, est = update_mrf(onehot, log_atlas, log_pi, est, torch.ones(1, *labels.shape, dtype=torch.float64))
    assert abs(float(est) - beta) < 0.2 * beta  # the bound; 0.23 for 0.2 and 1.33 for 1.3 when written
    assert torch.allclose(log_pi.exp(), torch.full((1, K), 0.25, dtype=torch.float64), atol=0.03)


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_em_with_beta_auto_recovers_the_sampled_beta(beta):
    labels, images = draw(beta, noise=0.14)
    x = torch.tensor(images[None], dtype=torch.float32)
    log_atlas = torch.log(torch.tensor(atlas()[None], dtype=torch.float32))
    counts = torch.ones(2, K, dtype=torch.long)
    auto = fit_em(x, torch.ones_like(x), log_atlas, counts, EMConfig(beta="auto"), max_iter=300, tol=1e-7)
    assert auto.converged
    assert abs(float(auto.params.beta[0]) - beta) < 0.2 * beta
    # the proportions come back to the truth (uniform: the labels were drawn from the atlas alone)
    assert torch.allclose(auto.params.log_pi.exp(), torch.full((1, K), 0.25), atol=0.03)
    # and the estimated field labels better than none
    plain = fit_em(x, torch.ones_like(x), log_atlas, counts, EMConfig(beta=0.0), max_iter=300, tol=1e-7)
    accuracy = lambda f: float((f.log_posterior[0].argmax(0).numpy() == labels).mean())
    assert accuracy(auto) > accuracy(plain)


@pytest.mark.parametrize("bad", ["often", -0.5, True])
def test_beta_must_be_a_number_or_auto(bad):
    with pytest.raises(ValueError, match="beta must be a number >= 0 or 'auto'"):
        EMConfig(beta=bad)


def test_fit_records_the_estimated_beta(tmp_path, caplog):
    out = tmp_path / "out"
    cfg = compose_config([f"paths.output_dir={out}", f"paths.cache_dir={tmp_path / 'cache'}", "subject=patient1",
                          "model.em.beta=auto", "trainer.max_epochs=15", "callbacks.progress.refresh_rate=0"])
    metrics = fit(cfg)
    params = json.loads((out / "params.json").read_text())
    assert params["mrf_beta"]["estimated"] is True
    assert 0.0 < params["mrf_beta"]["value"] <= cfg.model.em.beta_max
    assert params["settings"]["model"]["em"]["beta"] == "auto"
    # a fit whose estimate ends on the bound says so
    assert (params["mrf_beta"]["value"] == cfg.model.em.beta_max) == ("reached its bound" in caplog.text)
    assert metrics["dice"]["DE"]["lv"] > 0.85
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    betas = [e.value for e in ea.Scalars("em/beta")]
    assert len(betas) == metrics["iterations"] and betas[-1] == pytest.approx(params["mrf_beta"]["value"], rel=1e-5)
