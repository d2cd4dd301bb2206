"""Atlas deformation D = affine o exp(SVF): MONAI ``DVF2DDF`` (scaling and squaring) then ``Warp``.

The velocity is a sum of fields at several scales (coarse to fine, each switched on at a
configured iteration), upsampled to the common grid. In **in-plane** mode (thick-slice stacks)
the affine and the velocity act within each slice: the slices are the batch of 2D operations,
and nothing moves through-plane. Otherwise everything is 3D.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvmm_monai.registration._monai import bending_energy, make_dvf2ddf, make_warp


class AtlasDeformation(nn.Module):
    """Parameters and application of the atlas deformation on a ``[X, Y, Z]`` grid.

    Args:
        shape: common-space shape ``(X, Y, Z)``.
        spacing: voxel sizes (mm).
        inplane: deform within slices only (required when Z < 5).
        affine: fit a similarity part: in-plane rotation, translation (2 in-plane, 3 in 3D) and one
            isotropic log-scale (in-plane only when ``inplane``). Anisotropic scaling is left to the
            SVF: as a free affine parameter the likelihood exploits it to squash the atlas.
        svf: fit a stationary velocity field.
        scales: downsampling factors of the velocity components, coarse to fine.
        scale_start: ICM iteration at which each scale starts to move.
        num_steps: scaling-and-squaring steps.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        spacing: tuple[float, float, float],
        inplane: bool = True,
        affine: bool = True,
        svf: bool = True,
        scales: tuple[int, ...] = (8, 4),
        scale_start: tuple[int, ...] | None = None,
        num_steps: int = 7,
    ) -> None:
        super().__init__()
        x, y, z = shape
        if not inplane and z < 5:
            raise ValueError(f"AtlasDeformation: through-plane deformation needs >= 5 slices, got {z}; use inplane")
        if min(x, y) <= 4:
            raise ValueError(f"AtlasDeformation: in-plane size {x}x{y} is too small (> 4 needed)")
        scale_start = tuple(scale_start) if scale_start is not None else (0,) * len(scales)
        if len(scale_start) != len(scales) or any(f < 1 for f in scales):
            raise ValueError(f"AtlasDeformation: scales {scales} and scale_start {scale_start} must match, factors >= 1")
        self.shape, self.inplane = (x, y, z), inplane
        self.ndim = 2 if inplane else 3
        self.scales, self.scale_start = tuple(scales), scale_start
        self.register_buffer("spacing", torch.tensor(spacing, dtype=torch.float32), persistent=False)
        nt = self.ndim
        self.rotation = nn.Parameter(torch.zeros(1)) if affine else None
        self.translation_mm = nn.Parameter(torch.zeros(nt)) if affine else None
        self.log_scale = nn.Parameter(torch.zeros(1)) if affine else None
        batch = z if inplane else 1
        sp = (x, y) if inplane else (x, y, z)
        self.velocity = nn.ParameterList(
            [nn.Parameter(torch.zeros(batch, nt, *[max(2, math.ceil(s / f)) for s in sp])) for f in scales] if svf else []
        )
        self.dvf2ddf = make_dvf2ddf(num_steps)
        self.warp = make_warp()

    def set_iteration(self, iteration: int) -> None:
        """Freeze the velocity scales that have not started yet (coarse to fine schedule)."""
        for p, start in zip(self.velocity, self.scale_start):
            p.requires_grad_(iteration >= start)

    def _batched(self, vol: Tensor) -> Tensor:
        """``[1, C, X, Y, Z]`` -> ``[Z, C, X, Y]`` in in-plane mode."""
        return vol[0].permute(3, 0, 1, 2) if self.inplane else vol

    def _unbatched(self, vol: Tensor) -> Tensor:
        return vol.permute(1, 2, 3, 0)[None] if self.inplane else vol

    def svf_displacement(self) -> Tensor | None:
        """Displacement of the SVF part, voxels, batched layout (``[Z, 2, X, Y]`` or ``[1, 3, X, Y, Z]``)."""
        if len(self.velocity) == 0:
            return None
        size = self.shape[:2] if self.inplane else self.shape
        mode = "bilinear" if self.inplane else "trilinear"
        v = sum(F.interpolate(p, size=size, mode=mode, align_corners=True) for p in self.velocity)
        return self.dvf2ddf(v)

    def _grid(self, like: Tensor) -> Tensor:
        axes = [torch.arange(s, dtype=like.dtype, device=like.device) for s in (self.shape[:2] if self.inplane else self.shape)]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]  # [1, nd, *sp]

    def displacement(self, like: Tensor, svf: Tensor | None = None) -> Tensor:
        """Total displacement ``D(x) - x`` in voxels, batched layout. ``D(x) = A(x + u(x))``.

        ``svf``: the SVF displacement ``u`` if already computed (see :meth:`svf_displacement`).
        """
        grid = self._grid(like)
        u = self.svf_displacement() if svf is None else svf
        pos = grid if u is None else grid + u
        if self.rotation is not None:
            sp = self.spacing[: self.ndim].to(like).reshape(1, -1, *([1] * self.ndim))
            centre = (torch.tensor(self.shape[: self.ndim], dtype=like.dtype, device=like.device) - 1) / 2
            c = centre.reshape(1, -1, *([1] * self.ndim)) * sp
            p = pos * sp - c
            cos, sin = torch.cos(self.rotation), torch.sin(self.rotation)
            scale = torch.exp(self.log_scale).reshape(1, -1, *([1] * self.ndim))
            p = p * scale
            x, y = p[:, 0], p[:, 1]
            rot = [cos * x - sin * y, sin * x + cos * y] + ([p[:, 2]] if self.ndim == 3 else [])
            p = torch.stack(rot, dim=1) + self.translation_mm.reshape(1, -1, *([1] * self.ndim))
            pos = (p + c) / sp
        return pos - grid

    def forward(self, atlas: Tensor) -> tuple[Tensor, Tensor]:
        """Warp ``atlas`` ``[1, K, X, Y, Z]`` (probabilities). Returns ``(warped, ddf)``: the warped atlas
        ``[1, K, X, Y, Z]`` and the displacement ``[1, 3, X, Y, Z]`` in voxels (channel i along axis i).

        The SVF displacement of this call is kept (``last_svf``) for :meth:`bending` and
        :meth:`min_jacobian`, so one ICM iteration integrates the velocity once.
        """
        if tuple(atlas.shape[2:]) != self.shape:
            raise ValueError(f"AtlasDeformation: atlas spatial shape {tuple(atlas.shape[2:])} != {self.shape}")
        self.last_svf = self.svf_displacement()
        ddf = self.displacement(atlas, self.last_svf)
        warped = self._unbatched(self.warp(self._batched(atlas), ddf.expand(self._batched(atlas).shape[0], *ddf.shape[1:])))
        full = ddf.expand(self.shape[2], *ddf.shape[1:]) if self.inplane else ddf
        full = self._unbatched(full)
        if self.inplane:
            full = torch.cat((full, torch.zeros_like(full[:, :1])), dim=1)
        return warped, full

    def bending(self) -> Tensor:
        """MONAI bending energy of the SVF displacement of the last forward (0 without an SVF)."""
        u = getattr(self, "last_svf", None)
        if u is None and len(self.velocity):
            u = self.svf_displacement()
        if u is None:
            return torch.zeros((), device=self.spacing.device)
        return bending_energy(u)

    def min_jacobian(self, like: Tensor) -> float:
        """Smallest in-plane Jacobian determinant of ``D`` as of the last forward (finite differences)."""
        svf = getattr(self, "last_svf", None)
        d = self.displacement(like, None if svf is None else svf.detach())
        gx = torch.gradient(d, dim=2)
        gy = torch.gradient(d, dim=3)
        j11, j12 = 1 + gx[0][:, 0], gy[0][:, 0]
        j21, j22 = gx[0][:, 1], 1 + gy[0][:, 1]
        return float((j11 * j22 - j12 * j21).min())
