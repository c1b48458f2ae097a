"""Stand-in for `python -m mmtrain.train` in launcher tests (no torch import: starts in ~0.1 s).

Behaviour from $MMTRAIN_FAKE:
  ok (default)     write <trainer.output_dir>/summary.json and exit 0
  exit:<code>      rank 1 (or the only rank) exits <code>, the others exit 0
  preempt          wait for SIGUSR1 (up to 120 s), then exit 75; after a Slurm requeue
                   ($SLURM_RESTART_COUNT >= 1) behave like `ok`
Every rank appends what happened to <output_dir>/events.txt.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    overrides = dict(a.split("=", 1) for a in argv if "=" in a)
    out = Path(overrides.get("trainer.output_dir", "outputs/fake"))
    out.mkdir(parents=True, exist_ok=True)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    mode = os.environ.get("MMTRAIN_FAKE", "ok")

    def event(msg: str) -> None:
        with open(out / "events.txt", "a") as f:
            f.write(f"rank{rank} restart{restart} {msg}\n")

    event(f"start world={world} args={' '.join(argv)}")
    if mode.startswith("exit:"):
        code = int(mode.split(":", 1)[1])
        if rank == min(1, world - 1):
            event(f"exit {code}")
            return code
    elif mode == "preempt" and restart == 0:
        got = []

        def on_usr1(signum, frame) -> None:
            # recorded in the handler, at delivery: a rank that exits first makes torchrun stop the
            # others, which may then never leave the wait loop below
            if not got:
                event("usr1")
            got.append(signum)

        signal.signal(signal.SIGUSR1, on_usr1)
        event("ready")
        deadline = time.time() + 120
        while not got and time.time() < deadline:
            time.sleep(0.05)
        if not got:
            event("timeout")
        return 75 if got else 1
    if rank == 0:
        (out / "summary.json").write_text(json.dumps({"steps": 1, "world_size": world, "restart": restart}))
    event("done")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
