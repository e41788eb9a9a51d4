"""Per-rank ESD runtime: the worker role and the parameter-server role.

A job of ``W`` workers and ``P`` parameter servers is one ``torchrun`` world of
``W + P`` ranks: ranks ``0..W-1`` are workers (they run the model under
``DistributedModelParallel`` on the workers-only process group), ranks
``W..W+P-1`` are parameter servers.  ``EsdRuntime(config, tables, optimizer)``
builds this rank's role, the same call on every rank:

* :class:`EsdWorkerRuntime`: the replicated cache directory, the PS client,
  the plan channel from :class:`~torchrec_esd.distributed.input_dist.EsdInputDist`
  to the sharded module, the transmission meter;
* :class:`EsdPsRuntime`: :meth:`~EsdPsRuntime.serve` runs the parameter server.

Both share the topology checks (same config, tables and optimizer on every
rank), the process groups, the key space, the PS transport and the fault
monitor (:mod:`~torchrec_esd.distributed.faults`, unless
``EsdConfig.fault_timeout_s`` is ``None``): a rank that is killed, stopped or
fails ends every rank within a bounded time with a message naming it.  Asking a role
for the other role's API is an :class:`EsdConfigError` that says so.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import timedelta
from typing import Dict, List, NoReturn, Optional, Sequence

import torch
import torch.distributed as dist
from torchrec.distributed.collective_utils import init_collective_validation
from torchrec.distributed.types import ShardingEnv
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd.batch_select import select_kjt_keys
from torchrec_esd.cache import CacheDirectory, IterationPlan
from torchrec_esd.config import EsdConfig, EsdConfigError
from torchrec_esd.distributed.link_estimates import LinkEstimates
from torchrec_esd.distributed.faults import FaultMonitor, job_prefix, rank_roles
from torchrec_esd.distributed.loss_scaling import LossScaling
from torchrec_esd.distributed.plan_channel import PlanChannel
from torchrec_esd.layout import EsdIdError, KeySpace, table_fingerprint
from torchrec_esd.log import set_role
from torchrec_esd.metrics import TransmissionMeter
from torchrec_esd.optim import SparseOptimizer
from torchrec_esd.ps import GlooP2PTransport, ParameterServer, PsClient
from torchrec_esd.ps.row_storage import HashedUniformInit, LazyRowStorage
from torchrec_esd.ps.server import arrival_order


_GROUPS: Dict[tuple, tuple] = {}

logger = logging.getLogger(__name__)


def initial_weight(weight: torch.Tensor, table: EmbeddingBagConfig) -> torch.Tensor:
    """A table's initial rows: its weight, or, for a table built on the meta
    device, fresh rows drawn as TorchRec's sharded kernels draw them
    (``uniform(weight_init_min, weight_init_max)``, ``-+sqrt(1 / rows)`` by default)."""
    if not weight.is_meta:
        return weight.detach()
    out = torch.empty(tuple(weight.shape), dtype=torch.float32)
    return out.uniform_(table.get_weight_init_min(), table.get_weight_init_max())


def esd_process_groups(config: EsdConfig):
    """(all-ranks gloo group, workers-only group, workers-only gloo dispatch
    group, workers-only gloo estimates group) of ``config``'s topology.  The
    dispatch group carries only
    :class:`~torchrec_esd.distributed.input_dist.EsdInputDist`'s collectives when it
    dispatches ahead in a background thread (a group is never shared by two
    threads, so collectives cannot interleave differently on two ranks); the
    estimates group only the all-gathers of the link observations, which the
    training thread starts after each PS push/pull
    (:meth:`~torchrec_esd.distributed.link_estimates.LinkEstimates.publish`).

    Created once per process and reused by every runtime of the same
    topology.  Group names come from a per-process counter, so call this on
    every rank *before* anything that creates groups on a subset of ranks only
    (e.g. a vanilla TorchRec job on the worker ranks in the same world).
    """
    key = (dist.get_world_size(), config.num_workers, config.collective_timeout_s)
    if key not in _GROUPS:
        if dist.get_world_size() != config.world_size:
            raise EsdConfigError(
                f"world size {dist.get_world_size()} does not match the ESD topology: "
                f"{config.num_workers} workers + {config.num_ps} parameter servers = "
                f"{config.world_size} ranks"
            )
        timeout = timedelta(seconds=config.collective_timeout_s)
        all_group = dist.new_group(list(range(config.world_size)), timeout=timeout, backend="gloo")
        worker_group = dist.new_group(list(range(config.num_workers)), timeout=timeout)
        dispatch_group = dist.new_group(list(range(config.num_workers)), timeout=timeout, backend="gloo")
        estimates_group = dist.new_group(list(range(config.num_workers)), timeout=timeout, backend="gloo")
        _GROUPS[key] = (all_group, worker_group, dispatch_group, estimates_group)
    return _GROUPS[key]


def _require_initialised() -> None:
    if not dist.is_initialized():
        raise EsdConfigError(
            "torch.distributed is not initialised: launch with torchrun and call "
            "dist.init_process_group() before creating the EsdRuntime"
        )


class EsdRuntime:
    """This rank's ESD role; every rank makes the same call.

    ``EsdRuntime(config, tables, optimizer, replicated_tables)`` returns an
    :class:`EsdWorkerRuntime` on ranks ``0..W-1`` and an :class:`EsdPsRuntime`
    on the others (``runtime.is_worker`` / ``runtime.is_ps`` tell which).

    Args:
        config: the topology; every rank must pass an identical one.
        tables: the ESD-managed tables (``EmbeddingBagCollection`` configs), in
            key order (:class:`~torchrec_esd.layout.KeySpace`).
        optimizer: sparse optimizer applied by the PS and by workers' local updates.
        replicated_tables: tables kept whole on every worker (data parallel).
    """

    is_worker = False
    is_ps = False
    # the job's ESD tables are lazy (PS rows created on first touch; the job sets
    # it on every rank): snapshots and loads of them are refused (distributed/checkpoint.py)
    lazy_tables = False

    def __new__(cls, config: EsdConfig, *args, **kwargs):
        if cls is EsdRuntime:
            _require_initialised()
            cls = EsdWorkerRuntime if dist.get_rank() < config.num_workers else EsdPsRuntime
        return super().__new__(cls)

    def __init__(
        self,
        config: EsdConfig,
        tables: Sequence[EmbeddingBagConfig],
        optimizer: SparseOptimizer,
        replicated_tables: Sequence[EmbeddingBagConfig] = (),
    ) -> None:
        _require_initialised()
        self.config = config
        self.tables = list(tables)
        self.replicated_tables = list(replicated_tables)
        self.optimizer = optimizer
        both = [t.name for t in self.tables] + [t.name for t in self.replicated_tables]
        if len(set(both)) != len(both):
            raise EsdConfigError(f"a table is both ESD-managed and replicated: {both}")
        self.esd_features = [f for t in self.tables for f in t.feature_names]
        self.replicated_features = [f for t in self.replicated_tables for f in t.feature_names]
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if self.world_size != config.world_size:
            raise EsdConfigError(
                f"world size {self.world_size} does not match the ESD topology: "
                f"{config.num_workers} workers + {config.num_ps} parameter servers = "
                f"{config.world_size} ranks"
            )
        self.all_group, self.worker_group, self.dispatch_group, self.estimates_group = esd_process_groups(config)
        # the one owner of row keys, PS blocks and row formats on this rank
        self.keyspace = KeySpace(self.tables, config.num_ps, state_dim=optimizer.state_dim)
        self._check_same_config_everywhere()
        # DMP's constructor broadcasts TorchRec's collective-validation flag over its
        # env's group when that group spans the world; settled here on every rank, so
        # that a DMP given the world (no env=runtime.sharding_env()) reaches the ESD
        # sharder's check instead of waiting for the parameter servers forever
        init_collective_validation(self.all_group)
        config.validate_tables({t.name: t.num_embeddings for t in self.tables})
        self.transport = GlooP2PTransport(
            self.all_group, self.world_size, config.ps_ranks(), config.collective_timeout_s
        )
        set_role("worker" if self.is_worker else "ps")
        logger.info(
            "ESD runtime up: %d workers + %d parameter servers, %d ESD tables (%d replicated), "
            "%s, staleness %d, objective %s",
            config.num_workers, config.num_ps, len(self.tables), len(self.replicated_tables),
            optimizer.name, config.staleness, config.objective,
        )
        self.dispatched_batches = 0  # batches that entered EsdInputDist (workers; the run-out check)
        prefix = job_prefix()  # on every rank, monitored or not, so that prefixes agree
        self.faults: Optional[FaultMonitor] = None
        if config.fault_timeout_s is not None:
            self.faults = FaultMonitor(
                dist.distributed_c10d._get_default_store(), self.rank, self.world_size,
                rank_roles(config.num_workers), config.fault_timeout_s, prefix,
                workers=range(config.num_workers), progress=lambda: self.dispatched_batches,
                hosts_store=self.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True",
            ).start()

    def report_failure(self, error: BaseException | str) -> None:
        """Publish this rank's failure (every other rank ends with its message)
        and stop the fault monitor."""
        if self.faults is not None:
            self.faults.fail(error)

    def close_monitor(self) -> None:
        """Publish ``done``: other ranks stop timing this one."""
        if self.faults is not None:
            self.faults.close()

    def _check_same_config_everywhere(self) -> None:
        mine = json.dumps(
            {"config": self.config.to_dict(), "tables": self.keyspace.fingerprint(),
             "replicated": [table_fingerprint(t) for t in self.replicated_tables],
             "optimizer": [self.optimizer.name, self.optimizer.lr, self.optimizer.eps]},
            sort_keys=True,
        )
        everyone: List[Optional[str]] = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.all_group)
        bad = [r for r, s in enumerate(everyone) if s != everyone[0]]
        if bad:
            raise EsdConfigError(
                f"ranks {bad} hold a different ESD config / table configs / optimizer than "
                f"rank 0 (mismatched configs between ranks); rank 0 has {everyone[0]}, "
                f"rank {bad[0]} has {everyone[bad[0]]}"
            )

    def ps_optimizer(self) -> SparseOptimizer:
        return self.optimizer


# what a worker role holds beyond its methods (named in the PS role's errors)
_WORKER_STATE = ("directory", "client", "meter", "plans", "loss_scaling", "link_estimates", "compute_estimates")


class EsdPsRuntime(EsdRuntime):
    """A parameter-server rank: :meth:`serve` until the workers stop."""

    is_ps = True

    def serve(self, ebc: EmbeddingBagCollection, init: Optional[HashedUniformInit] = None) -> ParameterServer:
        """Run this PS rank until the workers stop; initial table values come
        from ``ebc`` (built with the same seed as on the workers; tables on the
        meta device are drawn as TorchRec draws them), or, with ``init``, rows
        are created on first touch from it (:class:`~torchrec_esd.ps.row_storage.LazyRowStorage`:
        memory O(rows touched); ``ebc``'s weights are not read)."""
        p = self.rank - self.config.num_workers
        try:
            storage, weights = None, None
            if init is not None:
                storage = LazyRowStorage(self.keyspace, p, self.optimizer.state_dim, init)
            else:
                configs = {t.name: t for t in ebc.embedding_bag_configs()}
                weights = {
                    name: initial_weight(bag.weight, configs[name])
                    for name, bag in ebc.embedding_bags.items()
                    if name in self.keyspace.names
                }
            # rows' gradients are summed, and a split exchange's values taken, fastest configured link first
            order = arrival_order([w.bytes_per_second for w in self.config.workers])
            server = ParameterServer(
                p, self.keyspace, self.optimizer, self.transport, weights, des=self.config.des_misses, storage=storage,
                arrival_order=order,
            )
            logger.info("parameter server %d serving %d tables%s", p, self.keyspace.num_tables,
                        " (rows created on first touch)" if init is not None else "")
            server.serve()
        except BaseException as e:
            self.report_failure(e)
            raise
        logger.info("parameter server %d stopped: the workers are done", p)
        self.close_monitor()
        return server

    def __getattr__(self, name: str):
        if not name.startswith("_") and (hasattr(EsdWorkerRuntime, name) or name in _WORKER_STATE):
            raise EsdConfigError(
                f"rank {self.rank} is a parameter server: EsdRuntime.{name} belongs to worker ranks "
                f"(ranks 0..{self.config.num_workers - 1}); a PS rank only calls runtime.serve(ebc)"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


class EsdWorkerRuntime(EsdRuntime):
    """A worker rank: the replicated cache directory, the PS client, the plan
    channel from the input dist to the sharded module, the meter."""

    is_worker = True

    def __init__(
        self,
        config: EsdConfig,
        tables: Sequence[EmbeddingBagConfig],
        optimizer: SparseOptimizer,
        replicated_tables: Sequence[EmbeddingBagConfig] = (),
    ) -> None:
        super().__init__(config, tables, optimizer, replicated_tables)
        self._esd_feature_set = frozenset(self.esd_features)
        # worker 0 dispatches (needs every cache); the others track their own, or every
        # cache with prefetch (its rule reads every worker's pushes: planning all W
        # caches costs CPU in the dispatch thread, where gathering the pushes instead
        # cost each worker's link a collective per step, 17 ms of the 10 Mbit/s one's)
        track_all = self.rank == 0 or config.prefetch_depth > 0
        self.directory = CacheDirectory(
            config, self.tables, track=None if track_all else [self.rank],
            optimizer_state_dim=optimizer.state_dim, keyspace=self.keyspace,
        )
        self.client = PsClient(self.keyspace, optimizer, self.transport, des=config.des_misses,
                               timed_replies=config.online_links)
        self.meter = TransmissionMeter()
        # every worker's link as measured (EsdConfig.online_links), the same on every worker
        self.link_estimates = LinkEstimates(config, self.rank) if config.online_links else None
        # every worker's compute time per sample as measured (torchrec_esd.distributed.compute_estimates),
        # set by EsdInputDist when its dispatcher prices compute with it
        self.compute_estimates = None
        # bytes the dense all-reduce moves on every worker's link per step and direction
        # (set_dense_sync; None: not known, priced at 0)
        self.dense_link_bytes: Optional[List[float]] = None
        self.dense_chunks = 1  # pieces the star cuts the gradients into (its directions overlap)
        self.computing: Optional[IterationPlan] = None  # the plan of the iteration the module computes
        self.plans = PlanChannel()
        self.loss_scaling = LossScaling(config)
        self._executor = None  # the sharded embedding module of this worker

    def set_dense_sync(self, mode: str, dense_bytes: int) -> None:
        """The dense all-reduce the job runs (``"ring"`` or ``"star"``, see
        :mod:`~torchrec_esd.distributed.dense_sync`) over ``dense_bytes`` of
        gradients per step: the share rules price its time on every link
        (:meth:`dense_sync_seconds`), a fixed cost of every step whatever the
        worker's samples."""
        from torchrec_esd.distributed.dense_sync import link_bytes_per_step, star_chunks

        if not (isinstance(dense_bytes, int) and dense_bytes >= 0):
            raise EsdConfigError(f"dense_bytes must be an integer >= 0, got {dense_bytes!r}")
        self.dense_link_bytes = link_bytes_per_step(mode, [w.bandwidth_mbps for w in self.config.workers],
                                                    dense_bytes)
        # (as one DDP bucket: DLRM's dense part is far below DDP's first 1 MB bucket)
        self.dense_chunks = star_chunks(dense_bytes // 4) if mode == "star" else 1

    def dense_sync_seconds(self, bytes_per_s: Optional[Sequence[float]] = None, idle: bool = False) -> List[float]:
        """Seconds of every worker's step in the dense all-reduce at
        ``bytes_per_s`` (default: the configured links;
        :func:`~torchrec_esd.distributed.dense_sync.sync_seconds`), 0 where
        :meth:`set_dense_sync` was not called.  ``idle``: for a worker without
        samples, which only receives the mean (one way of its link bytes; the
        hub, which relays the others' gradients either way, is priced the
        same, its link being the fastest)."""
        from torchrec_esd.distributed.dense_sync import sync_seconds

        bps = [w.bytes_per_second for w in self.config.workers] if bytes_per_s is None else list(bytes_per_s)
        if self.dense_link_bytes is None:
            return [0.0] * len(bps)
        if idle:
            return [float(b) / float(r) for b, r in zip(self.dense_link_bytes, bps)]
        return sync_seconds(self.dense_link_bytes, bps, self.dense_chunks)

    @property
    def worker_index(self) -> int:
        return self.rank

    def serve(self, ebc: EmbeddingBagCollection) -> NoReturn:
        raise EsdConfigError(
            f"rank {self.rank} is a worker; only parameter-server ranks "
            f"({self.config.num_workers}..{self.world_size - 1}) serve"
        )

    @property
    def link(self):
        return self.config.workers[self.worker_index]

    def esd_view(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """``kjt`` restricted to the features of ESD-managed tables (replicated
        tables' features never reach the directory, the cost model or the PS, nor
        do features no table reads, which TorchRec's EmbeddingBagCollection ignores)."""
        if not self.replicated_tables and all(k in self._esd_feature_set for k in kjt.keys()):
            return kjt
        return select_kjt_keys(kjt, self.esd_features)

    def check_replicated_ids(self, kjt: KeyedJaggedTensor) -> None:
        """Ids of replicated tables' features must be inside their tables."""
        for t in self.replicated_tables:
            for f in t.feature_names:
                if f not in kjt.keys():
                    raise EsdIdError(f"batch has no feature {f!r} (replicated table {t.name!r})")
                v = kjt[f].values()
                if v.numel() and (int(v.min()) < 0 or int(v.max()) >= t.num_embeddings):
                    bad = v[(v < 0) | (v >= t.num_embeddings)][0]
                    raise EsdIdError(
                        f"feature {f!r}: id {int(bad)} is outside table {t.name!r} of {t.num_embeddings} rows"
                    )

    def sharding_env(self) -> ShardingEnv:
        """The ``ShardingEnv`` to give ``DistributedModelParallel`` on workers."""
        return ShardingEnv(self.config.num_workers, self.worker_index, self.worker_group)

    # ------------------------------------------------------------ the sharded module
    def attach(self, executor) -> None:
        if self._executor is not None:
            raise EsdConfigError("one EsdRuntime serves one sharded EmbeddingBagCollection")
        self._executor = executor

    def enqueue(self, plan: IterationPlan) -> None:
        """Hand ``plan`` to the sharded module (the plan channel checks the order)."""
        self.plans.put(plan)

    def next_plan(self) -> IterationPlan:
        """The plan of the next iteration the sharded module computes."""
        self.computing = self.plans.take()
        return self.computing

    def dense_senders(self) -> Optional[List[bool]]:
        """Which workers have samples in the iteration the sharded module
        computes (its plan's ``sample_counts``; None: unknown, all send): the
        star all-reduce takes dense gradients only from them (a worker without
        samples has none to give), and every worker gets the mean."""
        plan = self.computing
        if plan is None or plan.sample_counts is None:
            return None
        return [c > 0 for c in plan.sample_counts]

    def flush(self) -> None:
        """Push every dirty cached row to the PS (checkpoint / end of training)."""
        if self._executor is None:
            raise EsdConfigError("flush() needs the sharded embedding module to be built")
        problem = self.loss_scaling.unscaled()
        if problem is not None:
            self.fail(problem)
        if self.plans.pending:
            raise EsdConfigError(
                f"{self.plans.pending} batch(es) went through EsdInputDist but were never trained; the "
                "cache directory already counts their updates, so flushing now would push wrong rows "
                "(train every dispatched batch, or stop a dispatch-ahead iterator only after its last batch)"
            )
        self._executor.flush()
        logger.debug("flushed the dirty cached rows to the parameter servers")

    def replica_tables(self) -> Dict[str, torch.Tensor]:
        """This worker's copies of the replicated (data-parallel) tables."""
        return self._executor.replica_tables() if self._executor is not None else {}

    def pull_rows(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """``[n, dim]`` current values of rows ``ids`` of ESD table ``table``
        from the PS ranks (call :meth:`flush` first; every worker calls it,
        with the same ids): O(n), it touches nothing else (lazy tables)."""
        if table not in self.keyspace.names:
            raise EsdConfigError(f"pull_rows: {table!r} is not an ESD table ({self.keyspace.names})")
        t = self.keyspace.names.index(table)
        ids = torch.as_tensor(ids, dtype=torch.int64).view(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= int(self.keyspace.rows[t])):
            raise EsdConfigError(f"pull_rows: ids of table {table!r} outside [0, {int(self.keyspace.rows[t])})")
        empty = torch.empty(0, dtype=torch.int64)
        got, _, _ = self.client.push_pull(empty, torch.empty(0, self.keyspace.wire_dim + self.optimizer.state_dim),
                                          self.keyspace.keys(t, ids))
        return got[:, : self.keyspace.formats[t].dim].clone()

    def gather_tables(self):
        """(weights, optimizer states) of every table, from the PS ranks, on
        every worker.  Call :meth:`flush` first to include dirty cached rows."""
        return self.client.gather_tables()

    # ------------------------------------------------------------ ending the job
    def end_of_batches(self) -> None:
        """This worker has trained its last batch: a worker that still
        dispatches another one fails every rank (it would wait forever) with a
        message naming both.  :meth:`shutdown` calls it."""
        if self.faults is not None:
            self.faults.end_of_batches()

    def shutdown(self, flush: bool = True) -> None:
        """Flush (by default) and stop the PS ranks; call on every worker."""
        self.end_of_batches()
        if flush and self._executor is not None:
            self.flush()
        self.client.stop()
        self.close_monitor()

    def abort(self, msg: str) -> None:
        """Make the PS ranks fail with ``msg``; call on every worker."""
        logger.error("aborting the parameter servers: %s", msg)
        self.client.abort(msg)
        self.report_failure(msg)

    def fail(self, msg: str) -> NoReturn:
        """Abort the PS ranks with ``msg`` and raise it here: for a misuse that
        every worker finds at the same point, so that no rank waits forever."""
        self.abort(msg)
        raise EsdConfigError(msg)

    def require_sharded_module(self) -> None:
        """Fail (every rank) when no ESD-sharded module is attached: DMP leaves a
        module whose path matches no plan key unsharded (plain, data parallel),
        which would train while the dispatch plans pile up unused."""
        if self._executor is None:
            self.fail(
                "no EmbeddingBagCollection was sharded by ESD, so the model would train its tables "
                "as plain replicated modules: build DistributedModelParallel with "
                "sharders=[EsdEmbeddingBagCollectionSharder(runtime)] and a ShardingPlan whose key is "
                "the collection's path in the model (e.g. 'sparse_arch.embedding_bag_collection' "
                "for TorchRec's DLRM; DMP silently skips plan keys that name no module) before the "
                "first batch goes through EsdInputDist"
            )

    # ------------------------------------------------------------ metrics
    def metrics(self) -> Dict:
        return self.meter.as_dict()

    def all_metrics(self) -> Dict:
        """Per-worker transmission metrics gathered on every worker."""
        return self.gather_metrics(self.metrics())  # type: ignore[return-value]

    def gather_metrics(self, mine: Optional[Dict]) -> Optional[Dict]:
        """Every worker's ``mine`` (a :meth:`TransmissionMeter.as_dict`-shaped
        dict, e.g. the traffic of some steps) gathered on every worker and
        summarised; ``None`` on every worker when one of them has none (a
        collective of the worker group: every worker calls it)."""
        out: List[Optional[Dict]] = [None] * self.config.num_workers
        dist.all_gather_object(out, mine, group=self.worker_group)
        if any(m is None for m in out):
            return None
        return TransmissionMeter.summarize(out)  # type: ignore[arg-type]
