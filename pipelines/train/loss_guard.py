"""Stop at the first non-finite loss, naming its step, without a host sync per step on CUDA.

On CPU the loss is checked before its update, so the weights never see it. On CUDA reading a
device value waits for all the work queued so far, so the check runs one step late instead:
the step's "finite" flag is copied to pinned host memory without blocking, and read when the
next step checks in (by then the copy has long landed), or before any checkpoint and at the
end of an epoch. A bad loss has then been applied once, but no checkpoint is written after it
and the error still names the step that produced it.
"""
from __future__ import annotations

import torch

from embtables.errors import EmbtablesError


class LossGuard:
    def __init__(self, run, lagged: bool | None = None):
        self.run = run
        self.lagged = run.device.type == "cuda" if lagged is None else lagged
        self._pending = None  # (host flag, CUDA event or None, loss, step, epoch)

    def check(self, loss: torch.Tensor, step: int, epoch: int) -> None:
        """Step `step`'s loss (before its update); raises for a non-finite one, or, lagged, for
        the previous step's."""
        flag = self.run.finite_flag(loss)
        if not self.lagged:
            if not bool(flag):
                self._fail(loss, step, epoch)
            return
        self.flush()
        cuda = flag.device.type == "cuda"
        host = torch.empty((), dtype=flag.dtype, pin_memory=cuda)
        host.copy_(flag, non_blocking=cuda)
        event = torch.cuda.Event() if cuda else None
        if event is not None:
            event.record()
        self._pending = (host, event, loss.detach(), step, epoch)

    def flush(self) -> None:
        """Resolve a pending (lagged) check; call before a checkpoint and at the end of an epoch."""
        if self._pending is None:
            return
        host, event, loss, step, epoch = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        if not bool(host):
            self._fail(loss, step, epoch)

    def _fail(self, loss, step: int, epoch: int):
        raise EmbtablesError(f"loss is {loss.item()} at step {step} (epoch {epoch + 1}); training stopped, the "
                             f"last good checkpoint is kept in {self.run.out}")
