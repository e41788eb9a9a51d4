"""The dispatcher's directory step split over ranks: group ranks and row shards.

The dispatcher's :class:`~torchrec_esd.cache.directory.CacheDirectory` tracks
every worker.  Every iteration it steps every worker's cache
(``O(sum_w (U_w + S_w))``) and builds the workers'
:class:`~torchrec_esd.cache.summary.StepSummary` from the whole batch
(``O(N + H)``).  At a fixed per-worker batch that grows linearly with ``W``: at
``W = 256`` it took 1.7x the modelled iteration
(``benchmarks/results/s17_reruns.md``).  Here the same state is split so that
no rank's work grows with ``W`` at a fixed per-worker batch, group size and
cache:

* a :class:`GroupRank` per group of workers (the grouped dispatcher's groups,
  :func:`~torchrec_esd.cost.group_inputs.link_groups`) replicates its workers'
  caches: a directory that tracks them alone, with their holder index.  Per
  iteration it reads only its own samples' row keys;
* a :class:`RowShard` per part of the row-key space (:func:`shard_of`, a stable
  hash of the key) keeps, for its rows cached anywhere, the *group bits* (which
  groups hold the row, and which hold it fresh) and the *dirty owner*.  These are
  what the grouped dispatcher's stage 1 and its groups read of the other groups
  (:meth:`~torchrec_esd.cache.holders.HolderIndex.group_bits`,
  :meth:`~torchrec_esd.cache.holders.HolderIndex.dirty_owner`).

One iteration, after the decision (:func:`split_step`):

1. each group rank counts, per distinct row of its samples, its user workers
   (:meth:`GroupRank.count`, ``O(N_g)`` radix sorts).  It sends ``(row, count)``
   to the row's shard;
2. each shard sums the counts over the groups (the groups are disjoint, so their
   distinct users add up).  It sends ``(row, total)`` back to every group that
   uses the row *or holds it* (its group bits) (:meth:`RowShard.route`,
   ``O(M_r + P_r)`` for the ``M_r`` pairs it got and the ``P_r`` it sends);
3. each group rank steps its workers' caches from those rows
   (:meth:`~torchrec_esd.cache.directory.CacheDirectory.plan_tracked`).  That
   gives the dispatcher directory's plans and, if asked, the workers'
   ``StepSummary``.  The group then reports its bit and its dirty owner for every
   row whose copies changed (:meth:`GroupRank.step`, ``O(sum_{w in g} (U_w + S_w)
   + U_g + H_g)``);
4. each shard applies the reports (:meth:`RowShard.apply`, ``O(reported rows)``).

The split is exact.  The group ranks' plans are the full directory's, and the
shards' bits and owners equal its holder index's for the same partition.
``tests/test_split_step.py`` checks both, step by step, with evictions, dirty
rows, staleness and flushes.  ``benchmarks/scale.py`` checks them at every step
it times.

Work per rank and iteration, at a fixed per-worker batch, group size and cache,
with ``R`` shards:

* a group rank: ``O(its samples' values + its workers' slots + the rows they hold
  that the batch uses)``;
* a shard: ``O((N + P) / R)``, for ``P`` routed pairs, at most the groups' used and
  held rows.

Neither grows with ``W`` when the numbers of groups and shards grow with it.
What crosses ranks is ``(row, count)`` pairs and the reports ``(row, bits,
owner)``, group by group and shard by shard.

In one process (:func:`split_step`) the ranks run one after the other, each
timed on its own.  The critical path is the slowest group of each group phase
plus the slowest shard of each shard phase.  What the messages cost is not
counted.

Limits:

* not with DES-served misses (``plan_tracked`` refuses them);
* at most :attr:`HolderIndex.MAX_GROUPS` groups;
* the runtime's ``EsdInputDist`` still runs the one dispatcher directory. This
  module is the split state that group and shard ranks would run.

:class:`SplitRank` runs the same four phases on real ranks of a process group,
one group and one shard per rank, their messages moved by ``all_to_all_single``
(``tests/test_split_step.py`` runs it on a gloo world and checks it against the
one directory).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd import ops
from torchrec_esd.cache.directory import CacheDirectory
from torchrec_esd.cache.holders import HolderIndex
from torchrec_esd.cache.plans import WorkerPlan
from torchrec_esd.cache.summary import StepSummary
from torchrec_esd.config import EsdConfig, EsdConfigError
from torchrec_esd.layout import KeySpace

SHARD_SALT = 0x5EED  # the "feature" of ops.hash_ids that routes a row key to its shard
FRESH_SHIFT = HolderIndex.MAX_GROUPS  # held bits 0-30, fresh bits 31-61, as in HolderIndex.group_bits
HELD_MASK = (1 << FRESH_SHIFT) - 1

Pairs = Tuple[torch.Tensor, torch.Tensor]  # (row keys, one int64 value per key)


def shard_of(keys: torch.Tensor, num_shards: int) -> torch.Tensor:
    """The shard of every row key in ``[0, num_shards)``: a stable hash
    (:func:`~torchrec_esd.ops.hash_ids`), the same on every rank and run."""
    if num_shards == 1 or keys.numel() == 0:
        return torch.zeros(keys.numel(), dtype=torch.int64)
    return ops.hash_ids(keys.to(torch.int64).contiguous(), SHARD_SALT, num_shards).to(torch.int64)


def _split_by(bins: torch.Tensor, num_bins: int, *cols: torch.Tensor) -> List[Tuple[torch.Tensor, ...]]:
    """``cols`` cut by ``bins`` (stable within a bin): one tuple per bin."""
    order, ptr = ops.bucket_order(bins, num_bins)
    cols = [c.index_select(0, order) for c in cols]
    p = ptr.tolist()
    return [tuple(c[p[b]:p[b + 1]] for c in cols) for b in range(num_bins)]


def _set_bits(bits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(index, bit)`` of every set bit of the non-negative ``bits``: one pass per
    bit level still set anywhere, each over the entries left (``O(len + pairs)``
    element operations)."""
    idx = torch.arange(bits.numel(), dtype=torch.int64)
    out_i, out_b = [], []
    x = bits.clone()
    while x.numel():
        keep = x != 0
        x, idx = x[keep], idx[keep]
        if x.numel() == 0:
            break
        low = x & -x
        out_i.append(idx)
        out_b.append(torch.log2(low.double()).round().to(torch.int64))  # exact for 2^0..2^61
        x = x ^ low
    if not out_i:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return torch.cat(out_i), torch.cat(out_b)


