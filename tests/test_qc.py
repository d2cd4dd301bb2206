"""Quality control: failures made on purpose (atlas.displace) move the atlas as asked, the quality
model's verdict follows its numbers, a mirrored or disagreeing sequence is named, cohort summaries
list failed and flagged subjects first, and a fit's metrics carry the verdict."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from mvmm_monai import compose_config, fit
from mvmm_monai.atlas.placement import displace_atlas
from mvmm_monai.cohort.summary import write_cohort_summary
from mvmm_monai.config import build
from mvmm_monai.pipeline.qc import FEATURES, QualityModel


def _atlas(shape=(40, 40, 3)) -> torch.Tensor:
    """Background, myocardium ring, LV disc about (20, 20), RV blob at (20, 30)."""
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    r = np.hypot(x - 20, y - 20)
    lv, myo = r < 5, (r >= 5) & (r < 8)
    rv = (np.hypot(x - 20, y - 31) < 3) & ~myo & ~lv
    prob = np.zeros((4, *shape))
    for k, m in enumerate((~(lv | myo | rv), myo, lv, rv)):
        prob[k] = m[..., None]
    return torch.from_numpy(prob)


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(0)[:2]


def test_displace_shifts_scales_and_rotates_about_the_heart():
    prob = _atlas()
    heart = (1 - prob[0]).numpy() > 0.5
    moved = displace_atlas(prob, (2.0, 1.0), shift_mm=(10.0, -4.0))
    assert torch.allclose(moved.sum(0), torch.ones(()).double())
    np.testing.assert_allclose(_centroid((1 - moved[0]).numpy() > 0.5) - _centroid(heart), [5.0, -4.0], atol=0.3)
    small = displace_atlas(prob, (1.0, 1.0), scale=0.5)
    assert (small[2].numpy() > 0.5).sum() == pytest.approx((prob[2].numpy() > 0.5).sum() / 4, rel=0.25)
    turned = displace_atlas(prob, (1.0, 1.0), angle_deg=180)
    rv_before, rv_after = _centroid(prob[3].numpy() > 0.5), _centroid(turned[3].numpy() > 0.5)
    centre = _centroid(heart)
    np.testing.assert_allclose(rv_after - centre, -(rv_before - centre), atol=1.0)  # the RV on the other side
    with pytest.raises(ValueError, match="atlas.displace"):
        displace_atlas(prob, (1.0, 1.0), scale=0.0)


def _model(**kw) -> QualityModel:
    base = dict(centre={"a": 0.0}, spread={"a": 1.0}, weights={"a": 0.1}, intercept=0.8, threshold=0.7,
                usual={"a": [-1.0, 1.0]}, disagreement=0.5)
    return QualityModel(**{**base, **kw})


def test_quality_model_score_flag_and_reasons():
    model = _model()
    good = model.assess({"a": 0.5}, {"C0": 0.9})
    assert good["score"] == pytest.approx(0.85) and not good["flag"] and good["reasons"] == []
    bad = model.assess({"a": -2.0})
    assert bad["score"] == pytest.approx(0.6) and bad["flag"]
    assert bad["reasons"][0].startswith("estimated myocardium Dice 0.60 below 0.70") and "usual >= -1" in bad["reasons"][1]
    assert model.score({"a": float("nan")}) == pytest.approx(0.8)  # a missing feature counts as its centre
    assert model.score({"a": 100.0}) == 1.0  # clipped to [0, 1]


def test_a_mirrored_or_disagreeing_sequence_sets_the_flag_and_is_named():
    model = _model()
    mirrored = model.assess({"a": 0.0}, {"C0": 0.9, "T2": 0.9}, {"C0": {"mirrored": True}, "T2": {"mirrored": False}})
    assert mirrored["flag"] and any(r.startswith("C0 looks mirrored") for r in mirrored["reasons"])
    apart = model.assess({"a": 0.0}, {"C0": 0.9, "T2": 0.3})
    assert apart["flag"] and apart["reasons"] == ["T2 disagrees with the other sequences on where the heart is (agreement 0.30)"]
    # agreement low for good fits but above the disagreement rule: the usual-range reason names the least agreeing sequence
    model = _model(centre={"sequence_agreement": 0.8}, spread={"sequence_agreement": 0.1}, weights={"sequence_agreement": 0.0},
                   usual={"sequence_agreement": [0.75, 0.95]})
    low = model.assess({"sequence_agreement": 0.6}, {"LGE": 0.8, "C0": 0.75, "T2": 0.6})
    assert low["reasons"] == ["T2 agrees least with the other sequences on the heart (sequence_agreement 0.6, usual >= 0.75)"]
    assert not low["flag"]


def test_features_unusual_together_set_the_flag():
    # two features each outside the range of good fits, the score still fine (the atlas placed too
    # large: a thick wall and a result far from the atlas)
    usual = {"wall_mm": [8.0, 17.0], "atlas_agreement": [0.7, 0.95], "entropy": [0.02, 0.04]}
    model = _model(centre=dict.fromkeys(usual, 0.0), spread=dict.fromkeys(usual, 1.0), weights=dict.fromkeys(usual, 0.0),
                   usual=usual, unusual_flag=2)
    one = model.assess({"wall_mm": 19.0, "atlas_agreement": 0.8, "entropy": 0.03})
    assert not one["flag"] and one["reasons"] == ["myocardial wall implausibly thick (wall_mm 19, usual <= 17)"]
    two = model.assess({"wall_mm": 19.0, "atlas_agreement": 0.65, "entropy": 0.03})
    assert two["flag"] and two["reasons"][0] == "2 features outside the range of good fits (at least 2 set the flag)"
    assert two["reasons"][1:] == ["myocardial wall implausibly thick (wall_mm 19, usual <= 17)",
                                  "result far from the atlas (atlas_agreement 0.65, usual >= 0.7)"]
    assert not _model(usual=usual, centre=model.centre, spread=model.spread, weights=model.weights).assess(
        {"wall_mm": 19.0, "atlas_agreement": 0.65, "entropy": 0.03})["flag"]  # unusual_flag None: reasons only


def _three_sequences(n: int = 3, moved=(6, -4)):
    """Three sequences of one synthetic heart (noisy class intensities, 1.5 mm pixels), C0 rolled by
    ``moved`` voxels against the others: the atlas ``prob``, the ``images`` ``[3, X, Y, Z]`` and a
    subject of the first ``n`` sequences (LGE the reference) in the shape quality control reads."""
    prob = _atlas((64, 64, 3)).float()
    labels = prob.argmax(0).numpy()
    rng = np.random.default_rng(0)
    means = {"LGE": (0.2, 0.5, 0.9, 0.8), "C0": (0.3, 0.4, 0.9, 0.85), "T2": (0.4, 0.6, 0.1, 0.15)}
    images = np.stack([np.asarray(m)[labels] + 0.05 * rng.standard_normal(labels.shape) for m in means.values()])
    images[1] = np.roll(images[1], moved, axis=(0, 1))
    return prob, images, _subject_of(images, n)


def _subject_of(images: np.ndarray, n: int = 3):
    from types import SimpleNamespace

    return SimpleNamespace(sequences=("LGE", "C0", "T2")[:n], reference="LGE", parent=None, uncrop=lambda v, *a: v,
                           grid=SimpleNamespace(spacing=torch.tensor([1.5, 1.5, 8.0])),
                           images=torch.from_numpy(images[:n]).float(), coverage=torch.ones(n, *images.shape[1:]))


def test_sequence_offsets_find_a_sequence_acquired_out_of_place():
    """Three sequences of one synthetic heart (noisy class intensities); C0 moved by (6, -4) voxels of
    1.5 mm against the others. Its intensities fit the labelled heart best at that shift (10.8 mm),
    T2's where it is; the model flags C0 by name, not T2, and never with the rule off."""
    from mvmm_monai.pipeline.qc import sequence_offsets

    prob, images, subject = _three_sequences()
    offsets = sequence_offsets(subject, prob)
    assert set(offsets) == {"C0", "T2"}  # the reference is what the others are measured against
    assert offsets["C0"]["mm"] == pytest.approx(1.5 * math.hypot(6, 4), abs=0.01) and offsets["C0"]["gain"] > 0.5
    assert offsets["T2"]["mm"] == 0.0 and offsets["T2"]["gain"] == 0.0
    verdict = _model(offset_gain=0.05).assess({"a": 0.0}, offsets=offsets)
    assert verdict["flag"] and len(verdict["reasons"]) == 1 and verdict["reasons"][0].startswith("C0 fits the heart best 11 mm away")
    assert verdict["sequence_offsets"]["C0"]["mm"] == pytest.approx(10.82, abs=0.01)
    assert not _model().assess({"a": 0.0}, offsets=offsets)["flag"]  # offset_gain None: the rule is off
    # a fit whose registration put C0's slices back is measured on the slices as it used them
    back = torch.from_numpy(np.roll(images, (-6, 4), axis=(1, 2))).float()
    back[0], back[2] = torch.from_numpy(images[0]).float(), torch.from_numpy(images[2]).float()
    assert sequence_offsets(subject, prob, moved=(back, subject.coverage))["C0"] == {"mm": 0.0, "gain": 0.0}
    assert not _model(offset_gain=0.05, offset_min_mm=12.0).assess({"a": 0.0}, offsets=offsets)["flag"]  # nearer than the minimum


