"""Shared fixtures: deterministic seeds, and a check that no test leaves hooks, files or process groups behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.nn.modules import module as torch_module

os.environ.setdefault("PYTHONHASHSEED", "0")
torch.set_num_threads(min(2, torch.get_num_threads()))
REPO = Path(__file__).resolve().parents[1]


def _global_hook_count() -> int:
    return sum(
        len(hooks)
        for hooks in (
            torch_module._global_forward_hooks,
            torch_module._global_forward_pre_hooks,
            torch_module._global_backward_hooks,
        )
    )


@pytest.fixture(autouse=True)
def _leave_nothing_behind(tmp_path, monkeypatch):
    """Run each test in its own directory; fail if it leaves files in the repo, hooks or a process group."""
    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)  # Lightning writes lightning_logs/ and checkpoints into the working directory
    repo_entries = set(os.listdir(REPO))
    hooks = _global_hook_count()
    yield
    leftovers = []
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        leftovers.append("a torch.distributed process group")
    if _global_hook_count() != hooks:
        leftovers.append("global module hooks")
    new_entries = set(os.listdir(REPO)) - repo_entries
    if new_entries:
        leftovers.append(f"files in the repository: {sorted(new_entries)}")
    if leftovers:
        pytest.fail("The test left behind " + ", ".join(leftovers) + ".")
