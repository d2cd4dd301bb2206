"""mvmm-monai: the Multivariate Mixture Model (Zhuang, TPAMI 2019) for multi-sequence cardiac MR.

The public API, and nothing else (imported on first use, so that ``import mvmm_monai`` is cheap):

* :func:`segment` -- segment one subject's images with an atlas; returns a :class:`Segmentation`.
* :func:`fit` -- run a composed Hydra config (what ``mvmm-fit`` / ``scripts/fit.py`` do).
* :func:`build_atlas` -- build a canonical atlas from a composed config (``mvmm-build-atlas``).
* :func:`compose_config` -- the config ``mvmm-fit`` would run with a list of overrides.
* :data:`CLASS_NAMES` -- the model's classes, in tensor and atlas-channel order.

Layers (imports run one way, top to bottom): ``cli`` -> ``api`` -> ``cohort`` -> ``pipeline`` ->
``conventions`` / ``atlas`` / ``registration`` -> ``mixture`` / ``data`` -> ``classes``, ``files``.
"""

from mvmm_monai.classes import CLASS_NAMES
from mvmm_monai.version import __version__

_LAZY = {
    "segment": "mvmm_monai.api",
    "Segmentation": "mvmm_monai.api",
    "fit": "mvmm_monai.cohort.run",
    "build_atlas": "mvmm_monai.pipeline.build_atlas",
    "compose_config": "mvmm_monai.config",
}

__all__ = ["CLASS_NAMES", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mvmm_monai' has no attribute {name!r}")
