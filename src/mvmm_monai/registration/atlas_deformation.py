"""Atlas deformation D = affine o exp(SVF): MONAI ``DVF2DDF`` (scaling and squaring) then ``Warp``.

The velocity is a sum of fields at several scales (coarse to fine; when each starts to move is the
schedule's, :class:`~mvmm_monai.registration.schedule.ICMSchedule`), upsampled to the common grid.
In **in-plane** mode (thick-slice stacks) the affine and the velocity act within each slice: the
slices are the batch of 2D operations, and nothing moves through-plane. Otherwise everything is 3D.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvmm_monai.registration._monai import bending_energy, make_dvf2ddf, make_warp
from mvmm_monai.registration.functional import thick_slices


@dataclass(frozen=True)
class DeformedAtlas:
    """One application of :class:`AtlasDeformation`.

    Attributes:
        atlas: ``[1, K, X, Y, Z]`` warped atlas probabilities.
        ddf: ``[1, 3, X, Y, Z]`` displacement ``D(x) - x`` in voxels (channel i along axis i; 0
            through-plane in in-plane mode).
        svf_displacement: displacement of the SVF part alone (voxels, batched layout ``[Z, 2, X, Y]``
            in-plane or ``[1, 3, X, Y, Z]``), what the bending energy penalises; ``None`` without an SVF.
    """

    atlas: Tensor
    ddf: Tensor
    svf_displacement: Tensor | None


class AtlasDeformation(nn.Module):
    """Parameters and application of the atlas deformation on a ``[X, Y, Z]`` grid.

    Args:
        shape: common-space shape ``(X, Y, Z)``.
        spacing: voxel sizes (mm).
        inplane: deform within slices only: ``"auto"`` (when slices are >= 2x thicker than the
            pixels, or fewer than 5), true or false (false needs >= 5 slices).
        affine: fit a similarity part: in-plane rotation, translation (2 in-plane, 3 in 3D) and one
            isotropic log-scale (in-plane only when ``inplane``). Anisotropic scaling is left to the
            SVF: as a free affine parameter the likelihood exploits it to squash the atlas.
        svf: fit a stationary velocity field.
        scales: downsampling factors of the velocity components, coarse to fine.
        num_steps: scaling-and-squaring steps.
        bending_weight: weight of MONAI's bending energy of the SVF displacement (>= 0).
        affine_weight: weight of a Gaussian prior ``log_scale^2 + rotation^2`` on the similarity part
            (0 = off); it counters the likelihood's pull towards a larger heart.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        spacing: tuple[float, float, float],
        inplane: str | bool = "auto",
        affine: bool = True,
        svf: bool = True,
        scales: Sequence[int] = (8, 4),
        num_steps: int = 7,
        bending_weight: float = 1.0,
        affine_weight: float = 0.0,
    ) -> None:
        super().__init__()
        x, y, z = shape
        if inplane == "auto":
            inplane = thick_slices(tuple(float(s) for s in spacing)) or z < 5
        elif not isinstance(inplane, bool):
            raise ValueError(f"registration.model.atlas_deformation.inplane must be auto, true or false, got {inplane!r}")
        if not inplane and z < 5:
            raise ValueError(f"AtlasDeformation: through-plane deformation needs >= 5 slices, got {z}; use inplane")
        if min(x, y) <= 4:
            raise ValueError(f"AtlasDeformation: in-plane size {x}x{y} is too small (> 4 needed)")
        if any(f < 1 for f in scales):
            raise ValueError(f"registration.model.atlas_deformation.scales must be factors >= 1, got {list(scales)}")
        if not bending_weight >= 0 or not affine_weight >= 0:
            raise ValueError(
                "registration.model.atlas_deformation: bending_weight and affine_weight must be >= 0, "
                f"got {bending_weight}, {affine_weight}"
            )
        self.shape, self.inplane = (x, y, z), inplane
        self.ndim = 2 if inplane else 3
        self.scales = tuple(scales)
        self.bending_weight, self.affine_weight = float(bending_weight), float(affine_weight)
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

    def train_parts(self, affine: bool, velocity: Sequence[bool]) -> None:
        """Let the similarity part and each velocity scale (``velocity``: one flag per scale,
        coarse to fine) move or hold (``requires_grad``)."""
        if len(self.velocity) and len(velocity) != len(self.velocity):
            raise ValueError(
                f"registration.schedule.scale_start must give one start per velocity scale "
                f"(registration.model.atlas_deformation.scales {list(self.scales)}), got {len(velocity)} flags"
            )
        for p in (self.rotation, self.translation_mm, self.log_scale):
            if p is not None:
                p.requires_grad_(affine)
        for p, on in zip(self.velocity, velocity):
            p.requires_grad_(on)

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

    def forward(self, atlas: Tensor) -> DeformedAtlas:
        """Warp ``atlas`` ``[1, K, X, Y, Z]`` (probabilities); see :class:`DeformedAtlas`. The
        velocity is integrated once per call (the result carries it for the bending energy)."""
        if tuple(atlas.shape[2:]) != self.shape:
            raise ValueError(f"AtlasDeformation: atlas spatial shape {tuple(atlas.shape[2:])} != {self.shape}")
        svf = self.svf_displacement()
        ddf = self.displacement(atlas, svf)
        warped = self._unbatched(self.warp(self._batched(atlas), ddf.expand(self._batched(atlas).shape[0], *ddf.shape[1:])))
        full = ddf.expand(self.shape[2], *ddf.shape[1:]) if self.inplane else ddf
        full = self._unbatched(full)
        if self.inplane:
            full = torch.cat((full, torch.zeros_like(full[:, :1])), dim=1)
        return DeformedAtlas(warped, full, svf)

    def bending(self, svf_displacement: Tensor) -> Tensor:
        """``bending_weight`` times MONAI's bending energy (mean reduction, voxel units) of
        ``svf_displacement`` (see :attr:`DeformedAtlas.svf_displacement`); a scalar."""
        return self.bending_weight * bending_energy(svf_displacement)

    def similarity_prior(self) -> Tensor:
        """``affine_weight * (log_scale^2 + rotation^2)`` (radians), a scalar: the Gaussian prior of
        the similarity part (needs ``affine``)."""
        if self.log_scale is None:
            raise ValueError("AtlasDeformation: similarity_prior needs the similarity part (affine=True)")
        return self.affine_weight * (self.log_scale.pow(2).sum() + self.rotation.pow(2).sum())


@torch.no_grad()
def min_jacobian(ddf: Tensor) -> float:
    """Smallest in-plane Jacobian determinant (finite differences) of the map ``x + ddf(x)``;
    ``ddf`` ``[B, >=2, X, Y, ...]`` in voxels, channels 0 and 1 along X and Y (the batched layout of
    :meth:`AtlasDeformation.displacement` or :attr:`DeformedAtlas.ddf`: the same values)."""
    gx = torch.gradient(ddf, dim=2)
    gy = torch.gradient(ddf, dim=3)
    j11, j12 = 1 + gx[0][:, 0], gy[0][:, 0]
    j21, j22 = gx[0][:, 1], 1 + gy[0][:, 1]
    return float((j11 * j22 - j12 * j21).min())
