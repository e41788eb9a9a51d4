"""EsdShardingPlanner: plans for heterogeneous edge workers.

TorchRec's planner knows per-rank memory but a single bandwidth.  This planner
takes every worker's memory, compute speed, bandwidth and latency, and every
PS's memory, plus (optionally) a sample of the workload, and decides:

* which tables are *replicated* on every worker (plain data parallel: whole
  table, all-reduced gradients) -- a table whose rows are fewer than the
  distinct ids a worker touches per iteration costs less to all-reduce than to
  keep synchronising through the PS;
* each worker's cache capacity per ESD table, filling its memory budget with
  the rows of highest access frequency per byte (measured on the sample; in
  proportion to table size without one);
* each worker's share ``B_w`` of the global batch, so that the predicted time
  per iteration is equal across workers: compute, plus the rows the worker
  moves at that share (replayed through the cache directory on the sample, so
  that rows every worker pays once per iteration are not scaled with the
  share) and its part of the dense gradient all-reduce, over its own link;
* the PS layout (every table row-wise over all PS ranks, contiguous blocks:
  bytes balanced to a row; expected traffic per PS measured on the sample).

The result, :class:`EsdPlan`, prints as a table, round-trips through JSON,
builds the :class:`EsdConfig` of the runtime and the TorchRec ``ShardingPlan``
that ``DistributedModelParallel`` takes with the ESD sharder.  Per-worker
memory is held in a TorchRec :class:`Topology` (one device per worker), and
``ParameterConstraints(sharding_types=[...])`` forces a table's choice.

This module holds the planner (:class:`EsdShardingPlanner`); the plan and the
resources it takes are in :mod:`~torchrec_esd.distributed.plan_types` and
re-exported here (``__all__``).
"""

from __future__ import annotations

import logging
import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torchrec.distributed.planner.types import ParameterConstraints, Topology
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd.batch_select import select_kjt_keys
from torchrec_esd.cache import CacheDirectory
from torchrec_esd.config import EsdConfig, EsdConfigError, WorkerSpec
from torchrec_esd.distributed.dense_sync import DENSE_SYNCS, link_bytes_per_step
from torchrec_esd.distributed.plan_types import ESD, REPLICATED, EsdPlan, PsResources, WorkerResources

logger = logging.getLogger(__name__)

DIRECTORY_BYTES_PER_ROW = 16  # the replicated cache directory: version + owner per ESD row

__all__ = [
    "DIRECTORY_BYTES_PER_ROW",
    "ESD",
    "REPLICATED",
    "EsdPlan",
    "EsdShardingPlanner",
    "PsResources",
    "WorkerResources",
]


