"""No drift: a registration fit kept running past its own stopping point keeps its accuracy (the
lecture's code loses 0.15 Dice between 200 and 5000 iterations). The test continues the default
fit from its checkpoint to twice its length (a resumed fit reproduces an uninterrupted one,
tests/test_monitoring.py); benchmarks/drift.py measures four times longer, synthetic and real.

Measured (1 torch thread, synthetic patient2 with its known misalignment, registration=full,
benchmarks/drift.py): stops after 100 ICM iterations (five still iterations in a row) at DE Dice myocardium
0.848 / LV 0.978 / RV 0.805; forced to 400: 0.848 / 0.977 / 0.805. The registration settles where
the fit meets its criterion, so the slice shifts of the longer fit are those of the default one.
Before (a one-iteration window, nothing settled) the step-size decay alone held it to -0.005 here,
but a real case lost 0.027.
"""

from __future__ import annotations

import json

import pytest

from mvmm_monai import compose_config, fit


@pytest.mark.slow
def test_twice_longer_loses_at_most_a_hundredth(tmp_path_factory, one_thread):
    cache = tmp_path_factory.mktemp("cache")
    base = [f"paths.cache_dir={cache}", "callbacks.progress.refresh_rate=0", "~logger", "subject=patient2",
            "data.misalignment=true", "registration=full", "registration.guard=false"]  # the registered fit itself
    out0 = tmp_path_factory.mktemp("default")
    first = fit(compose_config([*base, f"paths.output_dir={out0}"]))
    n = first["iterations"]
    assert first["converged"] and n < 200  # it stopped on the criterion, not on max_epochs (200 with full)
    shifts0 = json.loads((out0 / "params.json").read_text())["slice_shifts_mm"]
    # go on in the same folder from the default fit's last checkpoint
    longer = fit(compose_config([*base, f"paths.output_dir={out0}", f"trainer.min_epochs={2 * n}", f"trainer.max_epochs={2 * n}",
                                 "ckpt_path=last"]))
    assert longer["iterations"] == 2 * n
    # the registration settled where the default fit stopped, and did not move after it
    assert first["registration_settled_at"] == longer["registration_settled_at"] == n
    shifts4 = json.loads((out0 / "params.json").read_text())["slice_shifts_mm"]
    assert shifts0 == shifts4 and any(abs(v) > 0.5 for rows in shifts0.values() for row in rows for v in row)
    d0, d4 = first["dice"]["DE"], longer["dice"]["DE"]
    assert d0["myocardium"] > 0.78
    assert d4["myocardium"] >= d0["myocardium"] - 0.01
    assert d4["lv"] >= d0["lv"] - 0.01
    assert d4["rv"] >= d0["rv"] - 0.01
