"""Per-rank shim that torchrun starts instead of the training module (see mmtrain.launch.torchrun).

torchrun reports any failed worker as exit code 1, which would hide the preemption code (75) that
Slurm requeueing relies on. This shim runs `python -m <module> <args>` as a child, forwards
signals to it (SIGUSR1/SIGUSR2 for preemption, SIGTERM/SIGINT/SIGHUP), and records the child's
exit code in $MMTRAIN_EXIT_DIR so the launcher can return it.

usage: python -m mmtrain.launch.worker --module mmtrain.train -- <hydra overrides>
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _die_with_parent() -> None:
    try:  # PR_SET_PDEATHSIG = 1: the trainer must not outlive a SIGKILLed shim
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass
    for sig in FORWARDED:  # a handler never survives exec, but SIG_IGN would
        signal.signal(sig, signal.SIG_DFL)


def main(argv: list[str]) -> int:
    module = "mmtrain.train"
    if argv[:1] == ["--module"]:
        module, argv = argv[1], argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    child = subprocess.Popen([sys.executable, "-m", module, *argv], preexec_fn=_die_with_parent)

    # Inside a Slurm job step, srun delivers a signal to every process of the step, the trainer
    # included: forwarding SIGUSR1/2 again would deliver it twice.
    fanout = "SLURM_STEP_ID" in os.environ

    def forward(signum, _frame):
        if fanout and signum in (signal.SIGUSR1, signal.SIGUSR2):
            return
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    rc = child.wait()
    code = rc if rc >= 0 else 128 - rc  # killed by signal N -> 128 + N, like a shell
    exit_dir = os.environ.get("MMTRAIN_EXIT_DIR")
    if exit_dir:
        rank = os.environ.get("RANK", "0")
        try:
            with open(os.path.join(exit_dir, f"rank{rank}.exit"), "w") as f:
                f.write(f"{code}\n")
        except OSError:
            pass
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
