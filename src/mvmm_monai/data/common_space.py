"""Resampling between voxel grids through world coordinates, with coverage masks.

Grids are given by a 4x4 voxel-to-world affine (NIfTI convention, mm) and a spatial shape
``(X, Y, Z)``; the third axis is the slice axis of a short-axis stack. Tensors are channel-first
``[C, X, Y, Z]``. Sampling is bilinear in-plane and, by default, nearest-slice through-plane: a
thick-slice stack says nothing about what lies between its slices, so a target voxel takes the
slice whose slab contains it and is "covered" only if such a slab exists.

MONAI's ``SpatialResample`` interpolates trilinearly across slices and has no notion of a slab or
of per-slice motion, so this module writes the index mapping itself and hands the sampling to
``torch.nn.functional.grid_sample`` (differentiable in the per-slice shifts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mvmm_monai.classes import class_argmax


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``affine`` ``[4, 4]`` float64 voxel-to-world (mm), ``shape`` ``(X, Y, Z)``."""

    affine: Tensor
    shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        if tuple(self.affine.shape) != (4, 4):
            raise ValueError(f"Grid: affine must be 4x4, got {tuple(self.affine.shape)}")
        if len(self.shape) != 3:
            raise ValueError(f"Grid: shape must be (X, Y, Z), got {self.shape}")

    @property
    def spacing(self) -> Tensor:
        """Voxel sizes ``[3]`` in mm."""
        return self.affine[:3, :3].norm(dim=0)

    def voxel_centres(self, dtype=torch.float64) -> Tensor:
        """Index coordinates ``[X, Y, Z, 3]`` of every voxel."""
        axes = [torch.arange(s, dtype=dtype) for s in self.shape]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def map_indices(source: Grid, target: Grid) -> Tensor:
    """Continuous source voxel indices ``[X, Y, Z, 3]`` of every target voxel centre."""
    idx = target.voxel_centres()
    to_src = torch.linalg.solve(source.affine.to(torch.float64), target.affine.to(torch.float64))
    return idx @ to_src[:3, :3].T + to_src[:3, 3]


@dataclass(frozen=True)
class SamplingMap:
    """Where every target voxel falls in a source grid (precomputed once, reused every iteration).

    Attributes:
        index: ``[X, Y, Z, 3]`` continuous source voxel indices (slice index already snapped when
            sampling nearest-slice).
        coverage: ``[X, Y, Z]`` 1 inside the source field of view (slabs included), else 0.
        slice_index: ``[X, Y, Z]`` source slice of every target voxel.
        source_shape: the source grid's shape.
    """

    index: Tensor
    coverage: Tensor
    slice_index: Tensor
    source_shape: tuple[int, int, int]


