"""Shared fixtures: small known-truth mixtures and (optionally) the real MyoPS folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

MYOPS_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "myops"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the suite in two pytest-xdist workers on a 2-core machine: one torch thread
    # each, so the workers do not compete for the cores (a test that wants 1 thread has it anyway)
    torch.set_num_threads(1)


def smooth_atlas(spatial: tuple[int, ...], k: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """A smooth probabilistic atlas ``[1, K, *spatial]``: concentric soft classes with a random warp."""
    axes = [torch.linspace(-1, 1, s, dtype=dtype) for s in spatial]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    offset = 0.15 * torch.rand(len(spatial), generator=generator, dtype=dtype)
    r = ((grid[:2] - offset[:2, None, None] if len(spatial) == 2 else grid[:2] - offset[:2, None, None, None]) ** 2).sum(0).sqrt()
    centres = torch.linspace(0.15, 0.95, k, dtype=dtype)
    logits = -((r[None] - centres.reshape(k, *([1] * len(spatial)))) ** 2) / (2 * 0.12**2)
    return torch.softmax(logits, dim=0)[None]


@pytest.fixture
def myops_root() -> Path:
    if not MYOPS_ROOT.is_dir():
        pytest.skip(f"real MyoPS data not found at {MYOPS_ROOT}")
    return MYOPS_ROOT


@pytest.fixture
def one_thread():
    """One torch thread for a fit: the same result every run, and on a busy 2-CPU machine seconds
    instead of minutes (OpenMP threads competing with other processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
