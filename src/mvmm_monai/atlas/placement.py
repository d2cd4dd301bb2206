"""Initial atlas placement on a full field of view: the heart's frame, and finding it by template matching.

A *canonical* atlas (built by :func:`mvmm_monai.atlas.build.build_canonical_atlas`) lives in a
heart-centred frame: every short-axis slice of every atlas subject was moved so that the centre of
its left ventricle (myocardium + blood pool) is the origin, rotated so that the LV-to-RV direction
points the cohort's mean way, scaled to the cohort's mean heart size, and filed at its normalised
position along the long axis (``t = 0`` apex, ``t = 1`` base) among ``L`` levels.

A subject slice relates to that frame by a similarity transform per slice,

    p = c_z + sigma * R(phi) q        (p: slice point in mm, q: canonical point in mm),

with a centre ``c_z`` per slice and one rotation ``phi`` and scale ``sigma`` per stack. Placement
finds them without labels: the atlas's intensity template (mean of each sequence in the canonical
frame) is matched to the subject's images by masked normalised cross-correlation (NCC, computed
with FFTs over every centre at once), first coarsely over the whole slice for a grid of rotations,
scales and both long-axis directions, then finely per slice around the stack's centre. The chest
wall, liver and arms are bright too, but none of them has a bright disc inside a dark ring beside a
bright crescent at the right size, which is what the template scores.

Pure numpy/scipy/torch maths (the correlations: batched FFTs in torch): no files, no Lightning.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import fft as sp_fft
from scipy import ndimage
from torch import Tensor

from mvmm_monai.atlas.frame import at_level, canonical_to_slice, rotation, stack_levels
from mvmm_monai.atlas.io import Atlas
from mvmm_monai.data.common_space import Grid, resample

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- matching
@dataclass(frozen=True)
class PlacementConfig:
    """Search settings of :func:`find_heart` (from ``atlas.auto`` in the Hydra config).

    Attributes:
        coarse_mm: pixel size of the whole-slice search (mm).
        fine_mm: pixel size of the per-slice refinement (mm).
        angles_deg: rotations tried around the atlas' mean orientation (degrees).
        scales: heart sizes tried, relative to the atlas' mean heart.
        both_directions: also try the stack as base-first (else apex-first only).
        context: template radius in units of the atlas' epicardial radius (heart plus surroundings).
        slice_window_mm: how far a slice's centre may move from the stack's centre in refinement.
        slice_tolerance_mm: in the coarse search, each slice may sit this far from the stack centre.
        fine_angles_deg / fine_scales: the refinement's local steps around the coarse optimum.
        level_starts / level_ends: which part of the ventricle the stack covers. A stack need not
            run from apex to base (a 3-slice stack may start mid-ventricle); its first (apical)
            and last (basal) slice are given every atlas level ``a`` of ``level_starts`` and
            ``b`` of ``level_ends`` (0 apex, 1 base), the slices between spaced evenly, and the
            pair whose template matches best (mean NCC, centres refined per slice) is kept.
            ``[0]`` and ``[1]`` alone (this class's default): the stack is taken to span apex to
            base. The Hydra config (``atlas.auto``) searches ``[0, 0.125, 0.25, 0.375]`` x
            ``[0.625, 0.75, 0.875, 1]``, chosen together with the MyoPS sequence weights on
            held-out atlas folds of the shared MyoPS cases by ``benchmarks/real_myops.py``.
        slice_scales: per-slice scale refinement: after the stack's levels are chosen, every slice
            tries these multiples of the stack's scale (its centre found again for each) and keeps
            its best template match. ``[1]`` (this class's default): one scale for the whole stack.
            The Hydra config searches ``[0.9, 0.95, 1, 1.05, 1.1]`` (chosen on held-out atlas
            folds by ``benchmarks/real_myops.py``).
        slice_angles_deg: the same for the rotation: offsets (degrees) from the stack's angle that
            every slice tries, with every ``slice_scales`` value. ``[0]``: one angle per stack.
        sequences: the subject sequences whose images are matched to the template (``None``: every
            one the template has). The reference alone keeps the placement independent of the
            other sequences' slice motion (the real added-shift experiment uses it so that both of
            its fits share one placement), but finds the heart far less well: on held-out MyoPS
            cases LGE alone gave myocardium Dice 0.707 against 0.820 with all three
            (``benchmarks/real_myops.py``, one held-out atlas fold).
    """

    coarse_mm: float = 2.5
    fine_mm: float = 1.25
    angles_deg: tuple[float, ...] = (-40.0, -30.0, -20.0, -10.0, 0.0, 10.0, 20.0, 30.0, 40.0)
    scales: tuple[float, ...] = (0.55, 0.65, 0.75, 0.85, 0.95, 1.05, 1.15, 1.3)
    both_directions: bool = True
    context: float = 2.2
    slice_window_mm: float = 12.0
    slice_tolerance_mm: float = 7.5
    fine_angles_deg: tuple[float, ...] = (-5.0, 0.0, 5.0)
    fine_scales: tuple[float, ...] = (0.95, 1.0, 1.05)
    level_starts: tuple[float, ...] = (0.0,)
    level_ends: tuple[float, ...] = (1.0,)
    slice_scales: tuple[float, ...] = (1.0,)
    slice_angles_deg: tuple[float, ...] = (0.0,)
    sequences: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("coarse_mm", "fine_mm", "context", "slice_window_mm"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PlacementConfig: {name} must be > 0, got {getattr(self, name)}")
        if not self.slice_scales or any(s <= 0 for s in self.slice_scales):
            raise ValueError(f"PlacementConfig: slice_scales must be non-empty and > 0, got {list(self.slice_scales)}")
        if not self.slice_angles_deg:
            raise ValueError("PlacementConfig: slice_angles_deg must be non-empty ([0]: one angle per stack)")
        if not self.angles_deg or not self.scales or any(s <= 0 for s in (*self.scales, *self.fine_scales)):
            raise ValueError(f"PlacementConfig: angles_deg and scales must be non-empty and scales > 0, got {self.angles_deg}, {self.scales}")
        levels = (*self.level_starts, *self.level_ends)
        if not self.level_starts or not self.level_ends or any(not 0.0 <= t <= 1.0 for t in levels):
            raise ValueError(
                f"PlacementConfig: level_starts and level_ends must be non-empty, in [0, 1] (0 apex, 1 base), "
                f"got {list(self.level_starts)}, {list(self.level_ends)}"
            )
        if self.sequences is not None and not self.sequences:
            raise ValueError("PlacementConfig: sequences must name at least one sequence, or be null (all)")
        if min(self.level_ends) < max(self.level_starts):
            raise ValueError(
                f"PlacementConfig: every level_end must be >= every level_start (the stack runs apex to base), "
                f"got {list(self.level_starts)}, {list(self.level_ends)}"
            )


@dataclass(frozen=True)
class Placement:
    """The found heart frame of a stack.

    Attributes:
        centres_mm: ``[Z, 2]`` per-slice canonical origin in the slice (mm, index axes x spacing).
        angle_deg: rotation from the canonical frame (degrees).
        scale: heart size relative to the atlas' mean heart.
        levels: ``[Z]`` long-axis position of every slice (0 apex, 1 base).
        score: mean NCC of the template at the optimum (about 0.3-0.7 where the heart was found).
        slice_scores: ``[Z]`` NCC per slice.
        slice_scales: ``[Z]`` each slice's scale as a multiple of ``scale`` (``None``: one scale per stack).
        slice_angles: ``[Z]`` each slice's rotation offset from ``angle_deg`` (``None``: one angle per stack).
        hypotheses: with ``atlas.hypotheses`` > 1, every hypothesis judged (template score, QC
            score after a short fit, angle, scale, mean centre), best template match first, and
            ``chosen``: the index of this one among them.
    """

    centres_mm: np.ndarray
    angle_deg: float
    scale: float
    levels: np.ndarray
    score: float
    slice_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    slice_scales: np.ndarray | None = None
    slice_angles: np.ndarray | None = None
    hypotheses: list | None = None
    chosen: int | None = None

    def slice_scale(self, z: int) -> float:
        """The heart size on slice ``z`` relative to the atlas' mean heart."""
        return float(self.scale * (1.0 if self.slice_scales is None else self.slice_scales[z]))

    def slice_angle(self, z: int) -> float:
        """The rotation of slice ``z`` from the canonical frame (degrees)."""
        return float(self.angle_deg + (0.0 if self.slice_angles is None else self.slice_angles[z]))

    def as_dict(self) -> dict:
        return {
            "centres_mm": self.centres_mm.round(2).tolist(),
            "angle_deg": round(float(self.angle_deg), 2),
            "scale": round(float(self.scale), 4),
            "levels": self.levels.round(3).tolist(),
            "score": round(float(self.score), 4),
            "slice_scores": self.slice_scores.round(4).tolist(),
            **({"slice_scales": self.slice_scales.round(4).tolist()} if self.slice_scales is not None else {}),
            **({"slice_angles": self.slice_angles.round(2).tolist()} if self.slice_angles is not None else {}),
            **({"hypotheses": self.hypotheses, "chosen": self.chosen} if self.hypotheses is not None else {}),
        }


def _zoom_slice(img: np.ndarray, spacing, pixel_mm: float) -> np.ndarray:
    """Resample a 2D slice to ``pixel_mm`` pixels (anti-aliased when shrinking)."""
    f = np.asarray(spacing, dtype=float) / pixel_mm
    sm = np.maximum(0.5 / f - 0.5, 0.0) if (f < 1).any() else None
    if sm is not None and (sm > 0).any():
        img = ndimage.gaussian_filter(img, sm)
    return ndimage.zoom(img, f, order=1)


def _template_patches(template2d: np.ndarray, pixel_mm: float, atlas_px: float, phis, sigma: float, radius_mm: float):
    """The canonical template seen at ``pixel_mm`` pixels, scaled by ``sigma`` and rotated by every
    angle of ``phis`` (degrees): ``[A, h, w]`` (float32 tensor, one ``grid_sample``: bilinear, edge
    values beyond the template) and the disc mask ``[h, w]`` they share (a disc turns into itself)."""
    half = int(math.ceil(radius_mm * sigma / pixel_mm))
    ax = np.arange(-half, half + 1) * pixel_mm
    p = np.stack(np.meshgrid(ax, ax, indexing="ij"), -1)
    q = np.stack([p @ rotation(-phi).T / sigma for phi in phis])  # [A, h, w, 2] canonical mm
    idx = q / atlas_px + (np.asarray(template2d.shape, dtype=float) - 1) / 2.0
    size = np.asarray(template2d.shape, dtype=float) - 1
    grid = torch.from_numpy((2.0 * idx[..., ::-1] / size[::-1] - 1.0).astype(np.float32))  # (width, height) order, [-1, 1] corner to corner
    img = torch.from_numpy(np.ascontiguousarray(template2d, dtype=np.float32))[None, None].expand(len(phis), 1, *template2d.shape)
    patches = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True)[:, 0]
    mask = (np.linalg.norm(p, axis=-1) / sigma <= radius_mm).astype(float)
    return patches, mask


