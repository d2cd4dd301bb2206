"""Rigid in-plane alignment of one sequence's slices to the reference sequence by their edges.

The model's own objective (the likelihood with the atlas prior) rewards poses of real T2 and C0
slices that the manual labels reject (docs/results.md, "Rigid slice motion on real cases"). The
edges of the heart show in every sequence whatever its contrast, so the pose of a slice can also be
read from the images alone: the rotation about the heart and the translation at which the
slice's gradient magnitude correlates best with the reference sequence's over the heart's
in-plane footprint. This module holds that measure and its search; :class:`SliceMotion`
(``align``) uses it to set the slices' poses before the fit. No module state.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mvmm_monai.data.common_space import rotate, sample_at, sample_in_slices
from mvmm_monai.registration.functional import inplane_gradient

#: in-plane Gaussian sigma (voxels) of the edges: wider blurs merge the near edges of the wall
#: (contrasts differ per sequence) and bias the optimum (a synthetic slice: 0.04 voxel and 0.05
#: degree off at 0.7, 1 voxel and 1 degree at 1.5)
EDGE_SIGMA = 0.7
#: candidate poses x region voxels sampled in one ``grid_sample`` call
_CHUNK_SAMPLES = 2_000_000


def edge_magnitude(image: Tensor, spacing: tuple[float, float], sigma: float = EDGE_SIGMA) -> Tensor:
    """``[1, X, Y, Z]`` in-plane gradient magnitude (intensity per mm) of ``image`` ``[1, X, Y, Z]``
    after an in-plane Gaussian blur of ``sigma`` voxels, slice by slice."""
    g = inplane_gradient(image.float(), sigma)
    return torch.hypot(g[0] / spacing[0], g[1] / spacing[1])[None]


def heart_footprint(atlas: Tensor, spacing: tuple[float, float], margin_mm: float) -> Tensor:
    """``[*S]`` (bool) the in-plane footprint of the atlas' heart (``atlas`` ``[K, *S]``, class 0 the
    background: where the other classes sum to at least a half, on any slice), grown by
    ``margin_mm`` in-plane and repeated on every slice: the slices beyond the apex and the base
    are aligned by what surrounds the heart."""
    heart = (atlas[1:].sum(0) >= 0.5).any(dim=-1).float()  # [X, Y]
    rx, ry = (max(0, round(margin_mm / s)) for s in spacing)
    grown = F.max_pool2d(heart[None, None], (2 * rx + 1, 2 * ry + 1), stride=1, padding=(rx, ry))[0, 0] > 0
    return grown[..., None].expand(*atlas.shape[1:]).clone()


def _pearson(n: Tensor, sa: Tensor, saa: Tensor, sb: Tensor, sbb: Tensor, sab: Tensor) -> Tensor:
    """Pearson correlation from the per-slice sums over ``n`` voxels of the fixed values ``a`` and
    the moving ones ``b`` (``sa``, ``saa``, ``sb``, ``sbb``, ``sab``); 0 where either is constant."""
    n = n.clamp_min(1)
    cov = sab - sa * sb / n
    var = (saa - sa ** 2 / n) * (sbb - sb ** 2 / n)
    return torch.where(var > 0, cov / var.clamp_min(1e-30).sqrt(), torch.zeros_like(cov))


class _SliceCorrelation:
    """Per-slice Pearson correlation of a moving edge image, sampled at candidate poses, with fixed
    edge values at the region's voxels.

    The region's voxels are also kept slice by slice, padded to the largest slice's count
    (``grid`` ``[Z, W, 2]``, ``valid`` ``[Z, W]``), so that the candidate poses sample the moving
    slices in-plane as one batch (:func:`~mvmm_monai.data.common_space.sample_in_slices`: the
    slices' own index is whole) and the sums are plain row sums.

    Args:
        moving: ``[1, X, Y, Z]`` edge image of the moving sequence (its own voxel grid).
        points: ``[V, 3]`` the region's voxels in the moving sequence's voxel coordinates (pose 0).
        slices: ``[V]`` the moving slice of every region voxel.
        fixed: ``[V]`` the reference's edge values there.
        nz: number of moving slices.
    """

    def __init__(self, moving: Tensor, points: Tensor, slices: Tensor, fixed: Tensor, nz: int) -> None:
        self.moving = moving.float()  # [1, X, Y, Z]
        self.centre = (torch.tensor(moving.shape[1:3], dtype=torch.float32, device=moving.device) - 1) / 2
        self.offset = points[:, :2].float() - self.centre  # [V, 2] from the slice centre
        self.slices, self.nz = slices, nz
        a = fixed.double()
        self.n = self._per_slice(torch.ones_like(a)[None])[0]
        self.sa = self._per_slice(a[None])[0]
        self.saa = self._per_slice((a * a)[None])[0]
        self.a = a.float()
        # the same voxels slice by slice: [Z, W] padded rows
        counts = torch.bincount(slices, minlength=nz)
        order = torch.argsort(slices, stable=True)
        row = slices[order]
        col = torch.arange(len(order), device=slices.device) - (torch.cumsum(counts, 0) - counts)[row]
        width = max(1, int(counts.max())) if len(order) else 1
        self.grid = torch.zeros(nz, width, 2, device=moving.device)
        self.grid[row, col] = self.offset[order]
        self.valid = torch.zeros(nz, width, dtype=torch.bool, device=moving.device)
        self.valid[row, col] = True
        self.rows_a = torch.zeros(nz, width, dtype=torch.float64, device=moving.device)
        self.rows_a[row, col] = a[order]
        self.rows = torch.arange(nz, device=moving.device)  # the slices scored

    def restricted(self, keep: Tensor) -> _SliceCorrelation:
        """The same measure on the slices ``keep`` (``[Z]`` bool) alone: their correlations are
        the same numbers, the other slices are not sampled (correlation 0)."""
        out = copy.copy(self)
        out.rows = self.rows[keep[self.rows]]
        return out

    def _per_slice(self, values: Tensor) -> Tensor:
        """``[C, V]`` -> ``[C, Z]`` sums (float64) over each slice's region voxels."""
        out = torch.zeros(values.shape[0], self.nz, dtype=torch.float64, device=values.device)
        return out.index_add_(1, self.slices, values.double())

    def __call__(self, shifts: Tensor, angles: Tensor) -> Tensor:
        """``[C, Z]`` correlation at ``C`` candidate poses: ``shifts`` ``[C, Z, 2]`` (voxels) and
        ``angles`` ``[C, Z]`` (radians), :func:`~mvmm_monai.data.common_space.sample`'s convention
        (a region voxel at ``p`` reads the moving slice at ``R(angle) (p - c) + c + shift``)."""
        rows = self.rows
        out = torch.zeros(shifts.shape[0], self.nz, dtype=torch.float64, device=shifts.device)
        if len(rows) == 0:
            return out
        grid, valid, a = self.grid[rows], self.valid[rows], self.rows_a[rows]  # [R, W, ...]
        step = max(1, _CHUNK_SAMPLES // max(1, grid.shape[0] * grid.shape[1]))
        for lo in range(0, shifts.shape[0], step):
            sh, an = shifts[lo:lo + step, rows].float(), angles[lo:lo + step, rows].float()  # [C, R, 2], [C, R]
            xy = rotate(grid[:, None], an.T[..., None]) + self.centre + sh.transpose(0, 1)[:, :, None]  # [R, C, W, 2]
            b = sample_in_slices(self.moving, xy, rows)[:, 0]  # [R, C, W]
            b = torch.where(valid[:, None], b.double(), torch.zeros((), dtype=torch.float64, device=b.device))  # [R, C, W]
            sb, sbb, sab = b.sum(-1).T, (b * b).sum(-1).T, (b * a[:, None]).sum(-1).T  # [C, R]
            out[lo:lo + step, rows] = _pearson(self.n[rows], self.sa[rows], self.saa[rows], sb, sbb, sab)
        return out


def _exhaustive(score: _SliceCorrelation, pivot: Tensor, turns: Tensor, r: int) -> Tensor:
    """``[A, Z, 2r + 1, 2r + 1]`` each slice's correlation at each of its turns ``turns`` ``[A, Z]``
    (radians, about the slice's ``pivot`` ``[Z, 2]``, voxels from the slice centre) with every
    whole-voxel offset ``u'`` within ``r`` of the turned frame, i.e. at :func:`align_slices`'
    translation ``u = R u'`` (index ``[a, z, i, j]``: ``u' = (i - r, j - r)``).

    The region's voxels are put on the moving grid's nearest voxels (exact where the sequences
    share a grid, as MyoPS' do; the next stage rescores around the best pose at the exact
    points), the moving slice is turned once per angle on a window around them, and the three
    sums the correlation needs at every offset come from FFT cross-correlations, one pass for
    all offsets and slices of as many angles as :data:`_CHUNK_SAMPLES` allows."""
    moving, nz = score.moving, score.nz
    dev, f64 = moving.device, torch.float64
    q = (score.offset + score.centre).round().long()  # [V, 2] nearest moving voxels
    lo = q.min(dim=0).values
    h, w = (q.max(dim=0).values - lo + 1).tolist()
    L = (h + 2 * r, w + 2 * r)
    flat = (score.slices * h + (q[:, 0] - lo[0])) * w + (q[:, 1] - lo[1])
    kernels = torch.zeros(2, nz * h * w, dtype=f64, device=dev)
    kernels[0].index_add_(0, flat, torch.ones_like(score.a, dtype=f64))  # voxel counts
    kernels[1].index_add_(0, flat, score.a.double())  # reference edge sums
    kernels = F.pad(kernels.view(2, nz, h, w), (0, 2 * r, 0, 2 * r))  # [2, Z, *L]
    # the window's voxels (moving grid) turned about each slice's pivot: the moving edges there
    gx = torch.arange(L[0], device=dev, dtype=f64) + (lo[0] - r)
    gy = torch.arange(L[1], device=dev, dtype=f64) + (lo[1] - r)
    window = torch.stack(torch.meshgrid(gx, gy, indexing="ij"), dim=-1).view(-1, 1, 2)  # [L*L, 1, 2]
    P = pivot.to(f64) + score.centre.to(f64)  # [Z, 2] the pivots on the moving grid
    k = torch.fft.rfft2(kernels, s=L).conj()
    n, sa, saa = (v[:, None, None] for v in (score.n, score.sa, score.saa))

    def corr(kernel: Tensor, image: Tensor) -> Tensor:
        return torch.fft.irfft2(kernel * image, s=L)[..., : 2 * r + 1, : 2 * r + 1]

    out = []
    step = max(1, _CHUNK_SAMPLES // (L[0] * L[1] * nz))  # turns per pass: bounded memory
    for chunk in turns.to(f64).split(step):
        xy = P + rotate((window - P)[None], chunk[:, None, :])  # [A, L*L, Z, 2]
        z = torch.arange(nz, device=dev, dtype=f64).expand(*xy.shape[:-1])[..., None]
        b = sample_at(moving, torch.cat((xy, z), dim=-1).float())[0].double()  # [A, L*L, Z]
        b = b.view(len(chunk), *L, nz).permute(0, 3, 1, 2)  # [A, Z, *L]
        spectra = torch.fft.rfft2(torch.stack((b, b * b)), s=L)  # [2, A, Z, ...]
        out.append(_pearson(n, sa, saa, corr(k[0], spectra[0]), corr(k[0], spectra[1]), corr(k[1], spectra[0])))
    return torch.cat(out)


def align_slices(
    moving: Tensor,
    points: Tensor,
    slices: Tensor,
    fixed: Tensor,
    spacing: tuple[float, float],
    max_shift_mm: float = 8.0,
    max_angle_deg: float = 12.0,
    angle_step_deg: float = 2.0,
    min_voxels: int = 50,
    min_gain: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The rigid in-plane pose of every moving slice at which its edges correlate best with the
    reference's over the region.

    The pose is a rotation about the centroid of the slice's region voxels (the heart: a turn
    about the slice's own centre would also move the heart) and a translation of that centroid.
    Coarse to fine: first every angle step within ``max_angle_deg`` with every whole-voxel
    translation within ``max_shift_mm`` (whole voxels of the turned frame; :func:`_exhaustive`, by
    FFT); then the same with the whole degrees within ``angle_step_deg`` of each slice's best; and
    a compass search around that (half, quarter and eighth voxels; 0.5, 0.25 and 0.125 degrees),
    scored at the region's exact points. A slice with fewer than ``min_voxels``
    region voxels, or whose best pose does not correlate better than the acquired one by more than
    ``min_gain``, keeps the acquired pose (0).

    Args:
        moving: ``[1, X, Y, Z]`` the moving sequence's edge image (:func:`edge_magnitude`).
        points: ``[V, 3]`` the region's voxels in the moving sequence's voxel coordinates.
        slices: ``[V]`` (long) the moving slice of every region voxel.
        fixed: ``[V]`` the reference's edge values at those voxels.
        spacing: in-plane voxel size (mm) of the moving sequence.

    Returns:
        ``(shifts [Z, 2] voxels, angles [Z] radians, gain [Z])`` in
        :func:`~mvmm_monai.data.common_space.sample`'s convention, and each slice's correlation at
        its best pose less its correlation at the acquired pose (whether it moved or not).
    """
    nz = moving.shape[-1]
    score = _SliceCorrelation(moving, points, slices, fixed, nz)
    dev = points.device
    pivot = torch.zeros(nz, 2, dtype=torch.float64, device=dev).index_add_(0, slices, score.offset.double()) / score.n.clamp_min(1)[:, None]
    mm = torch.tensor(spacing, dtype=torch.float64, device=dev)
    max_angle = math.radians(max_angle_deg)

    def pose(u: Tensor, theta: Tensor) -> Tensor:
        """The slice translation (voxels) that turns by ``theta`` about the pivot and then moves it by ``u``."""
        return u + pivot - rotate(pivot, theta)

    def within(u: Tensor, theta: Tensor) -> Tensor:
        return ((u * mm).norm(dim=-1) <= max_shift_mm + 1e-9) & (theta.abs() <= max_angle + 1e-9)

    def best_of(fn, u: Tensor, theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s = torch.where(within(u, theta), fn(pose(u, theta), theta), torch.full_like(theta, -math.inf))
        top, arg = s.max(dim=0)
        rows = torch.arange(nz, device=dev)
        return top, u[arg, rows], theta[arg, rows]

    r = max(1, math.ceil(max_shift_mm / min(spacing)))
    steps = torch.arange(-r, r + 1, dtype=torch.float64, device=dev)
    grid = torch.cartesian_prod(steps, steps)
    k = math.floor(max_angle_deg / angle_step_deg + 1e-9) if max_angle_deg > 0 else 0
    turns = torch.deg2rad(torch.arange(-k, k + 1, dtype=torch.float64, device=dev) * angle_step_deg)
    zero_u, zero_t = torch.zeros(nz, 2, dtype=torch.float64, device=dev), torch.zeros(nz, dtype=torch.float64, device=dev)
    inside = ((grid * mm).norm(dim=-1) <= max_shift_mm + 1e-9).view(1, 1, 2 * r + 1, 2 * r + 1)

    def exhaustive_best(per_slice_turns: Tensor) -> tuple[Tensor, Tensor]:
        """The best of every turn ``[A, Z]`` with every whole-voxel offset ``u'`` of the turned
        frame (the translation ``u = R u'``, ``|u| = |u'|``): ``(u [Z, 2], theta [Z])``."""
        table = _exhaustive(score, pivot, per_slice_turns, r)  # [A, Z, 2r + 1, 2r + 1]
        ok = inside & (per_slice_turns.abs() <= max_angle + 1e-9)[:, :, None, None]
        arg = torch.where(ok, table, torch.full_like(table, -math.inf)).permute(1, 0, 2, 3).reshape(nz, -1).argmax(dim=1)
        theta = per_slice_turns[arg // grid.shape[0], torch.arange(nz, device=dev)]
        return rotate(grid[arg % grid.shape[0]], theta), theta

    u_best, t_best = exhaustive_best(turns[:, None].expand(-1, nz))
    fine_turns = torch.deg2rad(torch.arange(-angle_step_deg, angle_step_deg + 1e-9, 1.0, dtype=torch.float64, device=dev)) if k else zero_t[:1]
    u_best, t_best = exhaustive_best(t_best[None] + fine_turns[:, None])
    best = score(pose(u_best, t_best)[None], t_best[None])[0]  # at the region's exact points
    for du, dt in ((0.5, 0.5), (0.25, 0.25), (0.125, 0.125)):
        moves = torch.cartesian_prod(*(torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64, device=dev),) * 3)
        moves = moves * torch.tensor([du, du, math.radians(dt)], dtype=torch.float64, device=dev)
        if k == 0:
            moves = moves[moves[:, 2] == 0]
        active = torch.ones(nz, dtype=torch.bool, device=dev)  # a slice that did not improve keeps its pose at this step size
        for _ in range(8):
            fn = score if bool(active.all()) else score.restricted(active)
            top, cu, ct = best_of(fn, u_best[None] + moves[:, None, :2], t_best[None] + moves[:, None, 2])
            better = active & (top > best + 1e-12)
            if not better.any():
                break
            u_best = torch.where(better[:, None], cu, u_best)
            t_best = torch.where(better, ct, t_best)
            best = torch.where(better, top, best)
            active = better
    acquired = score(zero_u[None], zero_t[None])[0]
    keep = (best > acquired + min_gain) & (score.n >= min_voxels)
    shifts = torch.where(keep[:, None], pose(u_best, t_best), zero_u)
    angles = torch.where(keep, t_best, zero_t)
    gain = torch.where(score.n >= min_voxels, best - acquired, torch.zeros_like(best))
    return shifts.float(), angles.float(), gain.float()
