"""Post-processing of the final posterior that follows the manual labelling conventions.

MS-CMRSeg and MyoPS (like ACDC) count papillary muscles and trabeculations as part of the left
ventricular cavity: the manual endocardial contour is drawn smoothly around them. Intensity
models see those structures as myocardium-like (intermediate in bSSFP and LGE), so the mixture
labels a rim of the cavity as myocardium. :func:`fill_lv_cavity` gives every voxel inside the
convex hull of a slice's main LV blood pool that the mixture called myocardium back to the LV.
The compact myocardium lies outside that hull and is untouched.

A second convention: the manual myocardium includes scar and oedema, which LGE and bSSFP show as
bright as blood, so the mixture can take them into the LV pool and leave a wall thinner than any
the labels draw. :func:`thin_lv_at_wall` gives back to the myocardium every LV voxel closer than
``postprocess.min_wall_mm`` (in-plane) to tissue that is neither LV nor myocardium; it runs before the
cavity fill.

A third: the manual endocardial contour is a smooth curve. :func:`smooth_endocardium` takes, per
slice, the LV pool's radius around its centroid as a function of angle and replaces it with its
running median over ``postprocess.endocardium_median_deg`` on either side: the dents that a dark
trabecula or a partial-volume rim cuts into the pool are filled, and the narrow bulges that bright
damaged wall adds to it are cut. It runs last, on the filled cavity (on the raw pool its
trabecular notches pull the median in: ``benchmarks/conventions_sweep.py --smooth-before-fill``).

A fourth: the manual endocardial contour runs along the outer edge of the blood-wall transition, so
the one-voxel partial-volume rim belongs to the cavity, while the mixture tends to give it to the
myocardium's broad second subtype. :func:`claim_blood_rim` gives a myocardium voxel that touches
the LV pool in-plane to the LV where every named sequence puts it on the blood's side of the wall:
at least ``postprocess.blood_rim[seq]`` of the way from the myocardium's median intensity to the LV's
(MyoPS: bSSFP at least a quarter of the way to the bright blood, and T2 no brighter than normal
wall, so that oedema, bright in bSSFP too, stays myocardium). It runs after the median.

The mirror of the fourth: subendocardial scar is as bright as the blood in LGE and near it in bSSFP,
so the mixture gives it to the pool, while the manual myocardium includes it. In the MyoPS T2 the
manual myocardium that the fits drew as LV lies below the wall's median intensity
(``benchmarks/lv_error_sources.py``). :func:`give_wall_rim` gives LV voxels that touch the
myocardium to it where every sequence of ``postprocess.wall_rim`` puts them on the wall's side of
a fraction of the way to the blood, growing into the pool by up to ``postprocess.wall_rim_mm``
(MyoPS: T2 darker than the wall by half the wall-to-blood difference, 3.5 mm; chosen per fold on
cross-validated fits, ``benchmarks/conventions_sweep.py``, record ``conventions_wall_rim``). It runs
after the blood rim.

A fifth: the manual epicardial contour is a smooth curve too. :func:`smooth_epicardium` takes, per
slice, the outer radius of the heart (the LV pool and the myocardium joined to it) around the pool's
centroid as a function of angle and replaces it with its running median over
``postprocess.epicardium_median_deg`` on either side: myocardium beyond it (bumps of epicardial fat,
liver or lung partial volume) goes to the class the posterior ranks next, and background within it
(dents) becomes myocardium. It runs after the blood rim. On the cross-validated fits of the 25 shared
MyoPS cases it raised the LGE myocardium Dice of every case (``benchmarks/conventions_sweep.py``).

A sixth: the manual RV is one region per slice. :func:`keep_main_rv` gives every other RV region of
a slice (blood-bright structures beside the heart) to the class the posterior ranks next there. It
runs last.

The cavity fill, measured on the real MyoPS test cases by ``benchmarks/real_myops.py``: LV Dice 0.846 -> 0.867,
myocardium 0.813 -> 0.819, RV unchanged. Switch it off with ``postprocess.lv_cavity_fill=false``;
``postprocess.lv_cavity_fill=holes`` fills only what the pool encloses completely (for labels drawn
around the papillary muscles; on held-out atlas folds of the MyoPS cases, ``benchmarks/real_myops.py``,
LV 0.873 against the hull's 0.890).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import Delaunay, QhullError
from torch import Tensor

from mvmm_monai.classes import class_argmax

BACKGROUND, MYO, LV, RV = 0, 1, 2, 3


def _convex_hull_mask(mask: np.ndarray) -> np.ndarray:
    """Pixels of a 2D grid inside the convex hull of ``mask``'s pixel centres."""
    pts = np.argwhere(mask)
    if len(pts) < 4:
        return mask.copy()
    try:
        tri = Delaunay(pts)
    except QhullError:  # collinear pixels
        return mask.copy()
    lo, hi = pts.min(0), pts.max(0) + 1
    box = np.stack(np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="ij"), -1).reshape(-1, 2)
    out = np.zeros_like(mask)
    inside = tri.find_simplex(box) >= 0
    out[box[inside, 0], box[inside, 1]] = True
    return out


