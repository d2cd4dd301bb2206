#!/usr/bin/env python
"""Build a canonical probabilistic atlas from labelled subjects:
``python scripts/build_atlas.py data=myops data.root=DIR subjects=Case3001..Case3015 output=atlas/myops.nii.gz``.

See ``conf/build_atlas.yaml`` for every option and the README for the file format.
"""

from mvmm_monai.cli import build_atlas_main

if __name__ == "__main__":
    build_atlas_main()