def _correlate(image: Tensor, kernels: Tensor, spectra: dict | None = None) -> Tensor:
    """``scipy.signal.fftconvolve(image, k[::-1, ::-1], mode="same")`` for every kernel ``k`` of
    ``kernels`` ``[M, h, w]`` (odd sizes) by one batched FFT: ``[M, X, Y]``. ``spectra``: a cache of
    the image's spectrum by FFT size (one image, many kernel sizes)."""
    (x, y), (h, w) = image.shape, kernels.shape[-2:]
    size = (sp_fft.next_fast_len(x + h - 1, True), sp_fft.next_fast_len(y + w - 1, True))
    spectrum = None if spectra is None else spectra.get(size)
    if spectrum is None:
        spectrum = torch.fft.rfft2(image, s=size)
        if spectra is not None:
            spectra[size] = spectrum
    full = torch.fft.irfft2(spectrum * torch.fft.rfft2(kernels.flip(-2, -1), s=size), s=size)
    return full[:, (h - 1) // 2 : (h - 1) // 2 + x, (w - 1) // 2 : (w - 1) // 2 + y]


def _max_filter(maps: Tensor, radius: int) -> Tensor:
    """``ndimage.maximum_filter(m, size=2 * radius + 1, mode="nearest")`` of every map ``[M, X, Y]``
    (separable: rows, then columns)."""
    k = 2 * radius + 1  # (unfold + amax: about 4x faster than max_pool2d on the CPU)
    rows = F.pad(maps[:, None], (0, 0, radius, radius), mode="replicate")[:, 0].unfold(1, k, 1).amax(-1)
    return F.pad(rows[:, None], (radius, radius, 0, 0), mode="replicate")[:, 0].unfold(2, k, 1).amax(-1)


class _SliceStats:
    """Masked normalised cross-correlation (NCC) of templates with one image slice, by batched FFT:
    the slice's spectrum and its local sums under each disc are computed once and shared."""

    def __init__(self, image: np.ndarray, var_floor: float | None = None) -> None:
        self.image = image
        self._image = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        # flat regions (air, zero padding) have no contrast to correlate with: floor the local
        # variance at a fraction of the slice's own, so they score ~0 instead of dividing by ~0
        self.var_floor = (0.1 * float(image.std())) ** 2 + 1e-12 if var_floor is None else var_floor
        self._spectra: dict = {}  # FFT size -> the slice's spectrum
        self._local: dict = {}  # disc shape -> local sums of the slice and its square under the disc
        self._parts: dict = {}  # (box, disc radius) -> the _SliceStats of the part of the slice a box sees

    def ncc(self, patches: Tensor, mask: np.ndarray, box: tuple[int, int, int, int] | None = None) -> Tensor:
        """NCC ``[M, X, Y]`` of every masked template of ``patches`` ``[M, h, w]`` (sharing the disc
        ``mask``) at every centre pixel, -1 where its disc leaves the slice; with ``box`` ``(i0, i1,
        j0, j1)`` only the centres in that box are computed (the rest -1), on the part of the slice
        they see: far less work when a window is all that is searched."""
        h = mask.shape[0] // 2
        shape = self.image.shape
        if box is not None:
            i0, i1, j0, j1 = box
            r0, c0 = max(i0 - h, 0), max(j0 - h, 0)
            key = (box, h)
            if key not in self._parts:
                self._parts[key] = _SliceStats(self.image[r0 : i1 + h, c0 : j1 + h], self.var_floor)
            part = self._parts[key].ncc(patches, mask)
            out = torch.full((len(patches), *shape), -1.0)
            out[:, i0:i1, j0:j1] = part[:, i0 - r0 : i1 - r0, j0 - c0 : j1 - c0]
            # a centre whose disc leaves the whole slice is no candidate (the part's edge inside the slice is no edge)
            out[:, :h], out[:, shape[0] - h :], out[:, :, :h], out[:, :, shape[1] - h :] = -1.0, -1.0, -1.0, -1.0
            return out
        n = float(mask.sum())
        m = torch.from_numpy(mask.astype(np.float32))
        t = (patches - (patches * m).sum((1, 2), keepdim=True) / n) * m
        tn = t.square().sum((1, 2)).sqrt() + 1e-12
        num = _correlate(self._image, t, self._spectra)
        if mask.shape not in self._local:
            self._local[mask.shape] = (_correlate(self._image, m[None], self._spectra)[0], _correlate(self._image.square(), m[None])[0])
        s1, s2 = self._local[mask.shape]
        var = (s2 - s1 * s1 / n).clamp_min(n * self.var_floor)
        out = num / (tn[:, None, None] * var.sqrt())
        valid = torch.zeros(shape, dtype=torch.bool)
        valid[h : shape[0] - h, h : shape[1] - h] = True
        return out.masked_fill(~valid, -1.0)


#: the template's disc (``context`` times the atlas' heart radius, times the largest heart size
#: searched) spans at most this fraction of the field of view across: a disc must lie inside the
#: slice, so on a field of view cut close around the heart a full-size disc leaves the heart's
#: centre almost nowhere to be (``benchmarks/field_of_view.py``: on the shared cases cut to 180 and
#: 150 mm, the heart 21 mm off the centre, with a context of 2.2). The shared cases' fields of view
#: (294-379 mm) are wide enough for the packaged ``context`` at every size searched.
MAX_DISC_FRACTION = 0.4


class _HeartSearch:
    """What every stage of one :func:`find_heart` call shares: the subject's images, the template
    and the search settings, and the masked NCC of one slice against the template.

    Attributes:
        images / coverage: ``[N, X, Y, Z]`` the subject's sequences (linear intensities) and where
            each covers the common space (1 covered).
        spacing: in-plane spacing ``(sx, sy)`` mm of the common space.
        template: ``[S, H, W, L]`` the atlas' canonical intensity template.
        used: ``(n, c)`` pairs: subject sequence ``n`` is matched to template channel ``c``.
        atlas_pixel_mm: canonical pixel size (mm).
        radius_mm: template radius (mm, canonical): ``config.context`` x the atlas' epicardial
            radius, or less on a small field of view (:data:`MAX_DISC_FRACTION`).
        cfg: the search settings.
        nz: number of slices ``Z``.
    """

    def __init__(self, images, coverage, spacing, template, template_channels, atlas_pixel_mm, atlas_radius_mm, cfg):
        self.used = [(n, c) for n, c in enumerate(template_channels) if c is not None]
        if not self.used:
            raise ValueError("find_heart: none of the subject's sequences has an intensity template in the atlas")
        self.images, self.coverage, self.spacing, self.template = images, coverage, spacing, template
        self.atlas_pixel_mm, self.cfg = atlas_pixel_mm, cfg
        self.radius_mm = cfg.context * atlas_radius_mm
        fov_mm = min(images.shape[1] * float(spacing[0]), images.shape[2] * float(spacing[1]))
        largest = max(cfg.scales) * max(cfg.fine_scales) * max(cfg.slice_scales)
        if self.radius_mm * largest > MAX_DISC_FRACTION * fov_mm:
            self.radius_mm = MAX_DISC_FRACTION * fov_mm / largest
            log.info("placement: a %.0f mm field of view; the template's context cut to %.2f of the atlas' heart radius "
                     "(atlas.auto.context %.2f) so that it can lie off the image centre", fov_mm, self.radius_mm / atlas_radius_mm, cfg.context)
        self.nz = images.shape[-1]

    def slice_stats(self, pixel_mm: float) -> list[dict[int, _SliceStats]]:
        """Per slice ``z`` (a list of ``Z``): sequence ``n`` -> its slice resampled to ``pixel_mm``
        pixels (uncovered voxels zeroed), for every used sequence covering at least half the slice."""
        out = []
        for z in range(self.nz):
            per = {}
            for n, _ in self.used:
                cov = self.coverage[n, ..., z]
                if cov.mean() < 0.5:  # a sequence that barely covers this slice says little
                    continue
                per[n] = _SliceStats(_zoom_slice(self.images[n, ..., z] * (cov > 0), self.spacing, pixel_mm))
            out.append(per)
        return out

    def slice_ncc(self, stats, z: int, t: float, phis, sigma: float, pixel_mm: float, box=None) -> Tensor | None:
        """NCC maps of slice ``z`` (stats from :meth:`slice_stats` at ``pixel_mm``) against the template
        at level ``t``, rotated by each angle of ``phis`` (degrees) and scaled by ``sigma``:
        ``[A, X', Y']`` (one value per candidate centre pixel, -1 where the disc leaves the slice or
        outside ``box``), the mean over the sequences covering the slice; ``None`` when none does."""
        acc, count = None, 0
        for n, c in self.used:
            if n not in stats[z]:
                continue
            level = at_level(self.template[c : c + 1], t)[0]
            r = stats[z][n].ncc(*_template_patches(level, pixel_mm, self.atlas_pixel_mm, list(phis), sigma, self.radius_mm), box)
            acc = r if acc is None else acc + r
            count += 1
        return None if acc is None else acc / count


def _coarse_maps(search: _HeartSearch, stats, levels: list[float], tol: int) -> dict | None:
    """Per ``(phi, sigma)`` of ``angles_deg`` x ``scales``: the mean over slices of each slice's NCC
    map at ``coarse_mm`` pixels, each first maximised over ``+-tol`` pixels (a slice may sit that far
    from the stack's centre): ``[X', Y']`` by stack centre pixel; ``None`` when no slice is covered.
    Every angle of a scale is matched by one batched FFT correlation."""
    cfg = search.cfg
    angles, scales = list(cfg.angles_deg), list(cfg.scales)
    total, k = None, 0
    for z in range(search.nz):
        maps = [search.slice_ncc(stats, z, levels[z], angles, sigma, cfg.coarse_mm) for sigma in scales]
        if maps[0] is None:
            continue
        r = _max_filter(torch.stack(maps, 1).flatten(0, 1), tol)  # [A * S, X', Y']
        total = r if total is None else total + r
        k += 1
    if total is None:
        return None
    total = (total / k).reshape(len(angles), len(scales), *total.shape[1:]).numpy()
    return {(phi, sigma): total[a, b] for a, phi in enumerate(angles) for b, sigma in enumerate(scales)}


def _coarse_search(search: _HeartSearch, count: int = 1, apart_mm: float = 15.0) -> list[tuple[bool, float, float, np.ndarray]]:
    """The stack's long-axis direction, angle (degrees), scale and centre ``[2]`` (mm) of the best
    mean coarse NCC over direction x ``angles_deg`` x ``scales`` and every centre of the slice;
    with ``count`` > 1 also the next best candidates that differ from every one kept (a centre at
    least ``apart_mm`` away, or a heart size at least 1.2 times larger or smaller), best first."""
    cfg = search.cfg
    stats = search.slice_stats(cfg.coarse_mm)
    tol = max(1, int(round(cfg.slice_tolerance_mm / cfg.coarse_mm)))
    found = []  # (score, apex_first, phi, sigma, centre_mm): per setting its best centre, and one far from it
    directions = (True, False) if (cfg.both_directions and search.nz > 1) else (True,)
    far = apart_mm / cfg.coarse_mm
    for apex_first in directions:
        maps = _coarse_maps(search, stats, stack_levels(search.nz, apex_first), tol)
        if maps is None:
            continue
        for phi in cfg.angles_deg:
            for sigma in cfg.scales:
                total = maps[(phi, sigma)]
                i = np.unravel_index(int(np.argmax(total)), total.shape)
                found.append((float(total[i]), apex_first, phi, sigma, np.array(i, dtype=float) * cfg.coarse_mm))
                if count > 1:
                    ii, jj = np.meshgrid(np.arange(total.shape[0]), np.arange(total.shape[1]), indexing="ij")
                    away = np.where((ii - i[0]) ** 2 + (jj - i[1]) ** 2 >= far**2, total, -np.inf)
                    j = np.unravel_index(int(np.argmax(away)), away.shape)
                    if np.isfinite(away[j]):
                        found.append((float(away[j]), apex_first, phi, sigma, np.array(j, dtype=float) * cfg.coarse_mm))
    if not found:
        raise ValueError("find_heart: no slice is covered by a sequence with a template")
    found.sort(key=lambda f: -f[0])
    kept: list = []
    for f in found:
        if all(np.hypot(*(f[4] - k[4])) >= apart_mm or max(f[3] / k[3], k[3] / f[3]) >= 1.2 for k in kept):
            kept.append(f)
        if len(kept) == count:
            break
    return [f[1:] for f in kept]


class _SliceMatch:
    """Per-slice matching at ``fine_mm`` pixels: a slice's best centre within ``slice_window_mm``
    of the stack's coarse centre ``centre_mm`` ``[2]`` (mm)."""

    def __init__(self, search: _HeartSearch, centre_mm: np.ndarray) -> None:
        self.search, self.cfg = search, search.cfg
        self.pixel_mm = search.cfg.fine_mm
        self.stats = search.slice_stats(self.pixel_mm)
        self.centre_mm = centre_mm
        self.win = search.cfg.slice_window_mm / self.pixel_mm  # window radius (pixels)
        self._windows: dict = {}  # NCC map shape -> the disc within slice_window_mm of the centre

    def _window(self, shape) -> np.ndarray:
        if shape not in self._windows:
            ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
            c = self.centre_mm / self.pixel_mm
            self._windows[shape] = (ii - c[0]) ** 2 + (jj - c[1]) ** 2 <= self.win**2
        return self._windows[shape]

    def match(self, z: int, t: float, phis, sigma: float) -> list[tuple[np.ndarray | None, float]]:
        """Slice ``z``'s best centre ``[2]`` (mm) within the window and its NCC, for the template at
        level ``t``, each angle of ``phis`` (degrees) and scale ``sigma``: one pair per angle, each
        ``(None, nan)`` if the slice is not covered."""
        if not self.stats[z]:
            return [(None, np.nan)] * len(phis)
        shape = next(iter(self.stats[z].values())).image.shape
        c = self.centre_mm / self.pixel_mm
        box = (max(int(math.floor(c[0] - self.win)), 0), min(int(math.ceil(c[0] + self.win)) + 1, shape[0]),
               max(int(math.floor(c[1] - self.win)), 0), min(int(math.ceil(c[1] + self.win)) + 1, shape[1]))
        r = self.search.slice_ncc(self.stats, z, t, phis, sigma, self.pixel_mm, box if box[0] < box[1] and box[2] < box[3] else None)
        if r is None:
            return [(None, np.nan)] * len(phis)
        r = torch.where(torch.from_numpy(self._window(tuple(r.shape[1:]))), r, -torch.inf).flatten(1)
        best = r.argmax(1)
        return [(np.array(np.unravel_index(int(i), shape), dtype=float) * self.pixel_mm, float(r[a, i])) for a, i in enumerate(best)]


@dataclass(frozen=True)
class _Stack:
    """A candidate heart frame while it is refined: angle (degrees), scale, ``[Z]`` levels,
    ``[Z]`` centres (mm, ``None`` for uncovered slices), ``[Z]`` NCC, their nanmean, and the
    per-slice scale factors / angle offsets (``None``: one per stack)."""

    phi: float
    sigma: float
    levels: list[float]
    centres: list[np.ndarray | None]
    scores: np.ndarray
    score: float
    slice_scales: np.ndarray | None = None
    slice_angles: np.ndarray | None = None


def _fine_search(match: _SliceMatch, levels: list[float], phi0: float, sigma0: float) -> _Stack:
    """Per-slice centres around the coarse optimum for ``fine_angles_deg`` x ``fine_scales`` steps
    from ``phi0`` / ``sigma0``, each slice at ``levels``; the step of best mean NCC."""
    phis = [phi0 + dphi for dphi in match.cfg.fine_angles_deg]
    per_scale = {ds: [match.match(z, levels[z], phis, sigma0 * ds) for z in range(len(levels))] for ds in match.cfg.fine_scales}
    best_score, best = -np.inf, None
    for a, phi in enumerate(phis):
        for ds in match.cfg.fine_scales:
            found = [per_z[a] for per_z in per_scale[ds]]
            scores = [f[1] for f in found]
            s = float(np.nanmean(scores))
            if s > best_score:
                best_score, best = s, _Stack(phi, sigma0 * ds, levels, [f[0] for f in found], np.array(scores), s)
    return best


def _choose_coverage(match: _SliceMatch, stack: _Stack, apex_first: bool) -> _Stack:
    """The stack's coverage of the ventricle: its apical slice at each of ``level_starts``, its
    basal at each of ``level_ends``, the slices between evenly spaced, centres found again per slice;
    ``stack`` (apex to base) unless a pair matches better (mean NCC)."""
    ranges = [(a, b) for a in match.cfg.level_starts for b in match.cfg.level_ends]
    if ranges == [(0.0, 1.0)]:
        return stack
    nz = len(stack.levels)
    # the fine search already matched every slice at its apex-to-base level
    cache: dict = {(z, round(stack.levels[z], 6)): (stack.centres[z], stack.scores[z]) for z in range(nz)}
    best = stack
    for a, b in ranges:
        levels = stack_levels(nz, apex_first, a, b)
        found = []
        for z in range(nz):
            key = (z, round(levels[z], 6))
            if key not in cache:
                cache[key] = match.match(z, levels[z], [stack.phi], stack.sigma)[0]
            found.append(cache[key])
        s = float(np.nanmean([f[1] for f in found]))
        if s > best.score:
            best = replace(best, levels=levels, centres=[f[0] for f in found], scores=np.array([f[1] for f in found]), score=s)
    return best


def _refine_slices(match: _SliceMatch, stack: _Stack) -> _Stack:
    """Per slice: ``slice_scales`` multiples of the stack's scale x ``slice_angles_deg`` offsets
    from its angle, each with its centre found again; every slice keeps its best match."""
    cfg = match.cfg
    per_scale, per_angle = tuple(cfg.slice_scales) != (1.0,), tuple(cfg.slice_angles_deg) != (0.0,)
    if not (per_scale or per_angle):
        return stack
    nz = len(stack.levels)
    centres, scores = list(stack.centres), np.array(stack.scores, dtype=float)
    factors, offsets = np.ones(nz), np.zeros(nz)
    for z in range(nz):
        for f in cfg.slice_scales:
            offs = [d for d in cfg.slice_angles_deg if not (f == 1.0 and d == 0.0)]  # the stack's own: scores[z] already
            if not offs:
                continue
            for d, (c, s) in zip(offs, match.match(z, stack.levels[z], [stack.phi + d for d in offs], stack.sigma * f)):
                if c is not None and not s <= scores[z]:  # a better match (or the first for a slice without one)
                    centres[z], scores[z], factors[z], offsets[z] = c, s, f, d
    return replace(
        stack, centres=centres, scores=scores, score=float(np.nanmean(scores)),
        slice_scales=factors if per_scale else None, slice_angles=offsets if per_angle else None,
    )


def _assemble(stack: _Stack) -> Placement:
    """The :class:`Placement` of ``stack``; an uncovered slice takes the mean of the others' centres."""
    known = [c for c in stack.centres if c is not None]
    centres = np.stack([c if c is not None else np.mean(known, 0) for c in stack.centres])
    return Placement(
        centres, float(stack.phi), float(stack.sigma), np.array(stack.levels), stack.score, stack.scores,
        stack.slice_scales, stack.slice_angles,
    )


def find_heart(
    images: np.ndarray,
    coverage: np.ndarray,
    spacing,
    template: np.ndarray,
    template_channels: list[int | None],
    atlas_pixel_mm: float,
    atlas_radius_mm: float,
    config: PlacementConfig | None = None,
) -> Placement:
    """Find the heart frame of a stack by matching the atlas' intensity template.

    Stages: a coarse search for the stack's direction, angle, scale and centre; a fine per-slice
    search around it; the choice of the stack's coverage of the ventricle; an optional per-slice
    scale / angle refinement.

    Args:
        images: ``[N, X, Y, Z]`` the subject's sequences in the common space (linear intensities).
        coverage: ``[N, X, Y, Z]`` 1 where sequence n covers the voxel.
        spacing: in-plane spacing ``(sx, sy)`` mm of the common space.
        template: ``[S, H, W, L]`` the atlas' canonical intensity template (S sequences, L levels).
        template_channels: for each of the N subject sequences, the template channel that matches
            it (``None``: not used for placement).
        atlas_pixel_mm: canonical pixel size (mm); ``atlas_radius_mm``: the atlas' mean epicardial
            radius (mm), the unit of ``config.context``.

    Returns:
        :class:`Placement`. Raises ``ValueError`` when no sequence has a template.
    """
    return find_hearts(images, coverage, spacing, template, template_channels, atlas_pixel_mm, atlas_radius_mm, config)[0]


def find_hearts(images, coverage, spacing, template, template_channels, atlas_pixel_mm, atlas_radius_mm,
                config: PlacementConfig | None = None, count: int = 1) -> list[Placement]:
    """:func:`find_heart`'s best placement and, with ``count`` > 1, up to ``count - 1`` more
    hypotheses: the next best distinct coarse optima (elsewhere in the slice, or of another heart
    size), each refined the same way; best template match first."""
    cfg = config or PlacementConfig()
    search = _HeartSearch(images, coverage, spacing, template, template_channels, atlas_pixel_mm, atlas_radius_mm, cfg)
    out: list[Placement] = []
    for apex_first, phi0, sigma0, centre0 in _coarse_search(search, count):
        match = _SliceMatch(search, centre0)
        stack = _fine_search(match, stack_levels(search.nz, apex_first), phi0, sigma0)
        stack = _choose_coverage(match, stack, apex_first)
        found = _assemble(_refine_slices(match, stack))
        # a hypothesis whose refinement ended where a kept one is (centre within 5 mm, size within 5 %) adds nothing
        if not any(np.hypot(*(found.centres_mm.mean(0) - k.centres_mm.mean(0))) < 5.0 and abs(math.log(found.scale / k.scale)) < 0.05
                   for k in out):
            out.append(found)
    return out


def place_canonical(
    prob: np.ndarray, pixel_mm: float, shape, spacing, placement: Placement
) -> np.ndarray:
    """The canonical atlas ``[K, H, W, L]`` (probabilities, class 0 background) on a stack grid
    ``[K, *shape]`` by ``placement``; outside the atlas' frame everything is background."""
    out = np.zeros((prob.shape[0], *shape), dtype=np.float32)
    for z in range(shape[2]):
        canon = at_level(prob, float(placement.levels[z]))
        slab = canonical_to_slice(canon, pixel_mm, shape[:2], spacing, placement.centres_mm[z], placement.slice_scale(z), placement.slice_angle(z))
        slab = np.clip(slab, 0, None)
        slab[0] += np.clip(1.0 - slab.sum(0), 0, None)
        out[..., z] = slab / slab.sum(0, keepdims=True)
    return out


# ------------------------------------------------------------------------- placing an Atlas
PLACEMENTS = ("identity", "auto")


def place_atlas(atlas: Atlas, target: Grid, placement: str = "identity") -> Tensor:
    """The atlas in the common space ``[K, *target.shape]`` (probabilities).

    ``placement='identity'`` uses the atlas where its affine puts it in world space; outside its
    field of view everything is background. ``'auto'`` (finding the heart on a full field of view)
    is reserved for real data and not available in this version.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"atlas.placement must be one of {PLACEMENTS}, got {placement!r}")
    if placement == "auto":
        raise ValueError("place_atlas: placement='auto' needs the subject's images; use place_atlas_auto")
    if atlas.canonical:
        raise ValueError(
            f"{atlas.path}: a canonical atlas (from scripts/build_atlas.py) has no world position; "
            "use atlas.placement=auto"
        )
    prob, cov = resample(atlas.prob, atlas.grid, target, through_plane="linear")
    if cov.sum() == 0:
        raise ValueError(f"{atlas.path}: the atlas does not overlap the images in world space (check its affine)")
    prob = prob * cov
    prob[0] = prob[0] + (1 - cov)
    return prob / prob.sum(0, keepdim=True).clamp_min(1e-8)


def place_atlas_auto(atlas: Atlas, subject, config: PlacementConfig | None = None) -> tuple[Tensor, Placement]:
    """Find the heart on ``subject``'s full field of view and place the canonical ``atlas`` there.

    Returns the atlas in the common space ``[K, *subject.grid.shape]`` (probabilities) and the
    :class:`~mvmm_monai.atlas.placement.Placement` (per-slice centres, angle, scale,
    long-axis levels, template score). Only the images are used, never labels.
    """
    return place_atlas_hypotheses(atlas, subject, config, 1)[0]


def place_atlas_hypotheses(atlas: Atlas, subject, config: PlacementConfig | None = None, count: int = 1) -> list[tuple[Tensor, Placement]]:
    """:func:`place_atlas_auto` for the best placement and up to ``count - 1`` distinct others
    (:func:`find_hearts`), best template match first."""
    if not atlas.canonical or atlas.template is None:
        raise ValueError(
            f"{atlas.path}: atlas.placement=auto needs an atlas built by scripts/build_atlas.py (a canonical frame and "
            "an intensity template in its sidecar); this atlas has none. Use atlas.placement=identity or rebuild it."
        )
    side = atlas.sidecar
    tseq = list(side["template_sequences"])
    chosen = None if config is None or config.sequences is None else list(config.sequences)
    if chosen is not None and (missing := [s for s in chosen if s not in subject.sequences]):
        raise ValueError(f"atlas.auto.sequences: {missing} not among subject {subject.name}'s sequences {list(subject.sequences)}")
    channels = [tseq.index(s) if s in tseq and (chosen is None or s in chosen) else None for s in subject.sequences]
    if all(c is None for c in channels):
        raise ValueError(
            f"{atlas.path}: its template covers sequences {tseq}, none of the subject's {chosen or list(subject.sequences)}"
        )
    spacing = tuple(subject.grid.spacing[:2].tolist())
    found = find_hearts(
        subject.images.numpy(),
        subject.coverage.numpy(),
        spacing,
        atlas.template.numpy(),
        channels,
        float(side["pixel_mm"]),
        float(side["radius_mm"]),
        config,
        count,
    )
    return [(torch.from_numpy(place_canonical(atlas.prob.numpy(), float(side["pixel_mm"]), subject.grid.shape, spacing, f)), f) for f in found]


def displace_atlas(prob: Tensor, spacing, shift_mm=(0.0, 0.0), scale: float = 1.0, angle_deg: float = 0.0) -> Tensor:
    """The placed atlas ``[K, X, Y, Z]`` moved in-plane about its heart's centre: shifted by
    ``shift_mm`` (x, y), scaled by ``scale`` and rotated by ``angle_deg`` (every slice alike).

    A deliberate misplacement (``atlas.displace``): how quality control is calibrated and tested
    on failures made on purpose (``benchmarks/qc_calibration.py``); never part of a normal fit.
    """
    if not (0.2 <= float(scale) <= 5.0) or len(shift_mm) != 2:
        raise ValueError(f"atlas.displace: shift_mm must be [x, y] in mm and scale in [0.2, 5], got {list(shift_mm)}, {scale}")
    p = prob.double().numpy()
    heart = 1.0 - p[0]
    if heart.sum() <= 0:
        raise ValueError("atlas.displace: the placed atlas has no heart to move")
    sx, sy = float(spacing[0]), float(spacing[1])
    grid = np.indices(heart.shape, dtype=float)
    cx, cy = (float((g * heart).sum() / heart.sum()) for g in grid[:2])
    a = math.radians(float(angle_deg))
    # output voxel (x, y) takes the input at c + R(-a) (o - c - t) / scale, in mm
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]]) / float(scale)
    mm = np.diag([sx, sy])
    lin = np.linalg.inv(mm) @ rot @ mm
    centre = np.array([cx, cy])
    t = np.array([float(shift_mm[0]) / sx, float(shift_mm[1]) / sy])
    offset = centre - lin @ (centre + t)
    matrix = np.eye(3)
    matrix[:2, :2] = lin
    out = np.stack([
        ndimage.affine_transform(ch, matrix, offset=[*offset, 0.0], order=1, mode="constant", cval=1.0 if k == 0 else 0.0)
        for k, ch in enumerate(p)
    ])
    out = np.clip(out, 0.0, None)
    return torch.from_numpy(out / out.sum(0, keepdims=True).clip(1e-8)).to(prob.dtype)
