"""One DLRM training job, vanilla TorchRec or ESD, on one rank of a torchrun world.

Shared by the example (``examples/dlrm_esd.py``), the end-to-end benchmark
and the equivalence tests, so that every method runs the *same* model, data
and global batches:

* ``method="vanilla"``: TorchRec ``DistributedModelParallel`` with TorchRec's
  own planner (table-wise sharding) and fused embedding optimizer; each rank
  trains its contiguous slice of the global batch (``W`` ranks).
* ``method="esd"``: ``W`` workers + ``P`` parameter servers; every batch goes
  through :class:`EsdInputDist` (dispatcher by name) and the ESD sharder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_esd.config import EsdConfig, EsdConfigError
from torchrec_esd.distributed.planner import EsdPlan
from torchrec_esd.ps import SparseOptimizer
from torchrec_esd.apps.workload import SyntheticWorkload, SyntheticWorkloadConfig

EBC_PATH = "model.sparse_arch.embedding_bag_collection"


@dataclass
class JobConfig:
    method: str = "esd"  # "vanilla" | "esd"
    steps: int = 20
    global_batch: int = 256
    embedding_dim: int = 8
    dense_arch: Tuple[int, ...] = (16,)  # the last layer (embedding_dim) is appended
    over_arch: Tuple[int, ...] = (16, 1)
    dense_lr: float = 0.05
    sparse_optimizer: str = "sgd"
    sparse_lr: float = 0.05
    sparse_eps: float = 1e-8
    seed: int = 0
    workload: SyntheticWorkloadConfig = field(default_factory=SyntheticWorkloadConfig)
    # ESD only
    esd: Optional[EsdConfig] = None
    replicated: Tuple[str, ...] = ()  # tables kept whole on every worker (data parallel)
    plan: Optional[EsdPlan] = None  # an EsdShardingPlanner plan: sets esd + replicated
    dispatcher: str = "heuristic"
    dispatcher_kwargs: Dict = field(default_factory=dict)
    input_mode: str = "global"
    collect_tables: bool = False  # return final tables (tests)
    progress: bool = False  # tqdm progress bar on rank 0
    use_pipeline: bool = False  # ESD: drive steps with TorchRec's TrainPipelineSparseDist
    dispatch_ahead: int = 0  # ESD: dispatch this many batches ahead in a background thread (0: off)
    dense_sync: str = "ring"  # ESD: dense-gradient all-reduce, "ring" (DDP's) or "star" (torchrec_esd.distributed.dense_sync)
    auc_steps: int = 10  # AUC over the predictions of the last steps
    # DES only (method="des", see _des): "row_wise" | "table_wise"
    des_sharding: str = "row_wise"
    pooling: str = "sum"  # every table's pooling: "sum" | "mean"


def job_tables(job: JobConfig, workload) -> List[EmbeddingBagConfig]:
    """The job's embedding tables (one per sparse feature of the workload)."""
    modes = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
    if job.pooling not in modes:
        raise EsdConfigError(f"JobConfig.pooling must be 'sum' or 'mean', got {job.pooling!r}")
    return workload.table_configs(job.embedding_dim, modes[job.pooling])


class DlrmTask(nn.Module):
    """DLRM + BCE loss; ``esd_loss`` (``EsdInputDist.loss``) or ``loss_scale``
    turn the per-sample / summed loss into vanilla's gradient scale (see
    :class:`EsdInputDist`); neither: the local mean."""

    def __init__(
        self,
        model: DLRM,
        loss_scale: Optional[float] = None,
        esd_loss: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_scale = loss_scale
        self.esd_loss = esd_loss

    def forward(self, batch: Batch):
        logits = self.model(batch.dense_features, batch.sparse_features).squeeze(-1)
        if self.esd_loss is not None:
            per_sample = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
            loss = self.esd_loss(per_sample)
        elif self.loss_scale is None:
            loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        else:
            loss = (
                nn.functional.binary_cross_entropy_with_logits(logits, batch.labels, reduction="sum")
                * self.loss_scale
            )
        return loss, (loss.detach(), logits.detach(), batch.labels.detach())


class _Tracker:
    """Per-step losses, predictions of the last steps (for AUC), progress bar."""

    def __init__(self, job: JobConfig, group, rank: int, label: str) -> None:
        self.group, self.rank = group, rank
        self.losses = []
        self.step_end_s = []  # perf_counter() at the end of every step (the consumer's clock)
        self.step_end_cpu_s = []  # this process's CPU time (all threads) at the same moments
        self.preds, self.labels = [], []
        self.keep = max(1, job.auc_steps)
        self.bar = None
        if job.progress and rank == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=job.steps, desc=label, leave=False)

    def step(self, mean_loss: float, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.losses.append(mean_loss)
        self.step_end_s.append(time.perf_counter())
        self.step_end_cpu_s.append(time.process_time())
        self.preds.append(logits.detach().float())
        self.labels.append(labels.detach().float())
        self.preds, self.labels = self.preds[-self.keep :], self.labels[-self.keep :]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{mean_loss:.4f}")

    def auc(self) -> float:
        from torchmetrics.functional.classification import binary_auroc

        if self.bar is not None:
            self.bar.close()
        mine = (torch.cat(self.preds), torch.cat(self.labels))
        everyone = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(everyone, mine, group=self.group)
        p = torch.cat([e[0] for e in everyone])
        y = torch.cat([e[1] for e in everyone]).long()
        return float(binary_auroc(p, y))


def build_model(job: JobConfig, workload: SyntheticWorkload) -> DLRM:
    torch.manual_seed(job.seed)
    ebc = EmbeddingBagCollection(tables=job_tables(job, workload), device=torch.device("cpu"))
    return DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=workload.config.num_dense,
        dense_arch_layer_sizes=list(job.dense_arch) + [job.embedding_dim],
        over_arch_layer_sizes=list(job.over_arch),
    )


