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


def resample(
    image: Tensor,
    source: Grid,
    target: Grid,
    *,
    slice_shifts: Tensor | None = None,
    through_plane: str = "nearest",
    mode: str = "bilinear",
) -> tuple[Tensor, Tensor]:
    """Resample ``image`` ``[C, *source.shape]`` onto ``target``.

    Args:
        image: channel-first source image.
        source, target: the two grids.
        slice_shifts: optional ``[source Z, 2]`` in-plane shift of every source slice, in source
            voxels along its first two axes: target voxel x samples the source at
            ``index(x) + shift[slice(x)]`` (a slice whose content moved by +shift is put back).
        through_plane: ``"nearest"`` (slab model, default) or ``"linear"`` (smooth images such as
            an atlas).
        mode: ``"bilinear"`` or ``"nearest"`` in-plane (``"nearest"`` for label maps).

    Returns:
        ``(resampled [C, *target.shape], coverage [*target.shape])``; coverage is 1 where the
        target voxel lies inside the source's field of view (slab included), else 0.
    """
    if image.ndim != 4 or tuple(image.shape[1:]) != tuple(source.shape):
        raise ValueError(f"resample: image must be [C, {', '.join(map(str, source.shape))}], got {tuple(image.shape)}")
    if through_plane not in ("nearest", "linear"):
        raise ValueError(f"resample: through_plane must be 'nearest' or 'linear', got {through_plane!r}")
    idx = map_indices(source, target).to(image.dtype if image.is_floating_point() else torch.float32)
    size = torch.tensor(source.shape, dtype=idx.dtype)
    inside = ((idx >= -0.5) & (idx <= size - 0.5)).all(dim=-1)
    if through_plane == "nearest":
        k = idx[..., 2].round().clamp(0, source.shape[2] - 1)
        idx = torch.cat((idx[..., :2], k[..., None]), dim=-1)
    if slice_shifts is not None:
        if tuple(slice_shifts.shape) != (source.shape[2], 2):
            raise ValueError(f"resample: slice_shifts must be [{source.shape[2]}, 2], got {tuple(slice_shifts.shape)}")
        k = idx[..., 2].round().clamp(0, source.shape[2] - 1).long()
        shift = slice_shifts.to(idx.dtype)[k]
        idx = torch.cat((idx[..., :2] + shift, idx[..., 2:]), dim=-1)
    # grid_sample on [1, C, X, Y, Z] wants (z, y, x) order in [-1, 1] (align_corners=True)
    norm = 2.0 * idx / (size - 1).clamp_min(1.0) - 1.0
    norm = torch.where(size > 1, norm, torch.zeros_like(norm))
    grid = norm.flip(-1)[None]
    src = image[None].to(grid.dtype)
    out = F.grid_sample(src, grid, mode=mode, padding_mode="border", align_corners=True)[0]
    cov = inside.to(out.dtype)
    return out * cov, cov
