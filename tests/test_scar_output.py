"""End to end: ``<subject>_scar.nii.gz`` and the ``scar`` entry of ``metrics.json`` on the synthetic
cohort (patient2 has an LGE scar, patient1 none), and the scar ground truth as loaded."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mvmm_monai import compose_config, fit
from mvmm_monai.data.datasets import SyntheticDataset
from mvmm_monai.data.synthetic import SyntheticConfig, ensure_cohort

QUIET = ["callbacks.progress.refresh_rate=0", "~logger", "trainer.max_epochs=20"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_synthetic_scar_truth_is_loaded(cache_dir):
    ds = SyntheticDataset(cache_dir)
    with_scar, without = ds.load("patient2"), ds.load("patient1")
    assert set(with_scar.scar_labels) == {"DE"}
    truth = with_scar.scar_labels["DE"]
    assert truth.dtype == torch.bool and tuple(truth.shape) == with_scar.grids["DE"].shape
    assert truth.any() and not without.scar_labels["DE"].any()
    # scar lies inside the manual myocardium (class 1)
    assert bool((with_scar.labels["DE"][truth] == 1).all())


@pytest.mark.slow
@pytest.mark.parametrize("subject, has_scar", [("patient2", True), ("patient1", False)])
def test_fit_writes_scar_on_reference_grid(tmp_path, cache_dir, one_thread, subject, has_scar):
    out = tmp_path / "out"
    cfg = compose_config([f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}", f"subject={subject}", *QUIET])
    fit(cfg)
    cohort = ensure_cohort(cache_dir, SyntheticConfig(misalignment=False))
    img = nib.load(out / f"{subject}_scar.nii.gz")
    src = nib.load(cohort / f"{subject}_DE.nii.gz")
    assert img.shape == src.shape and np.allclose(img.affine, src.affine)
    assert img.get_data_dtype() == np.uint8
    scar = np.asarray(img.dataobj)
    assert set(np.unique(scar).tolist()) <= {0, 1}
    seg = np.asarray(nib.load(out / f"{subject}_DE_seg.nii.gz").dataobj)
    assert np.all(seg[scar > 0] == 200), "scar outside the segmented myocardium"
    saved = json.loads((out / "metrics.json").read_text())["scar"]
    assert saved["volume_ml"] == pytest.approx(scar.sum() * np.prod(src.header.get_zooms()[:3]) / 1000)
    assert set(saved) >= {"dice", "volume_ml", "true_volume_ml", "contrast", "blood_fraction", "bic_gain", "min_bic_gain"}
    if has_scar:
        # measured 0.50 (20 iterations): the scar is found, with partial-volume voxels at its border
        assert saved["true_volume_ml"] > 0 and saved["dice"] > 0.4
        assert saved["bic_gain"] > saved["min_bic_gain"] > 0  # the model comparison prefers the enhanced subtype
    else:
        # the bright partial-volume subtype of a scar-free myocardium must not become scar
        assert saved["true_volume_ml"] == 0 and saved["volume_ml"] == 0 and saved["dice"] == 1.0


def test_fwhm_keeps_what_is_half_as_bright_as_the_myocardium_maximum():
    from mvmm_monai.conventions.scar import fwhm_mask

    image = torch.cat([torch.full((90,), 0.2), torch.full((10,), 0.9), torch.full((20,), 1.0)])  # the last 20: outside
    myo = torch.arange(120) < 100
    mask = fwhm_mask(image, myo)
    assert mask[90:100].all() and not mask[:90].any() and not mask[100:].any()
    assert not fwhm_mask(image, torch.zeros(120, dtype=torch.bool)).any()


@pytest.mark.parametrize("rule", ["fwhm", "subtype_and_fwhm"])
def test_scar_rules_are_named_in_metrics_and_stay_in_the_myocardium(tmp_path, cache_dir, one_thread, rule):
    out = tmp_path / rule
    m = fit(compose_config(["subject=patient2", f"paths.cache_dir={cache_dir}", f"paths.output_dir={out}", f"model.scar.rule={rule}", *QUIET]))
    assert m["scar"]["rule"] == rule and m["scar"]["volume_ml"] > 0 and m["scar"]["dice"] > 0.3
    scar = np.asarray(nib.load(out / "patient2_scar.nii.gz").dataobj) > 0
    seg = np.asarray(nib.load(out / "patient2_DE_seg.nii.gz").dataobj)
    assert scar.any() and (seg[scar] != 0).all()  # scar only where the heart was labelled


def test_the_model_comparison_clears_a_scar_it_does_not_prefer_and_says_how_much(tmp_path, cache_dir, one_thread):
    # patient2's enhanced subtype is real, but no heart's comparison reaches a margin of 5 per voxel
    out = tmp_path / "cleared"
    m = fit(compose_config(["subject=patient2", f"paths.cache_dir={cache_dir}", f"paths.output_dir={out}", "model.scar.min_bic_gain=5",
                            *QUIET]))
    s = m["scar"]
    assert s["volume_ml"] == 0 and s["cleared_by_bic_ml"] > 0 and 0 < s["bic_gain"] <= 5 and s["min_bic_gain"] == 5
    assert not np.asarray(nib.load(out / "patient2_scar.nii.gz").dataobj).any()


def test_an_unknown_scar_rule_is_refused(tmp_path, cache_dir):
    with pytest.raises(ValueError, match="model.scar.rule"):
        fit(compose_config(["subject=patient2", f"paths.cache_dir={cache_dir}", f"paths.output_dir={tmp_path}", "model.scar.rule=otsu", *QUIET]))


def test_small_pieces_of_scar_are_dropped_by_volume():
    from mvmm_monai.conventions.scar import drop_small_components

    mask = torch.zeros(20, 20, 4, dtype=torch.bool)
    mask[2:6, 2:6, 1:3] = True  # 32 voxels: 0.32 ml at 0.01 ml per voxel
    mask[12, 12, 0] = True  # one voxel: 0.01 ml
    mask[15:17, 15:17, 2] = True  # 4 voxels, touching only diagonally ...
    mask[17, 17, 3] = True  # ... this one (26-connected): one piece of 0.05 ml
    assert torch.equal(drop_small_components(mask, 0.01, 0.0), mask)
    kept = drop_small_components(mask, 0.01, 0.05)
    assert int(kept.sum()) == 37 and not kept[12, 12, 0] and kept[17, 17, 3]
    kept = drop_small_components(mask, 0.01, 0.1)
    assert int(kept.sum()) == 32 and kept[2:6, 2:6, 1:3].all()
    assert not drop_small_components(mask, 0.01, 1.0).any()
    with pytest.raises(ValueError, match="min_component_ml"):
        drop_small_components(mask, 0.01, -1.0)


def test_opening_removes_thin_bands_and_keeps_what_holds_the_disk():
    from mvmm_monai.conventions.scar import open_in_plane

    mask = torch.zeros(40, 40, 2, dtype=torch.bool)
    mask[5:15, 5:15, 0] = True  # a 10 x 10 block: 5 mm at 0.5 mm voxels
    mask[20:38, 20:22, 0] = True  # a band 2 voxels (1 mm) thick, 9 mm long: partial volume along a border
    mask[30, 5, 1] = True  # a single voxel
    assert torch.equal(open_in_plane(mask, (0.5, 0.5), 0.0), mask)
    opened = open_in_plane(mask, (0.5, 0.5), 1.5)  # a disk of 3 voxels radius
    block = opened[5:15, 5:15, 0]
    assert block[2:8, 2:8].all() and int(block.sum()) >= 80  # the block stays, less a few voxels of its corners
    assert not opened[20:38, 20:22].any() and not opened[..., 1].any()
    # on 1 x 0.5 mm voxels a disk of 0.75 mm is 1 voxel across x and 3 across y: a band 2 voxels
    # (2 mm) thick across x stays, the same band turned (1 mm thick) goes
    band = torch.zeros(40, 40, 1, dtype=torch.bool)
    band[20:22, 10:30, 0] = True
    assert torch.equal(open_in_plane(band, (1.0, 0.5), 0.75), band)
    assert not open_in_plane(band.transpose(0, 1), (1.0, 0.5), 0.75).any()
    with pytest.raises(ValueError, match="open_mm"):
        open_in_plane(mask, (0.5, 0.5), -1.0)


def test_the_model_comparison_prefers_an_enhanced_subtype_by_its_analytic_margin():
    from mvmm_monai.mixture.scar import enhanced_subtype_bic_gain

    rng = np.random.default_rng(0)
    wall = rng.normal(0.3, 0.05, 4000)
    assert abs(enhanced_subtype_bic_gain(wall)) < 0.01  # one Gaussian: a second is not worth its parameters
    # 20 % enhanced, 10 SDs brighter: per voxel, 2 (0.2 ln 0.2 + 0.8 ln 0.8) + ln(total variance / 0.05^2),
    # less 3 ln(n) / n for the extra parameters
    scarred = np.concatenate([wall, rng.normal(0.8, 0.05, 1000)])
    total = 0.05**2 + 0.2 * 0.8 * 0.5**2
    expected = 2 * (0.2 * np.log(0.2) + 0.8 * np.log(0.8)) + np.log(total / 0.05**2) - 3 * np.log(5000) / 5000
    assert enhanced_subtype_bic_gain(scarred) == pytest.approx(expected, abs=0.05)
    assert enhanced_subtype_bic_gain(scarred * 7.0 + 3.0) == pytest.approx(enhanced_subtype_bic_gain(scarred))  # any scale
    assert enhanced_subtype_bic_gain(wall[:19]) is None and enhanced_subtype_bic_gain(np.full(100, 0.4)) is None


@pytest.mark.parametrize("setting", ["model.scar.min_component_ml=-1", "model.scar.open_mm=-2", "model.scar.open_mm=abc",
                                     "model.scar.min_bic_gain=-1"])
def test_a_silly_scar_setting_is_refused(tmp_path, cache_dir, setting):
    with pytest.raises(ValueError, match=setting.split("=")[0]):
        fit(compose_config(["subject=patient2", f"paths.cache_dir={cache_dir}", f"paths.output_dir={tmp_path}", setting, *QUIET]))
    assert not list(tmp_path.glob("*.nii.gz"))
