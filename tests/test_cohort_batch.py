"""Cohorts fitted several subjects at a time in one batch of the EM engine (``cohort.batch_size``):
the same labels, iterations and files as one after another."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mvmm_monai import compose_config, fit
from mvmm_monai.classes import class_argmax
from mvmm_monai.mixture import EMConfig, log_atlas_from_prob
from mvmm_monai.pipeline.batch import BatchedMvMMFit
from mvmm_monai.pipeline.progress import lightning_notes_silenced
from mvmm_monai.registration import Warped
from tests.conftest import smooth_atlas

QUIET = ["callbacks.progress.refresh_rate=0"]
NAMES = ["patient1", "patient2", "patient3"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def run(out: Path, cache_dir: Path, *overrides: str) -> dict:
    return fit(compose_config([f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}", *QUIET, *overrides]))


def _subject(shape: tuple[int, ...], seed: int) -> Warped:
    """Two sequences drawn from a smooth 4-class atlas: class k has mean 2k (+1 in the second)."""
    g = torch.Generator().manual_seed(seed)
    atlas = smooth_atlas(shape, 4, g, dtype=torch.float32)
    labels = torch.multinomial(atlas[0].movedim(0, -1).reshape(-1, 4), 1, generator=g).reshape(shape)
    images = torch.stack([2.0 * labels, 2.0 * labels + 1.0]).float() + 0.6 * torch.randn((2, *shape), generator=g)
    return Warped(images[None], torch.ones((1, 2, *shape)), log_atlas_from_prob(atlas, 1e-4))


def _fit(names: list[str], warped: list[Warped]) -> BatchedMvMMFit:
    module = BatchedMvMMFit(names, warped, torch.tensor([[2, 1, 1, 1]] * 2), [torch.ones(2)] * len(names),
                            em=EMConfig(beta=1.0), tol=1e-5, posterior_tol=1e-4, tol_window=2, min_epochs=3)
    trainer = pl.Trainer(max_epochs=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    with lightning_notes_silenced():
        trainer.fit(module)
    return module


def test_subjects_of_different_sizes_get_their_fit_alone(one_thread):
    """Padded to one box, each subject stops on its own criterion and gets the labels and parameters
    of its fit alone (the padding's posterior is held at zero: the MRF sees nothing there). The
    batch sums floating-point numbers in another order: a stopping test close to its tolerance may
    be met one iteration earlier or later."""
    shapes = [(40, 36, 5), (28, 44, 7), (33, 30, 4)]
    warped = [_subject(s, seed) for seed, s in enumerate(shapes)]
    names = ["a", "b", "c"]
    together = _fit(names, warped)
    assert len(set(together.iterations)) > 1  # they stopped at different iterations
    for i, name in enumerate(names):
        alone = _fit([name], [warped[i]])
        assert abs(together.iterations[i] - alone.iterations[0]) <= 1 and together.stopped_on_criterion[i]
        a, b = together.result(i), alone.result(0)
        assert a.posterior.shape == (4, *shapes[i])
        x, y = class_argmax(a.posterior), class_argmax(b.posterior)
        for k in range(1, 4):
            dice = 2 * float(((x == k) & (y == k)).sum()) / float((x == k).sum() + (y == k).sum())
            assert dice >= 0.999, (name, k, dice)
        assert torch.allclose(a.params.mean, b.params.mean, atol=1e-2)
        assert a.log_likelihood == pytest.approx(b.log_likelihood, abs=1e-3)


def test_batched_cohort_writes_the_one_by_one_results(tmp_path, cache_dir):
    common = [f"subject=[{','.join(NAMES)}]"]
    one = run(tmp_path / "one", cache_dir, *common, "cohort.batch_size=1")
    two = run(tmp_path / "two", cache_dir, *common, "cohort.batch_size=2")  # a batch of two, then one of one
    assert two["subjects"] == one["subjects"] == NAMES and not two["failed"]
    for name in NAMES:
        a = json.loads((tmp_path / "one" / name / "metrics.json").read_text())
        b = json.loads((tmp_path / "two" / name / "metrics.json").read_text())
        assert b["iterations"] == a["iterations"] and b["converged"] == a["converged"]
        assert b["log_likelihood"] == pytest.approx(a["log_likelihood"], abs=1e-4)
        for seq in ("DE", "C0", "T2"):
            x = np.asarray(nib.load(tmp_path / "one" / name / f"{name}_{seq}_seg.nii.gz").dataobj)
            y = np.asarray(nib.load(tmp_path / "two" / name / f"{name}_{seq}_seg.nii.gz").dataobj)
            assert np.array_equal(x, y), (name, seq)
            assert b["dice"][seq] == pytest.approx(a["dice"][seq], abs=1e-6)
        assert b["qc"]["score"] == pytest.approx(a["qc"]["score"], abs=1e-3)
        assert sorted(p.name for p in (tmp_path / "two" / name).iterdir()) == sorted(
            p.name for p in (tmp_path / "one" / name).iterdir() if p.name != "checkpoints"
        )
        # each subject's own TensorBoard curves, one point per iteration it ran
        ea = EventAccumulator(str(tmp_path / "two" / name / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
        ea.Reload()
        assert len(ea.Scalars("em/log_likelihood")) == a["iterations"]
        assert [e.step for e in ea.Images("overlay")] == [e.step for e in ea.Images("montage")] == [a["iterations"]]


def test_a_batch_that_fails_in_the_engine_falls_back_to_fits_one_after_another(tmp_path, cache_dir, monkeypatch):
    """An error inside the batched EM (here: patient2's iteration made non-finite on purpose) costs the
    batch, not the cohort: its subjects are fitted one after another, and every one is written."""
    calls = {"n": 0}
    real = BatchedMvMMFit.training_step

    def failing(self, batch, batch_idx):
        calls["n"] += 1
        if calls["n"] == 3:
            raise FloatingPointError("MvMM fit of patient2: non-finite log-likelihood or parameters at ICM iteration 3")
        return real(self, batch, batch_idx)

    monkeypatch.setattr(BatchedMvMMFit, "training_step", failing)
    out = tmp_path / "cohort"
    summary = run(out, cache_dir, "subject=[patient1,patient2]", "cohort.batch_size=2", "trainer.max_epochs=4", "~logger")
    assert summary["subjects"] == ["patient1", "patient2"] and not summary["failed"]
    for name in ("patient1", "patient2"):
        m = json.loads((out / name / "metrics.json").read_text())
        assert m["iterations"] == 4 and (out / name / "checkpoints" / "last.ckpt").is_file()  # fitted alone
        assert not any(p.name.startswith(".") and p.is_dir() for p in (out / name).iterdir())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["cohort.batch_size=0"], "cohort.batch_size must be an integer >= 1"),
        (["cohort.batch_size=two"], "cohort.batch_size must be an integer >= 1"),
        (["cohort.batch_size=2", "registration=slice_shift"], "registration=none"),
        (["cohort.batch_size=2", "ckpt_path=last"], "cannot resume from ckpt_path"),
        (["cohort.batch_size=2", "model.partial_volume=true"], "model.partial_volume=true"),
    ],
)
def test_batch_settings_that_cannot_work_are_refused_before_any_work(tmp_path, cache_dir, overrides, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path, cache_dir, "subject=[patient1,patient2]", *overrides)
    assert not (tmp_path / "patient1").exists()


@pytest.mark.slow
def test_two_cpu_processes_fit_their_shards_in_batches(tmp_path, cache_dir):
    """trainer.devices=2 with cohort.batch_size=2: each process fits its two subjects in one batch,
    with the results of the one-process, one-after-another fits."""
    names = ["patient1", "patient2", "patient3", "patient4"]
    common = [f"subject=[{','.join(names)}]", "trainer.max_epochs=6", "trainer.accelerator=cpu"]
    one = run(tmp_path / "one", cache_dir, *common, "trainer.devices=1")
    two = run(tmp_path / "two", cache_dir, *common, "trainer.devices=2", "cohort.batch_size=2")
    assert two["subjects"] == one["subjects"] == names and not two["failed"]
    for name in names:
        a = json.loads((tmp_path / "one" / name / "metrics.json").read_text())
        b = json.loads((tmp_path / "two" / name / "metrics.json").read_text())
        assert b["iterations"] == a["iterations"] == 6
        assert b["dice"]["DE"] == pytest.approx(a["dice"]["DE"], abs=1e-4)
        assert (tmp_path / "two" / name / "tensorboard").is_dir() and not (tmp_path / "two" / name / "checkpoints").exists()
