"""The pieces of `benchmarks/gpu.py` (kept runnable on CPU without a GPU session): DemP's own removal at a planted
width profile, and a model built at the same shapes computing the same function."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu


def test_planted_profiles_are_removed_by_demp_and_a_built_model_matches_the_compact_one():
    torch.manual_seed(0)
    example, batches = torch.randn(2, 3, 32, 32), [torch.randn(8, 3, 32, 32)]
    compact = gpu.plant_and_remove(gpu.resnet18(0.125), 0.5, example, batches).eval()
    assert compact.conv1.out_channels == 4  # half of the stem's 8 channels were dead and went
    built = gpu.built_like(compact, 0.125).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(built(x), compact(x))
    step = gpu.Stepper(compact, torch.device("cpu"), x, torch.randint(0, 10, (4,))).with_demp(example)
    step()
    assert step.step_index == 1
