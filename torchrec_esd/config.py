"""Worker / parameter-server topology of an ESD deployment.

Holds only *what the system looks like*: each edge worker's embedding cache
capacity, its link to the parameter servers (bandwidth, latency), its share of
the global batch, plus the global knobs (number of PS ranks, staleness bound,
dispatch objective, cache policy).  Everything is validated on construction so
that a bad value fails with a message naming the field, on every rank, before
any collective is entered.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Union

OBJECTIVES = ("total", "makespan")
CACHE_POLICIES = ("lru", "lfu", "lookahead")

CacheRows = Union[int, Mapping[str, int]]


class EsdConfigError(ValueError):
    """A topology / workload value that cannot work."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise EsdConfigError(msg)


def _is_count(v) -> bool:
    """An int >= 0 (a bool is not a count)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_positive_number(v) -> bool:
    """A finite int or float > 0 (a bool is not a number here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclass(frozen=True)
class WorkerSpec:
    """One edge worker.

    Args:
        cache_rows: embedding rows the worker may cache, either one number used
            for every table or a ``{table_name: rows}`` mapping.
        bandwidth_mbps: bandwidth of the worker's link to the PS, Mbit/s.
        latency_ms: one-way latency of one transmission on that link, ms.
        share: relative share of the global batch this worker trains (its
            compute weight); shares are normalised over all workers.
    """

    cache_rows: CacheRows
    bandwidth_mbps: float
    latency_ms: float = 0.0
    share: float = 1.0

    def __post_init__(self) -> None:
        rows = self.cache_rows
        if isinstance(rows, Mapping):
            _require(len(rows) > 0, "WorkerSpec.cache_rows mapping is empty")
            for name, r in rows.items():
                _require(
                    isinstance(r, int) and r > 0,
                    f"WorkerSpec.cache_rows[{name!r}] must be a positive int, got {r!r}"
                    " (a worker with no cache capacity cannot train through ESD)",
                )
        else:
            _require(
                isinstance(rows, int) and not isinstance(rows, bool) and rows > 0,
                f"WorkerSpec.cache_rows must be a positive int, got {rows!r}"
                " (a worker with no cache capacity cannot train through ESD)",
            )
        _require(
            math.isfinite(self.bandwidth_mbps) and self.bandwidth_mbps > 0,
            f"WorkerSpec.bandwidth_mbps must be > 0, got {self.bandwidth_mbps!r}",
        )
        _require(
            math.isfinite(self.latency_ms) and self.latency_ms >= 0,
            f"WorkerSpec.latency_ms must be >= 0, got {self.latency_ms!r}",
        )
        _require(
            math.isfinite(self.share) and self.share >= 0,
            f"WorkerSpec.share must be >= 0, got {self.share!r}",
        )

    @property
    def bytes_per_second(self) -> float:
        return self.bandwidth_mbps * 1e6 / 8.0

    @property
    def latency_s(self) -> float:
        return self.latency_ms / 1e3

    def link_time(self, num_bytes: float, num_messages: float = 1.0) -> float:
        """Seconds to move ``num_bytes`` in ``num_messages`` transmissions."""
        return num_bytes / self.bytes_per_second + num_messages * self.latency_s

    def cache_rows_for(self, table: str) -> int:
        if isinstance(self.cache_rows, Mapping):
            if table not in self.cache_rows:
                raise EsdConfigError(
                    f"WorkerSpec.cache_rows has no entry for table {table!r}"
                )
            return int(self.cache_rows[table])
        return int(self.cache_rows)


@dataclass(frozen=True)
class EsdConfig:
    """The whole ESD topology.

    Args:
        workers: one :class:`WorkerSpec` per worker rank (ranks ``0..W-1``).
        num_ps: parameter-server ranks (ranks ``W..W+P-1``); tables are split
            row-wise over them.
        staleness: bound ``s`` on how many iterations a cached row may lag the
            PS; ``0`` is strictly synchronous (same model as vanilla TorchRec).
        objective: ``"total"`` (sum of link times) or ``"makespan"`` (slowest
            link bounds the synchronous iteration).
        cache_policy: ``"lru"``, ``"lfu"`` or ``"lookahead"`` eviction (or a
            registered :class:`~torchrec_esd.cache.EvictionPolicy`'s name).
        cache_lookahead: upcoming global batches a policy that reads them
            (``"lookahead"``) sees; ``EsdInputDist.dispatch_ahead`` reads this
            many batches beyond the one it dispatches.
        collective_timeout_s: timeout of every collective, so that a rank that
            fails makes the others fail instead of hang.
        fault_timeout_s: a rank whose heartbeat is silent this long (killed,
            stopped, host gone) ends every rank with a message naming it; a
            rank's failure ends the others within about a tenth of it plus
            ``min(5, fault_timeout_s / 4)`` s (:mod:`torchrec_esd.distributed.faults`).
            ``None``: no fault monitor (only the collective timeouts).
        check_finite: a non-finite loss (the trainer) or embedding gradient
            (the ESD sharded module, before it is pushed) stops the job on
            every rank, naming the step, before the parameter servers' tables
            (the only copy of the model) are poisoned.  Costs one pass over
            the gradients per step.
        plan_from_summaries: worker 0 plans every cache and sends each
            other worker a compact summary it plans its own cache from
            (:mod:`torchrec_esd.distributed.worker_plans`), instead of every
            worker planning from the global batch.  ``None`` (default): only
            from :data:`~torchrec_esd.distributed.worker_plans.SUMMARY_MIN_WORKERS`
            workers on, where a worker's planning from the global batch
            grows with W; below, waiting for worker 0's summaries costs more
            than planning in parallel (4 equal 1000 Mbit/s workers: +25 % per
            iteration).
        des_misses: let the parameter servers serve cache misses DES-style
            (arXiv 1909.04823): for a bag whose missing rows would cost more
            to pull than one pooled partial sum down
            and one bag gradient up, the PS returns the bag's partial sum of
            those rows and applies the bag's gradient to them; such rows are
            not cached.  SUM / MEAN pooling only.  Exact at staleness 0.
        online_links: the dispatcher's cost model uses every worker's link as
            measured on its PS exchanges (bandwidth and latency,
            :mod:`torchrec_esd.distributed.link_estimates`), the configured
            numbers being the prior.
        compute_s_per_sample: with ``online_links``, a worker's compute time
            per sample at ``share`` 1: the shares then equalise the predicted
            step time (compute + measured link) instead of following ``share``.
        prefetch_depth: while batch ``i`` trains, pull the rows batches
            ``i+1 .. i+depth`` need that nothing changes before they read them
            (:mod:`torchrec_esd.cache.prefetch`), so the transfer overlaps the
            compute; the push/pull of ``i+1`` carries only the rest.  Exact at
            any staleness.  Needs ``EsdInputDist.dispatch_ahead(depth >=
            prefetch_depth)`` and every worker planning every cache from the
            global batch (not ``plan_from_summaries=True``; the default then
            plans from the global batch at any W).  ``0``: off.
        early_pull: post the push/pull of batch ``i+1`` right after the
            gradients of batch ``i`` when ``i+1`` is dispatched already
            (``EsdInputDist.dispatch_ahead``), instead of in its forward: the
            PS answers it once every worker's gradients of ``i`` are applied,
            so the reply comes down a worker's link while its backward, the
            dense all-reduce and the optimizer step still run (a link's two
            directions overlap).  Exact (the same request, served in the same
            phase).  Not with ``des_misses`` (the DES request needs the
            batch).  With ``online_links`` a thread of the PS client times the
            posted reply (``torchrec_esd.ps.client.ReplyClock``).
        split_reply: with ``early_pull``, the gradients of batch ``i`` and
            the posted push/pull of ``i+1`` go as one *split* exchange: the
            gradients' keys, the push/pull request, then the gradient values
            (``torchrec_esd.ps.client.PsClient.post_grads_push_pull``).  The
            PS applies each row as soon as all its gradients are in and
            answers in two parts: first the pulled rows this worker sent no
            gradient for (final once the OTHER workers' gradients are
            applied, so on a slow link they come down while this worker's
            own values still go up), then the rest.  Exact: each row's
            gradients are summed in one fixed order whether split or not
            (fastest configured link first, ties in worker order:
            ``torchrec_esd.ps.server.arrival_order``), so the PS holds the
            same bits.  Default on.
        split_sums: with ``split_reply``, at staleness 0, the worker whose
            gradients the PS sums last (the slowest configured link) gets
            the rest not as rows but as the other workers' summed gradients
            of those rows, sent as soon as their values are in; it adds its
            own gradient and applies the optimizer to the row and state it
            read in the forward: the PS's running sum and the same optimizer
            step, so the same bits.  Its download then waits for no part of
            its own upload.  Default off: on the hetero mix (iid and sessions
            workloads) it made no difference to the iteration time in four
            A/B runs, as the reply's second part is small there and the step
            already ran at 1.01-1.04x its link time
            (``benchmarks/results/s17_split_sums.md``).
        flush_on_slowdown: with ``online_links``, when a worker's estimated
            link falls below ``1 / flush_on_slowdown`` of the previous
            dispatch's estimate, that worker writes back every dirty row of
            its cache in the next iteration's push (the rows only it holds
            up to date), instead of draining them through its slow link one
            iteration at a time as the others come to need them.  The
            estimates are the same on every worker, so every directory
            replica flushes at the same iteration.  ``None`` (default):
            never.  Not with ``prefetch_depth`` (its rule reads the pushes).
            Off by default: after a 100 -> 10 Mbit/s drop (factor 2) it
            turned 7 steps of 10-60 % over the level into one step of 1.9 s
            (most dirty rows are ones nobody else needs soon),
            ``benchmarks/results/rate_change_v10_v11.md``.
        pre_push: send, right after the push/pull of batch ``i`` (before its
            forward), the dirty rows that batch ``i+1``'s push/pull would
            push and that this worker's batch ``i`` does not use, when ``i+1``
            is dispatched already (``EsdInputDist.dispatch_ahead``): the PS
            stores them at once, so they cross the worker's uplink while
            batch ``i`` computes instead of after its gradients, and the
            other workers' pulls of ``i+1`` no longer wait for them.  Exact
            at staleness 0: no gradient of batch ``i`` touches those rows (a
            row only one worker holds up to date is used by no other worker
            in ``i``, and this worker does not use it either), so storing
            them before the gradients of ``i`` or after is the same.  Every
            worker then sends one (possibly empty) ``PRE_PUSH`` request per
            iteration; only a worker whose link is within 1.25x of the
            slowest (estimated with ``online_links``) puts rows in it
            (``torchrec_esd.distributed.ps_sync.PRE_PUSH_SLOWEST``).  Needs
            ``staleness=0``, not with ``des_misses`` or ``prefetch_depth``.
            Default off (``benchmarks/results/s11_pre_push.md``).
    """

    workers: Sequence[WorkerSpec]
    num_ps: int = 1
    staleness: int = 0
    objective: str = "total"
    cache_policy: str = "lru"
    cache_lookahead: int = 4
    collective_timeout_s: float = 120.0
    des_misses: bool = False
    online_links: bool = False
    compute_s_per_sample: Optional[float] = None
    fault_timeout_s: Optional[float] = 30.0
    check_finite: bool = False
    plan_from_summaries: Optional[bool] = None
    prefetch_depth: int = 0
    early_pull: bool = True
    flush_on_slowdown: Optional[float] = None
    pre_push: bool = False
    split_reply: bool = True
    split_sums: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "workers", tuple(self.workers))
        _require(len(self.workers) > 0, "EsdConfig.workers is empty")
        for i, w in enumerate(self.workers):
            _require(
                isinstance(w, WorkerSpec),
                f"EsdConfig.workers[{i}] must be a WorkerSpec, got {type(w).__name__}",
            )
        _require(
            sum(w.share for w in self.workers) > 0,
            "EsdConfig: all worker shares are 0; at least one worker must train",
        )
        _require(
            isinstance(self.num_ps, int) and self.num_ps >= 1,
            f"EsdConfig.num_ps must be an int >= 1, got {self.num_ps!r}",
        )
        _require(
            isinstance(self.staleness, int) and self.staleness >= 0,
            f"EsdConfig.staleness must be an int >= 0, got {self.staleness!r}",
        )
        _require(
            self.objective in OBJECTIVES,
            f"EsdConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}",
        )
        _require(
            self.cache_policy in CACHE_POLICIES,
            f"EsdConfig.cache_policy must be one of {CACHE_POLICIES}, got {self.cache_policy!r}",
        )
        _require(
            _is_count(self.cache_lookahead),
            f"EsdConfig.cache_lookahead must be an int >= 0, got {self.cache_lookahead!r}",
        )
        _require(
            isinstance(self.des_misses, bool),
            f"EsdConfig.des_misses must be a bool, got {self.des_misses!r}",
        )
        _require(
            isinstance(self.online_links, bool),
            f"EsdConfig.online_links must be a bool, got {self.online_links!r}",
        )
        _require(
            self.compute_s_per_sample is None or _is_positive_number(self.compute_s_per_sample),
            f"EsdConfig.compute_s_per_sample must be None or a number > 0, got {self.compute_s_per_sample!r}",
        )
        _require(
            self.compute_s_per_sample is None or self.online_links,
            "EsdConfig.compute_s_per_sample sets the shares from the measured links: it needs online_links=True",
        )
        _require(
            self.collective_timeout_s > 0,
            f"EsdConfig.collective_timeout_s must be > 0, got {self.collective_timeout_s!r}",
        )
        _require(
            self.fault_timeout_s is None or _is_positive_number(self.fault_timeout_s),
            f"EsdConfig.fault_timeout_s must be > 0 seconds or None (no fault monitor), got {self.fault_timeout_s!r}",
        )
        _require(
            self.flush_on_slowdown is None or (_is_positive_number(self.flush_on_slowdown)
                                               and self.flush_on_slowdown > 1.0),
            f"EsdConfig.flush_on_slowdown must be None or a number > 1, got {self.flush_on_slowdown!r}",
        )
        _require(
            self.flush_on_slowdown is None or (self.online_links and not self.prefetch_depth),
            "EsdConfig.flush_on_slowdown reads the measured links and changes the pushes prefetch's rule reads: "
            "it needs online_links=True and prefetch_depth=0",
        )
        _require(
            isinstance(self.pre_push, bool),
            f"EsdConfig.pre_push must be a bool, got {self.pre_push!r}",
        )
        _require(
            not self.pre_push or (self.staleness == 0 and not self.des_misses and not self.prefetch_depth),
            "EsdConfig.pre_push stores the next iteration's dirty rows before this one's gradients, which is "
            "exact only at staleness=0, and it is not combined with des_misses or prefetch_depth (got "
            f"staleness={self.staleness}, des_misses={self.des_misses}, prefetch_depth={self.prefetch_depth})",
        )
        _require(
            isinstance(self.early_pull, bool),
            f"EsdConfig.early_pull must be a bool, got {self.early_pull!r}",
        )
        _require(
            isinstance(self.split_sums, bool),
            f"EsdConfig.split_sums must be a bool, got {self.split_sums!r}",
        )
        _require(
            isinstance(self.split_reply, bool),
            f"EsdConfig.split_reply must be a bool, got {self.split_reply!r}",
        )
        _require(
            isinstance(self.check_finite, bool),
            f"EsdConfig.check_finite must be a bool, got {self.check_finite!r}",
        )
        _require(
            self.plan_from_summaries is None or isinstance(self.plan_from_summaries, bool),
            f"EsdConfig.plan_from_summaries must be True, False or None (auto), got {self.plan_from_summaries!r}",
        )
        _require(
            _is_count(self.prefetch_depth),
            f"EsdConfig.prefetch_depth must be an int >= 0, got {self.prefetch_depth!r}",
        )
        _require(
            not (self.prefetch_depth and self.plan_from_summaries),
            "EsdConfig.prefetch_depth needs every worker's plan (which rows others push and update), so "
            "every worker plans every cache from the global batch: it cannot be combined with "
            "plan_from_summaries=True (leave it None or False)",
        )

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    @property
    def world_size(self) -> int:
        return self.num_workers + self.num_ps

    def ps_ranks(self) -> List[int]:
        return list(range(self.num_workers, self.world_size))

    def batch_shares(self, global_batch_size: int) -> List[int]:
        """Split ``global_batch_size`` into per-worker shares ``B_w``.

        Proportional to ``WorkerSpec.share`` with largest-remainder rounding;
        the shares always add up to the global batch size.
        """
        _require(
            isinstance(global_batch_size, int) and global_batch_size > 0,
            f"global batch size must be a positive int, got {global_batch_size!r}",
        )
        weights = [w.share for w in self.workers]
        total = sum(weights)
        exact = [global_batch_size * s / total for s in weights]
        shares = [int(math.floor(e)) for e in exact]
        rest = global_batch_size - sum(shares)
        order = sorted(range(len(exact)), key=lambda i: (shares[i] - exact[i], i))
        for i in order[:rest]:
            shares[i] += 1
        return shares

    def validate_tables(self, table_rows: Mapping[str, int]) -> None:
        """Check every worker's cache capacity against the tables' sizes."""
        _require(len(table_rows) > 0, "no embedding tables given")
        for name, rows in table_rows.items():
            _require(rows > 0, f"table {name!r} has {rows} rows")
            for i, w in enumerate(self.workers):
                c = w.cache_rows_for(name)
                _require(
                    c <= rows,
                    f"worker {i}: cache capacity {c} rows for table {name!r} exceeds"
                    f" the table's {rows} rows",
                )
        for i, w in enumerate(self.workers):
            if isinstance(w.cache_rows, Mapping):  # workers may mix per-table and uniform capacities
                extra = set(w.cache_rows) - set(table_rows)
                _require(
                    not extra,
                    f"worker {i}: cache_rows names unknown tables {sorted(extra)}",
                )

    # -- (de)serialisation, so that every rank can check it holds the same config
    def to_dict(self) -> Dict:
        d = asdict(self)
        d["workers"] = [asdict(w) for w in self.workers]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "EsdConfig":
        d = dict(d)
        d["workers"] = [
            WorkerSpec(
                **{
                    **w,
                    "cache_rows": dict(w["cache_rows"])
                    if isinstance(w["cache_rows"], Mapping)
                    else w["cache_rows"],
                }
            )
            for w in d["workers"]
        ]
        return cls(**d)

    def fingerprint(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def heterogeneous_workers(
    bandwidths_mbps: Sequence[float],
    cache_rows: Union[CacheRows, Sequence[CacheRows]],
    latency_ms: Union[float, Sequence[float]] = 0.0,
    shares: Optional[Sequence[float]] = None,
) -> List[WorkerSpec]:
    """Convenience: a worker list from per-worker bandwidths (e.g. 1:2:4:8)."""
    n = len(bandwidths_mbps)

    def per(v, name):
        if isinstance(v, (list, tuple)):
            _require(len(v) == n, f"{name} has {len(v)} entries for {n} workers")
            return list(v)
        return [v] * n

    return [
        WorkerSpec(cache_rows=c, bandwidth_mbps=b, latency_ms=l, share=s)
        for b, c, l, s in zip(
            bandwidths_mbps,
            per(cache_rows, "cache_rows"),
            per(latency_ms, "latency_ms"),
            per(list(shares) if shares is not None else 1.0, "shares"),
        )
    ]

