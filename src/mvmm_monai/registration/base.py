"""What every registration model gives the ICM loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mvmm_monai.data.subject import SubjectData
from mvmm_monai.mixture import log_atlas_from_prob


@dataclass(frozen=True)
class Warped:
    """Inputs of the mixture after the current registration.

    Attributes:
        images: ``[1, N, *S]`` sequences in the common space (slice shifts applied).
        coverage: ``[1, N, *S]`` coverage masks.
        log_atlas: ``[1, K, *S]`` log atlas, deformed.
    """

    images: Tensor
    coverage: Tensor
    log_atlas: Tensor

    def detach(self) -> "Warped":
        return Warped(self.images.detach(), self.coverage.detach(), self.log_atlas.detach())


class IdentityRegistration(nn.Module):
    """``registration=none``: the atlas as placed and the images as resampled, nothing fitted.

    Args:
        subject: the loaded subject (its common-space images and coverage are used).
        atlas: ``[K, *S]`` atlas probabilities in the common space.
        atlas_floor: smallest atlas probability (see :func:`log_atlas_from_prob`).
    """

    def __init__(self, subject: SubjectData, atlas: Tensor, atlas_floor: float = 1e-4) -> None:
        super().__init__()
        if tuple(atlas.shape[1:]) != tuple(subject.images.shape[1:]):
            raise ValueError(
                f"IdentityRegistration: atlas spatial shape {tuple(atlas.shape[1:])} != common space "
                f"{tuple(subject.images.shape[1:])}"
            )
        self.register_buffer("images", subject.images[None].float(), persistent=False)
        self.register_buffer("coverage", subject.coverage[None].float(), persistent=False)
        self.register_buffer("log_atlas", log_atlas_from_prob(atlas[None].float(), atlas_floor), persistent=False)

    def forward(self) -> Warped:
        return Warped(self.images, self.coverage, self.log_atlas)

    def regularisers(self) -> dict[str, Tensor]:
        """Named penalties subtracted from the log-likelihood (none here)."""
        return {}

    def slice_shifts_mm(self) -> dict[str, list[list[float]]]:
        """Fitted in-plane shift of every slice of every sequence, in mm (zeros here)."""
        return {}

    @property
    def fits_anything(self) -> bool:
        return False

    def set_iteration(self, iteration: int) -> None:
        """Nothing is scheduled."""

    def schedule_end(self) -> int:
        """ICM iteration of the last scheduled switch (none here)."""
        return 0

    def use_sequence_weights(self, weights: dict[str, float]) -> None:
        """The fit's per-sequence likelihood weights (nothing uses them here)."""

    def objective_posterior(self, posterior: Tensor | None) -> Tensor | None:
        """The posterior whose MRF enters the registration's objective (nothing is fitted here)."""
        return None

    def search_due(self, iteration: int) -> bool:
        """Whether ICM ``iteration`` runs the slice-shift search (never here)."""
        return False

    def shift_parameters(self) -> list[Tensor]:
        """The slice-shift parameters (none here)."""
        return []

    def param_groups(self) -> list[dict]:
        return []

    def check(self, iteration: int) -> None:
        """Nothing can blow up."""

    def native_shifts_voxels(self) -> dict[str, Tensor]:
        return {}

    def extra_outputs(self) -> dict[str, Tensor]:
        """Extra common-space volumes to write (e.g. the warped atlas, the displacement)."""
        return {"atlas_warped": torch.exp(self.log_atlas[0])}
