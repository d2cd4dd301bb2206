"""mvmm-monai: the Multivariate Mixture Model (Zhuang, TPAMI 2019) for multi-sequence cardiac MR.

Layers (imports run one way, top to bottom):

* :mod:`mvmm_monai.cli` -- Hydra entry points used by ``scripts/``.
* :mod:`mvmm_monai.fit_module` -- the LightningModule: one ICM iteration per training step.
* :mod:`mvmm_monai.atlas`, :mod:`mvmm_monai.outputs`, :mod:`mvmm_monai.evaluation`,
  :mod:`mvmm_monai.registration` -- atlas I/O, result files, metrics, spatial transforms.
* :mod:`mvmm_monai.mixture`, :mod:`mvmm_monai.data` -- the maths (pure torch) and data loading.
"""

__version__ = "0.1.0"

CLASS_NAMES = ("background", "myocardium", "lv", "rv")
