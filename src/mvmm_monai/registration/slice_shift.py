"""Per-slice in-plane rigid motion G_{i,s} of every sequence but the reference."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SliceShifts(nn.Module):
    """In-plane translation (mm) and optional rotation (radians) of every slice of some sequences.

    Convention: a slice whose content moved by ``+t`` (anatomy at ``p`` appears at ``p + t``) is
    put back when resampled with ``t``; ``t`` is along the sequence's first two voxel axes, in mm.

    Args:
        slices: sequence -> number of slices.
        spacing: sequence -> in-plane voxel size ``(dx, dy)`` in mm.
        rotation: also fit a rotation per slice.
    """

    def __init__(self, slices: dict[str, int], spacing: dict[str, tuple[float, float]], rotation: bool = False) -> None:
        super().__init__()
        if set(slices) != set(spacing):
            raise ValueError(f"SliceShifts: slices {sorted(slices)} and spacing {sorted(spacing)} name different sequences")
        self.translation_mm = nn.ParameterDict({s: nn.Parameter(torch.zeros(n, 2)) for s, n in slices.items()})
        self.angle = nn.ParameterDict({s: nn.Parameter(torch.zeros(n)) for s, n in slices.items()}) if rotation else None
        for s, sp in spacing.items():
            self.register_buffer(f"_spacing_{s}", torch.tensor(sp, dtype=torch.float32), persistent=False)

    @property
    def sequences(self) -> list[str]:
        return list(self.translation_mm.keys())

    def voxels(self, sequence: str) -> Tensor:
        """``[Z, 2]`` translation of ``sequence``'s slices in its own voxels."""
        return self.translation_mm[sequence] / getattr(self, f"_spacing_{sequence}")

    def angles(self, sequence: str) -> Tensor | None:
        return None if self.angle is None else self.angle[sequence]

    def max_abs_mm(self) -> float:
        return max((float(p.detach().norm(dim=-1).max()) for p in self.translation_mm.values()), default=0.0)