FILL_MODES = ("hull", "holes")


def _main_pool(labels2d: np.ndarray, min_voxels: int) -> np.ndarray | None:
    """The largest connected LV region of a slice's class map (bool), or None with fewer than
    ``min_voxels`` LV pixels."""
    lv = labels2d == LV
    if lv.sum() < min_voxels:
        return None
    comp, n = ndimage.label(lv)
    if n > 1:
        lv = comp == 1 + int(np.argmax(ndimage.sum(lv, comp, range(1, n + 1))))
    return lv


def lv_cavity_mask(labels: np.ndarray, min_voxels: int = 10, mode: str = "hull") -> np.ndarray:
    """``[X, Y, Z]`` bool: per slice, the largest connected LV region of the class map ``labels``
    closed to its convex hull (``mode="hull"``) or with its enclosed holes filled (``"holes"``: only
    what the pool surrounds completely, so the border's concavities stay myocardium); slices with
    fewer than ``min_voxels`` LV voxels: none."""
    if mode not in FILL_MODES:
        raise ValueError(f"lv_cavity_mask: mode must be one of {FILL_MODES}, got {mode!r}")
    out = np.zeros(labels.shape, dtype=bool)
    for z in range(labels.shape[2]):
        lv = _main_pool(labels[..., z], min_voxels)
        if lv is None:
            continue
        out[..., z] = _convex_hull_mask(lv) if mode == "hull" else ndimage.binary_fill_holes(lv)
    return out


def lv_cavity_fill_mode(value) -> str | None:
    """The fill mode of the config value ``postprocess.lv_cavity_fill``: ``true`` = ``"hull"``, ``false`` /
    ``null`` = none, or a mode name; anything else is a config error naming the key."""
    if value is None or value is False:
        return None
    if value is True:
        return "hull"
    if isinstance(value, str) and value in FILL_MODES:
        return value
    raise ValueError(f"postprocess.lv_cavity_fill must be true, false or one of {FILL_MODES}, got {value!r}")


def fill_lv_cavity(posterior: Tensor, mode: str = "hull") -> Tensor:
    """Posterior ``[K, X, Y, Z]`` in which every voxel inside the LV cavity
    (:func:`lv_cavity_mask` of the argmax, ``mode`` ``"hull"`` or ``"holes"``) whose argmax is
    myocardium swaps its myocardium and LV probabilities (so it becomes LV and the distribution
    stays a distribution)."""
    if posterior.ndim != 4 or posterior.shape[0] <= LV:
        raise ValueError(f"fill_lv_cavity: posterior must be [K>=3, X, Y, Z], got {tuple(posterior.shape)}")
    labels = class_argmax(posterior).cpu().numpy()
    return _swap(posterior, MYO, LV, lv_cavity_mask(labels, mode=mode) & (labels == MYO))


