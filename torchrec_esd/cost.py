"""Expected embedding transmission cost of dispatching a sample to a worker.

Given the dispatcher's mirror of every worker's cache (one
:class:`TableCacheView` per worker and table) and each worker's link, the cost
matrix ``c[s, w]`` (float64 seconds, ``[B, W]``) is the link time that putting
sample ``s`` on worker ``w`` is expected to cause.  Per distinct row id ``x`` of
the sample (``rt_w = row_bytes / bytes_per_second_w``, ``row_bytes =
embedding_dim * value_bytes + optimizer_state_bytes_per_row``):

* cached on ``w`` and fresh: ``0``;
* cached on ``w`` but outdated: ``rt_w`` (**update-pull**);
* not cached on ``w``: ``rt_w`` (**miss-pull**) plus the expected
  **miss-push** of the row it evicts: if ``w``'s cache of the table is full
  (``len(ids) >= capacity``), the fraction of dirty rows in it times ``rt_w``;
* in every case, if another worker ``w'`` holds ``x`` dirty (the only
  up-to-date copy), ``+ rt_{w'}``: ``w'`` must **update-push** it first.

The matrix is additive over the DISTINCT keys of each sample (an id used twice
in one bag counts once); an id shared by two samples placed on the same worker
is counted for both, and latency (a per-message constant) is not in it.
:meth:`CostModel.measure` gives the true, de-duplicated cost of an assignment.

:meth:`CostModel.dedup_cost` gives that true cost as a model a dispatcher can
optimise (:class:`DedupCost`): per distinct row, the cost of the set of
workers that use it (pulls once per worker, one gradient push per user when
the row is shared, the dirty owner's push), with exact single-move changes
(:meth:`DedupCost.move_deltas`) and amortised per-sample costs
(:meth:`DedupCost.amortised_matrix`); the ``esd`` dispatcher decides on it.

For the ``"makespan"`` objective the same matrix is used; the dirty-elsewhere
push really loads ``w'``'s link, not ``w``'s, which the per-worker sums of the
additive model attribute to ``w`` (``measure`` puts it on ``w'``).

Computation.  The C++ operators of :mod:`torchrec_esd.ops` do the per-sample
work: one :func:`~torchrec_esd.ops.id_table_build` over the batch's distinct
global row keys, one :func:`~torchrec_esd.ops.id_table_lookup` of all
workers' cached keys into that table (to read the cache state of every batch
key),
and one :func:`~torchrec_esd.ops.sample_cost_matrix` that sums, per sample and
worker, the weights of the sample's distinct keys.  Every batch key is in the
(shared) table, so the per-worker weight vectors carry the full per-key cost
(fresh / outdated / miss + expected miss-push, + dirty-elsewhere push) and
``miss_weight`` is never used: unlike a per-worker scalar miss weight, this is
exact when tables differ in row size or in the dirty fraction of their cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd import ops
from torchrec_esd.config import EsdConfig
from torchrec_esd.des_misses import KEY_BYTES, des_bag_bytes

KINDS = ("miss_pull", "miss_push", "update_pull", "update_push")


@dataclass
class TableCacheView:
    """One worker's cache of one table (a snapshot of the cache mirror).

    Attributes:
        ids: distinct cached row ids of the table (int64 ``[M]``).
        outdated: the cached copy is older than the latest value and needs an
            update-pull before use (bool ``[M]``).
        dirty: this worker holds the only up-to-date copy; the PS is stale
            (bool ``[M]``).
        capacity: cache capacity in rows.
    """

    ids: torch.Tensor
    outdated: torch.Tensor
    dirty: torch.Tensor
    capacity: int

    def __post_init__(self) -> None:
        m = self.ids.numel()
        if self.outdated.numel() != m or self.dirty.numel() != m:
            raise ValueError(
                f"TableCacheView: ids ({m}), outdated ({self.outdated.numel()}) and dirty"
                f" ({self.dirty.numel()}) must have the same length"
            )
        if m > self.capacity:
            raise ValueError(f"TableCacheView: {m} cached ids exceed the capacity {self.capacity}")


WorkerCacheView = Dict[str, TableCacheView]


@dataclass
class DirectoryCacheViews:
    """Every worker's cache as the cost model reads it, straight from a
    :class:`~torchrec_esd.cache.CacheDirectory` (its :meth:`cost_views`),
    without per-table views: per ``(worker, table)`` rows cached, dirty rows
    and capacity, and ``lookup(keys)``: for ascending distinct global row
    keys, ``(cached, outdated, dirty)``, each bool ``[W, len(keys)]``.
    ``lookup`` reads the directory's current state: use the views before the
    directory plans the next iteration.  Row keys follow ``tables``."""

    tables: List[str]
    occupied: torch.Tensor  # [W, T] int64
    ndirty: torch.Tensor  # [W, T] int64
    capacity: torch.Tensor  # [W, T] int64
    lookup: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    def __len__(self) -> int:
        return self.capacity.shape[0]


def segment_sum(rows: np.ndarray, segment: np.ndarray, num_segments: int) -> np.ndarray:
    """``out[j] = sum of rows[i] with segment[i] == j`` (float64 ``[num_segments, W]``)."""
    out = torch.zeros(num_segments, rows.shape[1], dtype=torch.float64)
    if segment.size:
        out.index_add_(0, torch.from_numpy(np.ascontiguousarray(segment, dtype=np.int64)),
                       torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float64)))
    return out.numpy()


class DedupCost:
    """De-duplicated transmission cost of one batch as a function of an assignment.

    The cost :meth:`CostModel.measure` reports is separable over the batch's
    DISTINCT rows: a row ``x`` costs what the set ``U_x`` of workers whose
    samples use it causes, whatever the number of samples behind each worker.
    With the cache state of the batch (``pull[x, w]``: ``0`` fresh,
    ``rt_w`` outdated (update-pull), ``rt_w + e_w`` not cached (miss-pull plus
    the expected miss-push of the row it evicts); ``push[x, w] = rt_w``; the
    worker ``o_x`` holding ``x`` dirty, if any):

    ``f_x(U) = sum_{w in U} pull[x, w]``
    ``      + [|U| > 1] * sum_{w in U} push[x, w]``  (every user pushes its gradient
    to the PS: staleness-0 synchronisation of a shared row; a sole user
    updates its cached copy locally)
    ``      + [o_x exists and U != {o_x}] * rt_{o_x}``  (the dirty copy is pushed
    first, on ``o_x``'s link).

    The total is ``sum_x f_x(U_x)``; :meth:`per_worker` attributes every term
    to the link that carries it.  Compared with :meth:`CostModel.measure`, the
    only approximation is the eviction push (expected dirty fraction per miss,
    as in the matrix) and that misses beyond a full cache's free slots are
    treated like cached ones (``measure`` counts a gradient push for such
    transient rows of sole users).

    Arrays (numpy): ``occ_s``/``occ_k`` the distinct (sample, row) pairs
    (sorted by sample), ``pull``/``push`` ``[U, W]``, ``owner`` ``[U]``
    (``-1``: none), ``owner_push`` ``[U]`` (``rt`` of the owner's link).
    """

    def __init__(self, num_samples, num_workers, occ_s, occ_k, pull, push, owner, owner_push):
        self.num_samples = int(num_samples)
        self.num_workers = int(num_workers)
        self.occ_s = np.ascontiguousarray(occ_s, dtype=np.int64)
        self.occ_k = np.ascontiguousarray(occ_k, dtype=np.int64)
        self.pull = np.ascontiguousarray(pull, dtype=np.float64)
        self.push = np.ascontiguousarray(push, dtype=np.float64)
        self.owner = np.ascontiguousarray(owner, dtype=np.int64)
        self.owner_push = np.ascontiguousarray(owner_push, dtype=np.float64)
        self.num_keys = self.pull.shape[0]
        if self.pull.shape != (self.num_keys, self.num_workers) or self.push.shape != self.pull.shape:
            raise ValueError("DedupCost: pull and push must be [num_keys, num_workers]")
        if self.occ_s.shape != self.occ_k.shape:
            raise ValueError("DedupCost: occ_s and occ_k must have the same length")
        # samples using each row (the batch frequency used by amortised costs)
        self.uses = np.bincount(self.occ_k, minlength=self.num_keys).astype(np.float64)
        self._index = None

    def occurrence_index(self):
        """``(sample_ptr, by_key, key_ptr)``: the occurrences of sample ``s``
        are ``sample_ptr[s]:sample_ptr[s + 1]``; those of row ``x`` are
        ``by_key[key_ptr[x]:key_ptr[x + 1]]`` (computed once)."""
        if self._index is None:
            by_key = np.argsort(self.occ_k, kind="stable")
            self._index = (
                np.searchsorted(self.occ_s, np.arange(self.num_samples + 1)),
                by_key,
                np.searchsorted(self.occ_k[by_key], np.arange(self.num_keys + 1)),
            )
        return self._index

    # ----------------------------------------------------------- transforms
    def restrict(self, workers) -> "DedupCost":
        """The same batch on a subset of the workers (e.g. those with a
        positive share): a row's dirty owner outside the subset still pushes
        it whenever it is used (its link is not part of the problem)."""
        idx = np.asarray(list(workers), dtype=np.int64)
        remap = np.full(self.num_workers, -1, dtype=np.int64)
        remap[idx] = np.arange(idx.size)
        owner = np.where(self.owner >= 0, remap[np.maximum(self.owner, 0)], -1)
        # an owner outside the subset always pushes: a constant, kept out
        owner_push = np.where(owner >= 0, self.owner_push, 0.0)
        return DedupCost(self.num_samples, idx.size, self.occ_s, self.occ_k, self.pull[:, idx],
                         self.push[:, idx], owner, owner_push)

    def scaled(self, weights) -> "DedupCost":
        """Every worker's link costs times ``weights[w]`` (e.g. makespan multipliers)."""
        lam = np.asarray(weights, dtype=np.float64).reshape(1, -1)
        op = self.owner_push * np.where(self.owner >= 0, lam[0, np.maximum(self.owner, 0)], 0.0)
        out = DedupCost(self.num_samples, self.num_workers, self.occ_s, self.occ_k,
                        self.pull * lam, self.push * lam, self.owner, op)
        out._index = self._index  # same occurrences
        return out

    # ----------------------------------------------------------- evaluation
    def counts(self, assignment) -> np.ndarray:
        """``[U, W]``: samples of each worker that use each row."""
        a = np.asarray(assignment, dtype=np.int64)
        W = self.num_workers
        return np.bincount(self.occ_k * W + a[self.occ_s], minlength=self.num_keys * W).reshape(
            self.num_keys, W
        )

    def key_state(self, used: np.ndarray, keys: Optional[np.ndarray] = None):
        """Per row, given its user set ``used`` (bool ``[n, W]``, rows ``keys``
        or all): ``(n_users, pull_sum, push_sum, cost)`` where ``push_sum``
        sums every user's push whether or not the row is shared and ``cost``
        is ``f_x(U_x)``."""
        k = np.arange(self.num_keys) if keys is None else keys
        n_users = used.sum(1)
        pull = (self.pull[k] * used).sum(1)
        push = (self.push[k] * used).sum(1)
        owner = self.owner[k]
        only_owner = (n_users == 1) & used[np.arange(k.size), np.maximum(owner, 0)]
        dirty = np.where((owner >= 0) & ~only_owner & (n_users > 0), self.owner_push[k], 0.0)
        return n_users, pull, push, pull + np.where(n_users > 1, push, 0.0) + dirty

    def key_costs(self, counts: np.ndarray) -> np.ndarray:
        """``f_x(U_x)`` of every row given the per-worker use counts."""
        return self.key_state(counts > 0)[3]

    def total(self, assignment) -> float:
        """Predicted de-duplicated link seconds of ``assignment`` (sum over links)."""
        return float(self.key_costs(self.counts(assignment)).sum())

    def per_worker(self, assignment) -> np.ndarray:
        """``[W]`` predicted link seconds of every worker (its pulls, its
        gradient pushes, and the dirty rows it pushes)."""
        used = self.counts(assignment) > 0
        n_users = used.sum(1)
        out = (self.pull * used + np.where((n_users > 1)[:, None], self.push * used, 0.0)).sum(0)
        has = self.owner >= 0
        only_owner = (n_users == 1) & used[np.arange(self.num_keys), np.maximum(self.owner, 0)]
        pushed = has & ~only_owner & (n_users > 0)
        out += np.bincount(self.owner[pushed], weights=self.owner_push[pushed], minlength=self.num_workers)
        return out

    def occurrence_deltas(self, occ: np.ndarray, assignment, counts: np.ndarray, state=None) -> np.ndarray:
        """``[len(occ), W]``: change of row ``occ_k[i]``'s cost when sample
        ``occ_s[i]`` alone moves to each worker (``0`` for its own worker);
        ``state`` is :meth:`key_state` of all rows (computed if not given)."""
        a = np.asarray(assignment, dtype=np.int64)
        W = self.num_workers
        used = counts > 0
        n_users, pull, push, f = self.key_state(used) if state is None else state
        k, s = self.occ_k[occ], self.occ_s[occ]
        w = a[s]
        r = np.arange(k.size)
        drop = counts[k, w] == 1
        add = ~used[k]  # [n, W]
        pk, qk = self.pull[k], self.push[k]
        dr = drop.astype(np.float64)[:, None]
        n2 = n_users[k][:, None] - drop[:, None] + add
        pull2 = pull[k][:, None] - dr * pk[r, w][:, None] + add * pk
        push2 = push[k][:, None] - dr * qk[r, w][:, None] + add * qk
        ok = self.owner[k]
        # with |U'| == 1 the sole user is v (if w stays, v joins: |U'| >= 2)
        only_owner = (n2 == 1) & (np.arange(W)[None, :] == ok[:, None])
        f2 = pull2 + np.where(n2 > 1, push2, 0.0) + np.where(
            (ok >= 0)[:, None] & ~only_owner, self.owner_push[k][:, None], 0.0
        )
        d = f2 - f[k][:, None]
        d[r, w] = 0.0
        return d

    def movable(self, occ: np.ndarray, assignment, counts: np.ndarray, n_users: np.ndarray) -> np.ndarray:
        """Occurrences whose row can change its user set when their sample
        moves (its worker's only user of the row, or a worker without it);
        the others have a zero :meth:`occurrence_deltas` row."""
        a = np.asarray(assignment, dtype=np.int64)
        k = self.occ_k[occ]
        return (counts[k, a[self.occ_s[occ]]] == 1) | (n_users[k] < self.num_workers)

    def move_deltas(self, assignment, counts: Optional[np.ndarray] = None) -> np.ndarray:
        """``[B, W]``: exact change of :meth:`total` when sample ``s`` alone
        moves to worker ``v`` (``0`` for its own worker).

        Only rows whose user set can change matter (:meth:`movable`); a row
        every worker already uses several times is skipped."""
        a = np.asarray(assignment, dtype=np.int64)
        B = self.num_samples
        cnt = self.counts(a) if counts is None else counts
        state = self.key_state(cnt > 0)
        occ = np.flatnonzero(self.movable(np.arange(self.occ_k.size), a, cnt, state[0]))
        d = self.occurrence_deltas(occ, a, cnt, state)
        return segment_sum(d, self.occ_s[occ], B)

    def additive_matrix(self) -> np.ndarray:
        """``[B, W]`` the additive matrix of :meth:`CostModel.matrix` (every
        distinct row of a sample charged to it: pull + the dirty owner's push)."""
        B = self.num_samples
        h = self.pull.copy()
        has = np.flatnonzero(self.owner >= 0)
        h[has] += self.owner_push[has, None]
        h[has, self.owner[has]] -= self.owner_push[has]
        return segment_sum(h[self.occ_k], self.occ_s, B)

    def amortised_matrix(self, shares: Sequence[int]) -> np.ndarray:
        """``[B, W]`` additive costs with every row's cost spread over the
        samples expected to share it.

        A row used by ``n_x`` samples of the batch is expected on worker ``w``
        ``m = 1 + (n_x - 1) (B_w - 1) / (B - 1)`` times if ``s`` is there
        (random placement of the others), and some other sample uses it
        elsewhere with probability ``p = 1 - (B_w / B)^(n_x - 1)`` (then every
        user pushes).  Entry: ``sum_{x in s} (pull[x, w] + p push[x, w]) / m``
        plus the dirty owner's push shared by the ``n_x`` users (only with
        probability ``p`` on the owner itself).  Hot rows, paid once per
        worker whatever the dispatch, stop dominating; rare rows decide."""
        W, B = self.num_workers, self.num_samples
        sh = np.asarray(shares, dtype=np.float64).reshape(1, -1)
        n = self.uses[:, None]
        m = 1.0 + (n - 1.0) * np.maximum(sh - 1.0, 0.0) / max(1, B - 1)
        p_shared = 1.0 - (sh / max(1, B)) ** np.maximum(n - 1.0, 0.0)
        h = (self.pull + p_shared * self.push) / m
        has = self.owner >= 0
        if has.any():
            o = np.maximum(self.owner, 0)
            share = self.owner_push / np.maximum(self.uses, 1.0)
            extra = np.repeat(share[:, None], W, axis=1)
            rows = np.flatnonzero(has)
            extra[rows, o[rows]] *= p_shared[rows, o[rows]]
            h = h + np.where(has[:, None], extra, 0.0)
        return segment_sum(h[self.occ_k], self.occ_s, B)


@dataclass
class _BatchState:
    keys: torch.Tensor  # [N] sample-major global row keys
    offsets: torch.Tensor  # [B+1]
    uniq: torch.Tensor  # [U] distinct keys of the batch (sorted)
    slots: torch.Tensor  # id table of uniq
    table_of: torch.Tensor  # [U] table index of every distinct key
    cached: torch.Tensor  # [W, U] bool
    outdated: torch.Tensor  # [W, U] bool (only meaningful where cached)
    dirty: torch.Tensor  # [W, U] bool
    occupied: Optional[torch.Tensor] = None  # [W, T] cached rows
    ndirty: Optional[torch.Tensor] = None  # [W, T] dirty cached rows
    cap: Optional[torch.Tensor] = None  # [W, T] capacity


class CostModel:
    """Cost matrix and measured cost of dispatching a global batch.

    Args:
        config: topology (links of every worker, cache capacities).
        tables: the embedding tables; a KJT feature maps to the table listing
            it in ``feature_names``.  Global row key of id ``i`` of table ``t``
            is ``row_offset[t] + i`` (tables in the given order).
        value_bytes: bytes per embedding value (4 for fp32).
        optimizer_state_bytes_per_row: optimizer state moved with every row.
    """

    def __init__(
        self,
        config: EsdConfig,
        tables: Sequence[EmbeddingBagConfig],
        value_bytes: int = 4,
        optimizer_state_bytes_per_row: int = 0,
    ) -> None:
        if value_bytes <= 0:
            raise ValueError(f"value_bytes must be > 0, got {value_bytes}")
        if optimizer_state_bytes_per_row < 0:
            raise ValueError(
                f"optimizer_state_bytes_per_row must be >= 0, got {optimizer_state_bytes_per_row}"
            )
        self.config = config
        self.tables = list(tables)
        if not self.tables:
            raise ValueError("CostModel needs at least one embedding table")
        self.num_workers = config.num_workers
        self.table_names = [t.name for t in self.tables]
        self._last_state: Optional[tuple] = None  # (kjt, views, _BatchState) of the last _state call
        self.table_index = {t.name: i for i, t in enumerate(self.tables)}
        if len(self.table_index) != len(self.tables):
            raise ValueError("CostModel: two tables have the same name")
        self.table_rows = torch.tensor([t.num_embeddings for t in self.tables], dtype=torch.int64)
        self.row_offset = torch.zeros(len(self.tables) + 1, dtype=torch.int64)
        self.row_offset[1:] = torch.cumsum(self.table_rows, 0)
        self.feature_table: Dict[str, int] = {}
        for i, t in enumerate(self.tables):
            for f in t.feature_names:
                if f in self.feature_table:
                    raise ValueError(f"feature {f!r} is mapped to two tables")
                self.feature_table[f] = i
        self.row_bytes = torch.tensor(
            [t.embedding_dim * value_bytes + optimizer_state_bytes_per_row for t in self.tables],
            dtype=torch.float64,
        )
        bps = torch.tensor([w.bytes_per_second for w in config.workers], dtype=torch.float64)
        self.bytes_per_second = bps
        self.value_bytes = value_bytes
        self.table_dims = torch.tensor([t.embedding_dim for t in self.tables], dtype=torch.int64)
        # rt[w, t]: seconds to move one row of table t over worker w's link
        self.row_time = self.row_bytes.view(1, -1) / bps.view(-1, 1)
        self.capacity = torch.tensor(
            [[w.cache_rows_for(n) for n in self.table_names] for w in config.workers],
            dtype=torch.int64,
        )

    # ------------------------------------------------------------------ keys
    def row_keys(self, kjt: KeyedJaggedTensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sample-major global row keys of a batch and their per-sample offsets.

        ``keys[offsets[s]:offsets[s+1]]`` are the keys of sample ``s``, feature
        by feature in ``kjt.keys()`` order; key = ``row_offset[table] + id``.
        """
        feats = list(kjt.keys())
        nf = len(feats)
        b = kjt.stride()
        lengths = kjt.lengths().view(nf, b).to(torch.int64) if nf else torch.zeros(0, b, dtype=torch.int64)
        values = kjt.values().to(torch.int64)
        tidx = []
        for f in feats:
            if f not in self.feature_table:
                raise ValueError(
                    f"KJT feature {f!r} has no embedding table (tables cover"
                    f" {sorted(self.feature_table)})"
                )
            tidx.append(self.feature_table[f])
        if values.numel() == 0:
            return values.new_zeros(0), torch.zeros(b + 1, dtype=torch.int64)
        tidx_t = torch.tensor(tidx, dtype=torch.int64)
        l0 = int(lengths[0, 0])
        if bool((lengths == l0).all()):
            # fixed bag size (e.g. one-hot Criteo): a reshape, no gather
            vals = values.view(nf, b, l0)
            rows = self.table_rows[tidx_t].view(nf, 1, 1)
            bad = (vals < 0) | (vals >= rows)
            if bool(bad.any()):
                f, _, _ = (int(x) for x in bad.nonzero()[0])
                i = int(bad.view(-1).nonzero()[0])
                self._bad_id(feats[f], int(tidx_t[f]), int(values[i]))
            keys = (vals + self.row_offset[tidx_t].view(nf, 1, 1)).permute(1, 0, 2).reshape(-1)
            offsets = torch.arange(0, (b + 1) * nf * l0, nf * l0, dtype=torch.int64)
            return keys, offsets
        per_feat = lengths.sum(1)
        feat_of = torch.repeat_interleave(torch.arange(nf), per_feat)
        t_of = tidx_t[feat_of]
        bad = (values < 0) | (values >= self.table_rows[t_of])
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            self._bad_id(feats[int(feat_of[i])], int(t_of[i]), int(values[i]))
        gkeys = values + self.row_offset[t_of]
        # feature-major bags (f, s) -> sample-major bags (s, f), without a sort
        flat_fm = lengths.reshape(-1)
        start_fm = torch.cumsum(flat_fm, 0) - flat_fm
        flat_sm = lengths.t().reshape(-1)
        start_sm = (torch.cumsum(flat_sm, 0) - flat_sm).view(b, nf).t().reshape(-1)
        bag = torch.repeat_interleave(torch.arange(nf * b), flat_fm)
        dest = start_sm[bag] + (torch.arange(values.numel()) - start_fm[bag])
        keys = torch.empty_like(gkeys)
        keys[dest] = gkeys
        offsets = torch.zeros(b + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths.sum(0), 0)
        return keys, offsets

    def _bad_id(self, feature: str, table: int, value: int) -> None:
        t = self.tables[table]
        raise ValueError(
            f"feature {feature!r}: id {value} is outside table {t.name!r}"
            f" of {t.num_embeddings} rows"
        )

    # --------------------------------------------------------------- state
    def _check_views(self, views: Sequence[WorkerCacheView]) -> None:
        if len(views) != self.num_workers:
            raise ValueError(f"{len(views)} cache views for {self.num_workers} workers")

    def _flatten_views(self, views: Sequence[WorkerCacheView]):
        """All cached keys of all workers at once: ``(global keys, worker,
        outdated, dirty)`` per cached row, plus per ``(worker, table)``: rows
        cached, dirty rows, capacity."""
        self._check_views(views)
        W, T = self.num_workers, len(self.tables)
        ids, od, dt, seg_w, seg_t, seg_n = [], [], [], [], [], []
        cap = self.capacity.clone()
        for w, view in enumerate(views):
            for name, v in view.items():
                t = self.table_index.get(name)
                if t is None:
                    raise ValueError(f"worker {w}: cache view names unknown table {name!r}")
                ids.append(v.ids.view(-1))
                od.append(v.outdated.view(-1))
                dt.append(v.dirty.view(-1))
                seg_w.append(w)
                seg_t.append(t)
                seg_n.append(v.ids.numel())
                cap[w, t] = int(v.capacity)
        occupied = torch.zeros(W, T, dtype=torch.int64)
        ndirty = torch.zeros(W, T, dtype=torch.int64)
        if not ids:
            e = torch.zeros(0, dtype=torch.int64)
            return e, e, e.bool(), e.bool(), occupied, ndirty, cap
        n = torch.tensor(seg_n, dtype=torch.int64)
        sw = torch.tensor(seg_w, dtype=torch.int64)
        stt = torch.tensor(seg_t, dtype=torch.int64)
        flat_ids = torch.cat(ids).to(torch.int64)
        dirty = torch.cat(dt).to(torch.bool)
        outdated = torch.cat(od).to(torch.bool)
        t_of = torch.repeat_interleave(stt, n)
        w_of = torch.repeat_interleave(sw, n)
        bad = (flat_ids < 0) | (flat_ids >= self.table_rows[t_of])
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"worker {int(w_of[i])}: cached id {int(flat_ids[i])} is outside table"
                f" {self.table_names[int(t_of[i])]!r}"
            )
        seg = sw * T + stt
        occupied.view(-1).index_add_(0, seg, n)
        seg_of = torch.repeat_interleave(seg, n)
        ndirty.view(-1).index_add_(0, seg_of, dirty.to(torch.int64))
        return flat_ids + self.row_offset[t_of], w_of, outdated, dirty, occupied, ndirty, cap

    def _state(self, kjt: KeyedJaggedTensor, views: Sequence[WorkerCacheView]) -> _BatchState:
        # a dispatcher that reads several inputs (matrix, hits, de-duplicated model)
        # of one batch asks with the same two objects: build the state once
        memo = self._last_state
        if memo is not None and memo[0] is kjt and memo[1] is views:
            return memo[2]
        st = self._build_state(kjt, views)
        self._last_state = (kjt, views, st)
        return st

    def _build_state(self, kjt: KeyedJaggedTensor, views: Sequence[WorkerCacheView]) -> _BatchState:
        keys, offsets = self.row_keys(kjt)
        uniq = torch.unique(keys)
        slots = ops.id_table_build(uniq)
        table_of = torch.searchsorted(self.row_offset, uniq, right=True) - 1
        if isinstance(views, DirectoryCacheViews):
            if list(views.tables) != list(self.table_names) or tuple(views.capacity.shape) != tuple(
                self.capacity.shape
            ):
                raise ValueError(
                    f"directory cache views of tables {views.tables} for {len(views)} workers do not "
                    f"match the cost model's tables {self.table_names} and {self.num_workers} workers"
                )
            cached, outdated, dirty = views.lookup(uniq)
            st = _BatchState(keys, offsets, uniq, slots, table_of, cached, outdated, dirty)
            st.occupied, st.ndirty, st.cap = views.occupied, views.ndirty, views.capacity
            return st
        ck, cw, cod, cdt, occupied, ndirty, cap = self._flatten_views(views)
        u = uniq.numel()
        W = self.num_workers
        cached = torch.zeros(W, u, dtype=torch.bool)
        outdated = torch.zeros(W, u, dtype=torch.bool)
        dirty = torch.zeros(W, u, dtype=torch.bool)
        if ck.numel() and u:
            idx = ops.id_table_lookup(slots, ck)
            hit = (idx >= 0).nonzero().view(-1)
            flat = cw[hit] * u + idx[hit]
            cached.view(-1)[flat] = True
            outdated.view(-1)[flat] = cod[hit]
            dirty.view(-1)[flat] = cdt[hit]
        st = _BatchState(keys, offsets, uniq, slots, table_of, cached, outdated, dirty)
        st.occupied, st.ndirty, st.cap = occupied, ndirty, cap
        return st

    def _evict_fraction(self, st: _BatchState) -> torch.Tensor:
        """[W, T]: dirty fraction of the cache where it is full, else 0."""
        full = (st.occupied > 0) & (st.occupied >= st.cap)
        frac = st.ndirty.double() / st.occupied.clamp(min=1).double()
        return torch.where(full, frac, torch.zeros_like(frac))

    def _key_costs(self, st: _BatchState) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(own, push_elsewhere)``, each ``[W, U]``: the cost of every distinct
        batch key on every worker's own link (0 fresh, update-pull, or miss-pull
        + expected miss-push), and the dirty owner's push it causes elsewhere."""
        rt = self.row_time[:, st.table_of]  # [W, U]
        evict = (self._evict_fraction(st) * self.row_time)[:, st.table_of]
        push_all = (st.dirty.double() * rt).sum(0, keepdim=True)
        push_elsewhere = push_all - st.dirty.double() * rt
        own = torch.where(st.cached, st.outdated.double() * rt, rt + evict)
        return own, push_elsewhere

    def key_weights(self, st: _BatchState) -> torch.Tensor:
        """[W, U] expected cost of every distinct batch key on every worker."""
        own, push_elsewhere = self._key_costs(st)
        return own + push_elsewhere

    # --------------------------------------------------------------- matrix
    def matrix(self, kjt: KeyedJaggedTensor, views: Sequence[WorkerCacheView]) -> torch.Tensor:
        """Expected transmission cost ``c[s, w]`` (float64 seconds, ``[B, W]``).

        With ``config.des_misses`` every bag (sample, feature) is priced as the
        cheaper of pulling its rows to pull (each with its key up; see
        :mod:`torchrec_esd.des_misses` for why their later write-back is not
        charged) and having the PS serve them as one partial sum, plus in both
        cases the dirty-elsewhere pushes."""
        st = self._state(kjt, views)
        if self.config.des_misses:
            return self._des_matrix(kjt, st)
        weights = self.key_weights(st)
        return self._sum(st, [weights[w].contiguous() for w in range(self.num_workers)])

    def _des_matrix(self, kjt: KeyedJaggedTensor, st: _BatchState) -> torch.Tensor:
        W, b, nf = self.num_workers, st.offsets.numel() - 1, len(kjt.keys())
        if st.keys.numel() == 0:
            return torch.zeros(b, W, dtype=torch.float64)
        bag_len = kjt.lengths().view(nf, b).to(torch.int64).t().reshape(-1)  # sample-major bags (s, f)
        bag_offsets = torch.zeros(b * nf + 1, dtype=torch.int64)
        bag_offsets[1:] = torch.cumsum(bag_len, 0)
        bps = self.bytes_per_second.view(-1, 1)  # [W, 1]
        own, push_elsewhere = self._key_costs(st)
        cand = (~st.cached | st.outdated).double()
        pull = own + cand * KEY_BYTES / bps
        miss = torch.zeros(W, dtype=torch.float64)

        def per_bag(weights: torch.Tensor) -> torch.Tensor:
            return ops.sample_cost_matrix(
                st.keys, bag_offsets, [st.slots] * W, [weights[w].contiguous() for w in range(W)], miss
            )

        n_cand = per_bag(cand)  # [B*F, W] rows of the bag this worker would pull
        feat_dim = self.table_dims[[self.feature_table[f] for f in kjt.keys()]]
        bag_dim = feat_dim.repeat(b).view(-1, 1)
        weighted = kjt.weights_or_none() is not None
        des = des_bag_bytes(n_cand, bag_dim, self.value_bytes, weighted) / bps.view(1, -1)
        c_bag = torch.minimum(per_bag(pull), des) + per_bag(push_elsewhere)
        return c_bag.view(b, nf, W).sum(1)

    def hit_matrix(self, kjt: KeyedJaggedTensor, views: Sequence[WorkerCacheView]) -> torch.Tensor:
        """``h[s, w]``: distinct ids of sample ``s`` cached on worker ``w``
        (fresh or outdated), float64 ``[B, W]`` (what LAIA-style dispatch uses)."""
        st = self._state(kjt, views)
        return self._sum(st, [st.cached[w].double().contiguous() for w in range(self.num_workers)])

    def _sum(self, st: _BatchState, weights: List[torch.Tensor]) -> torch.Tensor:
        b = st.offsets.numel() - 1
        if st.keys.numel() == 0:
            return torch.zeros(b, self.num_workers, dtype=torch.float64)
        miss = torch.zeros(self.num_workers, dtype=torch.float64)
        return ops.sample_cost_matrix(
            st.keys, st.offsets, [st.slots] * self.num_workers, weights, miss
        )

    def expected_matrix(
        self, kjt: KeyedJaggedTensor, views: Sequence[WorkerCacheView], shares: Optional[Sequence[int]] = None
    ) -> torch.Tensor:
        """``[B, W]`` expected cost of a sample on a worker with every row's
        cost shared by the samples expected to use it there
        (:meth:`DedupCost.amortised_matrix`, for ``shares``, by default the
        config's shares of this batch).  Unlike :meth:`matrix`, a hot row
        that the worker pulls once for many samples is not charged in full
        to each of them, so the rows that decide are the rare ones.

        With DES-served misses the per-bag DES price exists only in
        :meth:`matrix`, which is returned unchanged."""
        if self.config.des_misses:
            return self.matrix(kjt, views)
        if shares is None:
            shares = self.config.batch_shares(kjt.stride())
        return torch.from_numpy(self.dedup_cost(kjt, views).amortised_matrix(shares))

    # --------------------------------------------------------------- de-duplicated model
    def dedup_cost(self, kjt: KeyedJaggedTensor, views: Sequence[WorkerCacheView]) -> "DedupCost":
        """The batch's de-duplicated cost model (:class:`DedupCost`): the cost
        of an assignment as a function of which workers use each distinct row,
        so that a dispatcher can evaluate (and locally improve) the TRUE cost
        that :meth:`measure` reports instead of the additive matrix."""
        st = self._state(kjt, views)
        W = self.num_workers
        b = st.offsets.numel() - 1
        u = st.uniq.numel()
        if st.keys.numel():
            sample = torch.repeat_interleave(torch.arange(b), st.offsets[1:] - st.offsets[:-1])
            kidx = ops.id_table_lookup(st.slots, st.keys)
            pair = torch.unique(sample * u + kidx)  # distinct (sample, key), sorted by sample
            occ_s, occ_k = (pair // u).numpy(), (pair % u).numpy()
        else:
            occ_s = occ_k = np.zeros(0, dtype=np.int64)
        rt = self.row_time[:, st.table_of].t().contiguous().numpy()  # [U, W]
        dirty = st.dirty.t().numpy()
        pull = self._key_costs(st)[0].t().contiguous().numpy()  # own-link cost of using each row
        has_owner = dirty.any(1)
        owner = np.where(has_owner, dirty.argmax(1), -1)
        owner_push = np.where(has_owner, rt[np.arange(u), np.maximum(owner, 0)], 0.0)
        return DedupCost(b, W, occ_s, occ_k, pull, rt.copy(), owner, owner_push)

    # --------------------------------------------------------------- measure
    def measure(
        self,
        kjt: KeyedJaggedTensor,
        assignment: torch.Tensor,
        views: Sequence[WorkerCacheView],
    ) -> Dict:
        """True (de-duplicated) transmission of an assignment.

        Per worker ``w`` and per table, over the DISTINCT ids its samples use:

        * ``miss_pull``: ids not cached on ``w``;
        * ``update_pull``: ids cached on ``w`` but outdated;
        * ``miss_push``: dirty rows evicted to make room for the misses.  The
          number of evictions is exact (``misses - free slots``, at most the
          cached rows ``w`` does not use this iteration); which rows are evicted
          depends on the LRU/LFU order, which a view does not carry, so the
          dirty share among them is the expected one (dirty unused rows /
          unused rows; exact when every unused row is evicted);
        * ``update_push`` (on the pushing worker's link): a dirty row of ``w``
          that another worker uses this iteration (pushed once), plus one
          gradient push per using worker for ids used by more than one worker
          (synchronous, staleness-0 semantics), plus the gradients of ids that
          find no cache slot (misses beyond the capacity stay transient: the
          smallest ids get the slots, as in :class:`~torchrec_esd.cache.CacheDirectory`).

        Link seconds of a kind = ``bytes / bandwidth + latency`` if at least one
        row moves (one message per worker and kind).  Returns ``{"per_worker":
        [{kind: {"rows", "bytes", "seconds"}, "rows", "bytes", "seconds"}],
        "per_kind": {kind: {"rows", "bytes", "seconds"}}, "link_s": [W],
        "rows", "bytes", "total_s", "makespan_s"}``.
        """
        st = self._state(kjt, views)
        W = self.num_workers
        b = st.offsets.numel() - 1
        assignment = torch.as_tensor(assignment, dtype=torch.int64).view(-1)
        if assignment.numel() != b:
            raise ValueError(f"assignment has {assignment.numel()} entries for {b} samples")
        if b and (int(assignment.min()) < 0 or int(assignment.max()) >= W):
            raise ValueError(f"assignment names a worker outside [0, {W})")
        T = len(self.tables)
        u = st.uniq.numel()
        used = torch.zeros(W, u, dtype=torch.bool)
        if st.keys.numel():
            owner = torch.repeat_interleave(assignment, st.offsets[1:] - st.offsets[:-1])
            uk, ug, _ = ops.unique_keys_per_group(st.keys, owner, W)
            pos = ops.id_table_lookup(st.slots, uk)
            used[ug, pos] = True
        users = used.sum(0)  # [U]
        cached = st.cached
        tab = st.table_of.view(1, -1).expand(W, -1)
        flat_seg = (torch.arange(W).view(-1, 1) * T + tab).reshape(-1)

        def per_wt(mask: torch.Tensor) -> torch.Tensor:
            """[W, U] bool -> [W, T] counts."""
            return torch.bincount(flat_seg[mask.reshape(-1)], minlength=W * T).view(W, T).double()

        miss = used & ~cached
        rows = {
            "miss_pull": per_wt(miss),
            "update_pull": per_wt(used & cached & st.outdated),
            # a dirty copy that another worker uses is pushed first (once) ...
            # ... and every id with more than one user gets one gradient push per user
            "update_push": per_wt(st.dirty & ((users.view(1, -1) - used.long()) > 0))
            + per_wt(used & (users.view(1, -1) > 1)),
            "miss_push": torch.zeros(W, T, dtype=torch.float64),
        }
        # evictions: misses beyond the free slots evict rows w does not use
        n_miss = rows["miss_pull"]
        occupied = st.occupied.double()
        free = (st.cap.double() - occupied).clamp(min=0)
        unpinned = occupied - per_wt(used & cached)
        k = torch.minimum((n_miss - free).clamp(min=0), unpinned)
        dirty_unused = st.ndirty.double() - per_wt(st.dirty & (users.view(1, -1) > 0))
        rows["miss_push"] = torch.where(
            unpinned > 0, k * dirty_unused / unpinned.clamp(min=1), torch.zeros_like(k)
        )
        # misses beyond the slots stay transient (smallest ids get the slots) and
        # their gradient goes to the PS (if not already counted as shared)
        n_slot = free + k
        if u:
            cs = torch.cumsum(miss.long(), 1)  # [W, U]
            tstart = torch.searchsorted(st.uniq, self.row_offset[:-1])  # [T]
            before = torch.where(
                tstart.view(1, -1) > 0,
                cs[:, (tstart - 1).clamp(min=0)],
                torch.zeros(W, T, dtype=torch.long),
            )
            rank = cs - torch.gather(before, 1, tab)  # 1-based rank of a miss in its (w, t)
            slots_wt = torch.gather(n_slot, 1, tab)
            transient = miss & (rank.double() > slots_wt) & (users.view(1, -1) == 1)
            rows["update_push"] = rows["update_push"] + per_wt(transient)
        return self._summarize(rows)

    def _summarize(self, rows: Dict[str, torch.Tensor]) -> Dict:
        W = self.num_workers
        per_worker = []
        per_kind = {k: {"rows": 0.0, "bytes": 0.0, "seconds": 0.0} for k in KINDS}
        link = []
        for w, spec in enumerate(self.config.workers):
            d: Dict = {}
            tot_rows = tot_bytes = tot_s = 0.0
            for k in KINDS:
                r = float(rows[k][w].sum())
                by = float((rows[k][w] * self.row_bytes).sum())
                s = spec.link_time(by, 1.0) if r > 0 else 0.0
                d[k] = {"rows": r, "bytes": by, "seconds": s}
                per_kind[k]["rows"] += r
                per_kind[k]["bytes"] += by
                per_kind[k]["seconds"] += s
                tot_rows += r
                tot_bytes += by
                tot_s += s
            d.update(rows=tot_rows, bytes=tot_bytes, seconds=tot_s)
            per_worker.append(d)
            link.append(tot_s)
        return {
            "per_worker": per_worker,
            "per_kind": per_kind,
            "link_s": link,
            "rows": sum(p["rows"] for p in per_worker),
            "bytes": sum(p["bytes"] for p in per_worker),
            "total_s": float(sum(link)),
            "makespan_s": float(max(link)) if W else 0.0,
        }
