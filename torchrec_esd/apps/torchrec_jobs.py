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

from torchrec_esd.apps.job import (
    EBC_PATH,
    DlrmTask,
    JobConfig,
    _dense_params,
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
    contiguous slice of each global batch; returns (tracker, elapsed seconds)."""
    dense_opt = torch.optim.SGD(_dense_params(dmp), lr=job.dense_lr)
    per = job.global_batch // world
    track = _Tracker(job, group, rank, label)
    t0 = time.perf_counter()
    for step in range(job.steps):
        batch = workload.local_batch(step, job.global_batch, rank, world)
        dense_opt.zero_grad()
        loss, (_, logits, labels) = dmp(batch)
        loss.backward()
        dense_opt.step()
        g = loss.detach().clone() * per
        dist.all_reduce(g, group=group)
        track.step(float(g) / job.global_batch, logits, labels)
    elapsed = time.perf_counter() - t0
    logger.info("%s: %d steps in %.1f s", label, job.steps, elapsed)
    track.write_metrics()
    return track, elapsed


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
    track, elapsed = _train_local_batches(dmp, job, workload, group, rank, world, "vanilla TorchRec")
    out = {"losses": track.losses, "auc": track.auc(), "dense": _dense_state(dmp), "elapsed_s": elapsed,
           "step_end_s": track.step_end_s, "step_end_cpu_s": track.step_end_cpu_s,
           # which rank holds each table (TorchRec's table-wise plan): what a traffic model needs
           "table_owner": {name: ps.ranks[0] for name, ps in dmp.plan.get_plan_for_module(EBC_PATH).items()}}
    if job.collect_tables:
        out["tables"] = _gather_vanilla_tables(dmp, workload, job, group)
    return out


def _gather_vanilla_tables(dmp, workload, job, group) -> Dict[str, torch.Tensor]:
    sd = dmp.state_dict()
    tables = {}
    for t in job_tables(job, workload):
        key = [k for k in sd if k.endswith(f"embedding_bags.{t.name}.weight")][0]
        st = sd[key]
        full = torch.zeros(t.num_embeddings, t.embedding_dim)
        for shard in st.local_shards():
            off = shard.metadata.shard_offsets
            sz = shard.metadata.shard_sizes
            full[off[0] : off[0] + sz[0], off[1] : off[1] + sz[1]] = shard.tensor
        dist.all_reduce(full, group=group)  # each row is owned by exactly one rank
        tables[t.name] = full
    return tables


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
    track, elapsed = _train_local_batches(dmp, job, workload, group, rank, world, f"DES {job.des_sharding}")
    out = {"losses": track.losses, "auc": track.auc(), "dense": _dense_state(dmp), "elapsed_s": elapsed,
           "comm_bytes": dict(des_ebc.comm_bytes), "iterations": des_ebc.iterations}
    if job.collect_tables:
        out["tables"], out["tables_state"] = des_ebc.gather_tables()
    return out