def thin_lv_at_wall(posterior: Tensor, spacing_mm: tuple[float, float], min_wall_mm: float) -> Tensor:
    """Posterior ``[K, X, Y, Z]`` in which every voxel whose argmax is the LV and whose in-plane
    distance to the nearest voxel labelled neither LV nor myocardium (background, RV) is below
    ``min_wall_mm`` swaps its LV and myocardium probabilities (it becomes myocardium; the
    distribution stays a distribution). The distance is Euclidean in mm over the slice
    (``spacing_mm`` = in-plane voxel size). ``min_wall_mm=0`` changes nothing; slices without any
    such tissue are left alone."""
    if posterior.ndim != 4 or posterior.shape[0] <= LV:
        raise ValueError(f"thin_lv_at_wall: posterior must be [K>=3, X, Y, Z], got {tuple(posterior.shape)}")
    if not min_wall_mm >= 0:
        raise ValueError(f"thin_lv_at_wall: min_wall_mm must be >= 0, got {min_wall_mm}")
    if min_wall_mm == 0:
        return posterior
    labels = class_argmax(posterior).cpu().numpy()
    flip = np.zeros(labels.shape, dtype=bool)
    for z in range(labels.shape[2]):
        heart = np.isin(labels[..., z], (MYO, LV))
        if heart.all() or not (labels[..., z] == LV).any():
            continue
        dist = ndimage.distance_transform_edt(heart, sampling=tuple(float(v) for v in spacing_mm))
        flip[..., z] = (labels[..., z] == LV) & (dist < min_wall_mm)
    return _swap(posterior, MYO, LV, flip)


