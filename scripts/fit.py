#!/usr/bin/env python
"""Fit the MvMM to one subject: ``python scripts/fit.py subject=patient1 trainer.devices=1``.

See ``conf/fit.yaml`` for every option and the README for examples.
"""

from mvmm_monai.cli import fit_main

if __name__ == "__main__":
    fit_main()
