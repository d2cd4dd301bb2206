"""Pure tensor functions of the registration: the in-plane image gradient, a binned kernel
density and its lookup table, the first-order (smoothed-gradient) resampling of a slice stack,
the slice-geometry test. No state: the modules beside them hold parameters and call these."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mvmm_monai.data.common_space import per_slice

#: points of the lookup table that stands in for a kernel log-density (see :func:`kde_table`)
KDE_TABLE_SIZE = 2048


def thick_slices(spacing: tuple[float, float, float], ratio: float = 2.0) -> bool:
    """True when the slice spacing ``spacing[2]`` (mm) is at least ``ratio`` times the in-plane
    spacing ``max(spacing[0], spacing[1])`` (mm): such stacks are registered in-plane only."""
    return spacing[2] >= ratio * max(spacing[0], spacing[1])


def inplane_gradient(image: Tensor, sigma: float) -> Tensor:
    """In-plane gradient of a slice stack after an in-plane Gaussian blur, slice by slice.

    Args:
        image: ``[1, X, Y, Z]`` intensities.
        sigma: Gaussian standard deviation in voxels (> 0).

    Returns:
        ``[2, X, Y, Z]``: central differences (intensity per voxel) along X and along Y of the
        blurred image (replicate padding at the edges).
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"inplane_gradient: image must be [1, X, Y, Z], got {tuple(image.shape)}")
    if not sigma > 0:
        raise ValueError(f"inplane_gradient: sigma must be > 0 voxels, got {sigma}")
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    sl = image[0].permute(2, 0, 1)[:, None]  # [Z, 1, X, Y]
    sl = F.conv2d(F.pad(sl, (0, 0, radius, radius), mode="replicate"), kernel.reshape(1, 1, -1, 1))
    sl = F.conv2d(F.pad(sl, (radius, radius, 0, 0), mode="replicate"), kernel.reshape(1, 1, 1, -1))
    gx, gy = torch.gradient(sl[:, 0], dim=(1, 2))
    return torch.stack((gx, gy)).permute(0, 2, 3, 1).contiguous()


def kernel_density(values: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Binned Gaussian kernel density of 1D ``values`` (any shape, flattened; detached).

    Returns:
        ``(centres [bins], log_weights [bins], bandwidth [])``: bin centres (units of ``values``),
        log of each bin's share of the values, and the bandwidth (Silverman's rule, at least one
        bin wide), all in float32 on ``values``' device.
    """
    if values.numel() < 2 or bins < 2:
        raise ValueError(f"kernel_density: need >= 2 values and bins, got {values.numel()} values, {bins} bins")
    v = values.detach().float().flatten()
    lo, hi = float(v.min()), float(v.max())
    width = max(hi - lo, 1e-6) / bins
    centres = lo + width * (torch.arange(bins, dtype=v.dtype, device=v.device) + 0.5)
    idx = ((v - lo) / width).floor().clamp(0, bins - 1).long()
    counts = torch.bincount(idx, minlength=bins).to(v.dtype)
    bw = max(1.06 * float(v.std()) * v.numel() ** -0.2, width)
    return centres, torch.log(counts / counts.sum() + 1e-12), torch.tensor(bw, dtype=v.dtype, device=v.device)


def kernel_log_density(x: Tensor, centres: Tensor, log_w: Tensor, bw: Tensor) -> Tensor:
    """Log of the density of :func:`kernel_density` (``centres [M]``, ``log_w [M]``, ``bw []``)
    at ``x`` (any shape; the result has ``x``'s shape, natural log per intensity unit)."""
    z = (x[..., None] - centres) / bw
    return torch.logsumexp(log_w - 0.5 * z * z, dim=-1) - torch.log(bw) - 0.5 * math.log(2 * math.pi)


def kde_table(values: Tensor, bins: int, size: int = KDE_TABLE_SIZE) -> tuple[Tensor, Tensor]:
    """The kernel log-density of ``values`` (see :func:`kernel_density`) tabulated for
    :func:`table_lookup`: ``(table [size], value_range [2])``, the table on an even grid over
    ``value_range = [lo, hi]``, four bandwidths beyond the outer bin centres (float32)."""
    centres, log_w, bw = kernel_density(values, bins)
    lo, hi = float(centres[0] - 4 * bw), float(centres[-1] + 4 * bw)
    grid = torch.linspace(lo, hi, size, dtype=centres.dtype, device=centres.device)
    return kernel_log_density(grid, centres, log_w, bw), torch.tensor([lo, hi])


def table_lookup(x: Tensor, table: Tensor, value_range: Tensor) -> Tensor:
    """Piecewise-linear interpolation of ``table`` ``[T]`` (values on an even grid over
    ``value_range`` ``[lo, hi]``) at ``x`` (any shape, clamped to the range; same shape out, in
    ``x``'s dtype); differentiable in ``x``."""
    lo, hi = value_range.to(x)
    pos = ((x - lo) / (hi - lo) * (table.numel() - 1)).clamp(0, table.numel() - 1 - 1e-4)
    i0 = pos.detach().floor().long()
    frac = pos - i0.to(pos.dtype)
    t = table.to(x)
    return t[i0] * (1 - frac) + t[i0 + 1] * frac


def first_order_resample(
    values: Tensor,
    gradient: Tensor,
    shift: Tensor,
    slice_index: Tensor,
    angle: Tensor | None = None,
    index: Tensor | None = None,
    centre: Tensor | None = None,
) -> Tensor:
    """Resampled intensities whose derivative in the slice motion is that of a given gradient.

    The value is ``values`` (the sample at the current motion); the derivative with respect to
    ``shift`` (and ``angle``) is that of the first-order expansion ``values + gradient . move``
    around the current motion, ``move`` the displacement of every sample point (source voxels).

    Args:
        values: ``[1, *S]`` intensities sampled at the current (detached) slice motion.
        gradient: ``[2, *S]`` in-plane image gradient sampled there (intensity per source voxel).
        shift: ``[Z, 2]`` per-slice translation in source voxels (differentiable).
        slice_index: ``[*S]`` source slice of every target voxel (long).
        angle: ``[Z]`` per-slice rotation in radians (differentiable), or ``None``.
        index: ``[*S, 3]`` source voxel index of every target voxel (needed with ``angle``).
        centre: ``[2]`` in-plane rotation centre in source voxels (needed with ``angle``).

    Returns:
        ``[1, *S]``: equal to ``values`` in value.
    """
    move = per_slice(shift - shift.detach(), slice_index).movedim(-1, 0)  # [2, *S] source voxels
    if angle is not None:
        if index is None or centre is None:
            raise ValueError("first_order_resample: a rotation needs index and centre")
        d = index[..., :2].to(shift) - centre
        a = per_slice(angle.detach(), slice_index)
        cos, sin = torch.cos(a), torch.sin(a)
        da = per_slice(angle - angle.detach(), slice_index)
        move = move + torch.stack((-sin * d[..., 0] - cos * d[..., 1], cos * d[..., 0] - sin * d[..., 1])) * da
    return values + (move * gradient).sum(0, keepdim=True)
