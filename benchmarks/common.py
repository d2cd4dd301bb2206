"""What the benchmark scripts share: where the MyoPS data lie and the common part of their command line.

Every script runs as ``python benchmarks/NAME.py``, so this folder is first on ``sys.path`` and
``from common import ...`` finds this module.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import torch

MYOPS_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "myops"  # ../shared beside the checkout


def argument_parser(doc: str, *, myops: bool = False, threads: int | None = None, overrides: bool = True) -> argparse.ArgumentParser:
    """A parser with the script's docstring as help, ``--threads`` (torch threads; ``threads`` is the
    default, None: torch's), ``--root`` (the MyoPS folder) when ``myops``, and trailing Hydra
    ``overrides`` of the fit when ``overrides``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if myops:
        ap.add_argument("--root", type=Path, default=MYOPS_ROOT, help="MyoPS folder (CaseN/CaseN_{C0,LGE,T2,gd}.nii.gz)")
    ap.add_argument("--threads", type=int, default=threads, help="torch CPU threads (default %(default)s; None: torch's own); "
                    "1 is steadier on a busy machine")
    if overrides:
        ap.add_argument("overrides", nargs="*", help="Hydra overrides of the fit, e.g. registration=slice_shift")
    return ap


def parse_args(ap: argparse.ArgumentParser, argv=None, *, quiet: bool = False) -> argparse.Namespace:
    """Parse, set the torch threads, and with ``quiet`` silence INFO logs and warnings (tables only)."""
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if quiet:
        logging.disable(logging.INFO)
        warnings.filterwarnings("ignore")
    return args