def sampling_map(
    source: Grid,
    target: Grid,
    *,
    through_plane: str = "nearest",
    target_slice_shifts: Tensor | None = None,
    target_slice_angles: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> SamplingMap:
    """Precompute :class:`SamplingMap` from ``target`` voxels to ``source`` indices.

    ``target_slice_shifts`` ``[target Z, 2]`` (target voxels) and ``target_slice_angles``
    ``[target Z]`` (radians, about the slice centre ``c``): target voxel x is looked up at
    ``R(-angle) (x - shift - c) + c``, to write results back onto a grid whose slices were resampled
    with that motion (:func:`sample`'s ``slice_shifts`` and ``slice_angles``: its inverse).
    """
    if through_plane not in ("nearest", "linear"):
        raise ValueError(f"resample: through_plane must be 'nearest' or 'linear', got {through_plane!r}")
    if target_slice_shifts is not None or target_slice_angles is not None:
        if target_slice_shifts is not None and tuple(target_slice_shifts.shape) != (target.shape[2], 2):
            raise ValueError(
                f"resample: target_slice_shifts must be [{target.shape[2]}, 2], got {tuple(target_slice_shifts.shape)}"
            )
        if target_slice_angles is not None and tuple(target_slice_angles.shape) != (target.shape[2],):
            raise ValueError(f"resample: target_slice_angles must be [{target.shape[2]}], got {tuple(target_slice_angles.shape)}")
        idx = target.voxel_centres()
        xy = idx[..., :2]
        if target_slice_shifts is not None:
            xy = xy - target_slice_shifts.to(idx.dtype)[None, None]
        if target_slice_angles is not None:
            centre = (torch.tensor(target.shape[:2], dtype=idx.dtype) - 1) / 2
            ang = -target_slice_angles.to(idx.dtype)[idx[..., 2].round().long().clamp(0, target.shape[2] - 1)]
            xy = rotate(xy - centre, ang) + centre
        idx = torch.cat((xy, idx[..., 2:]), dim=-1)
        to_src = torch.linalg.solve(source.affine.to(torch.float64), target.affine.to(torch.float64))
        idx = idx @ to_src[:3, :3].T + to_src[:3, 3]
    else:
        idx = map_indices(source, target)
    size = torch.tensor(source.shape, dtype=idx.dtype)
    inside = ((idx >= -0.5) & (idx <= size - 0.5)).all(dim=-1)
    k = idx[..., 2].round().clamp(0, source.shape[2] - 1)
    if through_plane == "nearest":
        idx = torch.cat((idx[..., :2], k[..., None]), dim=-1)
    return SamplingMap(idx.to(dtype), inside.to(dtype), k.long(), tuple(source.shape))


def per_slice(values: Tensor, slice_index: Tensor) -> Tensor:
    """``values[slice_index]`` (``values`` ``[Z, ...]``, ``slice_index`` long ``[*S]`` -> ``[*S, ...]``)
    by ``index_select``: its backward adds into the ``Z`` rows (``index_add_``), where advanced
    indexing's backward (``index_put_`` with accumulation) took 6x longer on CPU with every voxel of
    a slice landing on one row."""
    return torch.index_select(values, 0, slice_index.reshape(-1)).reshape(*slice_index.shape, *values.shape[1:])


def sample(
    image: Tensor,
    smap: SamplingMap,
    *,
    slice_shifts: Tensor | None = None,
    slice_angles: Tensor | None = None,
    mode: str = "bilinear",
) -> Tensor:
    """Sample ``image`` ``[C, *source shape]`` at ``smap`` -> ``[C, *target shape]`` (0 outside coverage).

    ``slice_shifts`` ``[source Z, 2]`` (source voxels) and ``slice_angles`` ``[source Z]``
    (radians, about the slice centre, applied first) move every source slice in-plane: target
    voxel x samples the source at ``R(index(x) - c) + c + shift[slice(x)]``. Differentiable in
    both (and in ``image``).
    """
    if image.ndim != 4 or tuple(image.shape[1:]) != smap.source_shape:
        raise ValueError(
            f"resample: image must be [C, {', '.join(map(str, smap.source_shape))}], got {tuple(image.shape)}"
        )
    nz = smap.source_shape[2]
    idx = smap.index.to(device=image.device, dtype=image.dtype if image.is_floating_point() else smap.index.dtype)
    k = smap.slice_index.to(image.device)
    size = torch.tensor(smap.source_shape, dtype=idx.dtype, device=idx.device)
    if slice_angles is not None:
        if tuple(slice_angles.shape) != (nz,):
            raise ValueError(f"resample: slice_angles must be [{nz}], got {tuple(slice_angles.shape)}")
        centre = (size[:2] - 1) / 2
        rot = rotate(idx[..., :2] - centre, per_slice(slice_angles.to(idx.dtype), k))
        idx = torch.cat((rot + centre, idx[..., 2:]), dim=-1)
    if slice_shifts is not None:
        if tuple(slice_shifts.shape) != (nz, 2):
            raise ValueError(f"resample: slice_shifts must be [{nz}, 2], got {tuple(slice_shifts.shape)}")
        idx = torch.cat((idx[..., :2] + per_slice(slice_shifts.to(idx.dtype), k), idx[..., 2:]), dim=-1)
    out = sample_at(image, idx, mode=mode)
    return out * smap.coverage.to(out)


def rotate(v: Tensor, angle: Tensor) -> Tensor:
    """``[..., 2]`` in-plane vectors turned by ``angle`` ``[...]`` (radians, first axis towards the second)."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack((cos * v[..., 0] - sin * v[..., 1], sin * v[..., 0] + cos * v[..., 1]), dim=-1)


def _grid_sample_grid(index: Tensor, size) -> Tensor:
    """Voxel indices ``[..., D]`` of an image of spatial ``size`` as ``grid_sample``'s grid: in
    [-1, 1] (``align_corners=True``), the last axis first (0 along an axis of one voxel)."""
    size = torch.tensor(size, dtype=index.dtype, device=index.device)
    norm = 2.0 * index / (size - 1).clamp_min(1.0) - 1.0
    return torch.where(size > 1, norm, torch.zeros_like(norm)).flip(-1)


def sample_at(image: Tensor, index: Tensor, mode: str = "bilinear") -> Tensor:
    """``image`` ``[C, X, Y, Z]`` at continuous voxel indices ``index`` ``[A, B, D, 3]`` (any three
    leading sizes; border values outside) -> ``[C, A, B, D]``, in ``index``'s dtype."""
    grid = _grid_sample_grid(index, image.shape[1:])
    return F.grid_sample(image[None].to(grid.dtype), grid[None], mode=mode, padding_mode="border", align_corners=True)[0]


def sample_in_slices(image: Tensor, index: Tensor, slices: Tensor | None = None) -> Tensor:
    """Each slice of ``image`` ``[C, X, Y, Z]`` at its own continuous in-plane voxel indices
    ``index`` ``[R, A, B, 2]`` (bilinear, border values outside), for the slices ``slices`` ``[R]``
    (default: all, ``R = Z``) -> ``[R, C, A, B]``: :func:`sample_at` where every point lies on a
    whole slice, as a batch of 2D samples (a quarter of the 3D sampler's reads)."""
    planes = image.permute(3, 0, 1, 2)  # [Z, C, X, Y]
    if slices is not None:
        planes = planes[slices]
    grid = _grid_sample_grid(index, image.shape[1:3])
    return F.grid_sample(planes.to(grid.dtype), grid, mode="bilinear", padding_mode="border", align_corners=True)


def resample(
    image: Tensor,
    source: Grid,
    target: Grid,
    *,
    slice_shifts: Tensor | None = None,
    slice_angles: Tensor | None = None,
    target_slice_shifts: Tensor | None = None,
    through_plane: str = "nearest",
    mode: str = "bilinear",
) -> tuple[Tensor, Tensor]:
    """Resample ``image`` ``[C, *source.shape]`` onto ``target``: :func:`sampling_map` then :func:`sample`.

    Args:
        image: channel-first source image.
        source, target: the two grids.
        slice_shifts, slice_angles: in-plane motion of the source slices (see :func:`sample`).
        target_slice_shifts: motion of the target slices (see :func:`sampling_map`).
        through_plane: ``"nearest"`` (slab model, default) or ``"linear"`` (smooth images such as
            an atlas).
        mode: ``"bilinear"`` or ``"nearest"`` in-plane (``"nearest"`` for label maps).

    Returns:
        ``(resampled [C, *target.shape], coverage [*target.shape])``; coverage is 1 where the
        target voxel lies inside the source's field of view (slab included), else 0.
    """
    if image.ndim != 4 or tuple(image.shape[1:]) != tuple(source.shape):
        raise ValueError(f"resample: image must be [C, {', '.join(map(str, source.shape))}], got {tuple(image.shape)}")
    dtype = image.dtype if image.is_floating_point() else torch.float32
    if through_plane not in ("nearest", "linear"):
        raise ValueError(f"resample: through_plane must be 'nearest' or 'linear', got {through_plane!r}")
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"resample: mode must be 'bilinear' or 'nearest', got {mode!r}")
    still = slice_shifts is None and slice_angles is None and target_slice_shifts is None
    if still and source.shape == target.shape and torch.allclose(source.affine, target.affine, atol=1e-4):
        # the same grid (e.g. MyoPS' co-registered sequences): every voxel maps onto itself
        return image.to(dtype).clone(), torch.ones(target.shape, dtype=dtype, device=image.device)
    smap = sampling_map(source, target, through_plane=through_plane, target_slice_shifts=target_slice_shifts, dtype=dtype)
    out = sample(image, smap, slice_shifts=slice_shifts, slice_angles=slice_angles, mode=mode)
    return out, smap.coverage