def test_pair_offsets_name_the_sequence_out_of_place_even_where_the_labels_followed_it():
    """The heart of the test above with C0 moved by (6, -4) voxels, and labels that followed C0 (the
    atlas moved with it). Against the labels, LGE and T2 look moved (:func:`sequence_offsets` finds
    T2 10.8 mm away); between the sequences, C0 is 10.8 mm from both others while they agree, so the
    model names C0 and not T2. With two sequences the one that is not the reference is named."""
    from mvmm_monai.pipeline.qc import out_of_place, sequence_offsets, sequence_pair_offsets

    prob, images, _ = _three_sequences()
    followed = torch.roll(prob, (6, -4), dims=(1, 2))  # the fit's labels where C0 shows the heart

    def subject(n: int):
        return _subject_of(images, n)

    three = subject(3)
    assert sequence_offsets(three, followed)["T2"]["mm"] == pytest.approx(10.82, abs=0.01)  # against the labels: T2
    pairs = sequence_pair_offsets(three, followed)
    assert set(pairs) == {"LGE|C0", "LGE|T2", "C0|T2"}
    assert pairs["LGE|C0"]["mm"] == pytest.approx(10.82, abs=0.01) and pairs["C0|T2"]["mm"] == pytest.approx(10.82, abs=0.01)
    assert pairs["LGE|T2"]["mm"] == 0.0 and pairs["LGE|C0"]["gain"] > 0.2
    assert set(out_of_place(pairs, three.sequences, 6.0, 0.1)) == {"C0"}
    model = _model(offset_gain=0.05, pair_offset_min_mm=6.0, pair_offset_gain=0.1)
    verdict = model.assess({"a": 0.0}, offsets=sequence_offsets(three, followed), pairs=pairs, sequences=three.sequences)
    assert verdict["flag"] and [r.split()[0] for r in verdict["reasons"]] == ["C0"]  # T2's label-based reason is dropped
    assert verdict["reasons"][0].startswith("C0 is out of place against LGE and T2, which lie nearer each other")
    assert not out_of_place(pairs, three.sequences, 12.0, 0.1) and not out_of_place(pairs, three.sequences, 6.0, None)
    # all three far from each other: the one whose nearest other is twice as far as the others' is named
    spread = {"LGE|C0": {"mm": 19.1, "gain": 0.3}, "LGE|T2": {"mm": 5.3, "gain": 0.01}, "C0|T2": {"mm": 25.6, "gain": 0.1}}
    assert set(out_of_place(spread, three.sequences, 4.0, 0.05)) == {"C0"}
    assert not out_of_place({**spread, "LGE|C0": {"mm": 9.0, "gain": 0.3}}, three.sequences, 4.0, 0.05)  # 9 < 2 x 5.3
    two = subject(2)
    assert set(out_of_place(sequence_pair_offsets(two, followed), two.sequences, 6.0, 0.1)) == {"C0"}
    # nothing moved: no sequence is far from the others
    images[1] = np.roll(images[1], (-6, 4), axis=(0, 1))
    assert not out_of_place(sequence_pair_offsets(subject(3), prob), three.sequences, 3.0, 0.05)
    # the reference moved: it is what the others are placed against, never named
    images[0] = np.roll(images[0], (6, -4), axis=(0, 1))
    moved_reference = sequence_pair_offsets(subject(3), prob)
    assert moved_reference["LGE|C0"]["mm"] == pytest.approx(10.82, abs=0.01) and not out_of_place(moved_reference, three.sequences, 6.0, 0.1)


