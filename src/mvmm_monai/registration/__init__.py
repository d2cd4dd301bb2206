"""Spatial transforms of the ICM loop: atlas deformation and per-slice motion shifts."""

from mvmm_monai.registration.base import IdentityRegistration, Warped

__all__ = ["IdentityRegistration", "Warped"]
