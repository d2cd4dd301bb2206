"""The mirrored-sequence check: silent on real and synthetic subjects as given, loud on a mirrored copy."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from mvmm_monai import compose_config
from mvmm_monai.config import build
from mvmm_monai.data.checks import mirrored_sequences
from tests.conftest import MYOPS_ROOT


@pytest.fixture(scope="module")
def synthetic_subject(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    cfg = compose_config(["data=synthetic", f"paths.cache_dir={cache}", f"paths.output_dir={cache / 'out'}"])
    return build(cfg.data).load("patient1")


def mirror(subject, seq, axes=(0,)):
    n = subject.sequences.index(seq)
    images, coverage = subject.images.clone(), subject.coverage.clone()
    images[n], coverage[n] = images[n].flip(axes), coverage[n].flip(axes)
    return replace(subject, images=images, coverage=coverage)


def test_a_mirrored_synthetic_sequence_is_flagged_and_named(synthetic_subject, caplog):
    subject = synthetic_subject
    others = [s for s in subject.sequences if s != subject.reference]
    as_given = mirrored_sequences(subject)
    assert set(as_given) == set(others) and not any(r["mirrored"] for r in as_given.values())
    with caplog.at_level(logging.WARNING, logger="mvmm_monai.data.checks"):
        found = mirrored_sequences(mirror(subject, others[0], (1,)))
    assert found[others[0]]["mirrored"] and not found[others[1]]["mirrored"]
    assert max(found[others[0]]["flipped"], key=found[others[0]]["flipped"].get) == "up-down"
    assert others[0] in caplog.text and "mirrored" in caplog.text


@pytest.mark.skipif(not MYOPS_ROOT.is_dir(), reason="needs ../shared/data/myops")
def test_real_cases_pass_as_given_and_a_mirrored_lge_partner_is_caught():
    from mvmm_monai.data import MyoPSDataset

    dataset = MyoPSDataset(MYOPS_ROOT)
    for name in dataset.subjects()[:4]:
        subject = dataset.load(name)
        checks = mirrored_sequences(subject)
        assert set(checks) == {"C0", "T2"} and not any(r["mirrored"] for r in checks.values()), (name, checks)
        assert mirrored_sequences(mirror(subject, "C0"))["C0"]["mirrored"], name
