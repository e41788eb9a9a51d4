"""The data-parallel jobs over local batches: vanilla TorchRec and DES.

Every rank trains its contiguous slice of each global batch
(:func:`_train_local_batches`), with DDP for the dense part; the
``EmbeddingBagCollection`` is sharded by TorchRec's own planner and sharder
(``method="vanilla"``, :func:`torchrec_dmp`, :func:`_vanilla`) or by the DES
sharder (``method="des"``, :func:`_des`, :mod:`torchrec_esd.des.sharding`).
"""

from __future__ import annotations

import logging
import time
from typing import Dict, List

import torch
import torch.distributed as dist
from torchrec import optim as trec_optim
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from torchrec_esd.apps.checkpointing import LaggedStepSum, Preemption, checkpointer, dense_optimizer
from torchrec_esd.apps.job import (
    EBC_PATH,
    DlrmTask,
    JobConfig,
    _dense_state,
    _Tracker,
    build_model,
    job_tables,
    sparse_optimizer,
)
from torchrec_esd.apps.workload import SyntheticWorkload
from torchrec_esd.config import EsdConfigError
from torchrec_esd.des.sharding import DesEmbeddingBagCollectionSharder, des_module_plan, find_des_modules

logger = logging.getLogger(__name__)


def _train_local_batches(dmp, job: JobConfig, workload: SyntheticWorkload, group, rank: int, world: int, label: str):
    """The data-parallel loop of vanilla TorchRec and DES: every rank trains its
    contiguous slice of each global batch; returns (tracker, elapsed seconds,
    first step, step of a preemption or None).  With ``job.checkpoint_dir``:
    checkpoints (apps/checkpointing.py) every ``job.checkpoint_every`` steps,
    at the end and on SIGTERM; ``job.resume`` starts from the latest."""
    dense_opt = dense_optimizer(dmp, job.dense_lr)
    ckpt = checkpointer(job, dmp, dense_opt, group, job_tables(job, workload), sparse_optimizer(job))
    start = ckpt.resume() if ckpt is not None and job.resume else 0
    preemption = Preemption().install() if ckpt is not None else None
    per = job.global_batch // world
    track = _Tracker(job, group, rank, label)
    t0 = time.perf_counter()
    step, stopped = start, None
    # the loss sum of a step is read one step later (as in the ESD loop): no barrier per step
    sums = LaggedStepSum(preemption, group)

    def settled(done) -> bool:
        if done is None:
            return False
        total, preempted, (logits, labels) = done
        track.step(total / job.global_batch, logits, labels)
        return preempted

    while step < job.steps:
        batch = workload.local_batch(step, job.global_batch, rank, world)
        dense_opt.zero_grad()
        loss, (_, logits, labels) = dmp(batch)
        loss.backward()
        dense_opt.step()
        track.end_step()
        preempted = settled(sums.push(loss * per, (logits, labels)))
        step += 1
        if preempted or (ckpt is not None and (ckpt.due(step) or step == job.steps)):
            preempted = settled(sums.settle()) or preempted  # every loss in, and its flag
            stopped = step if preempted else None
            assert ckpt is not None  # (a preemption is only ever requested with a checkpointer)
            ckpt.save(step)
            if stopped is not None:
                break
    settled(sums.settle())
    if preemption is not None:
        preemption.uninstall()
    elapsed = time.perf_counter() - t0
    logger.info("%s: %d steps in %.1f s", label, len(track.losses), elapsed)
    track.write_metrics()
    return track, elapsed, start, stopped


def torchrec_dmp(job: JobConfig, workload: SyntheticWorkload, group, sharding: str = "table_wise"):
    """The job's DLRM under vanilla TorchRec ``DistributedModelParallel`` on
    ``group``: every table ``sharding`` ("table_wise" or "row_wise") by
    TorchRec's planner, the fused sparse optimizer applied in the backward."""

    class _CpuRowWiseSharder(EmbeddingBagCollectionSharder):
        # TorchRec 1.9.2 offers row_wise only on cuda/tpu; its CPU row-wise
        # path (bucketize ids -> all-to-all, pooled reduce-scatter) works on gloo
        def sharding_types(self, compute_device_type: str) -> List[str]:
            return super().sharding_types(compute_device_type) + ["row_wise"]

    world = dist.get_world_size(group)
    model = DlrmTask(build_model(job, workload))
    initial = {k: v.clone() for k, v in model.state_dict().items() if "embedding_bags" in k}
    opt_cls = torch.optim.SGD if job.sparse_optimizer == "sgd" else trec_optim.RowWiseAdagrad
    kwargs = {"lr": job.sparse_lr}
    if job.sparse_optimizer != "sgd":
        kwargs["eps"] = job.sparse_eps
    apply_optimizer_in_backward(opt_cls, model.model.sparse_arch.embedding_bag_collection.parameters(), kwargs)
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu", local_world_size=world),
        constraints={t.name: ParameterConstraints(sharding_types=[sharding]) for t in job_tables(job, workload)},
    )
    sharders = [_CpuRowWiseSharder() if sharding == "row_wise" else EmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(model, sharders, group)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(group), plan=plan,
                                   sharders=sharders, device=torch.device("cpu"))
    dmp.load_state_dict(initial, strict=False)
    return dmp


