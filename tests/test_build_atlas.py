"""scripts/build_atlas.py and atlas.placement=auto end to end on the synthetic cohort (known truth)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mvmm_monai import build_atlas, compose_config, fit
from mvmm_monai.pipeline.build_atlas import select_subjects

QUIET = ["callbacks.progress.refresh_rate=0", "~logger"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def synthetic_atlas(tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("atlas") / "synth_atlas.nii.gz"
    cfg = compose_config(
        ["data=synthetic", f"paths.cache_dir={cache_dir}", "subjects=patient1..patient4", f"output={out}", "size=96"],
        config_name="build_atlas",
    )
    build_atlas(cfg)
    return out


def test_build_atlas_writes_a_canonical_atlas(synthetic_atlas):
    side = json.loads(synthetic_atlas.with_name("synth_atlas.json").read_text())
    assert side["frame"] == "canonical" and side["subjects"] == ["patient1", "patient2", "patient3", "patient4"]
    assert side["classes"] == ["background", "myocardium", "lv", "rv"] and side["label_values"]["myocardium"] == [200]
    prob = np.asarray(nib.load(synthetic_atlas).dataobj)
    assert prob.shape == (96, 96, side["levels"], 4)
    assert np.allclose(prob.sum(-1), 1, atol=1e-4)
    template = np.asarray(nib.load(synthetic_atlas.with_name(side["template"])).dataobj)
    assert template.shape == (96, 96, side["levels"], len(side["template_sequences"]))
    assert synthetic_atlas.with_name("synth_atlas.png").stat().st_size > 10_000
    # the frame: LV centred, RV in the cohort's mean direction, the LV bright in the bSSFP template
    mid = prob[..., side["levels"] // 2, :]
    c = (96 - 1) / 2
    assert mid[int(c), int(c), 2] > 0.9
    ij = np.argwhere(mid[..., 3] > 0.5).mean(0) - c
    assert abs(math.degrees(math.atan2(ij[1], ij[0])) - side["angle_deg"]) < 15
    c0 = template[..., side["levels"] // 2, side["template_sequences"].index("C0")]
    assert c0[int(c), int(c)] > c0[mid[..., 1] > 0.8].mean() + 1.0  # blood pool vs myocardium, in SD units


@pytest.mark.slow
def test_auto_placement_fit_matches_truth(tmp_path, cache_dir, synthetic_atlas):
    """patient5 was not in the atlas; its heart is found without labels and segmented."""
    out = tmp_path / "fit"
    cfg = compose_config(
        [f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}", *QUIET, "subject=patient5",
         f"atlas.path={synthetic_atlas}", "atlas.placement=auto", "trainer.max_epochs=40"]
    )
    m = fit(cfg)
    assert m["placement"]["score"] > 0.3
    assert m["atlas_dice"]["DE"]["lv"] > 0.7  # the placed atlas' LV overlaps the true LV
    assert m["dice"]["DE"]["myocardium"] > 0.75 and m["dice"]["DE"]["lv"] > 0.85
    seg = nib.load(out / "patient5_DE_seg.nii.gz")
    src = nib.load(Path(cache_dir).glob("synthetic-*/patient5_DE.nii.gz").__next__())
    assert seg.shape == src.shape and np.allclose(seg.affine, src.affine)
    params = json.loads((out / "params.json").read_text())
    assert len(params["placement"]["centres_mm"]) == src.shape[2]


def test_placement_and_atlas_kinds_must_agree(tmp_path, cache_dir, synthetic_atlas):
    base = [f"paths.output_dir={tmp_path / 'o'}", f"paths.cache_dir={cache_dir}", *QUIET, "subject=patient5"]
    with pytest.raises(ValueError, match="canonical atlas .* use atlas.placement=auto"):
        fit(compose_config([*base, f"atlas.path={synthetic_atlas}", "atlas.placement=identity"]))
    with pytest.raises(ValueError, match="needs an atlas built by scripts/build_atlas.py"):
        fit(compose_config([*base, "atlas.placement=auto"]))  # the cohort's own world-space atlas
    with pytest.raises(ValueError, match="atlas.placement must be one of"):
        fit(compose_config([*base, "atlas.placement=magic"]))
    with pytest.raises(ValueError, match=r"atlas.auto.sequences: \['LGE'\] not among subject patient5's sequences"):
        fit(compose_config([*base, f"atlas.path={synthetic_atlas}", "atlas.placement=auto", "atlas.auto.sequences=[LGE]"]))
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.nii.gz"))


def test_subject_selection_and_bad_inputs(tmp_path, cache_dir):
    names = ["a1", "a2", "a3", "b1"]
    assert select_subjects("a2..b1", names) == ["a2", "a3", "b1"]
    assert select_subjects(None, names) == names and select_subjects(["b1"], names) == ["b1"]
    with pytest.raises(ValueError, match="comes after"):
        select_subjects("a3..a1", names)
    with pytest.raises(ValueError, match=r"\['zz'\] not among"):
        select_subjects("a1..zz", names)
    with pytest.raises(ValueError, match="unknown subjects"):
        select_subjects(["nope"], names)
    out = tmp_path / "atlas.nii.gz"
    cfg = compose_config(
        ["data=synthetic", f"paths.cache_dir={cache_dir}", "subjects=[patient1]", f"output={out}", "levels=0"],
        config_name="build_atlas",
    )
    with pytest.raises(ValueError, match="levels=0"):
        build_atlas(cfg)
    assert not out.exists()
