"""Several subjects fitted at once give each the fit it gets alone."""

from __future__ import annotations

import pytest
import torch

from mvmm_monai.mixture import EMConfig, fit_em, log_atlas_from_prob
from mvmm_monai.mixture.batch import pad_subjects
from tests.mixture.test_em import dice, sample_mixture

COUNTS = torch.tensor([[3, 2, 2, 2], [2, 2, 1, 1]])
CONFIG = EMConfig(beta=0.5)


def subject(spatial, seed):
    images, atlas, _, _ = sample_mixture(spatial, COUNTS, seed=seed)
    images = images[0].float()
    return images, torch.ones_like(images), log_atlas_from_prob(atlas.float(), 1e-4)[0]


def alone(x, c, a):
    return fit_em(x[None], c[None], a[None], COUNTS, CONFIG, max_iter=200, tol=1e-6)


def test_a_batch_of_equal_subjects_stops_each_where_it_stops_alone_with_the_same_labels():
    subjects = [subject((28, 24, 3), seed) for seed in (1, 2, 3)]
    batch = pad_subjects(*map(list, zip(*subjects)))
    together = fit_em(batch.images, batch.coverage, batch.log_atlas, COUNTS, CONFIG, max_iter=200, tol=1e-6)
    for i, s in enumerate(subjects):
        solo = alone(*s)
        assert int(together.iterations[i]) == solo.n_iter and bool(together.subject_converged[i])
        labels = together.log_posterior[i].argmax(0)
        assert float((labels == solo.log_posterior[0].argmax(0)).float().mean()) == 1.0
        assert torch.allclose(together.params.mean[i][solo.params.valid[0]], solo.params.mean[0][solo.params.valid[0]], atol=1e-5)
    assert len(set(together.iterations.tolist())) > 1, "the subjects should stop at different iterations"


def test_subjects_of_different_sizes_padded_to_one_box_keep_their_labels():
    subjects = [subject(shape, seed) for shape, seed in (((30, 26, 3), 4), ((22, 28, 2), 5), ((26, 20, 3), 6))]
    batch = pad_subjects(*map(list, zip(*subjects)))
    assert batch.images.shape == (3, 2, 30, 28, 3)
    together = fit_em(batch.images, batch.coverage, batch.log_atlas, COUNTS, CONFIG, max_iter=200, tol=1e-6)
    for i, s in enumerate(subjects):
        labels = batch.crop(together.log_posterior, i).argmax(0)
        assert labels.shape == s[0].shape[1:]
        solo = alone(*s).log_posterior[0].argmax(0)
        assert bool((dice(labels, solo, 4) >= 0.999).all()), dice(labels, solo, 4)


def test_pad_subjects_checks_its_inputs():
    x, c, a = subject((10, 10, 2), 0)
    with pytest.raises(ValueError, match="subject 1"):
        pad_subjects([x, x], [c, c[:1]], [a, a])
    with pytest.raises(ValueError, match="as many"):
        pad_subjects([x], [c, c], [a])
