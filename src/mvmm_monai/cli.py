"""Command-line entry points: compose the Hydra config, call the library, report errors in one line.

``mvmm-fit`` / ``scripts/fit.py`` / ``python -m mvmm_monai.cli`` run :func:`mvmm_monai.fit`;
``mvmm-build-atlas`` / ``scripts/build_atlas.py`` run :func:`mvmm_monai.build_atlas`. A user error
(a missing file, a bad value) ends in one ``ERROR`` line and exit status 1; ``HYDRA_FULL_ERROR=1``
shows the traceback as well.
"""

from __future__ import annotations

import gc
import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from mvmm_monai.config import CONFIG_DIR

log = logging.getLogger("mvmm_monai")

#: what a user can cause and fix: reported as one line, not a traceback
USER_ERRORS = (ValueError, OSError)


def _report(err: BaseException) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    log.error("%s: %s (set HYDRA_FULL_ERROR=1 for the traceback)", type(err).__name__, err)
    sys.exit(1)


def _output_dir_is_run_dir(argv: list[str]) -> list[str]:
    """With ``paths.output_dir=X`` (and no ``hydra.run.dir``), Hydra's own run files (``.hydra/``,
    the log) go to X too, beside the results, instead of ``outputs/<date>/<time>/``."""
    given = [a for a in argv if a.startswith("paths.output_dir=")]
    if given and not any(a.startswith("hydra.run.dir=") for a in argv) and not any(a in ("-m", "--multirun") for a in argv):
        return [*argv, f"hydra.run.dir={given[-1].split('=', 1)[1]}"]
    return argv


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="fit")
def _fit(cfg: DictConfig) -> float | None:
    from mvmm_monai.cohort.run import fit

    _imported()
    try:
        return fit(cfg).get("log_likelihood")  # the value a Hydra sweeper optimises
    except USER_ERRORS as err:
        _report(err)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="build_atlas")
def _build_atlas(cfg: DictConfig) -> None:
    from mvmm_monai.pipeline.build_atlas import build_atlas

    _imported()
    try:
        build_atlas(cfg)
    except USER_ERRORS as err:
        _report(err)


def _importing() -> None:
    """The cyclic garbage collector paused while a command imports torch, Lightning and MONAI: their
    objects are long-lived, and the full collections that their creation triggers found nothing
    to free but took about 0.7 s of a 5 s import here (issue "Fast")."""
    gc.disable()


def _imported() -> None:
    """After :func:`_importing`: the imported objects frozen (``gc.freeze``: never walked again) and
    the collector back on for what the command makes."""
    gc.freeze()
    gc.enable()


def fit_main() -> None:
    """``mvmm-fit [overrides]`` (and ``python scripts/fit.py``): fit a subject or a cohort."""
    _importing()
    sys.argv[1:] = _output_dir_is_run_dir(sys.argv[1:])
    _fit()


def build_atlas_main() -> None:
    """``mvmm-build-atlas [overrides]`` (and ``python scripts/build_atlas.py``): build an atlas."""
    _importing()
    _build_atlas()


if __name__ == "__main__":
    fit_main()
