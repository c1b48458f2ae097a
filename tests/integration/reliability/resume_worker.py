"""Runs several training jobs one after the other in one torchrun launch (one process group), so
the resume-at-another-layout tests pay for one start-up instead of one per layout.

usage: torchrun --nproc_per_node=2 tests/integration/reliability/resume_worker.py JOBS.json

JOBS.json: [{"name": ..., "overrides": [hydra overrides...]}, ...]. Each job is `mmtrain.train`'s
own `train(cfg)`; rank 0 writes <trainer.output_dir>/job_status.json ({"ok": bool, "error": str}).
A failing job does not stop the next one (unless it broke the process group).
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

from mmtrain import quiet  # noqa: E402

quiet.install()

import torch.distributed as dist  # noqa: E402

from mmtrain.config import compose  # noqa: E402
from mmtrain.parallel import setup  # noqa: E402
from mmtrain.train.loop import train  # noqa: E402
from mmtrain.train.preemption import Preempted  # noqa: E402


def main(jobs_file: str) -> None:
    jobs = json.loads(Path(jobs_file).read_text())
    try:
        for job in jobs:
            cfg = compose(job["overrides"])
            status: dict = {"ok": True}
            try:
                status["summary"] = train(cfg)
            except Preempted as e:
                status = {"ok": True, "preempted_at": e.step}
            except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
                status = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            if not dist.is_initialized() or dist.get_rank() == 0:
                out = Path(cfg.trainer.output_dir)
                out.mkdir(parents=True, exist_ok=True)
                (out / "job_status.json").write_text(json.dumps(status, indent=1, default=str))
    finally:
        setup.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