def test_window_sums_are_the_masked_sums_at_every_shift():
    from mvmm_monai.pipeline.qc import _window_sums

    rng = np.random.default_rng(1)
    values = rng.random((40, 36, 3))
    mask = np.zeros(values.shape, dtype=bool)
    mask[12:20, 10:22, :2] = rng.random((8, 12, 2)) > 0.4
    other = np.zeros(values.shape, dtype=bool)
    other[25:30, 5:9, 2] = True
    sums = _window_sums([mask, other], [values, values ** 2], (9, 7))
    assert sums.shape == (2, 2, 19, 15)
    for i, m in enumerate((mask, other)):
        for j, v in enumerate((values, values ** 2)):
            padded = np.pad(v, ((9, 9), (7, 7), (0, 0)))
            for dx, dy in ((0, 0), (4, -7), (-9, 7), (9, 2)):  # the shift's voxels off the volume count as 0
                assert sums[i, j, dx + 9, dy + 7] == pytest.approx((m * padded[9 + dx:49 + dx, 7 + dy:43 + dy]).sum())


def test_the_packaged_model_weighs_every_feature():
    model = build(compose_config([]).qc, _convert_="all")
    assert isinstance(model, QualityModel)
    assert set(model.weights) == set(FEATURES) and 0 < model.threshold < 1
    assert all(lo <= hi for lo, hi in model.usual.values())
    assert model.calibration["fits"] >= 50  # made from real fits (benchmarks/qc_calibration.py)