def sparse_optimizer(job: JobConfig) -> SparseOptimizer:
    return SparseOptimizer(job.sparse_optimizer, job.sparse_lr, job.sparse_eps)


def _dense_params(model: nn.Module):
    return [p for n, p in model.named_parameters() if "embedding_bag_collection" not in n]


def dense_param_bytes(job: JobConfig, workload) -> int:
    """Bytes of ``job``'s DLRM dense parameters (what DDP all-reduces each
    step; e.g. ``EsdShardingPlanner(dense_param_bytes=...)``)."""
    return sum(p.numel() * p.element_size() for p in _dense_params(build_model(job, workload)))


def _dense_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        if "embedding_bag_collection" in n:
            continue
        key = n
        for prefix in ("_dmp_wrapped_module.", "module."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = p.detach().clone()
    return out


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
    return track, time.perf_counter() - t0


def torchrec_dmp(job: JobConfig, workload: SyntheticWorkload, group, sharding: str = "table_wise"):
    """The job's DLRM under vanilla TorchRec ``DistributedModelParallel`` on
    ``group``: every table ``sharding`` ("table_wise" or "row_wise") by
    TorchRec's planner, the fused sparse optimizer applied in the backward."""
    from torchrec import optim as trec_optim
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import ShardingEnv
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

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
           "step_end_s": track.step_end_s, "step_end_cpu_s": track.step_end_cpu_s}
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


