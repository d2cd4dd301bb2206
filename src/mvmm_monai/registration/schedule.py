"""When each part of the registration moves in the ICM loop: the schedule, apart from the transforms.

ICM iterations count from 0 (Lightning's ``current_epoch``). Nothing moves during the ``warmup``
(EM only: the mixture must describe the images before its likelihood can tell where the atlas
belongs); then the similarity part of the atlas deformation moves, each velocity scale from its
own start, and the slice motion from ``slice_shift_start``. *Shift iterations* count from the
first iteration at which the slices move (``warmup + slice_shift_start``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Parts:
    """Parts of the registration: those a registration has, or those that train at an iteration.

    Attributes:
        affine: the similarity part of the atlas deformation (rotation, translation, log-scale).
        velocity: one flag per velocity scale of the atlas deformation, coarse to fine.
        slice_motion: the per-slice in-plane motion of the non-reference sequences.
    """

    affine: bool = False
    velocity: tuple[bool, ...] = ()
    slice_motion: bool = False

    @property
    def any(self) -> bool:
        """Whether any part is named."""
        return self.affine or any(self.velocity) or self.slice_motion


@dataclass(frozen=True)
class ICMSchedule:
    """The iterations at which the registration's parts start, search and switch gradients.

    Args:
        warmup: EM-only ICM iterations before anything moves (>= 0).
        slice_shift_start: iteration after the warm-up at which the slice motion starts (>= 0).
        scale_start: per velocity scale (coarse to fine, as many as the deformation's ``scales``),
            the iteration after the warm-up at which it starts to move (>= 0).
        shift_search_at: shift iterations at which every slice jumps to its best whole-voxel offset
            (the exhaustive search of :meth:`SliceMotion.search`; empty: never). Gradient ascent is
            local: a slice that started several voxels off while the atlas was still misplaced can
            stay in a wrong optimum; the search looks past it.
        shift_gradient_exact_after: shift iterations after which the slice motion follows the
            exact gradient instead of the smoothed one (``None``: never). Coarse to fine: the
            smoothed gradient brings slices near the optimum from far, the exact one removes the
            sub-voxel bias the smoothing leaves, once the step size has decayed.
        settle: once the fit meets its tolerance (after :meth:`schedule_end`), the registration
            takes no further step; a fit kept running past that point only refines the mixture.
    """

    warmup: int = 10
    slice_shift_start: int = 0
    scale_start: tuple[int, ...] = ()
    shift_search_at: tuple[int, ...] = ()
    shift_gradient_exact_after: int | None = None
    settle: bool = True

    def __post_init__(self) -> None:
        # Hydra passes lists: store tuples so the schedule stays hashable and frozen
        object.__setattr__(self, "scale_start", tuple(int(i) for i in self.scale_start or ()))
        object.__setattr__(self, "shift_search_at", tuple(int(i) for i in self.shift_search_at or ()))
        if self.warmup < 0 or self.slice_shift_start < 0:
            raise ValueError(
                f"registration.schedule: warmup and slice_shift_start must be >= 0, got {self.warmup}, {self.slice_shift_start}"
            )
        if any(i < 0 for i in self.scale_start):
            raise ValueError(f"registration.schedule.scale_start must hold iterations >= 0, got {list(self.scale_start)}")
        if any(i < 0 for i in self.shift_search_at):
            raise ValueError(f"registration.schedule.shift_search_at must hold iterations >= 0, got {list(self.shift_search_at)}")
        after = self.shift_gradient_exact_after
        if after is not None and after < 0:
            raise ValueError(f"registration.schedule.shift_gradient_exact_after must be >= 0 or null, got {after}")

    def _shift_iteration(self, iteration: int) -> int:
        return iteration - self.warmup - self.slice_shift_start

    def trains(self, iteration: int) -> Parts:
        """The parts that move at ICM ``iteration``: ``velocity`` has one flag per ``scale_start``."""
        it = iteration - self.warmup
        return Parts(
            affine=it >= 0,
            velocity=tuple(it >= 0 and it >= start for start in self.scale_start),
            slice_motion=it >= self.slice_shift_start,
        )

    def search_due(self, iteration: int) -> bool:
        """Whether ICM ``iteration`` runs the whole-voxel slice-shift search (``shift_search_at``)."""
        return self._shift_iteration(iteration) in self.shift_search_at

    def exact_gradient(self, iteration: int) -> bool:
        """Whether the slice motion follows the exact gradient at ICM ``iteration``."""
        after = self.shift_gradient_exact_after
        return after is not None and self._shift_iteration(iteration) >= after

    def schedule_end(self, present: Parts) -> int:
        """ICM iteration of the last scheduled switch for a registration with the parts ``present``
        (the warm-up's end, a velocity scale or the slice motion starting, a shift search, the exact
        shift gradient); 0 when nothing is fitted. The fit is not converged before it, however
        still the log-likelihood is: the next phase may move it."""
        if not present.any:
            return 0
        ends = [self.warmup]
        if any(present.velocity):
            ends.append(self.warmup + max(self.scale_start, default=0))
        if present.slice_motion:
            start = self.warmup + self.slice_shift_start
            ends.append(start + max((*self.shift_search_at, 0)))
            if self.shift_gradient_exact_after is not None:
                ends.append(start + self.shift_gradient_exact_after)
        return max(ends)
