"""The loss guard: immediate on CPU; one step late (no per-step host sync) as on CUDA."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from embtables.errors import EmbtablesError
from embtables.pipelines.train.loss_guard import LossGuard


def run_on(device: str):
    return SimpleNamespace(device=torch.device(device), out=Path("runs/x"),
                           finite_flag=lambda value: torch.isfinite(value.detach()))


LOSSES = [0.7, 0.6, float("nan"), 0.5]


def test_on_cpu_the_bad_step_is_refused_before_its_update():
    guard = LossGuard(run_on("cpu"))
    assert not guard.lagged
    guard.check(torch.tensor(LOSSES[0]), 1, 0)
    guard.check(torch.tensor(LOSSES[1]), 2, 0)
    with pytest.raises(EmbtablesError, match=r"loss is nan at step 3 \(epoch 1\).*runs/x"):
        guard.check(torch.tensor(LOSSES[2]), 3, 0)


def test_lagged_the_next_check_names_the_bad_step():
    guard = LossGuard(run_on("cpu"), lagged=True)
    for step in (1, 2, 3):  # step 3's own check does not raise: its flag is read later
        guard.check(torch.tensor(LOSSES[step - 1]), step, 0)
    with pytest.raises(EmbtablesError, match=r"loss is nan at step 3 \(epoch 1\)"):
        guard.check(torch.tensor(LOSSES[3]), 4, 0)


def test_lagged_a_flush_before_a_checkpoint_raises_for_the_last_step():
    guard = LossGuard(run_on("cpu"), lagged=True)
    guard.check(torch.tensor(0.5), 1, 1)
    guard.flush()  # finite: nothing
    guard.check(torch.tensor(float("inf")), 2, 1)
    with pytest.raises(EmbtablesError, match=r"loss is inf at step 2 \(epoch 2\)"):
        guard.flush()
    guard.flush()  # resolved once


def test_cuda_runs_are_lagged():
    assert LossGuard(run_on("cuda")).lagged
