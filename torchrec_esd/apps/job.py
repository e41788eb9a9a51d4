"""What every method of a DLRM training job shares (vanilla TorchRec, ESD,
DES; see :mod:`~torchrec_esd.apps.trainer`): the job's description
(:class:`JobConfig`), its embedding tables, the DLRM model and its loss
(:class:`DlrmTask`), the sparse optimizer, the dense-parameter helpers and the
per-step tracker (losses, step times, AUC over the last steps).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from tqdm import tqdm

from torchrec_esd.apps.step_metrics import StepMetrics
from torchrec_esd.apps.workload import SyntheticWorkload, SyntheticWorkloadConfig
from torchrec_esd.config import EsdConfig, EsdConfigError
from torchrec_esd.distributed.planner import EsdPlan
from torchrec_esd.ps import SparseOptimizer
from torchrec_esd.ps.row_storage import HashedUniformInit

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
    # ESD: return the final rows of the ids the batches used, {table: (ids, rows)} as
    # "touched_tables" (pulled from the PS: lazy tables stay unmaterialised, unlike collect_tables)
    collect_rows: bool = False
    progress: bool = False  # tqdm progress bar on rank 0
    use_pipeline: bool = False  # ESD: drive steps with TorchRec's TrainPipelineSparseDist
    dispatch_ahead: int = 0  # ESD: dispatch this many batches ahead in a background thread (0: off)
    dense_sync: str = "ring"  # ESD: dense-gradient all-reduce, "ring" (DDP's) or "star" (torchrec_esd.distributed.dense_sync)
    auc_steps: int = 10  # AUC over the predictions of the last steps
    # DES only (method="des", see _des): "row_wise" | "table_wise"
    des_sharding: str = "row_wise"
    pooling: str = "sum"  # every table's pooling: "sum" | "mean"
    # checkpoints (apps/checkpointing.py): DCP of TorchRec's state_dict every N steps, resume from the latest
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0  # 0: only at the end and on SIGTERM (with checkpoint_dir)
    resume: bool = False  # start from checkpoint_dir's latest checkpoint (if there is one)
    # per-step records (torchrec_esd.apps.step_metrics): JSON lines appended here by worker 0,
    # and TensorBoard scalars under this directory (needs the tensorboard package)
    metrics_jsonl: Optional[str] = None
    tensorboard_dir: Optional[str] = None
    # called on every worker after each training step with the step's index (from 0),
    # e.g. by a benchmark that changes a link mid-run
    on_step: Optional[Callable[[int], None]] = None
    # ESD: also report the training steps' traffic from this step on (counted from the run's
    # first step; the steps after a benchmark's warm-up, without the end-of-training
    # write-back) as "metrics_steady"
    steady_from_step: Optional[int] = None
    # tables initialised per (table, row) from a hash of (seed, table, id) (ps.row_storage.HashedUniformInit),
    # on every method alike; ESD's PS then creates rows on first touch (LazyRowStorage)
    lazy_tables: bool = False


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


def job_label(job: JobConfig) -> str:
    """The job's name in metrics records: vanilla, esd:<dispatcher>, des:<sharding>."""
    if job.method == "esd":
        return f"esd:{job.dispatcher}"
    if job.method == "des":
        return f"des:{job.des_sharding}"
    return job.method


