"""Per-table snapshots of the worker caches (built by hand in tests and
benchmarks, or by :meth:`~torchrec_esd.cache.CacheDirectory.views`), and their
reading as a :class:`~torchrec_esd.cache.state.CacheState`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Sequence

import torch

from torchrec_esd.cache.state import CacheHits, CacheLookup


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


def slots_view(st: "WorkerSlots", tables: Sequence, row_offset: torch.Tensor) -> WorkerCacheView:  # noqa: F821
    """One worker's :class:`~torchrec_esd.cache.slots.WorkerSlots` as per-table
    views (a copy is outdated when it lags and is not dirty).  O(slots)."""
    occ = (st.keys >= 0).nonzero().view(-1)  # slots are table-major
    keys = st.keys[occ]
    outdated = (st.lag[occ] > 0) & ~st.dirty[occ]
    dirty = st.dirty[occ]
    counts = torch.bincount(st.slot_table[occ], minlength=len(tables)).tolist()
    parts = zip(torch.split(keys, counts), torch.split(outdated, counts), torch.split(dirty, counts))
    return {
        t.name: TableCacheView(ids=k - row_offset[ti], outdated=o, dirty=d, capacity=int(st.capacity[ti]))
        for ti, (t, (k, o, d)) in enumerate(zip(tables, parts))
    }


class TableViewsState:
    """Per-worker, per-table views read as a :class:`CacheState`.

    Args:
        views: per worker, table name -> :class:`TableCacheView` (a table
            without a view has nothing cached).
        tables: table names in row-key order.
        table_rows: ``[T]`` rows of every table.
        default_capacity: ``[W, T]`` capacity of the tables without a view.
    """

    def __init__(self, views: Sequence[Mapping[str, TableCacheView]], tables: Sequence[str],
                 table_rows: torch.Tensor, default_capacity: torch.Tensor) -> None:
        W, T = default_capacity.shape
        if len(views) != W:
            raise ValueError(f"{len(views)} cache views for {W} workers")
        self.tables = list(tables)
        index = {n: t for t, n in enumerate(self.tables)}
        row_offset = torch.zeros(T + 1, dtype=torch.int64)
        row_offset[1:] = torch.cumsum(table_rows, 0)
        ids, od, dt, seg_w, seg_t, seg_n = [], [], [], [], [], []
        cap = default_capacity.clone()
        for w, view in enumerate(views):
            for name, v in view.items():
                t = index.get(name)
                if t is None:
                    raise ValueError(f"worker {w}: cache view names unknown table {name!r}")
                ids.append(v.ids.view(-1))
                od.append(v.outdated.view(-1))
                dt.append(v.dirty.view(-1))
                seg_w.append(w)
                seg_t.append(t)
                seg_n.append(v.ids.numel())
                cap[w, t] = int(v.capacity)
        self.capacity = cap
        self.occupied = torch.zeros(W, T, dtype=torch.int64)
        self.ndirty = torch.zeros(W, T, dtype=torch.int64)
        e = torch.zeros(0, dtype=torch.int64)
        # every cached row of every worker, sorted by global key
        self._keys, self._worker, self._outdated, self._dirty = e, e, e.bool(), e.bool()
        if not ids:
            return
        n = torch.tensor(seg_n, dtype=torch.int64)
        sw = torch.tensor(seg_w, dtype=torch.int64)
        st = torch.tensor(seg_t, dtype=torch.int64)
        flat_ids = torch.cat(ids).to(torch.int64)
        t_of = torch.repeat_interleave(st, n)
        w_of = torch.repeat_interleave(sw, n)
        bad = (flat_ids < 0) | (flat_ids >= table_rows[t_of])
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"worker {int(w_of[i])}: cached id {int(flat_ids[i])} is outside table"
                f" {self.tables[int(t_of[i])]!r}"
            )
        dirty = torch.cat(dt).to(torch.bool)
        seg = sw * T + st
        self.occupied.view(-1).index_add_(0, seg, n)
        self.ndirty.view(-1).index_add_(0, torch.repeat_interleave(seg, n), dirty.to(torch.int64))
        keys = flat_ids + row_offset[t_of]
        order = torch.argsort(keys, stable=True)
        self._keys, self._worker = keys[order], w_of[order]
        self._outdated, self._dirty = torch.cat(od).to(torch.bool)[order], dirty[order]

    def __len__(self) -> int:
        return self.capacity.shape[0]

    def lookup(self, keys: torch.Tensor) -> CacheLookup:
        """The cached pairs of the ascending ``keys``: one binary search per
        cached row, ``O(C log U)`` for ``C`` cached rows (dense ``[W, U]`` on demand)."""
        W, u = self.capacity.shape[0], keys.numel()
        e = torch.empty(0, dtype=torch.int64)
        hits = CacheHits(e, e, e.bool(), e.bool())
        if self._keys.numel() and u:
            pos = torch.searchsorted(keys, self._keys).clamp_(max=u - 1)
            hit = (keys[pos] == self._keys).nonzero().view(-1)
            hits = CacheHits(self._worker[hit], pos[hit], self._outdated[hit], self._dirty[hit])
        return CacheLookup.from_hits(hits, W, u)
