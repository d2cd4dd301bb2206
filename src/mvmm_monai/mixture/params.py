"""Containers of the mixture: its parameters and its configuration."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class EMConfig:
    """Settings of the EM steps (all from the Hydra ``model`` group).

    Attributes:
        min_variance: variance floor of every subtype (intensities are scaled to [0, 1]).
        min_mass: a subtype or class with less responsibility mass (in voxels) keeps its previous
            parameters instead of dividing by ~0.
        min_weight: floor of a real subtype's weight tau, so a starved subtype can come back.
        min_proportion: floor of a class proportion pi_k, so an empty class can come back once
            the registration moves the atlas.
        beta: strength of the mean-field MRF; 0 switches it off; ``"auto"`` estimates it in every
            M-step with the proportions (:func:`~mvmm_monai.mixture.prior.update_mrf`), from ``beta_start``.
        beta_start: the estimate's first value (with ``beta="auto"`` only).
        beta_max: the estimate's upper bound (with ``beta="auto"`` only): a strength far above the
            4-neighbour Potts model's critical value (log(1 + sqrt(K)) = 1.1 for K = 4) freezes
            the labels whatever the images say.
        mrf_neighbourhood: ``"inplane"`` or ``"full"``.
        update_pi: run the fixed-point update of the class proportions pi_k.
        pi_iterations: with ``update_pi``, update the proportions in the first this many EM
            iterations only and hold them after (:meth:`at_iteration`); ``None``: in every one.
        intensity_levels: intensity levels of the E-step's look-up tables
            (:func:`~mvmm_monai.mixture.gaussian.quantise`; 4096 = 12 bits); 0 evaluates every
            subtype at every voxel instead (the reference path, several times slower).
        chunk_voxels: voxels per chunk of an EM iteration: a CPU thread's share of work at a time
            (speed only, results do not depend on it).
    """

    min_variance: float = 1e-4
    min_mass: float = 1e-3
    min_weight: float = 1e-6
    min_proportion: float = 1e-8
    beta: float | str = 0.0
    beta_start: float = 1.0
    beta_max: float = 4.0
    mrf_neighbourhood: str = "inplane"
    update_pi: bool = True
    pi_iterations: int | None = None
    intensity_levels: int = 4096
    chunk_voxels: int = 131072

    def at_iteration(self, iteration: int) -> EMConfig:
        """The settings of EM iteration ``iteration`` (0-based): these, with ``update_pi`` off from
        iteration ``pi_iterations`` on."""
        if self.update_pi and self.pi_iterations is not None and iteration >= self.pi_iterations:
            return replace(self, update_pi=False)
        return self

    @property
    def estimate_beta(self) -> bool:
        """Whether the MRF strength is estimated in the M-step (``beta="auto"``)."""
        return self.beta == "auto"

    def __post_init__(self) -> None:
        if not self.min_variance > 0:
            raise ValueError(f"EMConfig.min_variance must be > 0, got {self.min_variance}")
        if self.min_mass < 0 or not 0 <= self.min_weight < 1 or not 0 <= self.min_proportion < 1:
            raise ValueError(
                f"EMConfig: need min_mass >= 0 and min_weight, min_proportion in [0, 1); got "
                f"{self.min_mass}, {self.min_weight}, {self.min_proportion}"
            )
        if isinstance(self.intensity_levels, bool) or not (self.intensity_levels == 0 or self.intensity_levels >= 2):
            raise ValueError(f"EMConfig.intensity_levels must be 0 (no look-up tables) or >= 2, got {self.intensity_levels!r}")
        if self.chunk_voxels < 1:
            raise ValueError(f"EMConfig.chunk_voxels must be >= 1, got {self.chunk_voxels}")
        if self.pi_iterations is not None and (isinstance(self.pi_iterations, bool) or not isinstance(self.pi_iterations, int)
                                               or self.pi_iterations < 0):
            raise ValueError(f"EMConfig.pi_iterations must be null or an integer >= 0, got {self.pi_iterations!r}")
        for name in ("beta", "update_pi"):
            if getattr(self, name) is None:
                raise ValueError(f"EMConfig.{name} is None: model.em.{name}=null must be resolved from the dataset first")
        if isinstance(self.beta, str):
            if self.beta != "auto":
                raise ValueError(f"EMConfig.beta must be a number >= 0 or 'auto', got {self.beta!r}")
            if not 0 <= self.beta_start <= self.beta_max:
                raise ValueError(f"EMConfig: need 0 <= beta_start <= beta_max, got {self.beta_start}, {self.beta_max}")
        elif isinstance(self.beta, bool) or not self.beta >= 0:
            raise ValueError(f"EMConfig.beta must be a number >= 0 or 'auto', got {self.beta!r}")
        if self.mrf_neighbourhood not in ("inplane", "full"):
            raise ValueError(f"EMConfig.mrf_neighbourhood must be 'inplane' or 'full', got {self.mrf_neighbourhood!r}")


@dataclass(frozen=True)
class MixtureParams:
    """Parameters of the MvMM mixture (B subjects, N images, K classes, C subtype slots).

    Attributes:
        log_pi: ``[B, K]`` log class proportions (the atlas prior's pi_k).
        log_tau: ``[B, N, K, C]`` log subtype weights; ``-inf`` marks a padded (absent) slot.
        mean: ``[B, N, K, C]`` subtype means.
        var: ``[B, N, K, C]`` subtype variances.
        beta: ``[B]`` MRF strength, when it is estimated (``EMConfig.beta="auto"``); ``None``: the
            configured ``EMConfig.beta`` holds.
    """

    log_pi: Tensor
    log_tau: Tensor
    mean: Tensor
    var: Tensor
    beta: Tensor | None = None

    @property
    def valid(self) -> Tensor:
        """``[B, N, K, C]`` mask of the real subtype slots."""
        return torch.isfinite(self.log_tau)

    def as_dict(self) -> dict[str, Tensor]:
        """The parameters by name (``beta`` only when it is estimated)."""
        out = {"log_pi": self.log_pi, "log_tau": self.log_tau, "mean": self.mean, "var": self.var}
        if self.beta is not None:
            out["beta"] = self.beta
        return out

    def with_beta_start(self, config: EMConfig) -> "MixtureParams":
        """These parameters with ``beta`` at ``config.beta_start`` when ``config`` estimates it and
        none is set yet; unchanged otherwise."""
        if not config.estimate_beta or self.beta is not None:
            return self
        return replace(self, beta=torch.full(self.log_pi.shape[:1], float(config.beta_start), dtype=self.mean.dtype, device=self.mean.device))

    def mrf_beta(self, config: EMConfig) -> float | Tensor:
        """The MRF strength in force: the estimate ``[B]`` when there is one, else ``config.beta``."""
        if self.beta is not None:
            return self.beta
        if config.estimate_beta:
            raise ValueError("MixtureParams: EMConfig.beta='auto' needs params with a beta (start: EMConfig.beta_start)")
        return float(config.beta)

    def subjects(self, index: Tensor | list[int]) -> "MixtureParams":
        """The parameters of the subjects ``index`` (batch positions, in that order)."""
        index = torch.as_tensor(index, dtype=torch.int64, device=self.mean.device)
        return MixtureParams(**{k: v.index_select(0, index) for k, v in self.as_dict().items()})

    @staticmethod
    def stack(parts: list["MixtureParams"]) -> "MixtureParams":
        """One batch from the parameters of several batches (the same N, K and subtype slots)."""
        names = parts[0].as_dict().keys()
        return MixtureParams(**{k: torch.cat([p.as_dict()[k] for p in parts]) for k in names})

    def detach(self) -> "MixtureParams":
        return MixtureParams(**{k: v.detach() for k, v in self.as_dict().items()})

    def to(self, *args, **kwargs) -> "MixtureParams":
        return MixtureParams(**{k: v.to(*args, **kwargs) for k, v in self.as_dict().items()})