def native_segmentation(posterior: torch.Tensor, subject, sequence: str, slice_shifts=None, smap: SamplingMap | None = None,
                        slice_angles=None):
    """Class indices ``[X_n, Y_n, Z_n]`` of ``sequence``'s own grid from the common-space posterior
    ``[K, *S]``: the posterior is resampled (bilinear in-plane, nearest slice) and its argmax taken;
    voxels the common space does not cover are background. ``slice_shifts`` ``[Z_n, 2]`` (voxels)
    and ``slice_angles`` ``[Z_n]`` (radians) are the fitted motions of the sequence's slices: the
    labels move with them. Without motion, a
    precomputed ``smap`` (:func:`sampling_map` from the common space
    to the sequence) saves recomputing the index map, e.g. at every iteration of a fit."""
    if sequence == subject.reference:
        return class_argmax(posterior)
    if smap is None or slice_shifts is not None or slice_angles is not None:
        smap = sampling_map(subject.grid, subject.grids[sequence], target_slice_shifts=slice_shifts, target_slice_angles=slice_angles)
    prob = sample(posterior.float(), smap)
    return torch.where(smap.coverage.to(prob.device) > 0, class_argmax(prob), torch.zeros((), dtype=torch.long, device=prob.device))


def slab_ids(source: Grid, target: Grid) -> Tensor:
    """``[X, Y, Z]`` long over ``target``: which slab of ``source`` every target voxel lies in, one id
    per (in-plane position, source slice) shared by two or more target voxels; -1 where the voxel is
    alone in its slab or outside ``source``. A slab thicker than the target's slices contains several
    of them (:mod:`mvmm_monai.mixture.partial_volume`)."""
    smap = sampling_map(source, target)
    x, y, _ = target.shape
    pos = torch.arange(x * y).reshape(x, y, 1).expand(target.shape)
    key = pos * source.shape[2] + smap.slice_index
    inside = smap.coverage > 0
    ids = torch.full(target.shape, -1, dtype=torch.long)
    if not bool(inside.any()):
        return ids
    _, inverse, count = torch.unique(key[inside], return_inverse=True, return_counts=True)
    shared = count[inverse] > 1
    dense = torch.cumsum(count > 1, 0) - 1  # ids 0.. for the shared slabs
    ids[inside] = torch.where(shared, dense[inverse], torch.full_like(inverse, -1))
    return ids
