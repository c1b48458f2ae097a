"""Write and submit a Slurm batch script for a recipe.

    python -m mmtrain.launch.slurm --recipe h20_4gpu_dp4 --partition h20 --time 04:00:00 packing=disabled
    python -m mmtrain.launch.slurm --recipe h20_4gpu_dp4 --dry-run scale=smoke   # print the script

The script runs one srun task per node, each starting torchrun (mmtrain.launch.torchrun) with a c10d
rendezvous at the first node of the allocation, on a port derived from the job id (so two jobs
sharing a node do not collide; --master-port fixes it). `#SBATCH --signal=B:USR1@<s>` warns the
script before the time limit; it forwards SIGUSR1 to the training processes, and when training
exits with trainer.exit_code_preempted (75) the job requeues itself. Hydra overrides (every argument
that is not an option below) are passed through unchanged and validated here before submitting.

Where the job runs: --workdir (the checkout on the compute nodes; default this one) and --python or
--venv (relative paths are taken inside the workdir at job time; default this interpreter);
$MMTRAIN_PYTHON in the job's environment overrides both.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path
from string import Template

from mmtrain.launch.common import REPO, check_world, compose_shape, hydra_args

TEMPLATE = Path(__file__).resolve().parent / "templates" / "sbatch.sh.tmpl"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Submit python -m mmtrain.train to Slurm (extra arguments are Hydra overrides)",
        usage="python -m mmtrain.launch.slurm --recipe NAME [--nodes N] [--gpus-per-node G] [--partition P] "
        "[--time T] [--dry-run] [hydra overrides...]",
    )
    p.add_argument("--recipe", required=True, help="configs/recipe/<NAME>.yaml")
    p.add_argument("--nodes", type=int, help="nodes (default: the recipe's cluster.nodes)")
    p.add_argument("--gpus-per-node", type=int,
                   help="training processes per node, one per GPU (default: cluster.procs_per_node); "
                   "GPUs are requested only on GPU clusters (cluster.gpus_per_node > 0)")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--account", help="Slurm account")
    p.add_argument("--qos", help="Slurm QOS")
    p.add_argument("--time", default="04:00:00", help="time limit (default 04:00:00)")
    p.add_argument("--job-name", help="job name (default mmtrain-<recipe>)")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per node for the torchrun task")
    p.add_argument("--mem", help="memory per node, e.g. 0 (all) or 500G")
    p.add_argument("--exclusive", action="store_true", help="whole nodes")
    p.add_argument("--signal-seconds", type=int, default=120,
                   help="send SIGUSR1 this many seconds before the time limit (default 120)")
    p.add_argument("--no-requeue", action="store_true", help="do not requeue on preemption")
    p.add_argument("--master-port", type=int,
                   help="c10d rendezvous port (default 20000 + job id %% 10000: two jobs on one node do not collide)")
    p.add_argument("--container-image", help="run inside this image (pyxis/enroot srun --container-image)")
    p.add_argument("--container-mounts", help="extra pyxis mounts (the repository is always mounted)")
    p.add_argument("--python", help="python on the compute nodes (default: this interpreter; "
                   "'python' inside a container); relative = inside --workdir")
    p.add_argument("--venv", help="virtual environment on the compute nodes (its bin/python); relative = inside --workdir")
    p.add_argument("--workdir", help="the checkout on the compute nodes (default: this checkout)")
    p.add_argument("--log-dir", help="where the script and job logs go (default <trainer.output_dir>/slurm)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra raw sbatch option, e.g. --sbatch-arg=--constraint=h20 (repeatable)")
    p.add_argument("--train-module", default="mmtrain.train", help=argparse.SUPPRESS)  # tests swap in a stub
    p.add_argument("--dry-run", action="store_true", help="print the script and exit without submitting")
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit with its exit code")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, passed through unchanged")
    return p


def render(args: argparse.Namespace, argv: list[str]) -> tuple[str, Path]:
    shape = compose_shape(args.recipe, args.overrides)
    nodes = args.nodes or shape.nodes
    per_node = args.gpus_per_node or shape.procs_per_node
    check_world(nodes * per_node, shape.tp, shape.pp)
    gpu = shape.gpu
    out_dir = Path(shape.output_dir)
    if not out_dir.is_absolute():
        out_dir = REPO / out_dir
    log_dir = Path(args.log_dir).resolve() if args.log_dir else out_dir / "slurm"
    job_name = args.job_name or f"mmtrain-{args.recipe}"

    d = [f"--job-name={job_name}", f"--nodes={nodes}", "--ntasks-per-node=1"]
    if gpu:
        d.append(f"--gpus-per-node={per_node}")
    if args.cpus_per_task:
        d.append(f"--cpus-per-task={args.cpus_per_task}")
    if args.mem is not None:
        d.append(f"--mem={args.mem}")
    for opt in ("partition", "account", "qos"):
        if getattr(args, opt):
            d.append(f"--{opt}={getattr(args, opt)}")
    d.append(f"--time={args.time}")
    if args.exclusive:
        d.append("--exclusive")
    d.append(f"--signal=B:USR1@{args.signal_seconds}")
    d.append("--no-requeue" if args.no_requeue else "--requeue")
    d += ["--open-mode=append", f"--output={log_dir}/%x-%j.out"]
    d += list(args.sbatch_arg)
    directives = "\n".join(f"#SBATCH {x}" for x in d)

    if args.python and args.venv:
        raise SystemExit("error: give --python or --venv, not both")
    workdir = args.workdir or str(REPO)
    srun_extra = ""
    python = args.python or (str(Path(args.venv) / "bin" / "python") if args.venv else sys.executable)
    if args.container_image:
        mounts = f"{REPO}:{REPO}" + (f",{args.container_mounts}" if args.container_mounts else "")
        srun_extra = (f"--container-image={shlex.quote(args.container_image)} "
                      f"--container-mounts={shlex.quote(mounts)} --container-workdir={shlex.quote(workdir)} ")
        python = args.python or (str(Path(args.venv) / "bin" / "python") if args.venv else "python")
    if args.no_requeue:
        exit_code = -1  # never matches: no requeue
    else:
        exit_code = shape.exit_code_preempted

    script = Template(TEMPLATE.read_text()).substitute(
        sbatch_directives=directives,
        command_line=shlex.join(["python", "-m", "mmtrain.launch.slurm", *argv]).replace("\n", " "),
        nproc_per_node=per_node,
        signal_seconds=args.signal_seconds,
        exit_code_preempted=exit_code,
        workdir_q=shlex.quote(workdir),
        master_port=(str(args.master_port) if args.master_port else "$(( 20000 + SLURM_JOB_ID % 10000 ))"),
        srun_extra=srun_extra,
        python_q=shlex.quote(python),
        train_args=(f"--module {shlex.quote(args.train_module)} " if args.train_module != "mmtrain.train" else "")
        + shlex.join(hydra_args(args.recipe, args.overrides)),
    )
    return script, log_dir


def wait_for(job_id: str, poll_s: float = 1.0) -> int:
    """Poll until the job leaves the queue (a requeued job stays in it); return its exit code."""
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
        time.sleep(poll_s)
    info = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    state = next((t.split("=", 1)[1] for t in info.split() if t.startswith("JobState=")), "UNKNOWN")
    code = next((t.split("=", 1)[1] for t in info.split() if t.startswith("ExitCode=")), "0:0")
    rc, sig = (int(x) for x in code.split(":"))
    print(f"[slurm] job {job_id} {state} exit code {rc}:{sig}", flush=True)
    return rc if state == "COMPLETED" or rc else (128 + sig if sig else 1)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_intermixed_args(argv)
    script, log_dir = render(args, argv)
    if args.dry_run:
        print(script, end="")
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{args.job_name or 'mmtrain-' + args.recipe}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    res = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        print(f"error: sbatch failed ({res.returncode}): {res.stderr.strip()}", file=sys.stderr)
        return res.returncode
    job_id = res.stdout.strip().split(";")[0]
    print(f"[slurm] submitted job {job_id}: script {path}, log {log_dir}/{args.job_name or 'mmtrain-' + args.recipe}-{job_id}.out",
          flush=True)
    return wait_for(job_id) if args.wait else 0


if __name__ == "__main__":
    sys.exit(main())