@dataclass(frozen=True)
class _Outline:
    """What :func:`smooth_endocardium` and :func:`smooth_epicardium` share: the argmax ``labels``
    ``[X, Y, Z]``, the pixels' in-plane coordinates ``gx``, ``gy`` (mm), ``n_angles`` sectors and
    the running median's ``half`` window in sectors."""

    labels: np.ndarray
    gx: np.ndarray
    gy: np.ndarray
    n_angles: int
    half: int
    tolerance_mm: float

    @classmethod
    def of(cls, name: str, posterior: Tensor, spacing_mm: tuple[float, float], half_window_deg: float, n_angles: int):
        """Check the arguments of ``name`` (errors name it); ``None`` when the window is 0 sectors."""
        if posterior.ndim != 4 or posterior.shape[0] <= LV:
            raise ValueError(f"{name}: posterior must be [K>=3, X, Y, Z], got {tuple(posterior.shape)}")
        if not 0 <= half_window_deg <= 180:
            raise ValueError(f"{name}: half_window_deg must be in [0, 180], got {half_window_deg}")
        half = int(round(half_window_deg * n_angles / 360.0))
        if half == 0:
            return None
        labels = class_argmax(posterior).cpu().numpy()
        sx, sy = (float(v) for v in spacing_mm)
        gx, gy = np.meshgrid(np.arange(labels.shape[0]) * sx, np.arange(labels.shape[1]) * sy, indexing="ij")
        return cls(labels, gx, gy, n_angles, half, 0.5 * min(sx, sy))

    def within(self, region: np.ndarray, pool: np.ndarray) -> np.ndarray:
        """Pixels of a slice (bool) within the smoothed outline of ``region``: in the sectors around
        the centroid of ``pool``, the outermost radius of ``region``'s pixels, replaced by its
        circular running median over ``half`` sectors either side, plus half a pixel."""
        dx, dy = self.gx - self.gx[pool].mean(), self.gy - self.gy[pool].mean()
        radius = np.hypot(dx, dy)
        sector = ((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * self.n_angles).astype(np.int64) % self.n_angles
        outer = np.zeros(self.n_angles)
        np.maximum.at(outer, sector[region], radius[region])
        smooth = ndimage.median_filter(outer, size=2 * self.half + 1, mode="wrap")
        return radius <= smooth[sector] + self.tolerance_mm


def smooth_endocardium(
    posterior: Tensor, spacing_mm: tuple[float, float], half_window_deg: float, n_angles: int = 90, min_voxels: int = 30
) -> Tensor:
    """Posterior ``[K, X, Y, Z]`` whose LV pool has a smooth endocardial contour. Per slice, the
    largest connected LV region of the argmax (slices with fewer than ``min_voxels`` LV voxels are
    left alone) gives, in ``n_angles`` equal angular sectors around its centroid, its outermost
    radius (mm, ``spacing_mm`` = in-plane voxel size); that radius is replaced by its circular
    running median over ``half_window_deg`` on either side (rounded to whole sectors). Myocardium
    voxels within the smoothed radius (half a voxel of tolerance) become LV, and voxels of the
    region beyond it become myocardium, by swapping the two probabilities (a distribution stays
    one). Background, RV and other LV regions are never touched. ``half_window_deg=0`` changes
    nothing."""
    outline = _Outline.of("smooth_endocardium", posterior, spacing_mm, half_window_deg, n_angles)
    if outline is None:
        return posterior
    labels = outline.labels
    flip = np.zeros(labels.shape, dtype=bool)
    for z in range(labels.shape[2]):
        lv = _main_pool(labels[..., z], min_voxels)
        if lv is None:
            continue
        inside = outline.within(lv, lv)
        flip[..., z] = (inside & (labels[..., z] == MYO)) | (~inside & lv)
    return _swap(posterior, MYO, LV, flip)


def smooth_epicardium(
    posterior: Tensor, spacing_mm: tuple[float, float], half_window_deg: float, n_angles: int = 90, min_voxels: int = 30
) -> Tensor:
    """Posterior ``[K, X, Y, Z]`` whose heart has a smooth epicardial contour. Per slice with a main
    LV pool (:func:`_main_pool`, at least ``min_voxels`` voxels), the heart is the connected region of
    LV and myocardium voxels of the argmax that holds that pool; in ``n_angles`` equal sectors around
    the pool's centroid its outermost radius (mm, ``spacing_mm`` = in-plane voxel size) is replaced by
    its circular running median over ``half_window_deg`` on either side. A myocardium voxel beyond
    the smoothed radius (half a voxel of tolerance) swaps its myocardium probability with that of
    the class the posterior ranks next there (so it becomes that class); a background voxel within
    it swaps its background and myocardium probabilities (it becomes myocardium). A distribution
    stays one; LV and RV voxels are never changed. ``half_window_deg=0`` changes nothing."""
    outline = _Outline.of("smooth_epicardium", posterior, spacing_mm, half_window_deg, n_angles)
    if outline is None:
        return posterior
    labels = outline.labels
    beyond = np.zeros(labels.shape, dtype=bool)
    within = np.zeros(labels.shape, dtype=bool)
    for z in range(labels.shape[2]):
        lv = _main_pool(labels[..., z], min_voxels)
        if lv is None:
            continue
        comp, _ = ndimage.label(np.isin(labels[..., z], (MYO, LV)))
        inside = outline.within(comp == comp[lv].max(), lv)
        beyond[..., z] = ~inside & (labels[..., z] == MYO)
        within[..., z] = inside & (labels[..., z] == BACKGROUND)
    return _swap(_swap_with_runner_up(posterior, MYO, beyond), MYO, BACKGROUND, within)


#: the four in-plane neighbours of a voxel of a [X, Y, Z] volume (no neighbour across slices)
_IN_PLANE_CROSS = np.zeros((3, 3, 1), dtype=bool)
_IN_PLANE_CROSS[1, :, 0] = _IN_PLANE_CROSS[:, 1, 0] = True


#: rim references (``postprocess.rim_reference``): whose medians ``t`` is measured against
RIM_REFERENCES = ("heart", "slice")
#: with ``rim_reference="slice"``, a slice with fewer covered myocardium or LV voxels than this
#: measures against the whole heart's medians
_MIN_SLICE_VOXELS = 10


def _rim_voxels(labels: np.ndarray, images: Tensor, coverage: Tensor, fractions: dict[int, float], rim_of: int,
                touching: int | None, blood_side: bool, reference: str = "heart") -> np.ndarray | None:
    """Voxels of class ``rim_of`` with a ``touching`` voxel among their four in-plane neighbours
    (every voxel of the class where ``touching`` is None) that the channels of ``fractions`` put on
    the blood's side (``blood_side``: ``t >= fraction``) or the wall's side (``t < fraction``) of
    ``fraction``, where ``t = (I_n - m_myo) / (m_lv - m_myo)`` with the channel's medians over the
    covered myocardium and LV voxels: of the whole heart (``reference="heart"``) or of the voxel's
    own slice (``"slice"``; a slice with fewer than ten covered voxels of either class, or without
    contrast between them, uses the heart's). A voxel must be covered by at least one of the
    channels, and every channel that covers it must agree: a sequence that does not reach a slice
    (T2 on a few slices of an MS-CMRSeg stack) leaves the rule to the others there, as does a
    channel with no covered myocardium, no covered LV or no contrast between them; ``None`` when no
    channel is left."""
    if reference not in RIM_REFERENCES:
        raise ValueError(f"postprocess.rim_reference must be one of {list(RIM_REFERENCES)}, got {reference!r}")
    myo, lv = labels == MYO, labels == LV
    rim = labels == rim_of
    if touching is not None:
        rim &= ndimage.binary_dilation(labels == touching, structure=_IN_PLANE_CROSS)
    seen = np.zeros_like(rim)
    for channel, fraction in fractions.items():
        image = images[channel].detach().cpu().numpy()
        covered = coverage[channel].detach().cpu().numpy() > 0.5
        if not (myo & covered).any() or not (lv & covered).any():
            continue  # no wall or no pool where it reaches: this sequence has nothing to say
        m_myo, m_lv = np.median(image[myo & covered]), np.median(image[lv & covered])
        if m_lv == m_myo:  # no contrast between blood and wall: nothing to go by
            continue
        t = (image - m_myo) / (m_lv - m_myo)
        if reference == "slice":  # each slice against its own wall and pool (2D slices: one breath-hold and scaling each)
            for z in range(image.shape[2]):
                wall, pool = (myo & covered)[..., z], (lv & covered)[..., z]
                if wall.sum() < _MIN_SLICE_VOXELS or pool.sum() < _MIN_SLICE_VOXELS:
                    continue
                s_myo, s_lv = np.median(image[..., z][wall]), np.median(image[..., z][pool])
                if s_lv != s_myo:
                    t[..., z] = (image[..., z] - s_myo) / (s_lv - s_myo)
        rim &= ~covered | ((t >= fraction) if blood_side else (t < fraction))
        seen |= covered
    return rim & seen if seen.any() else None


def _check_rim_inputs(name: str, posterior: Tensor, images: Tensor, coverage: Tensor) -> None:
    if posterior.ndim != 4 or posterior.shape[0] <= LV:
        raise ValueError(f"{name}: posterior must be [K>=3, X, Y, Z], got {tuple(posterior.shape)}")
    if images.shape != coverage.shape or tuple(images.shape[1:]) != tuple(posterior.shape[1:]):
        raise ValueError(
            f"{name}: images {tuple(images.shape)} and coverage {tuple(coverage.shape)} must be "
            f"[N, {', '.join(map(str, posterior.shape[1:]))}]"
        )


def claim_blood_rim(posterior: Tensor, images: Tensor, coverage: Tensor, fractions: dict[int, float], reference: str = "heart") -> Tensor:
    """Posterior ``[K, X, Y, Z]`` in which the partial-volume rim of the LV pool becomes LV. A voxel
    whose argmax is myocardium and that has an LV voxel among its four in-plane neighbours swaps its
    myocardium and LV probabilities (a distribution stays one) when, for every channel ``n`` of
    ``fractions`` (``{channel of images: fraction}``) that covers it (at least one must),
    ``(I_n - m_myo) / (m_lv - m_myo) >= fraction``, with ``m_myo``, ``m_lv`` the medians of the
    channel over the covered myocardium and LV voxels (a fraction of 0: on the blood's side of the
    wall's median, whether the blood is bright or dark there). ``images`` and ``coverage`` are
    ``[N, X, Y, Z]``; an empty ``fractions``, or no myocardium or LV voxel, changes nothing.
    ``reference``: the medians of the whole heart or of each voxel's slice (:func:`_rim_voxels`)."""
    _check_rim_inputs("claim_blood_rim", posterior, images, coverage)
    if not fractions:
        return posterior
    flip = _rim_voxels(class_argmax(posterior).cpu().numpy(), images, coverage, fractions, MYO, LV, blood_side=True, reference=reference)
    return posterior if flip is None else _swap(posterior, MYO, LV, flip)


def give_wall_rim(posterior: Tensor, images: Tensor, coverage: Tensor, fractions: dict[int, float], passes: int = 1,
                  reference: str = "heart") -> Tensor:
    """Posterior ``[K, X, Y, Z]`` in which the LV pool's rim that a sequence shows as wall becomes
    myocardium: the mirror of :func:`claim_blood_rim`. A voxel whose argmax is LV and that has a
    myocardium voxel among its four in-plane neighbours swaps its LV and myocardium probabilities
    when, for every channel ``n`` of ``fractions`` that covers it (at least one must),
    ``(I_n - m_myo) / (m_lv - m_myo) < fraction`` (a negative fraction: darker than the wall's median
    where the blood is bright). Subendocardial scar is as bright as the blood in LGE and near it in
    bSSFP, so the mixture gives it to the pool; in the MyoPS T2 the manual myocardium that the fits
    drew as LV lies below the wall's median (``benchmarks/lv_error_sources.py``). The rule runs
    ``passes`` times, each on the labels the one before left, so the wall grows into the pool by at
    most that many voxels and only through voxels the sequences show as wall (the medians are
    those of the first pass; ``reference`` as in :func:`claim_blood_rim`)."""
    _check_rim_inputs("give_wall_rim", posterior, images, coverage)
    if not fractions or passes < 1:
        return posterior
    labels = class_argmax(posterior).cpu().numpy()
    # the wall side of every channel, from the medians of the labels as they came
    wall_side = _rim_voxels(labels, images, coverage, fractions, LV, None, blood_side=False, reference=reference)
    if wall_side is None:
        return posterior
    flip = np.zeros_like(wall_side)
    for _ in range(passes):
        grow = wall_side & ~flip & (labels == LV) & ndimage.binary_dilation((labels == MYO) | flip, structure=_IN_PLANE_CROSS)
        if not grow.any():
            break
        flip |= grow
    return _swap(posterior, LV, MYO, flip)


def follow_labelling_conventions(
    posterior: Tensor,
    spacing_mm: tuple[float, float],
    *,
    min_wall_mm: float = 0.0,
    fill_mode: str | None = "hull",
    endocardium_median_deg: float = 0.0,
    blood_rim: dict[int, float] | None = None,
    images: Tensor | None = None,
    coverage: Tensor | None = None,
    epicardium_median_deg: float = 0.0,
    rv_main_region: bool = False,
    wall_rim: dict[int, float] | None = None,
    wall_rim_mm: float = 0.0,
    rim_reference: str = "heart",
) -> Tensor:
    """The final posterior ``[K, X, Y, Z]`` after every labelling step, in the order a fit applies
    them: :func:`thin_lv_at_wall` (``min_wall_mm``), :func:`fill_lv_cavity` (``fill_mode``, None:
    off), :func:`smooth_endocardium` (``endocardium_median_deg``), :func:`claim_blood_rim`
    (``blood_rim`` ``{channel: fraction}`` of ``images`` / ``coverage`` ``[N, X, Y, Z]``),
    :func:`give_wall_rim` (``wall_rim``, likewise, into the pool by up to ``wall_rim_mm`` in-plane: as
    many passes as voxels of the mean in-plane spacing, at least one) and :func:`smooth_epicardium`
    (``epicardium_median_deg``), then :func:`keep_main_rv` (``rv_main_region``); both rims measure
    against the medians of ``rim_reference`` (``"heart"`` or ``"slice"``). A step whose setting is
    0, None or empty leaves the posterior as it is."""
    posterior = thin_lv_at_wall(posterior, spacing_mm, min_wall_mm)
    if fill_mode:
        posterior = fill_lv_cavity(posterior, fill_mode)
    posterior = smooth_endocardium(posterior, spacing_mm, endocardium_median_deg)
    if (blood_rim or wall_rim) and (images is None or coverage is None):
        raise ValueError("follow_labelling_conventions: blood_rim and wall_rim need the images and their coverage")
    if blood_rim:
        posterior = claim_blood_rim(posterior, images, coverage, blood_rim, rim_reference)
    if wall_rim:
        passes = max(1, round(wall_rim_mm / (0.5 * (float(spacing_mm[0]) + float(spacing_mm[1])))))
        posterior = give_wall_rim(posterior, images, coverage, wall_rim, passes, rim_reference)
    posterior = smooth_epicardium(posterior, spacing_mm, epicardium_median_deg)
    return keep_main_rv(posterior) if rv_main_region else posterior


def keep_main_rv(posterior: Tensor) -> Tensor:
    """Posterior ``[K, X, Y, Z]`` with one RV region per slice: every connected region (in-plane,
    4-neighbours) of RV voxels of the argmax but the largest of its slice swaps its RV probability
    with that of the class the posterior ranks next there (it becomes that class; a distribution
    stays one). Blood-bright structures beside the heart (the pulmonary artery, the atria, the
    stomach) that the mixture calls RV are what this removes."""
    if posterior.ndim != 4 or posterior.shape[0] <= RV:
        raise ValueError(f"keep_main_rv: posterior must be [K>=4, X, Y, Z], got {tuple(posterior.shape)}")
    labels = class_argmax(posterior).cpu().numpy()
    drop = np.zeros(labels.shape, dtype=bool)
    for z in range(labels.shape[2]):
        rv = labels[..., z] == RV
        comp, n = ndimage.label(rv)
        if n > 1:
            sizes = ndimage.sum(rv, comp, range(1, n + 1))
            drop[..., z] = rv & (comp != 1 + int(np.argmax(sizes)))
    return _swap_with_runner_up(posterior, RV, drop)


def _swap_with_runner_up(posterior: Tensor, k: int, where: np.ndarray) -> Tensor:
    """:func:`_swap` of class ``k`` with the class the posterior ranks next at each voxel."""
    others = posterior.clone()
    others[k] = -1.0
    return _swap(posterior, k, class_argmax(others), where)


def _swap(posterior: Tensor, a: int, b: int | Tensor, where: np.ndarray) -> Tensor:
    """A copy of ``posterior`` ``[K, *S]`` in which, at the voxels of the boolean ``where`` ``[*S]``,
    class ``a``'s probability is swapped with class ``b``'s (``b``: one class, or a class per voxel
    ``[*S]``): where ``a`` won, ``b`` wins, and a distribution stays one."""
    flip = torch.from_numpy(where).to(posterior.device)
    b = torch.as_tensor(b, device=posterior.device).expand(flip.shape)
    out = posterior.clone()
    for k in range(posterior.shape[0]):
        if k != a:
            at = flip & (b == k)
            out[a] = torch.where(at, posterior[k], out[a])
            out[k] = torch.where(at, posterior[a], out[k])
    return out


def _amount(key: str, value, upper: float, unit: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= upper:
        raise ValueError(f"postprocess.{key} must be {unit} in [0, {upper:g}] (0: off), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LabellingConventions:
    """How a labelling protocol draws the heart, applied to the posterior to make label maps.

    The config group ``postprocess`` chooses one (``none``: the posterior's argmax; ``mscmr``: the
    LV cavity fill of MS-CMRSeg/ACDC; ``myops``: every MyoPS rule). The mixture's posterior is
    never changed: :meth:`apply` returns *label scores*, a copy of it in which the voxels a rule
    reassigns have their myocardium and LV probabilities swapped, whose argmax on every
    sequence's grid is the label map.

    Attributes:
        name: the protocol's name (recorded in ``params.json``).
        lv_cavity_fill: ``hull`` / ``holes`` / ``true`` (= hull) / ``false`` (see :func:`fill_lv_cavity`).
        min_wall_mm: :func:`thin_lv_at_wall` (0: off).
        endocardium_median_deg: :func:`smooth_endocardium` (0: off).
        blood_rim: sequence name -> fraction in [-1, 1] (:func:`claim_blood_rim`; empty: off).
        epicardium_median_deg: :func:`smooth_epicardium` (0: off).
        rv_main_region: :func:`keep_main_rv` (false: off).
        wall_rim: sequence name -> fraction in [-1, 1] (:func:`give_wall_rim`; empty: off).
        wall_rim_mm: how far the wall rim may grow into the pool, mm in-plane (0: one voxel).
        rim_reference: ``heart`` (the rims measure a voxel against the medians of the whole heart's
            wall and pool) or ``slice`` (of its own slice: a 2D multi-slice acquisition takes each
            slice in its own breath-hold, and its intensities shift from slice to slice).
    """

    name: str = "none"
    lv_cavity_fill: bool | str | None = False
    min_wall_mm: float = 0.0
    endocardium_median_deg: float = 0.0
    blood_rim: dict = field(default_factory=dict)
    epicardium_median_deg: float = 0.0
    rv_main_region: bool = False
    wall_rim: dict = field(default_factory=dict)
    wall_rim_mm: float = 0.0
    rim_reference: str = "heart"

    def __post_init__(self) -> None:
        if self.rim_reference not in RIM_REFERENCES:
            raise ValueError(f"postprocess.rim_reference must be one of {list(RIM_REFERENCES)}, got {self.rim_reference!r}")
        try:
            fill = lv_cavity_fill_mode(self.lv_cavity_fill)
        except ValueError as err:
            raise ValueError(str(err).replace("model.", "postprocess.")) from None
        object.__setattr__(self, "lv_cavity_fill", fill or False)
        object.__setattr__(self, "min_wall_mm", _amount("min_wall_mm", self.min_wall_mm, 30, "a thickness in mm"))
        object.__setattr__(
            self, "endocardium_median_deg", _amount("endocardium_median_deg", self.endocardium_median_deg, 180, "an angle in degrees")
        )
        object.__setattr__(
            self, "epicardium_median_deg", _amount("epicardium_median_deg", self.epicardium_median_deg, 180, "an angle in degrees")
        )
        object.__setattr__(self, "wall_rim_mm", _amount("wall_rim_mm", self.wall_rim_mm, 20, "a depth in mm"))
        if not isinstance(self.rv_main_region, bool):
            raise ValueError(f"postprocess.rv_main_region must be true or false, got {self.rv_main_region!r}")
        for key, example in (("blood_rim", "{C0: 0.25}"), ("wall_rim", "{T2: -0.25}")):
            rim = getattr(self, key) if getattr(self, key) is not None else {}
            if not isinstance(rim, Mapping):
                raise ValueError(f"postprocess.{key} must be a mapping sequence -> fraction (e.g. {example}) or {{}}, got {rim!r}")
            bad = {k: v for k, v in rim.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not -1 <= v <= 1}
            if bad:
                raise ValueError(f"postprocess.{key} must be fractions in [-1, 1], got {bad}")
            object.__setattr__(self, key, {str(k): float(v) for k, v in rim.items()})

    def check_sequences(self, sequences) -> None:
        """Refuse a ``blood_rim`` or ``wall_rim`` that names a sequence the dataset does not know (before any work)."""
        for key in ("blood_rim", "wall_rim"):
            unknown = sorted(set(getattr(self, key)) - set(sequences))
            if unknown:
                raise ValueError(f"postprocess.{key}: {unknown} not among the dataset's sequences {list(sequences)}")

    def as_dict(self) -> dict:
        """The effective settings (for ``params.json``)."""
        return {
            "name": self.name,
            "lv_cavity_fill": self.lv_cavity_fill,
            "min_wall_mm": self.min_wall_mm,
            "endocardium_median_deg": self.endocardium_median_deg,
            "blood_rim": dict(self.blood_rim),
            "epicardium_median_deg": self.epicardium_median_deg,
            "rv_main_region": self.rv_main_region,
            "wall_rim": dict(self.wall_rim),
            "wall_rim_mm": self.wall_rim_mm,
            "rim_reference": self.rim_reference,
        }

    def apply(self, posterior: Tensor, spacing_mm: tuple[float, float], sequences, images: Tensor, coverage: Tensor) -> Tensor:
        """Label scores ``[K, X, Y, Z]`` from the posterior ``[K, X, Y, Z]`` (common space; linear),
        ``images`` / ``coverage`` ``[N, X, Y, Z]`` in ``sequences`` order. The posterior is not changed.
        A ``blood_rim`` or ``wall_rim`` sequence the subject lacks is left out of the rule."""
        rim = {list(sequences).index(k): v for k, v in self.blood_rim.items() if k in sequences}
        wall = {list(sequences).index(k): v for k, v in self.wall_rim.items() if k in sequences}
        return follow_labelling_conventions(
            posterior,
            spacing_mm,
            min_wall_mm=self.min_wall_mm,
            fill_mode=self.lv_cavity_fill or None,
            endocardium_median_deg=self.endocardium_median_deg,
            blood_rim=rim,
            images=images,
            coverage=coverage,
            epicardium_median_deg=self.epicardium_median_deg,
            rv_main_region=self.rv_main_region,
            wall_rim=wall,
            wall_rim_mm=self.wall_rim_mm,
            rim_reference=self.rim_reference,
        )