def _esd(job: JobConfig, workload: SyntheticWorkload) -> Dict:
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingPlan

    from torchrec_esd.dispatch import make_dispatcher
    from torchrec_esd.distributed.input_dist import EsdInputDist
    from torchrec_esd.distributed.runtime import EsdRuntime
    from torchrec_esd.distributed.sharding import EsdEmbeddingBagCollectionSharder, esd_module_plan

    if job.plan is not None:
        job = replace(job, esd=job.plan.esd_config(), replicated=tuple(job.plan.replicated))
    if job.esd is None:
        raise EsdConfigError("method 'esd' needs JobConfig.esd or JobConfig.plan")
    cfg = job.esd
    all_tables = job_tables(job, workload)
    unknown = set(job.replicated) - {t.name for t in all_tables}
    if unknown:
        raise EsdConfigError(f"replicated tables {sorted(unknown)} are not tables of the model")
    tables = [t for t in all_tables if t.name not in job.replicated]
    replicated = [t for t in all_tables if t.name in job.replicated]
    runtime = EsdRuntime(cfg, tables, sparse_optimizer(job), replicated_tables=replicated)
    dlrm = build_model(job, workload)
    if runtime.is_ps:
        runtime.serve(dlrm.sparse_arch.embedding_bag_collection)
        return {"role": "ps"}
    W = cfg.num_workers
    dispatch = EsdInputDist(runtime, make_dispatcher(job.dispatcher, **job.dispatcher_kwargs), mode=job.input_mode)
    model = DlrmTask(dlrm, esd_loss=dispatch.loss)
    ebc = dlrm.sparse_arch.embedding_bag_collection
    plan = (
        job.plan.sharding_plan(EBC_PATH)
        if job.plan is not None
        else ShardingPlan({EBC_PATH: esd_module_plan(ebc, runtime)})
    )
    dmp = DistributedModelParallel(
        model,
        env=runtime.sharding_env(),
        plan=plan,
        sharders=[EsdEmbeddingBagCollectionSharder(runtime)],
        device=torch.device("cpu"),
    )
    if job.dense_sync != "ring":
        from torchrec_esd.distributed.dense_sync import register_dense_sync

        if not register_dense_sync(dmp, job.dense_sync, [w.bandwidth_mbps for w in cfg.workers], runtime.worker_group):
            raise EsdConfigError(f"dense_sync={job.dense_sync!r}: the model has no DistributedDataParallel part")
    dense_opt = torch.optim.SGD(_dense_params(dmp), lr=job.dense_lr)
    me = runtime.worker_index
    track = _Tracker(job, runtime.worker_group, me, f"ESD {job.dispatcher}")
    decisions, t0 = [], time.perf_counter()
    samples_seen = torch.zeros(job.global_batch, dtype=torch.int64)

    bad_input: List[str] = []

    def batches():
        for step in range(job.steps):
            try:
                if job.input_mode == "global":
                    batch = workload.global_batch(step, job.global_batch)
                else:
                    batch = workload.local_batch(step, job.global_batch, me, W)
            except EsdConfigError as e:
                # every worker reads the same global batch (a local batch is a
                # slice of it), so every worker fails here; _abort_on_bad_input
                # stops the PS ranks from the training thread (dispatch-ahead
                # reads batches in its own thread, which must not talk to the PS)
                bad_input.append(f"bad input batch at step {step}: {e}")
                raise
            yield batch

    def dispatched():
        nonlocal samples_seen
        if job.dispatch_ahead > 0:
            locals_ = dispatch.dispatch_ahead(batches(), depth=job.dispatch_ahead)
        else:
            locals_ = (dispatch(batch) for batch in batches())
        for local in _abort_on_bad_input(locals_):
            samples_seen += torch.bincount(dispatch.last_mine, minlength=job.global_batch)
            if dispatch.last_result is not None:
                decisions.append(
                    {"solver": dispatch.last_result.solver, "ms": dispatch.last_result.decision_s * 1e3}
                )
            yield local

    def _abort_on_bad_input(it):
        try:
            yield from it
        except EsdConfigError:
            if bad_input:
                runtime.abort(bad_input[0])
            raise

    def record(loss, logits, labels):
        g = loss.detach().clone() / dispatch.loss_scale
        dist.all_reduce(g, group=runtime.worker_group)
        track.step(float(g) / job.global_batch, logits, labels)

    if job.use_pipeline:
        # TorchRec's pipeline runs the ESD module's (local) input_dist of the
        # next batch ahead; dispatch plans are queued in order, the PS phases
        # run in compute and backward, so the pipelined result is the same.
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        pipe = TrainPipelineSparseDist(dmp, dense_opt, torch.device("cpu"), execute_all_batches=True)
        it = dispatched()
        for _ in range(job.steps):
            loss, logits, labels = pipe.progress(it)  # the model output's second element
            record(loss, logits, labels)
    else:
        for local in dispatched():
            dense_opt.zero_grad()
            loss, (_, logits, labels) = dmp(local)
            loss.backward()
            dense_opt.step()
            record(loss, logits, labels)
    elapsed = time.perf_counter() - t0
    runtime.flush()
    out = {
        "losses": track.losses,
        "step_end_s": track.step_end_s,
        "step_end_cpu_s": track.step_end_cpu_s,
        "auc": track.auc(),
        "dense": _dense_state(dmp),
        "elapsed_s": elapsed,
        "metrics": runtime.all_metrics(),
        "decisions": decisions,
        "samples_seen": samples_seen,
    }
    if job.collect_tables:
        out["tables"], out["tables_state"] = runtime.gather_tables()
        out["tables"].update(runtime.replica_tables())
    runtime.shutdown(flush=False)
    return out


# ---------------------------------------------------------------- DES (issue 9)
def _des(job: JobConfig, workload: SyntheticWorkload, group=None) -> Dict:
    """DES sharding (torchrec_esd.des.sharding): like ``_vanilla`` (same model, local
    batches, DDP dense), but the EBC is sharded by the DES sharder: partial
    sums are pooled next to the weight shards and exchanged instead of rows."""
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    from torchrec_esd.des.sharding import DesEmbeddingBagCollectionSharder, des_module_plan, find_des_modules

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


def run(job: JobConfig) -> Dict:
    """Run ``job`` on this rank (torch.distributed must be initialised).

    ``vanilla`` uses the first ``W`` ranks of the world (``W`` = the ESD
    config's workers if one is given, else the whole world); other ranks
    (an ESD job's PS ranks) idle, so both methods can run in one torchrun world.
    """
    # a workload config with make_workload() (torchrec_esd.apps.criteo.CriteoTsvConfig)
    # builds its own workload; a SyntheticWorkloadConfig the synthetic one
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
            from torchrec_esd.distributed.runtime import esd_process_groups

            group = esd_process_groups(job.esd)[1]
        if dist.get_rank() >= W:
            return {"role": "idle"}
        return _vanilla(job, workload, group)
    if job.method == "esd":
        return _esd(job, workload)
    if job.method == "des":
        return _des(job, workload)
    raise EsdConfigError(f"unknown method {job.method!r}; use 'vanilla', 'esd' or 'des'")