class _Tracker:
    """Per-step losses, predictions of the last steps (for AUC), progress bar,
    and the per-step metrics records when the job asks for them."""

    def __init__(self, job: JobConfig, group, rank: int, label: str) -> None:
        self.group, self.rank = group, rank
        self.losses = []
        self.step_end_s = []  # perf_counter() at the end of every step (the consumer's clock)
        self.step_end_cpu_s = []  # this process's CPU time (all threads) at the same moments
        self.preds, self.labels = [], []
        self.keep = max(1, job.auc_steps)
        self.on_step = job.on_step
        self.bar = None
        if job.progress and rank == 0:
            self.bar = tqdm(total=job.steps, desc=label, leave=False)
        self.metrics = None
        if job.metrics_jsonl is not None or job.tensorboard_dir is not None:
            bws = [w.bandwidth_mbps for w in job.esd.workers] if job.method == "esd" and job.esd else None
            self.metrics = StepMetrics(job_label(job), group, job.metrics_jsonl, job.tensorboard_dir, bws)

    @property
    def steps_ended(self) -> int:
        return len(self.step_end_s)

    def end_step(self) -> int:
        """The end of a step whose loss comes later (:meth:`step`): its wall
        and CPU clocks now, ``on_step``; returns its index."""
        self.step_end_s.append(time.perf_counter())
        self.step_end_cpu_s.append(time.process_time())
        if self.on_step is not None:
            self.on_step(len(self.step_end_s) - 1)
        return len(self.step_end_s) - 1

    def step(self, mean_loss: float, logits: torch.Tensor, labels: torch.Tensor,
             meter: Optional[Dict] = None, decision: Optional[Dict] = None) -> None:
        """The loss of the oldest step without one (ended by :meth:`end_step`).
        ``meter`` / ``decision``: the ESD worker's transmission counters at the
        step's end and the step's dispatch decision, for the per-step metrics."""
        if len(self.step_end_s) <= len(self.losses):
            raise RuntimeError("_Tracker.step: no ended step without a loss (call end_step at the step's end)")
        if self.metrics is not None:
            self.metrics.step(mean_loss, meter, decision)
        self.losses.append(mean_loss)
        self.preds.append(logits.detach().float())
        self.labels.append(labels.detach().float())
        self.preds, self.labels = self.preds[-self.keep :], self.labels[-self.keep :]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{mean_loss:.4f}")

    def write_metrics(self) -> None:
        """Write the per-step records (collective on the job's group)."""
        if self.metrics is not None:
            self.metrics.close()

    def auc(self) -> float:
        # imported here: torchmetrics takes ~1.3 s to import, and only the end
        # of a job needs it
        from torchmetrics.functional.classification import binary_auroc

        if self.bar is not None:
            self.bar.close()
        mine = (torch.cat(self.preds), torch.cat(self.labels)) if self.preds else (torch.empty(0), torch.empty(0))
        everyone = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(everyone, mine, group=self.group)
        p = torch.cat([e[0] for e in everyone])
        y = torch.cat([e[1] for e in everyone]).long()
        if y.numel() == 0:  # no step trained (e.g. resumed at the last step)
            return float("nan")
        return float(binary_auroc(p, y))


def build_model(job: JobConfig, workload: SyntheticWorkload, materialize_tables: bool = True) -> DLRM:
    """The job's DLRM.  With ``lazy_tables`` the collection is built on the
    meta device (no table-sized tensor, no draw from the RNG, so the dense
    layers start alike whatever the tables' sizes) and, with
    ``materialize_tables`` (vanilla TorchRec), then allocated on the CPU and
    filled from :func:`table_init`; an ESD job keeps it on the meta device
    (its PS creates rows on first touch, its sharded module never reads
    the collection's ESD tables)."""
    torch.manual_seed(job.seed)
    device = torch.device("meta" if job.lazy_tables else "cpu")
    ebc = EmbeddingBagCollection(tables=job_tables(job, workload), device=device)
    if job.lazy_tables and materialize_tables:
        materialize(ebc, table_init(job, workload), [t.name for t in ebc.embedding_bag_configs()])
    return DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=workload.config.num_dense,
        dense_arch_layer_sizes=list(job.dense_arch) + [job.embedding_dim],
        over_arch_layer_sizes=list(job.over_arch),
    )


def materialize(ebc: EmbeddingBagCollection, init, names) -> None:
    """Allocate the tables ``names`` of a meta-device collection on the CPU
    and fill them from ``init`` (``init.rows_of(table index, ids)``, e.g. a
    :class:`HashedUniformInit`): O(rows x dim) each."""
    with torch.no_grad():
        for name in names:
            bag = ebc.embedding_bags[name]
            bag.to_empty(device=torch.device("cpu"))
            rows = bag.weight.shape[0]
            bag.weight.copy_(init.rows_of(init.names.index(name), torch.arange(rows)).to(bag.weight.dtype))


def max_rss_bytes() -> int:
    """This process's peak resident set size so far (bytes; Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def table_init(job: JobConfig, workload) -> HashedUniformInit:
    """The per-(table, row) initialiser of a ``lazy_tables`` job (the
    workload's own, e.g. :class:`~torchrec_esd.apps.hashed_workload.HashedWorkload`'s,
    where it has one)."""
    own = getattr(workload, "table_init", None)
    if own is not None:
        return own(job_tables(job, workload), job.seed)
    return HashedUniformInit(job_tables(job, workload), seed=job.seed)


def sparse_optimizer(job: JobConfig) -> SparseOptimizer:
    return SparseOptimizer(job.sparse_optimizer, job.sparse_lr, job.sparse_eps)


def _dense_params(model: nn.Module):
    return [p for n, p in model.named_parameters() if "embedding_bag_collection" not in n]


def dense_param_bytes(job: JobConfig, workload) -> int:
    """Bytes of ``job``'s DLRM dense parameters (what DDP all-reduces each
    step; e.g. ``EsdShardingPlanner(dense_param_bytes=...)``)."""
    return sum(p.numel() * p.element_size() for p in _dense_params(build_model(job, workload, materialize_tables=False)))


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
