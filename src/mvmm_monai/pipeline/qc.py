"""Quality control without labels: does a fit deserve trust?

A derived, named step after the fit (the mixture's output is not touched). It measures what the
model knows about its own result (:func:`qc_features`):

- ``entropy``: the mean normalised entropy of the class posterior where the heart was labelled
  (an uncertain fit spreads its probability), as at the calibration's in-plane pixel
  (:func:`heart_entropy`: the label borders' share of it does not grow with the voxel size);
- ``lv_enclosed``: the share of the LV blood pool's in-plane border that is myocardium in the
  mixture's own labels (the posterior's most likely class, before the labelling conventions
  close the ring): a closed myocardial ring;
- ``rv_lv_contact``: the share of the RV's border that touches the LV pool, in the mixture's own
  labels (the septum separates them; a label swap puts them side by side);
- ``wall_mm``: the myocardial wall thickness, from the epicardial and endocardial areas of each
  slice as concentric rings (median over slices);
- ``myo_connected``: the share of the myocardium in its largest connected piece (mixture's own labels);
- ``rv_lv_ratio``: log of the RV to LV pool volume;
- ``blood_contrast``, ``rv_contrast``: how much brighter the LV (RV) pool is than the myocardium
  (median over the sequences, in units of their spread): a mislabelled pool is not brighter;
- ``sequence_agreement``: for each sequence, the labels its own intensities give (with the atlas
  prior) against those the other sequences give together (mean Dice of myocardium and LV); a
  sequence that sees the heart elsewhere (mirrored, moved) disagrees. The feature is the lowest;
- ``atlas_agreement``: the mean Dice of the labels and the (deformed) atlas' most likely class:
  how far the result had to leave the prior. The deformed atlas, not the atlas as placed: a
  registration that deformed the atlas one way while the labels went another lowers it (measured
  against the placed atlas instead, the registered crops of ``benchmarks/registration_guard.py``
  mostly scored higher, and the guard kept a fit 0.09 worse);
- ``placement_score``: the automatic placement's template correlation.

Beside the features, :func:`sequence_offsets` asks of every sequence but the reference where its
intensities fit the labelled heart best: the in-plane shift (the same for every slice, whole
voxels, up to 25 mm) that maximises the correlation ratio of the sequence's intensities given the
labels, over the heart and a margin around it. A sequence acquired or exported out of place (a
breath-hold apart, a wrong header) fits best far from zero; the model flags it by name when the
shift is at least ``offset_min_mm`` and the gain at least ``offset_gain``. Where the fit followed
the sequence out of place, that measure finds the others moved instead; :func:`sequence_pair_offsets`
asks every pair of sequences at which in-plane shift their heart edges (gradient magnitudes)
correlate best, which does not depend on the labels' position, and :func:`out_of_place` names a
sequence far from all the others while they agree among themselves.

:class:`QualityModel` turns them into ``{"score", "flag", "reasons", "features"}`` for
``metrics.json``: ``score`` is an estimate of the LGE myocardium Dice (ridge regression of the
Dice, raised to a floor so that the deepest failures do not set the weights, on the
standardised features, mapped through a monotone calibration curve fitted by isotonic
regression so that the estimate is unbiased for good fits as well as failures), ``flag`` is set when the score is below the model's threshold or when
a sequence was found mirrored or disagrees with the others, and ``reasons`` names every feature
outside the range of good fits. The model's numbers (``conf/qc/default.yaml``) are written by
``benchmarks/qc_calibration.py`` from cross-validated fits of the shared MyoPS cases and failures
made on purpose (displaced, mis-scaled and rotated placements); its record says how it was made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from mvmm_monai.classes import CLASS_NAMES, class_argmax
from mvmm_monai.conventions.scar import mask_dice
from mvmm_monai.mixture.gaussian import component_log_densities

MYO, LV, RV = (CLASS_NAMES.index(c) for c in ("myocardium", "lv", "rv"))

#: the features :class:`QualityModel` weighs, in order
FEATURES = (
    "entropy", "lv_enclosed", "rv_lv_contact", "wall_mm", "myo_connected", "rv_lv_ratio",
    "blood_contrast", "rv_contrast", "sequence_agreement", "atlas_agreement", "placement_score",
)

#: the in-plane pixel (mm) the ``entropy`` feature is measured as at: the shared MyoPS cases' (0.73
#: mm), on whose fits the quality model is calibrated (:func:`heart_entropy`)
ENTROPY_PIXEL_MM = 0.73

#: features for which both too small and too large are implausible (they enter the score as distances)
TWO_SIDED = ("wall_mm", "rv_lv_ratio")

#: short words for reasons (feature -> what a low / high value means)
MEANING = {
    "entropy": ("", "uncertain labels in the heart"),
    "lv_enclosed": ("myocardial ring around the LV open", ""),
    "rv_lv_contact": ("", "RV touches the LV pool (septum missing or labels swapped)"),
    "wall_mm": ("myocardial wall implausibly thin", "myocardial wall implausibly thick"),
    "myo_connected": ("myocardium in pieces", ""),
    "rv_lv_ratio": ("RV small against the LV", "RV large against the LV"),
    "blood_contrast": ("LV pool not brighter than the myocardium", ""),
    "rv_contrast": ("RV pool not brighter than the myocardium", ""),
    "sequence_agreement": ("sequences disagree on the heart", ""),
    "atlas_agreement": ("result far from the atlas", ""),
    "placement_score": ("weak automatic placement", ""),
}


def _neighbour_pairs(labels: np.ndarray, a: int, b: int) -> tuple[int, int]:
    """In-plane 4-neighbour pairs (voxel of class ``a``, neighbour not ``a``): how many, and how
    many of those neighbours are class ``b``."""
    total = hit = 0
    for x, y in ((labels[:-1], labels[1:]), (labels[1:], labels[:-1]), (labels[:, :-1], labels[:, 1:]), (labels[:, 1:], labels[:, :-1])):
        border = (x == a) & (y != a)
        total += int(border.sum())
        hit += int((border & (y == b)).sum())
    return total, hit


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return mask_dice(torch.from_numpy(a), torch.from_numpy(b))


def sequence_agreement(result, sequences: tuple[str, ...]) -> dict[str, float]:
    """Per sequence: mean Dice (myocardium, LV) of the labels its own intensities give with the atlas
    prior against the labels of the other sequences together, where both see the voxel; sequences
    without an overlap with the others are left out."""
    images, cover = result.warped.images[0], result.warped.coverage[0] > 0
    n = images.shape[0]
    if n < 2:
        return {}
    prior = (result.warped.log_atlas[0] + result.params.log_pi[0].reshape(-1, *[1] * (images.ndim - 1))).double()
    k = prior.shape[0]
    flat_prior = prior.reshape(k, -1)
    p = result.params
    # each sequence's log-likelihood of every class, its subtypes summed: [N, K, V]
    ll = torch.logsumexp(component_log_densities(images.reshape(1, n, -1).double(), p.log_tau.double(), p.mean.double(),
                                                 p.var.clamp_min(1e-12).double())[0], dim=2) * cover.reshape(n, 1, -1)
    out = {}
    for i, seq in enumerate(sequences):
        others = [j for j in range(n) if j != i]
        both = cover[i].reshape(-1) & cover[others].reshape(len(others), -1).any(0)
        if int(both.sum()) < 100:
            continue
        own = class_argmax(flat_prior + ll[i])[both].numpy()
        rest = class_argmax(flat_prior + ll[others].sum(0))[both].numpy()
        out[seq] = float(np.mean([_dice(own == c, rest == c) for c in (MYO, LV)]))
    return out


def _window_sums(masks: list[np.ndarray], values: list[np.ndarray], radius: tuple[int, int]) -> np.ndarray:
    """``out[i, j, a, b] = sum_v masks[i][v] * values[j][v + (a - rx, b - ry)]`` over every in-plane
    shift within ``radius`` (``values`` zero outside the volume), summed over the slices:
    ``[len(masks), len(values), 2 rx + 1, 2 ry + 1]``. One FFT per mask and per value array and
    slice (the masks' bounding box and ``radius`` around it), their products for every pair."""
    from scipy import fft

    rx, ry = radius
    out = np.zeros((len(masks), len(values), 2 * rx + 1, 2 * ry + 1))
    xs, ys = np.nonzero(np.any([m.any(2) for m in masks], axis=0))
    if xs.size == 0:
        return out
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    shape = (fft.next_fast_len(x1 - x0 + 2 * rx), fft.next_fast_len(y1 - y0 + 2 * ry))
    for z in range(masks[0].shape[2]):
        cut = [m[x0:x1, y0:y1, z] for m in masks]
        if not any(c.any() for c in cut):
            continue
        spectra = [fft.rfft2(np.pad(v[..., z], ((rx, rx), (ry, ry)))[x0:x1 + 2 * rx, y0:y1 + 2 * ry], shape) for v in values]
        for i, c in enumerate(cut):
            if not c.any():
                continue
            m = np.conj(fft.rfft2(c.astype(float), shape))
            for j, spectrum in enumerate(spectra):
                out[i, j] += fft.irfft2(spectrum * m, shape)[: 2 * rx + 1, : 2 * ry + 1]
    return out


@dataclass(frozen=True)
class _ShiftSearch:
    """What :func:`sequence_offsets` and :func:`sequence_pair_offsets` search over: the sequences'
    ``images`` and ``cover`` ``[N, *S]`` (uncut common grid), the ``labels`` (argmax), the
    ``region`` (the labelled heart and a margin, on the reference's slices), the search ``radius``
    in voxels, the in-plane ``spacing`` (mm) and the reference's channel ``ref``."""

    images: np.ndarray
    cover: np.ndarray
    labels: np.ndarray
    region: np.ndarray
    radius: tuple[int, int]
    spacing: tuple[float, float]
    ref: int

    def shift_mm(self, a: int, b: int) -> float:
        """The length (mm) of the shift at index ``(a, b)`` of a :func:`_window_sums` map."""
        return float(math.hypot((a - self.radius[0]) * self.spacing[0], (b - self.radius[1]) * self.spacing[1]))


def _shift_search(subject, scores: torch.Tensor, max_mm: float = 25.0, margin_mm: float = 8.0,
                  moved: tuple[torch.Tensor, torch.Tensor] | None = None) -> _ShiftSearch | None:
    """The images, labels and region of the offset searches (:func:`sequence_offsets`); ``None``
    when the labels hold no heart on the reference's slices."""
    full = subject.parent or subject
    ref = subject.sequences.index(subject.reference)
    if moved is None:
        images, cover = full.images.double().numpy(), full.coverage.numpy() > 0
    else:
        images = subject.uncrop(moved[0].double()).numpy()
        cover = subject.uncrop(moved[1]).numpy() > 0
    labels = class_argmax(subject.uncrop(scores, 0.0, 1.0)).numpy()
    heart = (labels > 0) & cover[ref]
    if not heart.any():
        return None
    sx, sy = (float(v) for v in subject.grid.spacing[:2])
    grow = np.zeros((3, 3, 1), dtype=bool)
    grow[..., 0] = ndimage.generate_binary_structure(2, 1)
    region = ndimage.binary_dilation(heart, structure=grow, iterations=max(1, round(margin_mm / min(sx, sy)))) & cover[ref]
    radius = (max(1, math.ceil(max_mm / sx)), max(1, math.ceil(max_mm / sy)))
    return _ShiftSearch(images, cover, labels, region, radius, (sx, sy), ref)


def sequence_offsets(subject, scores: torch.Tensor, max_mm: float = 25.0, margin_mm: float = 8.0,
                     moved: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
    """Per sequence but the reference: ``{"mm", "gain"}``, the in-plane shift (mm, the same for every
    slice, whole voxels within ``max_mm``) at which the correlation ratio of its intensities given
    the labels (the argmax of ``scores`` ``[K, *S]``, common space) is highest, over the labelled
    heart and ``margin_mm`` around it on the slices the reference covers, and how much higher it is
    there than unshifted (``eta^2(best) - eta^2(0)``, both in [0, 1]). The images are the
    sequences as acquired, on the uncut common grid when the fit's was cut to the heart, so that a
    shift may look past the fit's region; or, where the fit moved slices (``moved``: its images and
    coverage ``[N, *S]`` after the slice motion, common space), as the fit used them: a sequence the
    registration put back is not out of place for this fit. Only voxels the sequence covers count;
    a sequence whose slices see too little of the heart is left out."""
    return _offsets(_shift_search(subject, scores, max_mm, margin_mm, moved), subject.sequences)


def _offsets(search: _ShiftSearch | None, sequences: tuple[str, ...]) -> dict[str, dict[str, float]]:
    if search is None:
        return {}
    region, cover, labels, radius = search.region, search.cover, search.labels, search.radius
    out = {}
    for n, seq in enumerate(sequences):
        if n == search.ref or not (region & cover[n]).sum() >= 100:
            continue
        image = np.where(cover[n], search.images[n], 0.0)
        # per class: the covered voxels, their intensities' sum and sum of squares at every shift
        sums = _window_sums([region & (labels == k) for k in np.unique(labels[region])],
                            [cover[n].astype(float), image, image * image], radius)
        nk, s1, s2 = sums[:, 0], sums[:, 1], sums[:, 2]
        within = (s2 - s1 ** 2 / np.maximum(nk, 1.0)).sum(0)
        count, first, second = nk.sum(0), s1.sum(0), s2.sum(0)
        total = second - first ** 2 / np.maximum(count, 1.0)
        # where the shifted sequence still covers most of the region (a shift off its edge is no evidence)
        enough = count >= 0.5 * count[radius]
        eta = np.where(enough & (total > 0), 1.0 - within / np.where(total > 0, total, 1.0), -np.inf)
        a, b = np.unravel_index(int(np.argmax(eta)), eta.shape)
        out[seq] = {"mm": search.shift_mm(a, b), "gain": float(eta[a, b] - eta[radius])}
    return out


def sequence_pair_offsets(subject, scores: torch.Tensor, max_mm: float = 25.0, margin_mm: float = 8.0,
                          moved: tuple[torch.Tensor, torch.Tensor] | None = None, sigma_px: float = 1.0) -> dict[str, dict[str, float]]:
    """Per pair of sequences ``"A|B"`` (in the subject's order): ``{"mm", "gain"}``, the in-plane
    shift of B against A (mm, the same for every slice, whole voxels within ``max_mm``) at which
    the correlation of their gradient magnitudes (each slice smoothed by ``sigma_px``) is highest
    over the labelled heart and ``margin_mm`` around it (the argmax of ``scores`` ``[K, *S]``, on
    the slices the reference covers), and how much higher it is there than unshifted. Edges of the
    heart show in every sequence, so two sequences acquired in place agree near zero whatever the
    labels say; a sequence out of place is far from every other one, which names it even where
    the fit followed that sequence (:func:`sequence_offsets` measures against the labels, and then
    finds the sequences that stayed in place). The images are those of :func:`sequence_offsets`;
    only voxels both sequences cover count, and a pair with too little of the heart in common is
    left out."""
    return _pair_offsets(_shift_search(subject, scores, max_mm, margin_mm, moved), subject.sequences, sigma_px)


def _pair_offsets(search: _ShiftSearch | None, sequences: tuple[str, ...], sigma_px: float = 1.0) -> dict[str, dict[str, float]]:
    if search is None:
        return {}
    images, cover, radius = search.images, search.cover, search.radius
    edges = []
    for n in range(len(sequences)):
        g = np.zeros(images.shape[1:])
        for z in range(images.shape[-1]):
            if cover[n, ..., z].any():
                smooth = ndimage.gaussian_filter(np.where(cover[n, ..., z], images[n, ..., z], 0.0), sigma_px)
                g[..., z] = np.hypot(*np.gradient(smooth, *search.spacing))
        edges.append(np.where(cover[n], g, 0.0))
    out = {}
    for i in range(len(sequences)):
        for j in range(i + 1, len(sequences)):
            mask = search.region & cover[i] & cover[j]  # the slices both sequences reach
            if mask.sum() < 100:
                continue
            a = np.where(mask, edges[i], 0.0)
            b = edges[j]
            # at every shift: the covered voxels of B under the mask, and the sums for their correlation with A
            sums = _window_sums([mask.astype(float), a], [cover[j].astype(float), b, b * b], radius)
            n_ = sums[0, 0]
            enough = n_ >= 0.5 * n_[radius]  # a shift off B's edge is no evidence
            sa, saa = a.sum(), (a * a).sum()
            nm = float(mask.sum())
            sb, sbb, sab = sums[0, 1], sums[0, 2], sums[1, 1]
            cov = sab - sa * sb / nm
            var = (saa - sa * sa / nm) * (sbb - sb * sb / nm)
            r = np.where(enough & (var > 0), cov / np.sqrt(np.where(var > 0, var, 1.0)), -np.inf)
            x, y = np.unravel_index(int(np.argmax(r)), r.shape)
            out[f"{sequences[i]}|{sequences[j]}"] = {"mm": search.shift_mm(x, y), "gain": float(r[x, y] - r[radius])}
    return out


#: :func:`out_of_place`: how much further than every other sequence's nearest other a sequence's
#: nearest other must lie to be named where several are far from every other (a fixed rule, not fitted)
OUTLIER_RATIO = 2.0


def out_of_place(pairs: dict[str, dict[str, float]], sequences: tuple[str, ...], min_mm: float, gain: float | None) -> dict[str, dict]:
    """The sequence that :func:`sequence_pair_offsets` puts out of place: at least ``min_mm`` from
    every other sequence (every pair it is in), with at least one of those pairs gaining ``gain``,
    while no other sequence is (the others agree among themselves), or, where several are, whose
    nearest other lies at least :data:`OUTLIER_RATIO` times further than every other one's;
    ``{sequence: {"mm": the smallest of those shifts, "gain": the largest gain}}``, or ``{}``. ``sequences``: the subject's,
    the reference first. The reference is never named, as :func:`sequence_offsets` never names it:
    it is what the others are placed against, and the calibration moves the others only (with two
    sequences, the other one is named). ``gain`` None: never."""
    if gain is None or len(sequences) < 2:
        return {}
    found = {}
    for s in sequences:
        mine = [v for k, v in pairs.items() if s in k.split("|")]
        if len(mine) < len(sequences) - 1:
            continue  # a pair left out (too little of the heart in common): nothing to compare
        if all(v["mm"] >= min_mm for v in mine) and max(v["gain"] for v in mine) >= gain:
            found[s] = {"mm": min(v["mm"] for v in mine), "gain": max(v["gain"] for v in mine)}
    if len(sequences) > 2 and len(found) > 1:
        # several are far from every other: one whose nearest other lies OUTLIER_RATIO times further
        # than any other's nearest is still out of place (the others are near each other by
        # comparison); else no two sequences agree and nothing tells which one moved
        ranked = sorted(found.items(), key=lambda item: -item[1]["mm"])
        if ranked[0][1]["mm"] < OUTLIER_RATIO * ranked[1][1]["mm"]:
            return {}
        found = dict(ranked[:1])
    found.pop(sequences[0], None)
    return found


def heart_entropy(entropy: np.ndarray, labels: np.ndarray, pixel_mm: float) -> float:
    """The mean of ``entropy`` ``[X, Y, Z]`` over the heart (``labels`` > 0), as at an in-plane
    pixel of :data:`ENTROPY_PIXEL_MM`; 1.0 without a heart.

    A good fit is uncertain on its label borders (the voxels with an in-plane neighbour of another
    label), in a band about one voxel wide at any resolution, so the borders' share of the heart,
    and with it the plain mean, grows with the voxel size: the shared MyoPS cases with 2 x 2 voxels
    averaged gave 0.040 instead of 0.030, and quality control flagged 21 of 25 good fits
    (``benchmarks/resolution.py``). Here the borders get the share of the heart they would have at
    that pixel (their share times ``ENTROPY_PIXEL_MM / pixel_mm``) and keep their mean entropy; the
    heart's interior, where a failed fit spreads its probability, keeps its own. At that pixel, and
    at any finer one, this is the plain mean: a finer grid does not make the band narrower than
    the acquisition's voxel (C0 and T2 reach the MyoPS LGE grid interpolated), and the shared
    cases with their voxel size made 0.75 times as large, the same voxels, were flagged 6 times of
    25 when the share was raised there (record ``heart_size_qc``)."""
    heart = labels > 0
    if not heart.any():
        return 1.0
    cross = ndimage.generate_binary_structure(2, 1)[..., None]  # the in-plane 4-neighbourhood
    border = ndimage.maximum_filter(labels, footprint=cross) != ndimage.minimum_filter(labels, footprint=cross)
    on_border, values = border[heart], entropy[heart]
    if on_border.all() or not on_border.any():
        return float(values.mean())
    inner, edge = float(values[~on_border].mean()), float(values[on_border].mean())
    share = float(on_border.mean()) * min(1.0, ENTROPY_PIXEL_MM / pixel_mm)
    return inner + share * (edge - inner)


def qc_features(subject, result, scores: torch.Tensor, placement=None) -> tuple[dict[str, float], dict[str, float]]:
    """The label-free features of a fit (module docstring) and the per-sequence agreement.

    ``scores`` ``[K, *S]``: the labelled fit in the common space (its argmax is the label map);
    features are measured on the slices the reference sequence covers.
    """
    ref = subject.sequences.index(subject.reference)
    covered = (result.warped.coverage[0, ref] > 0).numpy()
    labels = class_argmax(scores).numpy()
    labels = np.where(covered, labels, -1)
    post = result.posterior.double().numpy()
    sx, sy = (float(v) for v in subject.grid.spacing[:2])
    f: dict[str, float] = {}
    p = np.clip(post, 1e-12, 1.0)
    ent = -(p * np.log(p)).sum(0) / math.log(post.shape[0])
    f["entropy"] = heart_entropy(ent, labels, math.sqrt(sx * sy))
    own = np.where(covered, post.argmax(0), -1)  # the mixture's own labels, before any convention
    total = hit = rtot = rhit = 0
    walls = []
    for z in range(labels.shape[-1]):
        sl, mine = labels[..., z], own[..., z]
        n_lv, n_myo = int((sl == LV).sum()), int((sl == MYO).sum())
        if n_lv >= 10 and n_myo >= 10:
            walls.append(math.sqrt((n_myo + n_lv) * sx * sy / math.pi) - math.sqrt(n_lv * sx * sy / math.pi))
        if (mine == LV).sum() >= 10:
            t, h = _neighbour_pairs(mine, LV, MYO)
            total, hit = total + t, hit + h
        if (mine == RV).sum() >= 10:
            t, h = _neighbour_pairs(mine, RV, LV)
            rtot, rhit = rtot + t, rhit + h
    f["lv_enclosed"] = hit / total if total else 0.0
    f["rv_lv_contact"] = rhit / rtot if rtot else 0.0
    f["wall_mm"] = float(np.median(walls)) if walls else 0.0
    own_myo = own == MYO
    if own_myo.any():
        comp, _ = ndimage.label(own_myo, structure=np.ones((3, 3, 3)))
        f["myo_connected"] = float(np.bincount(comp.ravel())[1:].max() / own_myo.sum())
    else:
        f["myo_connected"] = 0.0
    myo = labels == MYO
    n_lv, n_rv = int((labels == LV).sum()), int((labels == RV).sum())
    f["rv_lv_ratio"] = float(math.log((n_rv + 1) / (n_lv + 1)))
    images, cover = result.warped.images[0].numpy(), result.warped.coverage[0].numpy() > 0
    for name, pool in (("blood_contrast", LV), ("rv_contrast", RV)):
        contrasts = []
        for i in range(images.shape[0]):
            blood, mo = images[i][(labels == pool) & cover[i]], images[i][myo & cover[i]]
            if blood.size >= 10 and mo.size >= 10:
                spread = math.sqrt(0.5 * (blood.var() + mo.var())) or 1e-6
                contrasts.append((blood.mean() - mo.mean()) / spread)
        f[name] = float(np.median(contrasts)) if contrasts else 0.0
    agreement = sequence_agreement(result, subject.sequences)
    f["sequence_agreement"] = min(agreement.values()) if agreement else 1.0
    atlas_labels = class_argmax(result.warped.log_atlas[0]).numpy()
    f["atlas_agreement"] = float(np.mean([_dice((labels == c), (atlas_labels == c) & covered) for c in (MYO, LV, RV)]))
    f["placement_score"] = float(placement.score) if placement is not None else float("nan")
    return f, agreement


@dataclass(frozen=True)
class QualityModel:
    """The calibrated quality-control model (``conf/qc/default.yaml``, written by
    ``benchmarks/qc_calibration.py``).

    Attributes:
        centre, spread: each feature's centre and spread over the calibration fits; a feature
            enters the regression as ``(value - centre) / spread``, or for the ``two_sided`` ones
            (too small and too large are both implausible, e.g. the wall thickness) as
            ``|value - centre| / spread`` with the centre the median of the good fits.
        weights: ridge-regression weight of each of those terms; ``intercept``: the constant.
        curve: ``{"raw": [...], "dice": [...]}``, the monotone map from the regression's value to
            the estimated Dice (linear between its points; ``None``: the regression's value).
        threshold: ``flag`` when the score is below it (chosen on the calibration fits so that
            failures are flagged and few good fits are).
        usual: each feature's range over the good calibration fits (myocardium Dice >= 0.80); a
            value outside it is a reason.
        disagreement: a sequence whose agreement with the others is below this is named in a reason
            and sets the flag.
        unusual_flag: at least this many features outside their usual range together set the flag
            (``None``: never; one outside its range is a reason only), with a reason that counts them:
            a failure that no single feature gives away (the atlas placed too large: a thick wall
            and a result far from the atlas) rarely looks unusual in two ways at once on a good fit.
        offset_min_mm, offset_gain: a sequence that fits the labelled heart best at least
            ``offset_min_mm`` away (:func:`sequence_offsets`), with a correlation-ratio gain of at
            least ``offset_gain``, is named in a reason and sets the flag (``offset_gain`` None: never).
        pair_offset_min_mm, pair_offset_gain: a sequence at least ``pair_offset_min_mm`` from every
            other sequence (:func:`sequence_pair_offsets`, :func:`out_of_place`), with a gain of at
            least ``pair_offset_gain``, is named in a reason and sets the flag; the label-based
            reason then names no other sequence (those the fit left where they are).
        calibration: where the numbers come from (record, cases, fits).
    """

    centre: dict[str, float]
    spread: dict[str, float]
    weights: dict[str, float]
    intercept: float
    threshold: float
    usual: dict[str, list[float]]
    disagreement: float = 0.5
    offset_min_mm: float = 5.0
    offset_gain: float | None = None
    pair_offset_min_mm: float = 5.0
    pair_offset_gain: float | None = None
    unusual_flag: int | None = None
    two_sided: tuple[str, ...] = ()
    curve: dict | None = None
    calibration: dict = field(default_factory=dict)

    def linear_score(self, features: dict[str, float]) -> float:
        """The ridge regression's value before the calibration curve (which is monotone but has flat
        steps): it orders two fits of one subject where :meth:`score` ties them."""
        s = self.intercept
        for name, w in self.weights.items():
            v = features.get(name, float("nan"))
            if v is None or not math.isfinite(v):
                continue
            u = (v - self.centre[name]) / (self.spread[name] or 1.0)
            s += w * (abs(u) if name in self.two_sided else u)
        return float(s)

    def score(self, features: dict[str, float]) -> float:
        """The estimated LGE myocardium Dice in [0, 1]; a missing or NaN feature counts as its centre."""
        s = self.linear_score(features)
        if self.curve:
            s = float(np.interp(s, self.curve["raw"], self.curve["dice"]))
        return float(min(max(s, 0.0), 1.0))

    def reasons(self, features: dict[str, float], agreement: dict[str, float] | None = None) -> list[str]:
        """A reason for every feature outside its usual range; the sequences' agreement names the
        sequence that agrees least (``agreement``: per sequence, as :meth:`assess` takes it)."""
        out = []
        for name, (lo, hi) in self.usual.items():
            v = features.get(name)
            if v is None or not math.isfinite(v):
                continue
            low, high = MEANING.get(name, (name + " low", name + " high"))
            if name == "sequence_agreement" and agreement and v < lo and low:
                seq = min(agreement, key=agreement.get)
                out.append(f"{seq} agrees least with the other sequences on the heart ({name} {v:.3g}, usual >= {lo:.3g})")
            elif v < lo and low:
                out.append(f"{low} ({name} {v:.3g}, usual >= {lo:.3g})")
            elif v > hi and high:
                out.append(f"{high} ({name} {v:.3g}, usual <= {hi:.3g})")
        return out

    def assess(self, features: dict[str, float], agreement: dict[str, float] | None = None, mirrored: dict | None = None,
               notes: list[str] | None = None, offsets: dict[str, dict[str, float]] | None = None,
               pairs: dict[str, dict[str, float]] | None = None, sequences: tuple[str, ...] = ()) -> dict:
        """``{"score", "flag", "reasons", "features", "sequence_agreement", "sequence_offsets",
        "sequence_pair_offsets"}`` for ``metrics.json``; ``notes`` are further reasons that do not
        set the flag by themselves; ``offsets``: :func:`sequence_offsets`; ``pairs``:
        :func:`sequence_pair_offsets` of the subject's ``sequences``."""
        score = self.score(features)
        reasons = []
        flag = score < self.threshold
        if flag:
            reasons.append(f"estimated myocardium Dice {score:.2f} below {self.threshold:.2f}")
        for seq, check in (mirrored or {}).items():
            if check.get("mirrored"):
                flag = True
                reasons.append(f"{seq} looks mirrored against the reference (input_checks.mirrored)")
        for seq, a in (agreement or {}).items():
            if a < self.disagreement:
                flag = True
                reasons.append(f"{seq} disagrees with the other sequences on where the heart is (agreement {a:.2f})")
        odd = out_of_place(pairs or {}, tuple(sequences), self.pair_offset_min_mm, self.pair_offset_gain)
        for seq, o in odd.items():
            flag = True
            others = [s for s in sequences if s != seq]
            reasons.append(f"{seq} is out of place against {' and '.join(others)}, which lie nearer each other: its heart edges "
                           f"match theirs {o['mm']:.0f} mm or more away (sequence_pair_offsets gain {o['gain']:.3f})"
                           if len(others) > 1 else
                           f"{seq} is out of place against {others[0]}: its heart edges match {o['mm']:.0f} mm away "
                           f"(sequence_pair_offsets gain {o['gain']:.3f})")
        for seq, o in (offsets or {}).items():
            if odd and seq not in odd:
                continue  # the fit followed the sequence out of place: the others only look moved against its labels
            if self.offset_gain is not None and o["mm"] >= self.offset_min_mm and o["gain"] >= self.offset_gain:
                flag = True
                reasons.append(f"{seq} fits the heart best {o['mm']:.0f} mm away from where the labels put it: acquired or "
                               f"exported out of place? (sequence_offsets gain {o['gain']:.3f})")
        unusual = self.reasons(features, agreement)
        if self.unusual_flag is not None and len(unusual) >= self.unusual_flag:
            flag = True
            reasons.append(f"{len(unusual)} features outside the range of good fits (at least {self.unusual_flag} set the flag)")
        reasons += unusual + list(notes or [])
        return {
            "score": round(score, 4), "flag": bool(flag), "reasons": reasons,
            "features": {k: (round(v, 5) if math.isfinite(v) else None) for k, v in features.items()},
            "sequence_agreement": {k: round(v, 4) for k, v in (agreement or {}).items()},
            "sequence_offsets": _rounded_offsets(offsets),
            "sequence_pair_offsets": _rounded_offsets(pairs),
        }


def _rounded_offsets(offsets: dict | None) -> dict:
    return {k: {"mm": round(v["mm"], 2), "gain": round(v["gain"], 4)} for k, v in (offsets or {}).items()}


def fit_notes(converged: bool, placement=None, scale_range: tuple[float, float] | None = None) -> list[str]:
    """Reasons to look closer that do not make a result untrustworthy by themselves: a fit that
    stopped at its iteration cap, a heart size on the edge of the placement's search range."""
    notes = [] if converged else ["stopped at trainer.max_epochs before converging (metrics.json converged)"]
    if placement is not None and scale_range is not None:
        lo, hi = scale_range
        if placement.scale <= lo * 1.001 or placement.scale >= hi * 0.999:
            notes.append(f"heart size {placement.scale:.3g} on the edge of the placement search ({lo:.3g}-{hi:.3g}; atlas.auto.scales)")
    return notes


def assess_fit(model: QualityModel | None, subject, result, scores: torch.Tensor, placement=None, checks: dict | None = None,
               notes: list[str] | None = None) -> dict:
    """The ``qc`` entry of ``metrics.json``; without a model (``qc`` config group removed) only the
    features and the per-sequence agreement."""
    features, agreement = qc_features(subject, result, scores, placement)
    # the slices as the fit used them where its registration moved any, else as acquired
    warped = result.warped
    moved = None if torch.equal(warped.images[0], subject.images.to(warped.images)) else (warped.images[0], warped.coverage[0])
    search = _shift_search(subject, scores, moved=moved)  # made once for both searches
    offsets, pairs = _offsets(search, subject.sequences), _pair_offsets(search, subject.sequences)
    if model is None:
        return {"features": {k: (round(v, 5) if math.isfinite(v) else None) for k, v in features.items()},
                "sequence_agreement": {k: round(v, 4) for k, v in agreement.items()},
                "sequence_offsets": _rounded_offsets(offsets), "sequence_pair_offsets": _rounded_offsets(pairs)}
    return model.assess(features, agreement, (checks or {}).get("mirrored"), notes, offsets, pairs, tuple(subject.sequences))
