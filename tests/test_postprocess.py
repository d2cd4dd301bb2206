"""Post-processing of the final labels: the LV cavity fill (trabeculae inside the cavity's convex hull
go to the LV), the minimum wall, the smooth endocardium, the blood rim and its mirror the wall rim,
the smooth epicardium and one RV region per slice; each moves only what it should."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from mvmm_monai.conventions.labelling import (
    claim_blood_rim,
    fill_lv_cavity,
    follow_labelling_conventions,
    give_wall_rim,
    keep_main_rv,
    lv_cavity_fill_mode,
    lv_cavity_mask,
    smooth_endocardium,
    smooth_epicardium,
    thin_lv_at_wall,
)


def _ring():
    """An anisotropic slice (0.8 x 1.2 mm pixels) with a true LV of r <= 15 mm inside an 8 mm
    wall: spacing, offsets from the centre (mm), radius, angle (degrees) and the class map."""
    sx, sy = 0.8, 1.2  # mm
    x, y = np.meshgrid(np.arange(80) * sx, np.arange(54) * sy, indexing="ij")
    dx, dy = x - 32.0, y - 32.0
    r, ang = np.hypot(dx, dy), np.degrees(np.arctan2(dy, dx))
    truth = np.zeros(r.shape, dtype=np.int64)
    truth[r <= 23] = 1
    truth[r <= 15] = 2
    return sx, sy, dx, dy, r, ang, truth


def _one_hot_posterior(stack: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.from_numpy(stack), 4).permute(3, 0, 1, 2).double() * 0.7 + 0.075


def labelled_slice():
    """LV disc (r 10) with a myocardial notch carved into it, myocardial ring (r 10-15), RV and a
    far-away stray LV blob."""
    x, y = np.meshgrid(np.arange(60), np.arange(60), indexing="ij")
    r = np.hypot(x - 30, y - 30)
    lab = np.zeros((60, 60), dtype=np.int64)
    lab[r <= 15] = 1
    lab[r <= 10] = 2
    notch = (r <= 10) & (r > 6) & (np.abs(y - 30) <= 2) & (x > 30)  # a trabecula reaching in from the wall
    lab[notch] = 1
    lab[(np.hypot(x - 30, y - 52) <= 6)] = 3
    lab[2:5, 2:5] = 2  # stray LV voxels: must not widen the hull
    return lab, notch


def test_fill_moves_only_the_enclosed_myocardium():
    lab, notch = labelled_slice()
    stack = np.stack([lab, lab], -1)
    post = _one_hot_posterior(stack)
    out = fill_lv_cavity(post)
    new = out.argmax(0).numpy()
    assert torch.allclose(out.sum(0), post.sum(0))
    for z in range(2):
        moved = (new[..., z] != stack[..., z])
        # the notch voxels strictly inside the disc's hull go to LV; the ring, RV and the stray blob stay
        assert moved.any() and (new[..., z][moved] == 2).all() and (stack[..., z][moved] == 1).all()
        assert moved[notch].mean() > 0.6 and not moved[~notch].any()
    assert (new[2:5, 2:5] == 2).all() and (new[15:45, 15:45] == 1).sum() > 0


def test_cavity_mask_skips_tiny_lv_and_checks_shape():
    lab = np.zeros((20, 20, 1), dtype=np.int64)
    lab[5, 5, 0] = 2
    assert not lv_cavity_mask(lab).any()
    with pytest.raises(ValueError, match="fill_lv_cavity"):
        fill_lv_cavity(torch.zeros(4, 5, 5))


def test_holes_mode_fills_enclosed_myocardium_only():
    """``holes``: a papillary muscle the pool surrounds goes to the LV, a notch open to the wall stays."""
    lab, notch = labelled_slice()
    x, y = np.meshgrid(np.arange(60), np.arange(60), indexing="ij")
    muscle = np.hypot(x - 27, y - 27) <= 2  # inside the pool, away from the notch
    lab[muscle] = 1
    mask = lv_cavity_mask(lab[..., None], mode="holes")[..., 0]
    assert mask[muscle].all() and not mask[notch].any()
    hull = lv_cavity_mask(lab[..., None], mode="hull")[..., 0]
    assert hull[muscle].all() and hull[notch].mean() > 0.6
    post = torch.nn.functional.one_hot(torch.from_numpy(lab[..., None]), 4).permute(3, 0, 1, 2).double()
    new = fill_lv_cavity(post, mode="holes").argmax(0).numpy()[..., 0]
    assert (new[muscle] == 2).all() and (new[notch] == 1).all()


@pytest.mark.parametrize("value, mode", [(True, "hull"), (False, None), (None, None), ("holes", "holes"), ("hull", "hull")])
def test_fill_mode_from_config(value, mode):
    assert lv_cavity_fill_mode(value) == mode


@pytest.mark.parametrize("value", ["convex", 1, "yes"])
def test_bad_fill_mode_names_the_key(value):
    with pytest.raises(ValueError, match="postprocess.lv_cavity_fill"):
        lv_cavity_fill_mode(value)
    with pytest.raises(ValueError, match="mode must be one of"):
        lv_cavity_mask(np.zeros((4, 4, 1), dtype=np.int64), mode="convex")


def test_thin_wall_gives_the_bulge_back_to_the_myocardium():
    """A true LV (r <= 15 mm) inside an 8 mm wall; the mixture's LV bulges to r = 21 mm over a
    60-degree sector (scar taken for blood), leaving 2 mm of wall there. With a 6 mm minimum wall
    the LV is cut back to r <= 17 mm in the sector and nowhere else, on an anisotropic grid."""
    sx, sy, dx, dy, r, ang, truth = _ring()
    sector = (ang >= 0) & (ang <= 60)
    pred = truth.copy()
    pred[sector & (r <= 21)] = 2
    stack = np.stack([pred, np.ones_like(pred)], -1)  # second slice: all myocardium, no outside
    post = _one_hot_posterior(stack)
    out = thin_lv_at_wall(post, (sx, sy), 6.0)
    assert torch.allclose(out.sum(0), torch.ones(out.shape[1:], dtype=out.dtype))
    lab = out.argmax(0).numpy()[..., 0]
    assert not ((lab == 2) & sector & (r > 17.0 + 0.5 * max(sx, sy))).any()  # cut back to the 6 mm wall
    assert (lab[r <= 15] == 2).all()  # the true pool untouched
    assert np.array_equal(lab[~sector], pred[~sector])  # elsewhere the 8 mm wall is thick enough
    dice = lambda a, b: 2 * ((a == 2) & (b == 2)).sum() / ((a == 2).sum() + (b == 2).sum())
    assert dice(lab, truth) > dice(pred, truth) + 0.02
    assert torch.equal(out[..., 1], post[..., 1])  # a slice with no outside tissue: left alone
    assert thin_lv_at_wall(post, (sx, sy), 0.0) is post
    with pytest.raises(ValueError, match="min_wall_mm must be >= 0"):
        thin_lv_at_wall(post, (sx, sy), -1.0)


def test_smooth_endocardium_fills_a_dent_and_cuts_a_bulge():
    """A true LV (r <= 15 mm) inside an 8 mm wall; the mixture's pool has a 24-degree dent to
    r = 6 mm (a dark trabecula) and a 24-degree bulge to r = 21 mm (bright wall). The running
    median of the radius over +-32 degrees restores the round pool on an anisotropic grid, and
    touches neither the background nor the RV."""
    sx, sy, dx, dy, r, ang, truth = _ring()
    truth[(dx > 26) & (np.abs(dy) < 8)] = 3  # an RV patch outside the wall
    dent, bulge = (ang >= 100) & (ang <= 124), (ang >= -60) & (ang <= -36)
    pred = truth.copy()
    pred[dent & (r > 6) & (r <= 15)] = 1
    pred[bulge & (r > 15) & (r <= 21)] = 2
    stack = np.stack([pred, np.where(r <= 3, 2, 1)], -1)  # second slice: a pool too small to smooth
    post = _one_hot_posterior(stack)
    out = smooth_endocardium(post, (sx, sy), 32.0)
    assert torch.allclose(out.sum(0), torch.ones(out.shape[1:], dtype=out.dtype))
    lab = out.argmax(0).numpy()[..., 0]
    tol = max(sx, sy)
    assert (lab[dent & (r <= 15 - tol)] == 2).all()  # the dent is filled
    assert not ((lab == 2) & (r > 15 + tol)).any()  # the bulge is cut
    assert np.array_equal(lab[np.isin(pred, (0, 3))], pred[np.isin(pred, (0, 3))])  # outside the heart: untouched
    dice = lambda a, b: 2 * ((a == 2) & (b == 2)).sum() / ((a == 2).sum() + (b == 2).sum())
    assert dice(lab, truth) > 0.98 and dice(lab, truth) > dice(pred, truth) + 0.02
    assert torch.equal(out[..., 1], post[..., 1])
    assert smooth_endocardium(post, (sx, sy), 0.0) is post
    with pytest.raises(ValueError, match="half_window_deg must be in"):
        smooth_endocardium(post, (sx, sy), -5.0)


def test_smooth_epicardium_cuts_a_bump_and_fills_a_dent():
    """A true heart (LV r <= 15 mm, wall to r = 23 mm) with an RV beside it; the mixture's wall has a
    24-degree bump of myocardium out to r = 29 mm (epicardial fat) whose runner-up class is the
    background, a second one beside the RV whose runner-up is the RV, and a 24-degree dent where the
    wall stops at r = 18 mm. The running median of the heart's outer radius over +-32 degrees
    restores the ring on an anisotropic grid: each bump goes to its runner-up class, the dent becomes
    myocardium, the LV and the RV are untouched and a distribution stays one."""
    sx, sy, dx, dy, r, ang, truth = _ring()
    rv = (r > 23) & (r <= 31) & (ang >= 150)
    truth[rv] = 3
    bump, rv_bump, dent = (ang >= -60) & (ang <= -36), (ang >= 124) & (ang <= 148), (ang >= 30) & (ang <= 54)
    pred = truth.copy()
    pred[bump & (r > 23) & (r <= 29)] = 1
    pred[rv_bump & (r > 23) & (r <= 29)] = 1
    pred[dent & (r > 18) & (r <= 23)] = 0
    stack = np.stack([pred, np.where(r <= 3, 2, 1)], -1)  # second slice: a pool too small to go by
    post = _one_hot_posterior(stack)
    post[3, ..., 0] = torch.where(torch.from_numpy(rv_bump), post[3, ..., 0] + 0.05, post[3, ..., 0])  # the RV ranks next there
    post = post / post.sum(0, keepdim=True)
    out = smooth_epicardium(post, (sx, sy), 32.0)
    assert torch.allclose(out.sum(0), torch.ones(out.shape[1:], dtype=out.dtype))
    lab = out.argmax(0).numpy()[..., 0]
    tol = max(sx, sy)
    assert (lab[bump & (r > 23 + tol)] == 0).all()  # the bump goes to the background
    assert (lab[rv_bump & (r > 23 + tol) & (r <= 29)] == 3).all()  # ... or to the RV where that ranks next
    assert (lab[dent & (r > 15) & (r <= 23 - tol)] == 1).all()  # the dent is filled
    for k in (2, 3):  # LV and RV voxels stay what they were
        assert (lab[pred == k] == k).all()
    dice = lambda a, b: 2 * ((a == 1) & (b == 1)).sum() / ((a == 1).sum() + (b == 1).sum())
    assert dice(lab, truth) > 0.97 and dice(lab, truth) > dice(pred, truth) + 0.03
    assert torch.equal(out[..., 1], post[..., 1])
    assert smooth_epicardium(post, (sx, sy), 0.0) is post
    with pytest.raises(ValueError, match="half_window_deg must be in"):
        smooth_epicardium(post, (sx, sy), 181.0)


def test_keep_main_rv_gives_other_rv_regions_to_their_runner_up():
    """A slice with the RV beside the heart and two smaller blood-bright regions the mixture called
    RV (one whose runner-up is the background, one whose runner-up is the LV); a second slice with
    a single RV region. Only the two small regions change, each to its runner-up class."""
    sx, sy, dx, dy, r, ang, truth = _ring()
    main = (r > 23) & (r <= 31) & (ang >= 150)
    far_bg, far_lv = (dx > 28) & (np.abs(dy) < 4), (dx < -28) & (dy < -25)
    pred = truth.copy()
    assert far_bg.sum() > 5 and far_lv.sum() > 5
    pred[main | far_bg | far_lv] = 3
    stack = np.stack([pred, np.where(main, 3, truth)], -1)
    post = _one_hot_posterior(stack)
    post[2, ..., 0] = torch.where(torch.from_numpy(far_lv), post[2, ..., 0] + 0.05, post[2, ..., 0])
    post = post / post.sum(0, keepdim=True)
    out = keep_main_rv(post)
    assert torch.allclose(out.sum(0), torch.ones(out.shape[1:], dtype=out.dtype))
    lab = out.argmax(0).numpy()
    assert (lab[..., 0][main] == 3).all() and (lab[..., 0][far_bg] == 0).all() and (lab[..., 0][far_lv] == 2).all()
    untouched = ~(far_bg | far_lv)
    assert np.array_equal(lab[..., 0][untouched], pred[untouched])
    assert torch.equal(out[..., 1], post[..., 1])  # one region: nothing to do


def test_blood_rim_claims_the_partial_volume_rim_but_not_oedema():
    """The mixture's pool stops one voxel short of the true LV: that voxel ring is partial volume
    (bSSFP between wall and blood, T2 between the dark blood and the wall). It goes to the LV,
    except in a sector of oedema (bright in bSSFP *and* T2) and a sector where the ring is plain
    wall; nothing beyond the ring moves, and where T2 does not reach (the second slice, as on an
    MS-CMRSeg stack) bSSFP decides alone."""
    sx, sy, dx, dy, r, ang, _ = _ring()
    pred = np.zeros(r.shape, dtype=np.int64)
    pred[r <= 23] = 1
    pred[r <= 13] = 2
    pred[(dx > 26) & (np.abs(dy) < 8)] = 3  # an RV patch outside the wall
    ring = ndimage.binary_dilation(pred == 2) & (pred == 1)  # the four-neighbour ring
    oedema, plain = (ang >= 0) & (ang <= 60), (ang >= 150) & (ang <= 200)
    tissue = {0: (0.1, 0.5), 1: (0.35, 0.4), 2: (0.8, 0.1), 3: (0.75, 0.15)}  # class: (bSSFP, T2)
    c0, t2 = np.zeros(r.shape), np.zeros(r.shape)
    for k, (a, b) in tissue.items():
        c0[pred == k], t2[pred == k] = a, b
    c0[ring], t2[ring] = 0.55, 0.25  # partial volume: a little over a third of the way to the blood
    c0[oedema & (pred == 1)], t2[oedema & (pred == 1)] = 0.7, 0.7  # oedematous wall, ring included
    c0[plain & ring], t2[plain & ring] = 0.35, 0.4
    images = torch.from_numpy(np.stack([np.stack([c0, c0], -1), np.stack([t2, t2], -1)])).float()
    coverage = torch.ones_like(images)
    coverage[1, ..., 1] = 0  # T2 does not cover the second slice
    post = _one_hot_posterior(np.stack([pred, pred], -1))
    out = claim_blood_rim(post, images, coverage, {0: 0.25, 1: 0.0})
    assert torch.allclose(out.sum(0), torch.ones(out.shape[1:], dtype=out.dtype))
    lab = out.argmax(0).numpy()
    moved = lab[..., 0] != pred
    assert np.array_equal(moved, ring & ~oedema & ~plain) and (lab[..., 0][moved] == 2).all()
    assert moved.sum() > 50
    alone = claim_blood_rim(post, images, coverage, {0: 0.25}).argmax(0).numpy()
    assert np.array_equal(alone[..., 0] != pred, ring & ~plain)  # bSSFP alone: the oedematous ring taken too
    assert np.array_equal(lab[..., 1], alone[..., 1])  # uncovered by T2: bSSFP alone decides there
    flat = images.clone()
    flat[1] = 0.5  # a T2 without contrast between wall and blood has nothing to say: bSSFP decides alone
    assert np.array_equal(claim_blood_rim(post, flat, coverage, {0: 0.25, 1: 0.0}).argmax(0).numpy(), alone)
    nothing = coverage.clone()
    nothing[0, ..., 1] = 0  # no sequence of the rule reaches the second slice: it stays as it was
    assert np.array_equal(claim_blood_rim(post, images, nothing, {0: 0.25, 1: 0.0}).argmax(0)[..., 1].numpy(), pred)
    assert claim_blood_rim(post, images, coverage, {}) is post
    with pytest.raises(ValueError, match="claim_blood_rim: images"):
        claim_blood_rim(post, images[:, :-1], coverage[:, :-1], {0: 0.25})


def test_wall_rim_gives_the_dark_subendocardial_band_to_the_wall_up_to_its_depth():
    """The mixture's pool reaches 3 voxels into the true wall in a sector of subendocardial scar
    (LGE as bright as blood; T2 darker than the wall). The wall rim gives that band back to the
    myocardium, one voxel layer per pass up to its depth and no deeper; elsewhere the pool's edge is
    blood in T2 and stays LV, and where no sequence of the rule reaches a slice nothing moves."""
    sx, sy, dx, dy, r, ang, truth = _ring()
    scar = (ang >= -40) & (ang <= 40)
    band = scar & (r > 15 - 3 * sx) & (r <= 15)  # true wall the mixture took into the pool
    pred = truth.copy()
    pred[band] = 2
    t2 = np.where(truth == 1, 0.4, np.where(truth == 2, 0.9, 0.1))  # wall, blood, background
    t2[band] = 0.2  # darker than the wall: (0.2 - 0.4) / (0.9 - 0.4) = -0.4
    images = torch.from_numpy(np.stack([np.stack([t2, t2], -1)])).float()
    coverage = torch.ones_like(images)
    coverage[0, ..., 1] = 0  # T2 does not cover the second slice
    post = _one_hot_posterior(np.stack([pred, pred], -1))
    layers = []
    for passes in (1, 2, 10):
        out = give_wall_rim(post, images, coverage, {0: -0.25}, passes)
        assert torch.allclose(out.sum(0), torch.ones(out.shape[1:], dtype=out.dtype))
        lab = out.argmax(0).numpy()
        moved = lab[..., 0] != pred
        assert (lab[..., 0][moved] == 1).all() and not (moved & ~band).any()  # only the dark band, to the wall
        assert np.array_equal(lab[..., 1], pred)  # uncovered: nothing to go by
        layers.append(int(moved.sum()))
    assert 0 < layers[0] < layers[1] < layers[2] == int(band.sum())  # deeper with every pass, never past the band
    assert give_wall_rim(post, images, coverage, {0: -0.5}, 10).argmax(0)[..., 0][band].eq(2).all()  # -0.4 is not below -0.5
    assert give_wall_rim(post, images, coverage, {}) is post
    # through the conventions: the depth in mm sets the passes (mean in-plane spacing 1 mm here: 2 mm = 2 passes)
    two = follow_labelling_conventions(post, (0.8, 1.2), fill_mode=None, images=images, coverage=coverage,
                                       wall_rim={0: -0.25}, wall_rim_mm=2.0)
    assert int((two.argmax(0).numpy()[..., 0] != pred).sum()) == layers[1]
    with pytest.raises(ValueError, match="give_wall_rim: images"):
        give_wall_rim(post, images[:, :-1], coverage[:, :-1], {0: -0.25})


def test_rims_against_each_slice_follow_an_intensity_shift_between_slices():
    """Two slices of the same heart, the second acquired with every T2 intensity 0.3 higher (another
    breath-hold, another scaling). Against the whole heart's medians the second slice's dark band
    is no longer darker than the wall by a quarter of the wall-to-blood difference; against each
    slice's own (``rim_reference="slice"``) both slices give the same band to the wall."""
    from mvmm_monai.conventions.labelling import LabellingConventions

    sx, sy, dx, dy, r, ang, truth = _ring()
    band = (ang >= -40) & (ang <= 40) & (r > 15 - 3 * sx) & (r <= 15)
    pred = truth.copy()
    pred[band] = 2
    t2 = np.where(truth == 1, 0.4, np.where(truth == 2, 0.9, 0.1))
    t2[band] = 0.2  # (0.2 - 0.4) / (0.9 - 0.4) = -0.4 on its own slice
    images = torch.from_numpy(np.stack([np.stack([t2, t2 + 0.3], -1)])).float()
    coverage = torch.ones_like(images)
    post = _one_hot_posterior(np.stack([pred, pred], -1))
    moved = {ref: give_wall_rim(post, images, coverage, {0: -0.25}, 10, reference=ref).argmax(0).numpy() != np.stack([pred, pred], -1)
             for ref in ("heart", "slice")}
    assert moved["slice"][..., 0][band].all() and moved["slice"][..., 1][band].all() and moved["slice"].sum() == 2 * band.sum()
    assert moved["heart"][..., 1].sum() < band.sum()  # the brighter slice's band reads as pool against the heart's medians
    with pytest.raises(ValueError, match="rim_reference"):
        give_wall_rim(post, images, coverage, {0: -0.25}, reference="stack")
    with pytest.raises(ValueError, match="postprocess.rim_reference"):
        LabellingConventions(rim_reference="stack")
    assert LabellingConventions(rim_reference="slice").as_dict()["rim_reference"] == "slice"


def test_class_argmax_is_torch_argmax_over_the_class_axis_ties_included():
    """The label maps' argmax (over a contiguous last axis on the CPU) gives torch's ``argmax(0)``,
    ties to the lower class, for 3D and 2D score maps."""
    from mvmm_monai.classes import class_argmax

    g = torch.Generator().manual_seed(0)
    for shape in ((4, 9, 7, 3), (4, 11, 5)):
        scores = torch.randint(0, 3, shape, generator=g).float()  # many ties
        assert torch.equal(class_argmax(scores), scores.argmax(0))
        probs = torch.softmax(torch.randn(shape, generator=g), dim=0)
        assert torch.equal(class_argmax(probs), probs.argmax(0))