class EsdShardingPlanner:
    """Plans an ESD deployment; see the module docstring.

    Args:
        workers / ps: resources of each worker and parameter server.
        tables: the EmbeddingBagCollection's tables (one embedding_dim).
        sample: batches (KJT) of the workload to measure access skew on.
        global_batch_size: samples per iteration (for per-iteration estimates).
        optimizer_state_per_row: optimizer floats per row (row-wise Adagrad: 1).
        constraints: per table, ``ParameterConstraints(sharding_types=[...])``
            with ``"data_parallel"`` or ``"esd_ps_cache"`` forces the choice.
        dense_param_bytes: bytes of the model's dense (data-parallel)
            parameters, whose gradients cross every worker's link each step.
        dense_sync: how the dense gradients are all-reduced: ``"ring"``
            (DDP's: ``2 (W - 1) / W`` of them over every link) or ``"star"``
            (:mod:`torchrec_esd.distributed.dense_sync`: once over every link but the
            fastest worker's, which carries ``W - 1`` times them); see
            :func:`torchrec_esd.distributed.dense_sync.link_bytes_per_step`.
        share_rounds: rebalancing rounds of the shares (each replays the
            sample at the current shares); 0 keeps the shares of the
            per-sample model measured at equal shares.
    """

    def __init__(
        self,
        workers: Sequence[WorkerResources],
        ps: Sequence[PsResources],
        tables: Sequence[EmbeddingBagConfig],
        sample: Optional[Iterable[KeyedJaggedTensor]] = None,
        global_batch_size: int = 512,
        optimizer_state_per_row: int = 1,
        constraints: Optional[Mapping[str, ParameterConstraints]] = None,
        value_bytes: int = 4,
        dense_param_bytes: int = 0,
        share_rounds: int = 3,
        dense_sync: str = "ring",
    ) -> None:
        if dense_sync not in DENSE_SYNCS:
            raise EsdConfigError(f"dense_sync must be one of {DENSE_SYNCS}, got {dense_sync!r}")
        self.dense_sync = dense_sync
        if dense_param_bytes < 0:
            raise EsdConfigError(f"dense_param_bytes must be >= 0, got {dense_param_bytes}")
        if share_rounds < 0:
            raise EsdConfigError(f"share_rounds must be >= 0, got {share_rounds}")
        self.dense_param_bytes = int(dense_param_bytes)
        self.share_rounds = int(share_rounds)
        if not workers:
            raise EsdConfigError("EsdShardingPlanner needs at least one worker")
        if not ps:
            raise EsdConfigError("EsdShardingPlanner needs at least one parameter server")
        if not tables:
            raise EsdConfigError("EsdShardingPlanner needs at least one table")
        dims = {t.embedding_dim for t in tables}
        if len(dims) != 1:
            raise EsdConfigError(f"all tables must share one embedding_dim, got {sorted(dims)}")
        if global_batch_size <= 0:
            raise EsdConfigError(f"global_batch_size must be > 0, got {global_batch_size}")
        self.workers = list(workers)
        self.ps = list(ps)
        self.tables = list(tables)
        self.dim = dims.pop()
        self.row_bytes = (self.dim + optimizer_state_per_row) * value_bytes
        self.global_batch_size = global_batch_size
        self.constraints = dict(constraints or {})
        for name, c in self.constraints.items():
            if name not in {t.name for t in self.tables}:
                raise EsdConfigError(f"constraints name unknown table {name!r}")
            bad = set(c.sharding_types or []) - {ESD, REPLICATED}
            if bad:
                raise EsdConfigError(
                    f"table {name!r}: ESD plans support sharding types {ESD!r} and {REPLICATED!r}, got {sorted(bad)}"
                )
        # TorchRec topology: one device per worker with its memory as DDR
        self.topology = Topology(world_size=len(self.workers), compute_device="cpu", local_world_size=len(self.workers))
        for dev, w in zip(self.topology.devices, self.workers):
            dev.storage.ddr = w.memory_bytes
            dev.storage.hbm = 0
        self._freq = self._measure(sample)

    # -------------------------------------------------------------- sample statistics
    def _measure(self, sample) -> Optional[Dict[str, Dict]]:
        self._sample = list(sample) if sample is not None else None
        if sample is None:
            return None
        sample = self._sample
        feat = {f: t for t in self.tables for f in t.feature_names}
        counts = {t.name: torch.zeros(t.num_embeddings, dtype=torch.int64) for t in self.tables}
        samples = 0
        for kjt in sample:
            samples += kjt.stride()
            per_batch: Dict[str, List[torch.Tensor]] = {t.name: [] for t in self.tables}
            for k in kjt.keys():
                if k not in feat:
                    continue
                t = feat[k]
                v = kjt[k].values().to(torch.int64)
                if v.numel() and (int(v.min()) < 0 or int(v.max()) >= t.num_embeddings):
                    raise EsdConfigError(f"sample feature {k!r} has ids outside table {t.name!r}")
                per_batch[t.name].append(v)
            for name, vs in per_batch.items():
                if vs:
                    v = torch.cat(vs)
                    counts[name] += torch.bincount(v, minlength=counts[name].numel())
        if samples == 0:
            raise EsdConfigError("the workload sample is empty")
        out = {}
        for t in self.tables:
            c = counts[t.name]
            sorted_c = torch.sort(c, descending=True).values
            out[t.name] = {
                "sorted": sorted_c,
                "ids_per_sample": float(c.sum()) / samples,
                "counts": c,
            }
        return out

    # -------------------------------------------------------------- planning
    def plan(self) -> EsdPlan:
        W = len(self.workers)
        notes: List[str] = []
        table_bytes = {t.name: t.num_embeddings * self.row_bytes for t in self.tables}
        # 1) replicated tables: fewer rows than a worker touches per iteration
        replicated = []
        for t in self.tables:
            forced = self.constraints.get(t.name)
            types = forced.sharding_types if forced and forced.sharding_types else None
            if types == [REPLICATED]:
                replicated.append(t.name)
            elif types == [ESD]:
                continue
            elif self._freq is not None:
                # all-reducing the whole table (2 (W-1)/W rows per worker) costs less
                # than synchronising the rows a worker touches through the PS (~2 per row)
                if t.num_embeddings * (W - 1) / W <= self._expected_distinct(t.name, W):
                    replicated.append(t.name)
            elif table_bytes[t.name] <= 64 * 1024:
                replicated.append(t.name)
        esd_tables = [t for t in self.tables if t.name not in replicated]
        rep_bytes = sum(table_bytes[n] for n in replicated)
        dir_bytes = DIRECTORY_BYTES_PER_ROW * sum(t.num_embeddings for t in esd_tables)
        # 2) caches: budget after replicated tables and the directory
        workers_out = []
        for i, w in enumerate(self.workers):
            budget_rows = (w.memory_bytes - rep_bytes - dir_bytes) // self.row_bytes
            if budget_rows < len(esd_tables):
                raise EsdConfigError(
                    f"worker {i}: memory {w.memory_bytes} B cannot hold the replicated tables "
                    f"({rep_bytes} B), the cache directory ({dir_bytes} B) and one cache row per ESD "
                    f"table ({len(esd_tables) * self.row_bytes} B): no feasible plan"
                )
            caches = self._allocate(esd_tables, int(budget_rows))
            used = rep_bytes + dir_bytes + sum(caches.values()) * self.row_bytes
            workers_out.append(
                {
                    "bandwidth_mbps": w.bandwidth_mbps,
                    "latency_ms": w.latency_ms,
                    "cache_rows": caches,
                    "memory_budget_bytes": w.memory_bytes,
                    "memory_used_bytes": int(used),
                    "share": 0.0,
                }
            )
        # 3) shares: equal predicted step time (see shares_for)
        for wo, share in zip(workers_out, self.shares_for([wo["cache_rows"] for wo in workers_out], esd_tables)):
            wo["share"] = share
        if self._freq is None:
            notes.append("no workload sample: caches in proportion to table rows, miss rates assumed uniform")
        # 4) PS layout: every ESD table row-wise over all PS ranks
        P = len(self.ps)
        ps_bytes = [0] * P
        ps_traffic = [0.0] * P
        for t in esd_tables:
            block = math.ceil(t.num_embeddings / P)
            for p in range(P):
                rows = max(0, min(block, t.num_embeddings - p * block))
                ps_bytes[p] += rows * self.row_bytes
                if self._freq is not None and rows:
                    ps_traffic[p] += float(self._freq[t.name]["counts"][p * block : p * block + rows].sum())
        total_traffic = sum(ps_traffic) or 1.0
        ps_out = []
        for p, r in enumerate(self.ps):
            if ps_bytes[p] > r.memory_bytes:
                raise EsdConfigError(
                    f"parameter server {p}: its share of the tables needs {ps_bytes[p]} B but it has "
                    f"{r.memory_bytes} B: no feasible plan (add PS ranks or memory)"
                )
            ps_out.append(
                {
                    "bytes": ps_bytes[p],
                    "budget_bytes": r.memory_bytes,
                    "traffic_share": ps_traffic[p] / total_traffic if self._freq is not None else 1.0 / P,
                }
            )
        tables_out = [
            {
                "name": t.name,
                "rows": t.num_embeddings,
                "dim": t.embedding_dim,
                "choice": REPLICATED if t.name in replicated else ESD,
            }
            for t in self.tables
        ]
        logger.info("ESD plan: %d ESD tables, %d replicated, %d workers, %d parameter servers",
                    len(tables_out) - len(replicated), len(replicated), W, P)
        for note in notes:
            logger.debug("plan note: %s", note)
        return EsdPlan(tables=tables_out, workers=workers_out, ps=ps_out, num_ps=P, notes=notes)

    def shares_for(
        self, cache_rows: Sequence[Mapping[str, int]], esd_tables: Optional[Sequence[EmbeddingBagConfig]] = None
    ) -> List[float]:
        """Each worker's share ``B_w / B`` for the given caches (one ``{table:
        rows}`` per worker; ``esd_tables`` default: all tables).

        A worker's predicted step time is ``n_w a_w + f_w``: per sample,
        compute (``1 / samples_per_s``) plus the rows it transmits per sample
        over its link (``a_w``); per step, its latency and its part of the
        dense all-reduce (``f_w``).  The shares equalise the step times
        (closed form; a worker whose fixed time alone exceeds the others'
        step gets the minimum of one sample).  Rows per sample come from
        replaying the sample through the real cache directory (random
        dispatch), first at equal shares, then ``share_rounds`` times at the
        current shares (damped), because a worker pays hot rows once per
        iteration whatever its share; without a sample, twice the expected
        misses per sample."""
        esd_tables = list(self.tables) if esd_tables is None else list(esd_tables)
        if len(cache_rows) != len(self.workers):
            raise EsdConfigError(f"{len(cache_rows)} cache layouts for {len(self.workers)} workers")
        workers_out = [{"cache_rows": dict(c), "bandwidth_mbps": w.bandwidth_mbps} for c, w in zip(cache_rows, self.workers)]
        bps = [w.bandwidth_mbps * 1e6 / 8 for w in self.workers]
        sync = link_bytes_per_step(self.dense_sync, [w.bandwidth_mbps for w in self.workers], self.dense_param_bytes)
        fixed = [w.latency_ms / 1e3 + y / b for w, y, b in zip(self.workers, sync, bps)]

        def per_sample(rows: List[Optional[float]], prev: Optional[List[float]]) -> List[float]:
            out = []
            for i, (w, wo, r) in enumerate(zip(self.workers, workers_out, rows)):
                if r is None:
                    if prev is not None:  # no sample reached this worker: keep its estimate
                        out.append(prev[i])
                        continue
                    r = self._expected_miss_rows_per_sample(esd_tables, wo["cache_rows"]) * 2
                out.append(1.0 / w.samples_per_s + r * self.row_bytes / bps[i])
            return out

        a = per_sample(self._simulated_rows_per_sample(esd_tables, workers_out), None)
        shares = self._equal_time_shares(a, fixed)
        if self._sample is not None and esd_tables:
            for _ in range(self.share_rounds):
                a = per_sample(self._simulated_rows_per_sample(esd_tables, workers_out, shares), a)
                new = self._equal_time_shares(a, fixed)
                shares = [0.5 * (x + y) for x, y in zip(shares, new)]
        total = sum(shares)
        return [round(x / total, 6) for x in shares]

    def _equal_time_shares(self, a: Sequence[float], fixed: Sequence[float]) -> List[float]:
        """Shares ``n_w / B`` with ``n_w a_w + f_w`` equal over the workers
        (``sum n_w = B``); workers whose fixed time alone is too long get one
        sample and the rest is solved again."""
        B = self.global_batch_size
        floor = 1.0 / B
        active = list(range(len(a)))
        shares = [floor] * len(a)
        while active:
            left = B * (1.0 - floor * (len(a) - len(active)))
            t = (left + sum(fixed[i] / a[i] for i in active)) / sum(1.0 / a[i] for i in active)
            n = {i: (t - fixed[i]) / a[i] for i in active}
            low = [i for i in active if n[i] < 1.0]
            if not low or len(low) == len(active):
                for i in active:
                    shares[i] = max(n[i], 1.0) / B
                break
            active = [i for i in active if i not in low]
        return shares

    def _allocate(self, esd_tables: Sequence[EmbeddingBagConfig], budget_rows: int) -> Dict[str, int]:
        """Rows per table: one each, then the most frequently accessed rows first
        (with a sample) or in proportion to table rows (without)."""
        caps = {t.name: 1 for t in esd_tables}
        left = budget_rows - len(esd_tables)
        total_rows = sum(t.num_embeddings for t in esd_tables)
        if left >= total_rows - len(esd_tables):
            return {t.name: t.num_embeddings for t in esd_tables}
        if self._freq is None:
            for t in esd_tables:
                caps[t.name] += int(left * (t.num_embeddings - 1) / max(1, total_rows - len(esd_tables)))
            return caps
        # the `left` most frequent rows over all tables (beyond each table's first)
        names = [t.name for t in esd_tables]
        freqs = torch.cat([self._freq[n]["sorted"][1:].double() for n in names])
        owner = torch.cat(
            [torch.full((self._freq[n]["sorted"].numel() - 1,), i, dtype=torch.int64) for i, n in enumerate(names)]
        )
        # ties (unseen rows) broken in proportion to table size: stable order by frequency
        order = torch.argsort(-freqs, stable=True)[:left]
        extra = torch.bincount(owner[order], minlength=len(names))
        for n, e in zip(names, extra.tolist()):
            caps[n] += e
        return caps

    def _simulated_rows_per_sample(self, esd_tables, workers_out, shares=None) -> List[Optional[float]]:
        """Rows each worker transmits per sample (all four kinds), replaying the
        workload sample through the real cache directory with the planned
        caches, ``shares`` (default equal) and random dispatch; ``None``
        without a sample (or for a worker that got no sample)."""
        if self._sample is None or not esd_tables:
            return [None] * len(self.workers)
        cfg = EsdConfig(
            [WorkerSpec(dict(wo["cache_rows"]), wo["bandwidth_mbps"], share=1.0 if shares is None else max(s, 1e-9))
             for wo, s in zip(workers_out, shares or [None] * len(workers_out))],
            num_ps=len(self.ps),
        )
        directory = CacheDirectory(cfg, esd_tables)
        features = [f for t in esd_tables for f in t.feature_names]
        gen = torch.Generator().manual_seed(0)
        rows = [0] * len(self.workers)
        samples = [0] * len(self.workers)
        for i, kjt in enumerate(self._sample):
            kjt = select_kjt_keys(kjt, features)
            shares = cfg.batch_shares(kjt.stride())
            a = torch.repeat_interleave(torch.arange(len(shares)), torch.tensor(shares))
            a = a[torch.randperm(a.numel(), generator=gen)]
            plan = directory.plan(kjt, a)
            if i == 0:
                continue  # cold caches
            for w, wp in enumerate(plan.workers):
                rows[w] += sum(wp.rows.values())
                samples[w] += wp.num_samples
        return [r / s if s else None for r, s in zip(rows, samples)]

    def _expected_distinct(self, table: str, num_workers: int) -> float:
        """Expected distinct rows of ``table`` in one worker's share of a batch
        (``sum_i 1 - (1 - p_i)^n`` with the sample's access frequencies)."""
        f = self._freq[table]  # type: ignore[index]
        c = f["counts"].double()
        if float(c.sum()) == 0:
            return 0.0
        n = f["ids_per_sample"] * self.global_batch_size / num_workers
        p = c / c.sum()
        return float((1 - (1 - p).pow(n)).sum())

    def _expected_miss_rows_per_sample(self, esd_tables, caches: Dict[str, int]) -> float:
        total = 0.0
        for t in esd_tables:
            if self._freq is None:
                total += 1.0 - caches[t.name] / t.num_embeddings
                continue
            f = self._freq[t.name]
            s = f["sorted"].double()
            hit = float(s[: caches[t.name]].sum() / s.sum()) if float(s.sum()) > 0 else 0.0
            total += f["ids_per_sample"] * (1.0 - hit)
        return total
