"""One DLRM training job, vanilla TorchRec, ESD or DES, on one rank of a torchrun world.

Shared by the example (``examples/dlrm_esd.py``), the end-to-end benchmark
and the equivalence tests, so that every method runs the *same* model, data
and global batches:

* ``method="vanilla"``: TorchRec ``DistributedModelParallel`` with TorchRec's
  own planner (table-wise sharding) and fused embedding optimizer; each rank
  trains its contiguous slice of the global batch (``W`` ranks).
* ``method="esd"``: ``W`` workers + ``P`` parameter servers; every batch goes
  through :class:`EsdInputDist` (dispatcher by name) and the ESD sharder.
* ``method="des"``: like vanilla, with the EBC sharded by the DES sharder.

This module holds the entry point, :func:`run`.  The job's description and
model are in :mod:`~torchrec_esd.apps.job`, the vanilla and DES jobs in
:mod:`~torchrec_esd.apps.torchrec_jobs`, the ESD job in
:mod:`~torchrec_esd.apps.esd_job`; the public names of those are re-exported
here (``__all__``).
"""

from __future__ import annotations

from typing import Dict

import torch.distributed as dist

from torchrec_esd.apps.esd_job import _esd
from torchrec_esd.apps.job import (
    EBC_PATH,
    DlrmTask,
    JobConfig,
    build_model,
    dense_param_bytes,
    job_tables,
    sparse_optimizer,
)
from torchrec_esd.apps.torchrec_jobs import _des, _vanilla, torchrec_dmp
from torchrec_esd.apps.workload import SyntheticWorkload
from torchrec_esd.config import EsdConfigError
from torchrec_esd.distributed.faults import fail_open_monitors
from torchrec_esd.distributed.runtime import esd_process_groups

__all__ = [
    "EBC_PATH",
    "DlrmTask",
    "JobConfig",
    "build_model",
    "dense_param_bytes",
    "job_tables",
    "run",
    "sparse_optimizer",
    "torchrec_dmp",
]


def run(job: JobConfig) -> Dict:
    """Run ``job`` on this rank (torch.distributed must be initialised).

    ``vanilla`` uses the first ``W`` ranks of the world (``W`` = the ESD
    config's workers if one is given, else the whole world); other ranks
    (an ESD job's PS ranks) idle, so both methods can run in one torchrun world.
    """
    for name in ("steps", "global_batch"):  # every rank, before any collective
        value = getattr(job, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EsdConfigError(f"JobConfig.{name} must be an int >= 1, got {value!r}")
    # a workload config with make_workload() (torchrec_esd.apps.criteo.CriteoTsvConfig)
    # builds its own workload; a SyntheticWorkloadConfig the synthetic one
    if (job.resume or job.checkpoint_every) and not job.checkpoint_dir:
        raise EsdConfigError("JobConfig.resume and checkpoint_every need a checkpoint_dir")
    if job.checkpoint_dir and job.method not in ("vanilla", "esd"):
        raise EsdConfigError(f"checkpoints are written by the vanilla and esd methods, not {job.method!r}")
    if job.checkpoint_every < 0:
        raise EsdConfigError(f"JobConfig.checkpoint_every must be >= 0, got {job.checkpoint_every}")
    make = getattr(job.workload, "make_workload", None)
    workload = make() if make is not None else SyntheticWorkload(job.workload)
    if job.method == "vanilla":
        world = dist.get_world_size()
        W = job.esd.num_workers if job.esd is not None else world
        if W > world:
            raise EsdConfigError(f"vanilla needs {W} ranks, the world has {world}")
        if job.global_batch % W:
            raise EsdConfigError(
                f"vanilla TorchRec needs the global batch {job.global_batch} divisible by {W} ranks"
            )
        if W == world:
            group = dist.group.WORLD
        else:  # the workers of an ESD world (its PS ranks idle meanwhile)
            group = esd_process_groups(job.esd)[1]
        if dist.get_rank() >= W:
            return {"role": "idle"}
        return _vanilla(job, workload, group)
    if job.method == "esd":
        try:
            return _esd(job, workload)
        except BaseException as e:
            # any exception (a reader's OverflowError, a dispatcher's error, ...):
            # every other rank, the PS included, ends with this message
            fail_open_monitors(e)
            raise
    if job.method == "des":
        return _des(job, workload)
    raise EsdConfigError(f"unknown method {job.method!r}; use 'vanilla', 'esd' or 'des'")
