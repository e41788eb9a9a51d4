"""One rank of a small ESD training job under torchrun (tests/test_multinode.py).

    torchrun --nnodes 2 --node_rank R --nproc_per_node 2 --master_addr HOST \
        --master_port PORT tests/torchrun_job.py OUT_DIR

Rank r writes OUT_DIR/rank{r}.pt (its result of torchrec_esd.apps.trainer.run).
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from torchrec_esd.apps.trainer import JobConfig, run  # noqa: E402
from torchrec_esd.apps.workload import SyntheticWorkloadConfig  # noqa: E402
from torchrec_esd.config import EsdConfig, WorkerSpec  # noqa: E402

WORKLOAD = SyntheticWorkloadConfig(num_sparse=3, cardinalities=[60, 150, 25], bag_size=(1, 3), alpha=1.1, seed=3)


def job() -> JobConfig:
    """2 workers + 2 parameter servers (ranks 0, 1 and 2, 3)."""
    cfg = EsdConfig([WorkerSpec(10, 1.0), WorkerSpec(10, 4.0)], num_ps=2, collective_timeout_s=60)
    return JobConfig(method="esd", esd=cfg, dispatcher="heuristic", steps=6, global_batch=24, workload=WORKLOAD,
                     collect_tables=True, sparse_optimizer="sgd", sparse_lr=0.1, dense_lr=0.1,
                     lazy_tables=True)


if __name__ == "__main__":
    out = sys.argv[1]
    dist.init_process_group("gloo")
    res = run(job())
    torch.save(res, os.path.join(out, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()
