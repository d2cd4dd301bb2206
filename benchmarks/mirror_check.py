#!/usr/bin/env python
r"""The mirrored-sequence check (``data.checks.mirrored_sequences``) on the shared MyoPS cases: every
case as given (nothing should be flagged), and every case with its C0 flipped left-right in the
common space, as a header or export error would leave it (it should be flagged).

    .venv/bin/python benchmarks/mirror_check.py [--root DIR] [--record NAME]
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from common import myops_dataset
from record import add_record_option, write_record

from mvmm_monai.data.checks import mirrored_sequences

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "myops")
    add_record_option(ap, "mirror_check")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    dataset = myops_dataset(args.root)  # scaled as a fit with data=myops scales it
    cases, flagged, caught, ratios = {}, 0, 0, []
    for name in dataset.subjects():
        subject = dataset.load(name)
        given = mirrored_sequences(subject)
        n = subject.sequences.index("C0")
        images, coverage = subject.images.clone(), subject.coverage.clone()
        images[n], coverage[n] = images[n].flip(0), coverage[n].flip(0)
        mirrored = mirrored_sequences(replace(subject, images=images, coverage=coverage))["C0"]
        flagged += sum(r["mirrored"] for r in given.values())
        caught += mirrored["mirrored"]
        ratios += [max(r["flipped"].values()) / r["mutual_information"] for r in given.values()]
        cases[name] = {"as_given": given, "C0_mirrored": mirrored}
        print(name, {s: round(r["mutual_information"], 3) for s, r in given.items()},
              "largest flipped", {s: round(max(r["flipped"].values()), 3) for s, r in given.items()},
              "mirrored C0 caught" if mirrored["mirrored"] else "MIRRORED C0 MISSED", flush=True)
    given_mi = [r["mutual_information"] for c in cases.values() for r in c["as_given"].values()]
    figures = {"cases": cases, "sequences_flagged_as_given": flagged, "mirrored_c0_caught": caught, "n_cases": len(cases),
               "largest_flipped_over_given_as_given": max(ratios)}
    print(f"{len(cases)} cases: {flagged} sequences flagged as given, mirrored C0 caught in {caught}; "
          f"largest flipped / given as given {max(ratios):.2f}")
    if args.record:
        write_record(args.record, figures, table={
            "columns": ["cases", "C0 and T2 flagged as given", "mirrored C0 caught", "mutual information with LGE as given (range)",
                        "largest flipped / as given, as given"],
            "rows": [[len(cases), flagged, f"{caught}/{len(cases)}", f"{min(given_mi):.2f}-{max(given_mi):.2f}", max(ratios)]],
            "caption": "The mirrored-sequence check on the shared MyoPS cases (flagged when a flip shares 1.5x the mutual information)."})


if __name__ == "__main__":
    main()
