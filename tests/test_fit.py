"""End-to-end fits through the Hydra config, outputs on native grids, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mvmm_monai import compose_config, fit
from mvmm_monai.config import build
from mvmm_monai.data.synthetic import SyntheticConfig, ensure_cohort

QUIET = ["callbacks.progress.refresh_rate=0"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def run(tmp_path: Path, cache_dir: Path, *overrides: str) -> tuple[dict, Path]:
    out = tmp_path / "out"
    cfg = compose_config([f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}", *QUIET, *overrides])
    return fit(cfg), out


@pytest.mark.slow
def test_default_fit_writes_native_grid_outputs(tmp_path, cache_dir):
    metrics, out = run(tmp_path, cache_dir, "subject=patient1", "trainer.max_epochs=40")
    cohort = ensure_cohort(cache_dir, SyntheticConfig(misalignment=False))
    for seq in ("DE", "C0", "T2"):
        seg = nib.load(out / f"patient1_{seq}_seg.nii.gz")
        src = nib.load(cohort / f"patient1_{seq}.nii.gz")
        assert seg.shape == src.shape
        assert np.allclose(seg.affine, src.affine)
        values = set(np.unique(np.asarray(seg.dataobj)).tolist())
        assert values <= {0, 200, 500, 600} and {200, 500, 600} <= values
        # the segmentation agrees with the manual label on the sequence's own grid
        assert metrics["dice"][seq]["lv"] > 0.85
    assert metrics["dice"]["DE"]["myocardium"] > 0.75
    post = nib.load(out / "patient1_posterior.nii.gz")
    assert post.shape == (*nib.load(cohort / "patient1_DE.nii.gz").shape, 4)
    assert np.allclose(np.asarray(post.dataobj).sum(-1), 1.0, atol=1e-4)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["iterations"] == metrics["iterations"] >= 3
    assert set(saved["hd95_mm"]["DE"]) == {"myocardium", "lv", "rv"}
    params = json.loads((out / "params.json").read_text())
    assert len(params["subtypes"]["DE"]["background"]["mu"]) == 3
    assert not list(out.glob(".*tmp*")), "temporary files left behind"
    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    lls = [e.value for e in ea.Scalars("em/log_likelihood")]
    assert len(lls) == metrics["iterations"] and lls[-1] > lls[0]
    assert "dice/DE/myocardium" in ea.Tags()["scalars"]


@pytest.fixture
def cohort_copy(tmp_path, cache_dir) -> Path:
    src = ensure_cohort(cache_dir, SyntheticConfig(misalignment=False))
    dst = tmp_path / "mscmr"
    shutil.copytree(src, dst)
    return dst


def test_nan_image_is_named_and_nothing_written(tmp_path, cache_dir, cohort_copy):
    f = cohort_copy / "patient2_C0.nii.gz"
    img = nib.load(f)
    data = np.asarray(img.dataobj).astype(np.float32)
    data[10, 10, 3] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), f)
    with pytest.raises(ValueError, match=r"patient2_C0\.nii\.gz.*NaN"):
        run(tmp_path, cache_dir, "data=mscmr", f"data.root={cohort_copy}", "subject=patient2",
            f"atlas.path={cohort_copy / 'atlas.nii.gz'}")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.nii.gz"))


@pytest.mark.parametrize("content", [b"", b"not an image\n"])
def test_empty_or_text_file_is_named_in_one_error(tmp_path, cache_dir, cohort_copy, content):
    (cohort_copy / "patient1_C0.nii.gz").write_bytes(content)
    with pytest.raises(ValueError, match=r"patient1_C0\.nii\.gz: cannot be read as a NIfTI image"):
        run(tmp_path, cache_dir, "data=mscmr", f"data.root={cohort_copy}", "subject=patient1",
            f"atlas.path={cohort_copy / 'atlas.nii.gz'}")


def test_missing_file_is_named(tmp_path, cache_dir, cohort_copy):
    (cohort_copy / "patient3_T2.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"patient3_T2\.nii\.gz"):
        run(tmp_path, cache_dir, "data=mscmr", f"data.root={cohort_copy}", "subject=patient3",
            f"atlas.path={cohort_copy / 'atlas.nii.gz'}")


def test_atlas_with_wrong_class_count(tmp_path, cache_dir, cohort_copy):
    atlas = nib.load(cohort_copy / "atlas.nii.gz")
    data = np.asarray(atlas.dataobj)[..., :3]
    data = data / data.sum(-1, keepdims=True)
    bad = tmp_path / "three_classes.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), atlas.affine), bad)
    with pytest.raises(ValueError, match=r"three_classes\.nii\.gz: atlas has 3 classes, expected 4"):
        run(tmp_path, cache_dir, "subject=patient1", f"atlas.path={bad}")


def test_unknown_subject(tmp_path, cache_dir):
    with pytest.raises(ValueError, match=r"unknown subject 'patient99'.*patient1"):
        run(tmp_path, cache_dir, "subject=patient99")


def test_label_with_unknown_values_is_named(tmp_path, cache_dir, cohort_copy):
    f = cohort_copy / "patient1_DE_manual.nii.gz"
    img = nib.load(f)
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 123
    nib.save(nib.Nifti1Image(data, img.affine), f)
    with pytest.raises(ValueError, match=r"patient1_DE_manual\.nii\.gz: label values \[123\]"):
        run(tmp_path, cache_dir, "data=mscmr", f"data.root={cohort_copy}", "subject=patient1",
            f"atlas.path={cohort_copy / 'atlas.nii.gz'}")


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.subtypes.lv=0", "counts must be integers in 1..10"),
        ("model.em.min_variance=-1", "min_variance must be > 0"),
        ("model.em_steps=0", "em_steps must be >= 1"),
        ("atlas.placement=upside_down", "atlas.placement must be one of"),
        ("data.lower_percentile=99", "lower_percentile < upper_percentile"),
        ("trainer.devices=2", "one subject is fitted on one device"),
        ("model.sequence_weights={XX:0.5}", r"model.sequence_weights: \['XX'\] not among"),
        ("model.sequence_weights={C0:0}", "model.sequence_weights must be positive numbers"),
        ("postprocess.lv_cavity_fill=convex", "postprocess.lv_cavity_fill must be true, false or one of"),
        ("model.atlas_weight=0", r"model.atlas_weight must be in \(0, 4\]"),
        ("model.atlas_weight=9", r"model.atlas_weight must be in \(0, 4\]"),
        ("postprocess.min_wall_mm=-1", r"postprocess.min_wall_mm must be a thickness in mm in \[0, 30\]"),
        ("postprocess.endocardium_median_deg=400", r"postprocess.endocardium_median_deg must be an angle in degrees in \[0, 180\]"),
        ("postprocess.epicardium_median_deg=-3", r"postprocess.epicardium_median_deg must be an angle in degrees in \[0, 180\]"),
        ("postprocess.rv_main_region=maybe", "postprocess.rv_main_region must be true or false"),
        ("postprocess.blood_rim={XX:0.5}", r"postprocess.blood_rim: \['XX'\] not among"),
        ("postprocess.blood_rim={C0:2}", r"postprocess.blood_rim must be fractions in \[-1, 1\]"),
        ("postprocess.blood_rim=0.3", "postprocess.blood_rim must be a mapping sequence -> fraction"),
        ("postprocess.wall_rim={XX:-0.5}", r"postprocess.wall_rim: \['XX'\] not among"),
        ("postprocess.wall_rim={T2:-3}", r"postprocess.wall_rim must be fractions in \[-1, 1\]"),
        ("postprocess.wall_rim_mm=-1", r"postprocess.wall_rim_mm must be a depth in mm in \[0, 20\]"),
        ("postprocess.rim_reference=stack", r"postprocess.rim_reference must be one of \['heart', 'slice'\]"),
        ("subject=../evil", r"cannot name an output"),
        ("model.sequence_weights=2", "model.sequence_weights must be a mapping sequence -> number"),
        ("model.tol_window=0", "model.tol_window must be an integer >= 1"),
        ("model.dice_every_n_iterations=0", "model.dice_every_n_iterations must be an integer >= 1"),
        ("model.partial_volume=maybe", "model.partial_volume must be true or false"),
        ("+registration.min_tol_window=-2", "registration.min_tol_window must be an integer >= 1"),
    ],
)
def test_silly_config_values(tmp_path, cache_dir, override, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path, cache_dir, "subject=patient1", "trainer.max_epochs=2", override)


def test_postprocess_group_follows_the_dataset_and_can_be_chosen(tmp_path):
    """Each dataset names its labelling conventions in its defaults list; ``postprocess=...`` wins."""
    out = f"paths.output_dir={tmp_path}"
    composed = lambda *o: build(compose_config([out, *o]).postprocess, _convert_="all")
    assert composed().name == "mscmr" and composed().lv_cavity_fill == "hull"
    myops = composed("data=myops", "data.root=x")
    assert myops.as_dict() == {
        "name": "myops", "lv_cavity_fill": "hull", "min_wall_mm": 8.0, "endocardium_median_deg": 32.0,
        "blood_rim": {"C0": 0.25, "T2": 0.0}, "epicardium_median_deg": 45.0,
        "rv_main_region": True, "wall_rim": {"T2": -0.25}, "wall_rim_mm": 3.5, "rim_reference": "slice",
    }
    assert composed("data=myops", "data.root=x", "postprocess=none").as_dict()["lv_cavity_fill"] is False
    assert composed("data=files", "data.images.DE=a.nii.gz", "postprocess=myops").name == "myops"


def test_tuning_group_follows_the_dataset_and_can_be_chosen(tmp_path):
    """The model settings measured per kind of data come from the ``tuning`` group, which each dataset
    names and ``tuning=...`` or an explicit ``model....`` overrides; the fit records what it used."""
    tuned = lambda *o: OmegaConf.to_container(compose_config([f"paths.output_dir={tmp_path}", *o]).model, resolve=True)
    synthetic, myops = tuned(), tuned("data=myops", "data.root=x")
    assert (synthetic["em"]["beta"], synthetic["em"]["update_pi"], synthetic["sequence_weights"]) == (0.5, False, None)
    assert (myops["em"]["beta"], myops["em"]["update_pi"], myops["sequence_weights"]) == (1.0, True, {"LGE": 0.5, "T2": 0.5})
    as_myops = tuned("data=files", "+data.images.LGE=a.nii.gz", "data.reference=LGE", "tuning=myops")
    assert as_myops["sequence_weights"] == {"LGE": 0.5, "T2": 0.5} and as_myops["em"]["beta"] == 1.0
    assert tuned("data=myops", "data.root=x", "model.em.beta=0.25")["em"]["beta"] == 0.25


def test_registration_presets_share_slice_shift_settings(tmp_path):
    """``registration=full`` and ``atlas_only`` inherit every setting of ``slice_shift`` (the
    composite's parts, the schedule, the optimiser) through Hydra's defaults list and change only
    what they name; the trainer override still applies."""

    def leaves(node, prefix=""):
        if isinstance(node, dict) and node:
            return {k: v for key, value in node.items() for k, v in leaves(value, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    out = [f"paths.output_dir={tmp_path}"]
    base = leaves(OmegaConf.to_container(compose_config(out + ["registration=slice_shift"]).registration))
    atlas = {"model.atlas_deformation.affine": True, "model.atlas_deformation.svf": True, "model.objective_mrf": True,
             "min_tol_window": 5}
    changed = {
        "full": {**atlas, "schedule.shift_search_at": [25], "scheduler.gamma": 0.97},
        "atlas_only": {**atlas, "model.slice_motion": None},
    }
    for preset, named in changed.items():
        cfg = compose_config(out + [f"registration={preset}"])
        reg = leaves(OmegaConf.to_container(cfg.registration))
        assert {k: v for k, v in reg.items() if base.get(k, "absent") != v} == named
        gone = {k for k in base if k not in reg}
        assert gone == ({k for k in base if k.startswith("model.slice_motion.")} if preset == "atlas_only" else set())
        assert cfg.trainer.max_epochs == 200
    assert compose_config(out + ["registration=full", "trainer.max_epochs=7"]).trainer.max_epochs == 7


def test_constant_image_is_refused_naming_file_and_sequence(tmp_path, cache_dir, cohort_copy):
    f = cohort_copy / "patient2_T2.nii.gz"
    img = nib.load(f)
    nib.save(nib.Nifti1Image(np.full(img.shape, 7.0, dtype=np.float32), img.affine), f)
    with pytest.raises(ValueError, match=r"patient2_T2\.nii\.gz: sequence T2 has the same value \(7\) in every voxel"):
        run(tmp_path, cache_dir, "data=mscmr", f"data.root={cohort_copy}", "subject=patient2",
            f"atlas.path={cohort_copy / 'atlas.nii.gz'}")


def test_atlas_with_an_empty_class_is_refused_naming_the_class(tmp_path, cache_dir, cohort_copy):
    atlas = nib.load(cohort_copy / "atlas.nii.gz")
    data = np.asarray(atlas.dataobj).astype(np.float32)
    data[..., 0] += data[..., 3]
    data[..., 3] = 0.0
    bad = tmp_path / "no_rv.nii.gz"
    nib.save(nib.Nifti1Image(data, atlas.affine), bad)
    with pytest.raises(ValueError, match=r"no_rv\.nii\.gz: atlas class 'rv' \(channel 3\) is empty"):
        run(tmp_path, cache_dir, "subject=patient1", f"atlas.path={bad}")