def test_cohort_summary_lists_failed_then_flagged_subjects_first(tmp_path):
    results = {
        "a": {"dice": {"LGE": {"myocardium": 0.85}}, "qc": {"score": 0.84, "flag": False, "reasons": []}},
        "b": {"dice": {"LGE": {"myocardium": 0.40}}, "qc": {"score": 0.52, "flag": True, "reasons": ["estimated myocardium Dice 0.52 below 0.70"]}},
    }
    summary = write_cohort_summary(tmp_path, results, {"c": "ValueError: bad file"})
    assert summary["flagged"] == ["b"]
    rows = list(csv.DictReader((tmp_path / "cohort_summary.csv").read_text().splitlines()))
    assert [(r["subject"], r["status"]) for r in rows[:3]] == [("c", "failed"), ("b", "flagged"), ("a", "ok")]
    assert "below 0.70" in rows[1]["qc_reasons"]
    assert float(rows[3]["qc_score"]) == pytest.approx(0.68)  # the mean row


def test_a_fit_reports_its_quality_and_a_turned_atlas_scores_lower(tmp_path):
    common = [f"paths.cache_dir={tmp_path / 'cache'}", "callbacks.progress.refresh_rate=0", "~logger", "trainer.max_epochs=15"]
    given = fit(compose_config([f"paths.output_dir={tmp_path / 'given'}", *common]))
    turned = fit(compose_config([f"paths.output_dir={tmp_path / 'turned'}", "atlas.displace={angle_deg:180}", *common]))
    for m in (given, turned):
        qc = m["qc"]
        assert 0 <= qc["score"] <= 1 and isinstance(qc["flag"], bool)
        assert set(qc["features"]) == set(FEATURES) and qc["features"]["placement_score"] is None  # identity placement
        assert all(math.isfinite(v) for k, v in qc["features"].items() if k != "placement_score")
        assert set(qc["sequence_agreement"]) == {"C0", "T2", "DE"}
        assert set(qc["sequence_offsets"]) == {"C0", "T2"} and all(0 <= o["mm"] <= 26 for o in qc["sequence_offsets"].values())
        assert set(qc["sequence_pair_offsets"]) == {"DE|C0", "DE|T2", "C0|T2"}  # the reference first
    assert turned["dice"]["DE"]["myocardium"] < given["dice"]["DE"]["myocardium"] - 0.2
    assert turned["qc"]["score"] < given["qc"]["score"]
    assert turned["qc"]["features"]["atlas_agreement"] < given["qc"]["features"]["atlas_agreement"]