class _GrowingIdTable:
    """An id table (:func:`~torchrec_esd.ops.id_table_build`'s layout) of row key ->
    int64 that counts its entries and grows before an assignment could load it over
    1/2 (:func:`~torchrec_esd.ops.id_table_reserve`, as the holder index's bits tables)."""

    def __init__(self, min_keys: int = 1024) -> None:
        self.table = torch.full((ops.id_table_capacity(min_keys), 2), -1, dtype=torch.int64)
        self.rows = 0

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        return ops.id_table_lookup(self.table, keys)

    def assign(self, erase: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Erase ``erase`` (absent ones ignored), then map ``keys[i] -> values[i]``."""
        if erase.numel() + keys.numel() == 0:
            return
        self.table = ops.id_table_reserve(self.table, self.rows, keys.numel())
        touched = ops.sorted_distinct(torch.cat([erase, keys]))[0]
        before = int((self.lookup(touched) >= 0).sum())
        ops.id_table_assign(self.table, erase, keys, values)
        self.rows += int((self.lookup(touched) >= 0).sum()) - before

    def items(self) -> Pairs:
        """Every ``(key, value)`` held, keys ascending (``O(capacity)``; for checks)."""
        live = self.table[self.table[:, 0] >= 0]
        order = torch.argsort(live[:, 0])
        return live[order, 0], live[order, 1]

    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()


class RowShard:
    """The group bits and dirty owners of the row keys that :func:`shard_of` sends
    to shard ``shard`` of ``num_shards``, for the partition ``group_of`` (int64
    ``[W]``, every worker's group in ``[0, G)``).  Memory ``O(its rows cached
    anywhere)``: two id tables (32-64 B per row each), nothing per worker or slot."""

    def __init__(self, group_of: torch.Tensor, shard: int, num_shards: int) -> None:
        self.group_of = group_of.to(torch.int64)
        self.num_groups = int(self.group_of.max()) + 1 if self.group_of.numel() else 0
        if self.group_of.numel() and int(self.group_of.min()) < 0:
            raise EsdConfigError("every worker must be in a group of the split directory step")
        if self.num_groups > HolderIndex.MAX_GROUPS:
            raise EsdConfigError(f"{self.num_groups} groups: the group bits hold {HolderIndex.MAX_GROUPS} at most")
        self.shard, self.num_shards = int(shard), int(num_shards)
        self.bits = _GrowingIdTable()  # key -> held | fresh << FRESH_SHIFT (absent: held nowhere)
        self.owners = _GrowingIdTable()  # key -> the worker holding its only up-to-date (dirty) copy

    def nbytes(self) -> int:
        return self.bits.nbytes() + self.owners.nbytes()

    def group_bits(self, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(held, fresh)`` of ``keys`` (all in this shard), as
        :meth:`HolderIndex.group_bits` gives them.  ``O(len(keys))``."""
        v = self.bits.lookup(keys.to(torch.int64)).clamp(min=0)
        return v & HELD_MASK, v >> FRESH_SHIFT

    def dirty_owner(self, keys: torch.Tensor) -> torch.Tensor:
        """Each key's dirty owner (-1: none), as :meth:`HolderIndex.dirty_owner` gives it."""
        return self.owners.lookup(keys.to(torch.int64))

    def _merged(self, parts: Sequence[Tuple[torch.Tensor, ...]], what: str):
        """The groups' messages ``parts[g] = (rows, *columns)`` as one: ``(distinct rows,
        each entry's row among them, per row the groups that sent it as bits, each entry's
        group, the columns concatenated)``; None when all are empty.  A wrong number of
        groups, or a row sent twice by one group, raises."""
        G = len(parts)
        if G != self.num_groups:
            raise EsdConfigError(f"shard {self.shard} got {what} from {G} groups, expected {self.num_groups}")
        keys = torch.cat([p[0].to(torch.int64) for p in parts])
        if keys.numel() == 0:
            return None
        cols = [torch.cat([p[i].to(torch.int64) for p in parts]) for i in range(1, len(parts[0]))]
        src = torch.repeat_interleave(torch.arange(G, dtype=torch.int64),
                                      torch.tensor([p[0].numel() for p in parts], dtype=torch.int64))
        rows, inv = ops.sorted_distinct_inverse(keys)
        if ops.sorted_distinct(inv * G + src)[0].numel() != keys.numel():
            raise EsdConfigError(f"a group sent shard {self.shard} one row twice" if what == "counts" else
                                 f"a group reported one row twice to shard {self.shard}")
        # each group sends a row once: the sum of its bits is their union
        senders = torch.zeros(rows.numel(), dtype=torch.int64).index_add_(0, inv, torch.ones_like(src) << src)
        return rows, inv, senders, src, cols

    def route(self, parts: Sequence[Pairs]) -> List[Pairs]:
        """Phase 2.  ``parts[g]``: ``(rows, counts)`` from group ``g``, the distinct
        rows of its samples in this shard with their user workers in the group.  Returns,
        per group, ``(rows, totals)``: every row of this iteration that the group uses or
        holds, with its user workers over all groups.  ``O(M + P)``."""
        merged = self._merged(parts, "counts")
        if merged is None:
            empty = torch.zeros(0, dtype=torch.int64)
            return [(empty, empty) for _ in range(self.num_groups)]
        rows, inv, users, _, (counts,) = merged
        if self.num_shards > 1 and bool((shard_of(rows, self.num_shards) != self.shard).any()):
            raise EsdConfigError(f"shard {self.shard} got counts of rows of another shard")
        total = torch.zeros(rows.numel(), dtype=torch.int64).index_add_(0, inv, counts)
        held, _ = self.group_bits(rows)
        i, g = _set_bits(users | held)
        return [(rows.index_select(0, ii), total.index_select(0, ii)) for (ii,) in _split_by(g, self.num_groups, i)]

    def apply(self, parts: Sequence[Tuple[torch.Tensor, ...]]) -> None:
        """Phase 4: ``parts[g]`` is group ``g``'s report ``(rows, held, fresh, owner)``
        for rows of this shard (distinct within a report): whether one of its workers holds
        each row (``held``), holds it fresh (``fresh``), and which of them holds it dirty
        (``owner``, a worker id, or -1).  All groups' reports at once, ``O(reported
        rows)``."""
        merged = self._merged(parts, "reports")
        if merged is None:
            return
        rows, inv, reporting, src, (held, fresh, owner) = merged
        u = rows.numel()
        # each group reports a row once: sums of its bits are unions
        setbits = torch.zeros(u, dtype=torch.int64).index_add_(
            0, inv, ((held & 1) << src) | ((fresh & 1) << (FRESH_SHIFT + src)))
        cur = self.bits.lookup(rows).clamp(min=0)
        new = (cur & ~(reporting | (reporting << FRESH_SHIFT))) | setbits
        some = new != 0
        self.bits.assign(rows[~some], rows[some], new[some])
        # a row has one dirty copy at most (a local update needs a sole user; any other user
        # has the dirty copy pushed first): a reported owner replaces the row's, and a report
        # of none from the owner's group clears it
        top = torch.full((u,), -1, dtype=torch.int64).scatter_reduce_(0, inv, owner, "amax")
        cur_o = self.owners.lookup(rows)
        has = top >= 0
        own_group = self.group_of.index_select(0, cur_o.clamp(min=0))
        clear = ~has & (cur_o >= 0) & (((reporting >> own_group) & 1) == 1)
        self.owners.assign(rows[clear], rows[has], top[has])


class GroupRank:
    """The caches of one group's ``workers``, replicated, and what the group sends
    the shards.  Memory: the group's slots and their holder index (:class:`CacheDirectory`
    tracking them alone), nothing per other worker or table row."""

    def __init__(self, config: EsdConfig, tables: Sequence[EmbeddingBagConfig], workers: Sequence[int],
                 num_shards: int, keyspace: Optional[KeySpace] = None) -> None:
        self.workers = sorted(int(w) for w in workers)
        if not self.workers:
            raise EsdConfigError("a group rank needs at least one worker")
        self.num_shards = int(num_shards)
        self.directory = CacheDirectory(config, tables, track=self.workers, keyspace=keyspace)
        self._workers_t = torch.tensor(self.workers, dtype=torch.int64)
        self._local = torch.full((config.num_workers,), -1, dtype=torch.int64)
        self._local[self._workers_t] = torch.arange(len(self.workers))
        self._one_group = torch.zeros(len(self.workers), dtype=torch.int64)
        # the holder index and its (one-group) bits from the start, so every change is tracked
        index = self.directory.holder_index()
        index.group_bits(self._one_group, torch.zeros(0, dtype=torch.int64))
        index.reserve(int(index.base[-1]))  # a row per slot at most: the bits tables never grow mid-step
        self._pending = None

    def nbytes(self) -> int:
        return self.directory.nbytes()

    def count(self, keys: torch.Tensor, owner: torch.Tensor, num_samples: Sequence[int]) -> List[Pairs]:
        """Phase 1.  ``keys``: the row key of every value of the group's samples,
        ``owner``: the worker of each (one of the group's), ``num_samples``: each of the
        group's workers' samples.  Returns per shard ``(rows, counts)``: the distinct
        rows there and their user workers in the group.  ``O(N_g)``."""
        n = len(self.workers)
        if len(num_samples) != n:
            raise EsdConfigError(f"group of {n} workers got {len(num_samples)} sample counts")
        local = self._local.index_select(0, owner.to(torch.int64))
        if local.numel() and int(local.min()) < 0:
            raise EsdConfigError(f"a value of the group's samples is owned by a worker outside {self.workers}")
        ukeys, uw, _ = ops.unique_keys_per_group(keys.to(torch.int64), local, n)
        used = list(torch.split(ukeys, torch.bincount(uw, minlength=n).tolist()))
        rows, counts = ops.sorted_distinct(ukeys)
        self._pending = (used, [int(x) for x in num_samples])
        return [tuple(p) for p in _split_by(shard_of(rows, self.num_shards), self.num_shards, rows, counts)]

    def step(self, parts: Sequence[Pairs], summaries: bool = False, flush: Sequence[int] = (),
             upcoming: Sequence[KeyedJaggedTensor] = ()
             ) -> Tuple[Dict[int, WorkerPlan], Optional[List[StepSummary]], List[Tuple[torch.Tensor, ...]]]:
        """Phase 3.  ``parts[r]``: shard ``r``'s ``(rows, totals)`` for this group.
        Steps the group's workers' caches (:meth:`CacheDirectory.plan_tracked`) and returns
        ``(plans by worker, their StepSummary or None, reports)``: per shard ``(rows, held,
        fresh, owner)`` of every row whose copies in the group changed (for
        :meth:`RowShard.apply`).  ``flush``: workers that write back every dirty row
        first (those of other groups are left to their groups); ``upcoming``: the next global batches, for a policy that reads them
        (both as in :meth:`CacheDirectory.plan`)."""
        if self._pending is None:
            raise EsdConfigError("GroupRank.step before count")
        used, num_samples = self._pending
        self._pending = None
        rows = torch.cat([k.to(torch.int64) for k, _ in parts]) if parts else torch.zeros(0, dtype=torch.int64)
        totals = torch.cat([c.to(torch.int64) for _, c in parts]) if parts else rows
        user_keys, inv = ops.sorted_distinct_inverse(rows) if rows.numel() else (rows, rows)
        if user_keys.numel() != rows.numel():
            raise EsdConfigError("the shards sent one row twice")
        user_counts = torch.empty_like(user_keys).index_copy_(0, inv, totals)
        mine = [w for w in flush if w in self.workers]
        plans, sums, changed = self.directory.plan_tracked(used, user_keys, user_counts, num_samples,
                                                           summaries=summaries, flush=mine, upcoming=upcoming)
        return plans, sums, self.report(changed)

    def report(self, changed: Optional[torch.Tensor]) -> List[Tuple[torch.Tensor, ...]]:
        """Per shard ``(rows, held, fresh, owner)`` of the distinct ``changed`` rows."""
        keys = ops.sorted_distinct(changed)[0] if changed is not None and changed.numel() else \
            torch.zeros(0, dtype=torch.int64)
        h = self.directory.holder_index()
        held, fresh = h.group_bits(self._one_group, keys)
        pos = h.dirty_owner(self._one_group, keys)
        owner = torch.where(pos >= 0, self._workers_t.index_select(0, pos.clamp(min=0)), pos)
        return [tuple(p) for p in _split_by(shard_of(keys, self.num_shards), self.num_shards,
                                            keys, held & 1, fresh & 1, owner)]

    def flush_plan(self):
        """:meth:`CacheDirectory.flush_plan` of the group's workers, and the reports of
        the rows flushed (their owners change)."""
        plans = self.directory.flush_plan()
        keys = torch.cat([p.push_keys for p in plans if p is not None])
        return {w: plans[w] for w in self.workers}, self.report(keys)


@dataclass
class SplitStepResult:
    """One :func:`split_step`: the plans (by worker), the summaries (by worker, where
    asked), per phase the seconds of every rank (``phase_s``), and per phase the bytes
    every rank sends to the others (``sent_bytes``: ``count`` and ``step`` by group,
    ``route`` by shard; the tensors' bytes as they are, int64 and bool; ``apply`` sends
    nothing)."""

    plans: Dict[int, WorkerPlan]
    summaries: Dict[int, StepSummary]
    phase_s: Dict[str, List[float]] = field(default_factory=dict)
    sent_bytes: Dict[str, List[int]] = field(default_factory=dict)

    @property
    def critical_s(self) -> float:
        """The slowest rank of every phase, summed (the ranks of a phase run side by side)."""
        return sum(max(v) for v in self.phase_s.values() if v)

    @property
    def total_s(self) -> float:
        """Every rank's time, summed (what one process spent)."""
        return sum(sum(v) for v in self.phase_s.values())


def _group_of(config: EsdConfig, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Every worker's group, ``groups`` checked to be a partition of the workers."""
    W = config.num_workers
    flat = sorted(int(w) for g in groups for w in g)
    if flat != list(range(W)):
        raise EsdConfigError(f"the groups {list(map(list, groups))} are not a partition of the {W} workers")
    group_of = torch.empty(W, dtype=torch.int64)
    for g, ws in enumerate(groups):
        group_of[torch.tensor(list(ws), dtype=torch.int64)] = g
    return group_of


def make_split_ranks(config: EsdConfig, tables: Sequence[EmbeddingBagConfig], groups: Sequence[Sequence[int]],
                     num_shards: int, keyspace: Optional[KeySpace] = None
                     ) -> Tuple[List[GroupRank], List[RowShard], torch.Tensor]:
    """The group ranks of ``groups`` (a partition of all workers), ``num_shards`` row
    shards, and ``group_of`` (every worker's group), all with cold caches."""
    if num_shards < 1:
        raise EsdConfigError(f"num_shards must be >= 1, got {num_shards}")
    group_of = _group_of(config, groups)
    keyspace = keyspace if keyspace is not None else KeySpace(tables)
    ranks = [GroupRank(config, tables, ws, num_shards, keyspace=keyspace) for ws in groups]
    shards = [RowShard(group_of, r, num_shards) for r in range(num_shards)]
    return ranks, shards, group_of


def split_step(ranks: Sequence[GroupRank], shards: Sequence[RowShard], keys: torch.Tensor, owner: torch.Tensor,
               num_samples: Sequence[int], summaries: bool = False, flush: Sequence[int] = (),
               upcoming: Sequence[KeyedJaggedTensor] = ()) -> SplitStepResult:
    """One iteration of the split directory step (module docstring), the ranks run one
    after the other and timed one by one.  ``keys``: the row key of every value of the
    global batch, ``owner``: the worker of each (the decision), ``num_samples``: every
    worker's samples; ``flush`` and ``upcoming`` as in :meth:`CacheDirectory.plan` (a
    lookahead policy makes every group rank read the next global batches: O(N) each).
    (Handing each group its samples' keys is not timed: a group rank has them from its
    own decision.)"""
    G = len(ranks)
    group_of = shards[0].group_of
    keys, owner = keys.to(torch.int64), owner.to(torch.int64)
    by_group = _split_by(group_of.index_select(0, owner), G, keys, owner)
    phase: Dict[str, List[float]] = {"count": [], "route": [], "step": [], "apply": []}
    to_shard = []
    for g, rank in enumerate(ranks):
        k, o = by_group[g]
        t0 = time.perf_counter()
        to_shard.append(rank.count(k, o, [num_samples[w] for w in rank.workers]))
        phase["count"].append(time.perf_counter() - t0)
    to_group: List[List[Pairs]] = [[] for _ in range(G)]
    for r, shard in enumerate(shards):
        t0 = time.perf_counter()
        out = shard.route([to_shard[g][r] for g in range(G)])
        phase["route"].append(time.perf_counter() - t0)
        for g in range(G):
            to_group[g].append(out[g])
    plans: Dict[int, WorkerPlan] = {}
    sums: Dict[int, StepSummary] = {}
    reports = []
    for g, rank in enumerate(ranks):
        t0 = time.perf_counter()
        p, s, rep = rank.step(to_group[g], summaries=summaries, flush=flush, upcoming=upcoming)
        phase["step"].append(time.perf_counter() - t0)
        plans.update(p)
        if s is not None:
            sums.update({x.worker: x for x in s})
        reports.append(rep)
    for r, shard in enumerate(shards):
        t0 = time.perf_counter()
        shard.apply([reports[g][r] for g in range(G)])
        phase["apply"].append(time.perf_counter() - t0)
    def nbytes(messages) -> int:
        return sum(t.numel() * t.element_size() for m in messages for t in m)

    sent = {"count": [nbytes(m) for m in to_shard],
            "route": [nbytes(to_group[g][r] for g in range(G)) for r in range(len(shards))],
            "step": [nbytes(rep) for rep in reports]}
    return SplitStepResult(plans, sums, phase, sent)


def split_flush(ranks: Sequence[GroupRank], shards: Sequence[RowShard]) -> Dict[int, WorkerPlan]:
    """Every group's :meth:`GroupRank.flush_plan`, its reports applied: the plans by worker."""
    plans, reports = {}, []
    for rank in ranks:
        p, rep = rank.flush_plan()
        plans.update(p)
        reports.append(rep)
    for r, shard in enumerate(shards):
        shard.apply([rep[r] for rep in reports])
    return plans


class SplitRank:
    """One rank of the split directory step on a process group: group ``rank`` of
    ``groups`` (a :class:`GroupRank`) and shard ``rank`` (a :class:`RowShard`), the four
    phases' messages moved between the ranks by ``all_to_all_single`` (gloo or NCCL; the
    tensors stay on the CPU here, as the directory does).  Every rank of ``pg`` calls
    :meth:`step` with the same iteration.  A count read off the wire above
    ``max_rows`` rows (default: the table rows) raises before anything is allocated."""

    def __init__(self, config: EsdConfig, tables: Sequence[EmbeddingBagConfig], groups: Sequence[Sequence[int]],
                 pg=None, keyspace: Optional[KeySpace] = None, max_rows: Optional[int] = None) -> None:
        self.pg = pg
        self.rank, self.size = dist.get_rank(pg), dist.get_world_size(pg)
        if len(groups) != self.size:
            raise EsdConfigError(f"{len(groups)} groups on a process group of {self.size} ranks (one group per rank)")
        self.group_of = _group_of(config, groups)
        self.group = GroupRank(config, tables, groups[self.rank], self.size, keyspace=keyspace)
        self.shard = RowShard(self.group_of, self.rank, self.size)
        self.max_rows = int(max_rows) if max_rows is not None else int(self.group.directory.total_rows)

    def _exchange(self, parts: Sequence[Tuple[torch.Tensor, ...]], k: int) -> List[Tuple[torch.Tensor, ...]]:
        """Send ``parts[r]`` (``k`` int64 columns of equal length) to rank ``r``; returns what
        every rank sent this one, by rank."""
        send = [torch.stack([c.to(torch.int64) for c in cols], 1) if cols[0].numel()
                else torch.zeros(0, k, dtype=torch.int64) for cols in parts]
        n_send = torch.tensor([t.shape[0] for t in send], dtype=torch.int64)
        n_recv = torch.empty(self.size, dtype=torch.int64)
        dist.all_to_all_single(n_recv, n_send, group=self.pg)
        if bool((n_recv < 0).any()) or bool((n_recv > self.max_rows).any()):
            raise EsdConfigError(f"split step rank {self.rank}: peers announced {n_recv.tolist()} rows,"
                                 f" outside [0, {self.max_rows}]")
        out = torch.empty(int(n_recv.sum()) * k, dtype=torch.int64)
        dist.all_to_all_single(out, torch.cat(send).reshape(-1), (n_recv * k).tolist(), (n_send * k).tolist(),
                               group=self.pg)
        return [tuple(p[:, i] for i in range(k)) for p in torch.split(out.view(-1, k), n_recv.tolist())]

    def step(self, keys: torch.Tensor, owner: torch.Tensor, num_samples: Sequence[int], summaries: bool = False,
             flush: Sequence[int] = (), upcoming: Sequence[KeyedJaggedTensor] = ()
             ) -> Tuple[Dict[int, WorkerPlan], Optional[List[StepSummary]]]:
        """One iteration: ``keys`` / ``owner`` the row keys of this group's samples' values and
        their workers, ``num_samples`` every worker's samples.  Returns this group's plans
        (by worker) and, with ``summaries``, its workers' summaries."""
        counts = self._exchange(self.group.count(keys, owner, [num_samples[w] for w in self.group.workers]), 2)
        totals = self._exchange(self.shard.route(counts), 2)
        plans, sums, reports = self.group.step(totals, summaries=summaries, flush=flush, upcoming=upcoming)
        self.shard.apply(self._exchange(reports, 4))
        return plans, sums
