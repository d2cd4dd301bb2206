"""Several subjects in one batch for the EM engine: padded to a common box, and back.

The engine takes ``[B, N, *S]`` images; subjects of different sizes are padded at the high end of
each spatial axis with voxels no image covers (coverage 0) and a uniform atlas, so the padding adds
nothing to any subject's likelihood or moments. The MRF does see the padded voxels' posterior (the
prior there) as neighbours of a subject's border voxels: a subject whose region of interest
reaches its border can differ there from its fit alone, by a few border voxels at most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PaddedBatch:
    """Subjects padded to one box: ``images``, ``coverage`` ``[B, N, *S]``, ``log_atlas``
    ``[B, K, *S]``, and each subject's own spatial shape (:meth:`crop` takes it back)."""

    images: Tensor
    coverage: Tensor
    log_atlas: Tensor
    shapes: tuple[tuple[int, ...], ...]

    def crop(self, tensor: Tensor, i: int) -> Tensor:
        """Subject ``i``'s part of a batched ``[B, C, *S]`` tensor: ``[C, *its shape]``."""
        return tensor[(i, slice(None), *(slice(0, s) for s in self.shapes[i]))]


def pad_subjects(images: list[Tensor], coverage: list[Tensor], log_atlas: list[Tensor]) -> PaddedBatch:
    """Stack subjects (each ``[N, *S_i]`` images and coverage, ``[K, *S_i]`` log atlas; the same N,
    K and number of spatial axes) into one :class:`PaddedBatch`."""
    if not images or not len(images) == len(coverage) == len(log_atlas):
        raise ValueError(f"pad_subjects: need as many images, coverages and atlases (>= 1), got "
                         f"{len(images)}, {len(coverage)}, {len(log_atlas)}")
    shapes = []
    for i, (x, c, a) in enumerate(zip(images, coverage, log_atlas)):
        if x.shape != c.shape or x.shape[1:] != a.shape[1:] or x.shape[0] != images[0].shape[0] or a.shape[0] != log_atlas[0].shape[0] \
                or x.ndim != images[0].ndim:
            raise ValueError(f"pad_subjects: subject {i} has images {tuple(x.shape)}, coverage {tuple(c.shape)}, "
                             f"atlas {tuple(a.shape)}; every subject needs [N, *S] / [N, *S] / [K, *S] with the first's N and K")
        shapes.append(tuple(x.shape[1:]))
    box = [max(s[d] for s in shapes) for d in range(len(shapes[0]))]
    k = log_atlas[0].shape[0]

    def pad(t: Tensor, value: float) -> Tensor:
        widths = [w for d in reversed(range(len(box))) for w in (0, box[d] - t.shape[1 + d])]
        return F.pad(t, widths, value=value)

    return PaddedBatch(
        images=torch.stack([pad(x, 0.0) for x in images]),
        coverage=torch.stack([pad(c, 0.0) for c in coverage]),
        log_atlas=torch.stack([pad(a, -math.log(k)) for a in log_atlas]),
        shapes=tuple(shapes),
    )
