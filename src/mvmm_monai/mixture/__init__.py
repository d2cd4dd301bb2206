"""The MvMM mixture engine: pure torch functions, 2D and 3D alike.

Shapes: images ``[B, N, *spatial]`` (N sequences), coverage ``[B, N, *spatial]`` (1 where image
n covers the voxel), atlas / prior / posterior ``[B, K, *spatial]`` (K classes), per-image class
subtype parameters ``[B, N, K, C]`` (C = the largest subtype count, unused slots masked).
"""

from mvmm_monai.mixture.em import (
    EMConfig,
    EStepResult,
    HeldVoxelLogLikelihood,
    MixtureParams,
    class_log_likelihood_table,
    e_step,
    em_step,
    fit_em,
    log_likelihood,
    lookup_class_log_likelihood,
    m_step,
    posterior_without,
    relative_change,
    voxel_log_likelihood,
)
from mvmm_monai.mixture.gaussian import (
    component_log_densities,
    log_normal,
    subtype_mask,
)
from mvmm_monai.mixture.init import initialise_from_atlas
from mvmm_monai.mixture.prior import (
    atlas_log_prior,
    log_atlas_from_prob,
    mrf_log_potential,
    update_log_pi,
)

__all__ = [
    "EMConfig",
    "EStepResult",
    "HeldVoxelLogLikelihood",
    "MixtureParams",
    "atlas_log_prior",
    "class_log_likelihood_table",
    "component_log_densities",
    "e_step",
    "em_step",
    "fit_em",
    "initialise_from_atlas",
    "log_atlas_from_prob",
    "log_likelihood",
    "log_normal",
    "lookup_class_log_likelihood",
    "m_step",
    "mrf_log_potential",
    "posterior_without",
    "relative_change",
    "subtype_mask",
    "update_log_pi",
    "voxel_log_likelihood",
]
