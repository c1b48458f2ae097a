"""Launch training with torchrun, on one node or on several (c10d rendezvous).

    # one node, process count from the recipe (cluster.procs_per_node)
    python -m mmtrain.launch.torchrun --recipe h20_4gpu_dp4
    python -m mmtrain.launch.torchrun --recipe h20_4gpu_dp4 scale=smoke                  # CPU smoke, 4 gloo ranks
    # several nodes: run the same line on every node
    python -m mmtrain.launch.torchrun --recipe h20_4gpu_dp4 --nnodes 2 --nproc-per-node 8 \
        --rdzv-endpoint node0:29500 --rdzv-id myrun parallel=tp2

Everything that is not a launcher flag is a Hydra override and goes to `python -m mmtrain.train`
unchanged. The exit code is the training's: a rank that exits with trainer.exit_code_preempted (75)
makes the launcher exit 75 (torchrun alone would say 1), and so does a run that was interrupted
after the launcher received SIGUSR1/SIGTERM (preemption). SIGUSR1/SIGUSR2 are forwarded to every
training process, SIGTERM/SIGINT/SIGHUP to torchrun (which stops the workers).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from mmtrain.launch.common import REPO, check_world, compose_shape, hydra_args



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="torchrun launcher for python -m mmtrain.train (extra arguments are Hydra overrides)",
        usage="python -m mmtrain.launch.torchrun [--recipe NAME] [options] [hydra overrides...]",
    )
    p.add_argument("--recipe", help="configs/recipe/<NAME>.yaml (same as the override recipe=NAME)")
    p.add_argument("--nnodes", type=int, help="nodes (default: the recipe's cluster.nodes)")
    p.add_argument("--nproc-per-node", type=int, help="processes per node (default: cluster.procs_per_node)")
    p.add_argument("--rdzv-endpoint", help="HOST:PORT of the c10d rendezvous (multi-node; default: standalone)")
    p.add_argument("--rdzv-id", help="rendezvous id shared by all nodes (default: $SLURM_JOB_ID or random)")
    p.add_argument("--module", default="mmtrain.train", help=argparse.SUPPRESS)  # tests swap in a stub
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command and exit")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, passed through unchanged")
    return p


def torchrun_command(args: argparse.Namespace, nnodes: int, nproc: int) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
           "--max-restarts=0"]
    if args.rdzv_endpoint:
        rdzv_id = args.rdzv_id or os.environ.get("SLURM_JOB_ID") or uuid.uuid4().hex[:12]
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    elif nnodes > 1:
        raise SystemExit("error: --nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "mmtrain.launch.worker", "--module", args.module, "--", *hydra_args(args.recipe, args.overrides)]


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            kids.append(int(entry))
    return kids


def _ignore_usr() -> None:
    # torchrun's agent does not handle SIGUSR1/2 (default action: die). Slurm may signal every process
    # of a job step, so torchrun ignores them; the worker shims install their own handlers.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def run(args: argparse.Namespace) -> int:
    shape = compose_shape(args.recipe, args.overrides)
    nnodes = args.nnodes or shape.nodes
    nproc = args.nproc_per_node or shape.procs_per_node
    check_world(nnodes * nproc, shape.tp, shape.pp)
    cmd = torchrun_command(args, nnodes, nproc)
    world = nnodes * nproc
    print(f"[launch] recipe={shape.recipe} nodes={nnodes} procs/node={nproc} world={world} "
          f"TP={shape.tp} PP={shape.pp} DP={world // (shape.tp * shape.pp)}", flush=True)
    print("[launch] " + shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0

    preempt = shape.exit_code_preempted
    with tempfile.TemporaryDirectory(prefix="mmtrain-exit-") as exit_dir:
        env = dict(os.environ, MMTRAIN_EXIT_DIR=exit_dir)
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, preexec_fn=_ignore_usr)
        state = {"signalled": False}

        # Inside a Slurm job step srun signals every process of the step (the trainers too): then only
        # record the preemption, so that a trainer does not get SIGUSR1 twice.
        fanout = "SLURM_STEP_ID" in os.environ

        def to_workers(signum, _frame):
            state["signalled"] = True
            name = signal.Signals(signum).name
            if fanout:
                print(f"[launch] got {name} (delivered to every process of the Slurm step)", flush=True)
                return
            print(f"[launch] got {name}: forwarding to the training processes", flush=True)
            for pid in _children(proc.pid):
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass

        def to_torchrun(signum, _frame):
            state["signalled"] = True
            print(f"[launch] got {signal.Signals(signum).name}: stopping torchrun", flush=True)
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass

        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, to_workers)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, to_torchrun)
        rc = proc.wait()
        codes = {}
        for f in Path(exit_dir).glob("rank*.exit"):
            try:
                codes[f.name[4:-5]] = int(f.read_text().strip())
            except ValueError:
                pass

    if codes:
        print("[launch] worker exit codes: " + " ".join(f"rank{r}={c}" for r, c in sorted(codes.items())), flush=True)
    if preempt in codes.values():
        print(f"[launch] preempted: exiting {preempt}", flush=True)
        return preempt
    if rc == 0 and all(c == 0 for c in codes.values()):
        return 0
    if state["signalled"]:
        print(f"[launch] interrupted by a preemption signal: exiting {preempt}", flush=True)
        return preempt
    failed = [c for c in codes.values() if c != 0]
    return failed[0] if failed else (rc if rc > 0 else 1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