def _vanilla(job: JobConfig, workload: SyntheticWorkload, group=None) -> Dict:
    group = group or dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dmp = torchrec_dmp(job, workload, group)
    track, elapsed, start, stopped = _train_local_batches(dmp, job, workload, group, rank, world, "vanilla TorchRec")
    out = {"losses": track.losses, "auc": track.auc(), "dense": _dense_state(dmp), "elapsed_s": elapsed,
           "step_end_s": track.step_end_s, "step_end_cpu_s": track.step_end_cpu_s,
           "start_step": start, "preempted_at": stopped,
           # which rank holds each table (TorchRec's table-wise plan): what a traffic model needs
           "table_owner": {name: ps.ranks[0] for name, ps in dmp.plan.get_plan_for_module(EBC_PATH).items()}}
    if job.collect_tables:
        out["tables"], out["tables_state"] = _gather_vanilla_tables(dmp, workload, job, group)
    return out


def _full_rows(st, shape, group) -> torch.Tensor:
    """A whole tensor from a ShardedTensor whose rows each rank owns once."""
    full = torch.zeros(shape)
    for shard in st.local_shards() if st is not None else []:
        sl = tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
        full[sl] = shard.tensor
    dist.all_reduce(full, group=group)
    return full


def _gather_vanilla_tables(dmp, workload, job, group):
    """(tables, row-wise optimizer states) of a vanilla DMP, whole on every rank."""
    sd = dmp.state_dict()
    osd = dmp.fused_optimizer.state_dict()["state"]
    tables, states = {}, {}
    for t in job_tables(job, workload):
        key = [k for k in sd if k.endswith(f"embedding_bags.{t.name}.weight")][0]
        tables[t.name] = _full_rows(sd[key], (t.num_embeddings, t.embedding_dim), group)
        if job.sparse_optimizer == "sgd":
            states[t.name] = torch.zeros(t.num_embeddings, 0)
            continue
        # a rank that owns no shard of the table has no state entry for it
        mom = osd.get(key, {}).get(f"{t.name}.momentum1")
        states[t.name] = _full_rows(mom, (t.num_embeddings,), group).view(-1, 1)
    return tables, states


def _des(job: JobConfig, workload: SyntheticWorkload, group=None) -> Dict:
    """DES sharding (torchrec_esd.des.sharding): like ``_vanilla`` (same model, local
    batches, DDP dense), but the EBC is sharded by the DES sharder: partial
    sums are pooled next to the weight shards and exchanged instead of rows."""
    group = group or dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if job.global_batch % world:
        raise EsdConfigError(f"DES needs the global batch {job.global_batch} divisible by {world} ranks")
    model = DlrmTask(build_model(job, workload))
    ebc = model.model.sparse_arch.embedding_bag_collection
    plan = ShardingPlan({EBC_PATH: des_module_plan(ebc, world, job.des_sharding)})
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(group),
        plan=plan,
        sharders=[DesEmbeddingBagCollectionSharder(sparse_optimizer(job))],
        device=torch.device("cpu"),
    )
    (des_ebc,) = find_des_modules(dmp)
    track, elapsed, _, _ = _train_local_batches(dmp, job, workload, group, rank, world, f"DES {job.des_sharding}")
    out = {"losses": track.losses, "auc": track.auc(), "dense": _dense_state(dmp), "elapsed_s": elapsed,
           "comm_bytes": dict(des_ebc.comm_bytes), "iterations": des_ebc.iterations}
    if job.collect_tables:
        out["tables"], out["tables_state"] = des_ebc.gather_tables()
    return out
