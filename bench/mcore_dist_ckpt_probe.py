"""Probe: megatron-core 0.19.2 dist_checkpointing save (sync / async) on CPU + gloo, one small tensor.

Why mmtrain's checkpoints use torch.distributed.checkpoint directly (docs/reliability.md):

    python bench/mcore_dist_ckpt_probe.py OUT sync                # one process
    torchrun --nproc_per_node=2 bench/mcore_dist_ckpt_probe.py OUT async
    MODE: sync | async (mcore async, a forked writer per save) | async_persistent (a persistent writer)

megatron's sync save runs its async path underneath, which needs psutil (not a megatron-core
dependency; `pip install --target DIR psutil` and PYTHONPATH=DIR to try it) and starts a spawn-context
multiprocessing Manager. Run it under `timeout`: the persistent writer dies on CPU and the caller waits.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")


def main() -> None:
    import torch
    import torch.distributed as dist

    from mmtrain.parallel import cpu_compat

    cpu_compat.enable_for_process()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29755")
    dist.init_process_group("gloo")
    from megatron.core import dist_checkpointing as dc
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    r, w = dist.get_rank(), dist.get_world_size()
    t = torch.arange(1024, dtype=torch.float32).view(32, 32) + r
    sd = {"w": ShardedTensor.from_rank_offsets("w", t, (0, r, w))}
    out, mode = sys.argv[1], sys.argv[2]
    if r == 0:
        os.makedirs(out, exist_ok=True)
    dist.barrier()
    t0 = time.time()
    if mode == "sync":
        dc.save(sd, out)
    else:
        q = AsyncCallsQueue(persistent=mode == "async_persistent")
        req = dc.save(sd, out, dc.serialization.get_default_save_sharded_strategy(), async_sharded_save=True,
                      async_strategy="mcore")
        q.schedule_async_request(req)
        print(f"rank{r}: scheduled after {time.time() - t0:.2f} s", flush=True)
        q.maybe_finalize_async_calls(blocking=True, no_dist=False)
        q.close()
    print(f"rank{r}: {mode} done in {time.time() - t0:.2f} s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":  # the spawn-context Manager re-imports __main__: keep the work in main()
    main()