def test_notes_name_an_unconverged_fit_and_a_heart_size_on_the_search_edge():
    from types import SimpleNamespace

    from mvmm_monai.pipeline.fit import placement_scale_range
    from mvmm_monai.pipeline.qc import fit_notes

    lo, hi = placement_scale_range(compose_config(["data=myops"]))
    assert (lo, hi) == pytest.approx((0.55 * 0.95, 1.3 * 1.05))
    notes = fit_notes(False, SimpleNamespace(scale=0.5225), (lo, hi))
    assert len(notes) == 2 and "max_epochs" in notes[0] and "edge of the placement search" in notes[1]
    assert fit_notes(True, SimpleNamespace(scale=1.0), (lo, hi)) == []
    verdict = _model().assess({"a": 0.5}, notes=notes)
    assert not verdict["flag"] and verdict["reasons"] == notes  # notes alone do not flag


def _heart(pixel_mm: float, fov_mm: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """A slice of LV disc (radius 12 mm) and myocardial ring (to 20 mm) at ``pixel_mm``, and a good
    fit's entropy on it: 0.25 on the label borders (one voxel wide at any pixel), 0.005 inside."""
    n = int(round(fov_mm / pixel_mm))
    c = (np.arange(n) + 0.5) * pixel_mm - fov_mm / 2
    r = np.hypot(c[:, None], c[None, :])
    labels = np.where(r < 12, 2, np.where(r < 20, 1, 0))[..., None]
    border = np.zeros(labels.shape, dtype=bool)
    for axis in (0, 1):
        border |= labels != np.roll(labels, 1, axis=axis)
        border |= labels != np.roll(labels, -1, axis=axis)
    return labels, np.where(border, 0.25, 0.005)


def test_heart_entropy_does_not_grow_with_the_voxel_size():
    """The label borders' share of the heart doubles at twice the pixel; the plain mean entropy
    with it (a good fit on coarser images looked uncertain), the feature does not; uncertainty in
    the heart's interior (a failed fit's) still raises it."""
    from mvmm_monai.pipeline.qc import ENTROPY_PIXEL_MM, heart_entropy

    fine, coarse = _heart(ENTROPY_PIXEL_MM), _heart(2 * ENTROPY_PIXEL_MM)
    plain = [float(e[lab > 0].mean()) for lab, e in (fine, coarse)]
    assert plain[1] > 1.6 * plain[0]
    measured = [heart_entropy(e, lab, p) for (lab, e), p in ((fine, ENTROPY_PIXEL_MM), (coarse, 2 * ENTROPY_PIXEL_MM))]
    assert measured[0] == pytest.approx(plain[0])
    assert measured[1] == pytest.approx(measured[0], rel=0.1)
    labels, ent = coarse
    assert heart_entropy(np.where(ent < 0.1, 0.1, ent), labels, 2 * ENTROPY_PIXEL_MM) > 2 * measured[1]
    assert heart_entropy(ent, np.zeros_like(labels), 1.0) == 1.0
    # a finer pixel than the calibration's: the plain mean (the same voxels are judged the same)
    assert heart_entropy(ent, labels, 0.5 * ENTROPY_PIXEL_MM) == pytest.approx(plain[1])
