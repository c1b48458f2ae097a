"""Preemption: SIGTERM / SIGUSR1 ask the run to stop at the next step boundary.

The handler only sets a flag. At the end of every step all ranks all-reduce the flag (MAX), so a
signal that reached any rank stops every rank after the *same* step; they then save a checkpoint
together and exit with `trainer.exit_code_preempted` (75, EX_TEMPFAIL), which the Slurm launcher
turns into a requeue. A second signal while stopping is ignored (the checkpoint is being written).
"""

from __future__ import annotations

import signal
from typing import Optional

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised by `train()` after the preemption checkpoint is written; `code` is the exit code."""

    def __init__(self, code: int, step: int, signame: str) -> None:
        super().__init__(code)
        self.step = step
        self.signame = signame


class PreemptionHandler:
    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old: dict[int, object] = {}

    def install(self) -> "PreemptionHandler":
        for s in SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._on_signal)
            except ValueError:  # not the main thread (e.g. called from a worker thread): no handler
                pass
        return self

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        self._old.clear()

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        if self.signum is None:
            self.signum = signum

    def request(self, signum: int = signal.SIGTERM) -> None:
        self._on_signal(signum, None)

    def should_stop(self, device: torch.device) -> Optional[str]:
        """Collective: the signal name if any rank got one, else None."""
        flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        n = int(flag.item())
        return signal.Signals(n).name if n else None
