"""The Hydra configs that ship inside the package, and building objects from them.

``conf/`` is package data: ``mvmm-fit``, ``scripts/fit.py``, the Python API and the tests all
compose the same files, from any folder, editable install or not.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

#: the package's config directory (``fit.yaml``, ``build_atlas.yaml`` and one folder per group)
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


def compose_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "fit") -> DictConfig:
    """The config that ``mvmm-fit`` (``config_name="fit"``) or ``mvmm-build-atlas``
    (``"build_atlas"``) would run with ``overrides`` (Hydra override strings).

    ``paths.output_dir`` must be among the overrides of a fit (there is no Hydra run directory here).
    """
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def build(node, *args, **kwargs):
    """``hydra.utils.instantiate`` that lets our own clear errors through unwrapped.

    Hydra wraps an exception raised by a ``_target_`` in ``InstantiationException``; a
    ``ValueError``/``FileNotFoundError`` from our constructors already names the problem.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, *args, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, (ValueError, FileNotFoundError)):
            raise err.__cause__ from None
        raise
