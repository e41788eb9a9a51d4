"""Worker embedding caches: the replicated cache directory and its plans.

:class:`CacheDirectory` holds the metadata of *every* worker's cache for every
table (which ids sit in which slot, LRU clock / LFU counts, dirty bits, copy
versions) plus, per row, the global version and which worker (if any) holds
the only up-to-date copy.  It is a deterministic function of the sequence of
``(global batch ids, assignment)`` it is fed, so the dispatcher's mirror and the
workers' real caches are the *same* object replicated on every worker rank:
no cache state ever needs to be exchanged.

Feeding it one iteration (:meth:`CacheDirectory.plan`) returns, per worker and
table, the :class:`TablePlan` that the worker's sharded embedding module then
executes against its row storage (:class:`WorkerRowStore`):

1. *value pushes* (before the forward): dirty rows that are evicted
   (**miss-push**) or that another worker uses this iteration (**update-push**);
2. *pulls*: ids not cached (**miss-pull**) or cached but outdated beyond the
   staleness bound (**update-pull**);
3. after the backward, per used id: a *local update* when this worker is its
   only user this iteration and holds a current cached copy (the row becomes
   dirty here, nothing is sent), otherwise a *gradient push* to the PS
   (**update-push**), which sums all users' gradients before applying the
   optimizer -- exactly the synchronous semantics of vanilla TorchRec.

Staleness ``s``: a cached copy at most ``s`` versions behind the latest may be
used without a pull; a worker that used such a stale copy sends its gradient to
the PS (never applies it to its stale copy), so no update is ever lost.
``s = 0`` is strictly synchronous.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd.config import EsdConfig, EsdConfigError

KINDS = ("miss_pull", "miss_push", "update_pull", "update_push")


@dataclass
class TablePlan:
    """What one worker does for one table in one iteration."""

    used_ids: torch.Tensor  # (U,) sorted distinct ids this worker's samples use
    used_slot: torch.Tensor  # (U,) cache slot of each used id, -1 = transient
    push_ids: torch.Tensor  # ids whose value (+ optimizer state) is pushed first
    push_slots: torch.Tensor  # their cache slots (read before any pull)
    pull_pos: torch.Tensor  # positions in used_ids to pull from the PS
    local_pos: torch.Tensor  # positions whose update is applied locally
    grad_pos: torch.Tensor  # positions whose gradient is pushed to the PS
    rows: Dict[str, int] = field(default_factory=dict)  # rows per transmission kind

    @property
    def pull_ids(self) -> torch.Tensor:
        return self.used_ids[self.pull_pos]


@dataclass
class IterationPlan:
    """Plans of all workers for one iteration (every worker rank holds it)."""

    iteration: int
    tables: List[Dict[str, TablePlan]]  # [worker][table]
    evicted_dirty: int = 0

    def rows(self, worker: int) -> Dict[str, int]:
        out = {k: 0 for k in KINDS}
        for tp in self.tables[worker].values():
            for k, v in tp.rows.items():
                out[k] += v
        return out


class _TableState:
    """Metadata of one worker's cache of one table."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.ids = torch.full((capacity,), -1, dtype=torch.int64)
        self.last_use = torch.zeros(capacity, dtype=torch.int64)
        self.freq = torch.zeros(capacity, dtype=torch.int64)
        self.ver = torch.zeros(capacity, dtype=torch.int64)
        self.dirty = torch.zeros(capacity, dtype=torch.bool)

    def find(self, ids: torch.Tensor) -> torch.Tensor:
        """Slot of each id, -1 where not cached."""
        occupied = (self.ids >= 0).nonzero().view(-1)
        if occupied.numel() == 0 or ids.numel() == 0:
            return torch.full_like(ids, -1)
        keys = self.ids[occupied]
        order = torch.argsort(keys)
        sk = keys[order]
        pos = torch.searchsorted(sk, ids).clamp_(max=sk.numel() - 1)
        hit = sk[pos] == ids
        return torch.where(hit, occupied[order[pos]], torch.full_like(ids, -1))


def _table_feature_layout(tables: Sequence[EmbeddingBagConfig]) -> Dict[str, str]:
    feat_to_table: Dict[str, str] = {}
    for t in tables:
        for f in t.feature_names:
            if f in feat_to_table:
                raise EsdConfigError(f"feature {f!r} is mapped to two tables")
            feat_to_table[f] = t.name
    return feat_to_table


def checked_features(kjt: KeyedJaggedTensor, feat_to_table: Dict[str, str], rows: Dict[str, int]):
    """Yield ``(feature, table, ids, lengths)`` of every KJT key, raising a clear
    error for a feature without a table, a bad dtype, or an id outside its table."""
    if kjt.values().dtype not in (torch.int32, torch.int64):
        raise EsdConfigError(f"KJT values must be int32/int64 ids, got {kjt.values().dtype}")
    stride = kjt.stride()
    lengths = kjt.lengths().view(len(kjt.keys()), stride).to(torch.int64)
    values = kjt.values().to(torch.int64)
    offset = 0
    for i, key in enumerate(kjt.keys()):
        n = int(lengths[i].sum())
        vals = values[offset : offset + n]
        offset += n
        if key not in feat_to_table:
            raise EsdConfigError(f"batch feature {key!r} has no embedding table")
        t = feat_to_table[key]
        if n and (int(vals.min()) < 0 or int(vals.max()) >= rows[t]):
            bad = vals[(vals < 0) | (vals >= rows[t])][0]
            raise EsdConfigError(
                f"feature {key!r}: id {int(bad)} is outside table {t!r} of {rows[t]} rows"
            )
        yield key, t, vals, lengths[i]


def ids_per_worker(
    kjt: KeyedJaggedTensor,
    assignment: torch.Tensor,
    tables: Sequence[EmbeddingBagConfig],
    num_workers: int,
) -> Dict[str, List[torch.Tensor]]:
    """For every table, each worker's sorted distinct ids (checked in range)."""
    feat_to_table = _table_feature_layout(tables)
    rows = {t.name: t.num_embeddings for t in tables}
    stride = kjt.stride()
    if assignment.numel() != stride:
        raise EsdConfigError(
            f"assignment has {assignment.numel()} entries for a batch of {stride} samples"
        )
    per_table_vals: Dict[str, List[torch.Tensor]] = {t.name: [] for t in tables}
    per_table_owner: Dict[str, List[torch.Tensor]] = {t.name: [] for t in tables}
    for key, t, vals, lens in checked_features(kjt, feat_to_table, rows):
        per_table_vals[t].append(vals)
        per_table_owner[t].append(torch.repeat_interleave(assignment, lens))
    out: Dict[str, List[torch.Tensor]] = {}
    for t in per_table_vals:
        if not per_table_vals[t]:
            out[t] = [torch.empty(0, dtype=torch.int64) for _ in range(num_workers)]
            continue
        vals = torch.cat(per_table_vals[t])
        owner = torch.cat(per_table_owner[t])
        key = owner * rows[t] + vals
        uk = torch.unique(key)  # sorted by (worker, id)
        uw = uk // rows[t]
        counts = torch.bincount(uw, minlength=num_workers).tolist()
        out[t] = list(torch.split(uk - uw * rows[t], counts))
    return out


class CacheDirectory:
    """Replicated metadata of all worker caches; see the module docstring."""

    def __init__(self, config: EsdConfig, tables: Sequence[EmbeddingBagConfig]) -> None:
        self.config = config
        self.tables = list(tables)
        self.table_rows = {t.name: t.num_embeddings for t in self.tables}
        config.validate_tables(self.table_rows)
        _table_feature_layout(self.tables)
        self.num_workers = config.num_workers
        self.iteration = 0
        self._state: List[Dict[str, _TableState]] = [
            {t.name: _TableState(w.cache_rows_for(t.name)) for t in self.tables}
            for w in config.workers
        ]
        self._latest = {t.name: torch.zeros(t.num_embeddings, dtype=torch.int64) for t in self.tables}
        self._owner = {
            t.name: torch.full((t.num_embeddings,), -1, dtype=torch.int64) for t in self.tables
        }

    # ------------------------------------------------------------ inspection
    def state(self, worker: int, table: str) -> _TableState:
        return self._state[worker][table]

    def views(self):
        """Snapshots for the cost model: per worker, table -> TableCacheView."""
        from torchrec_esd.cost import TableCacheView  # cost.py depends on cache views only

        out = []
        for w in range(self.num_workers):
            d = {}
            for name, st in self._state[w].items():
                occ = st.ids >= 0
                ids = st.ids[occ]
                d[name] = TableCacheView(
                    ids=ids,
                    outdated=(st.ver[occ] < self._latest[name][ids]) & ~st.dirty[occ],
                    dirty=st.dirty[occ].clone(),
                    capacity=st.capacity,
                )
            out.append(d)
        return out

    def dirty_rows(self, worker: int) -> Dict[str, torch.Tensor]:
        """Ids (per table) whose only up-to-date copy is in ``worker``'s cache."""
        return {
            name: st.ids[st.dirty].clone() for name, st in self._state[worker].items()
        }

    def check_batch(self, kjt: KeyedJaggedTensor) -> None:
        """Raise :class:`EsdConfigError` for ids outside their table etc."""
        for _ in checked_features(kjt, _table_feature_layout(self.tables), self.table_rows):
            pass

    # ------------------------------------------------------------ one iteration
    def plan(self, kjt: KeyedJaggedTensor, assignment: torch.Tensor) -> IterationPlan:
        """Plan one iteration for the global batch ``kjt`` dispatched by
        ``assignment`` and advance the directory to its end state."""
        assignment = assignment.to(torch.int64)
        if assignment.numel() and (
            int(assignment.min()) < 0 or int(assignment.max()) >= self.num_workers
        ):
            raise EsdConfigError(
                f"assignment names a worker outside [0, {self.num_workers})"
            )
        used = ids_per_worker(kjt, assignment, self.tables, self.num_workers)
        self.iteration += 1
        plans: List[Dict[str, TablePlan]] = [dict() for _ in range(self.num_workers)]
        evicted_dirty = 0
        for t in self.tables:
            evicted_dirty += self._plan_table(t.name, used[t.name], plans)
        return IterationPlan(self.iteration, plans, evicted_dirty)

    def _plan_table(self, name: str, used: List[torch.Tensor], plans) -> int:
        W = self.num_workers
        latest = self._latest[name]
        owner = self._owner[name]
        nrows = self.table_rows[name]
        s = self.config.staleness
        users = torch.zeros(nrows, dtype=torch.int64)
        for u in used:
            users.index_add_(0, u, torch.ones_like(u))
        push_slots: List[List[torch.Tensor]] = [[] for _ in range(W)]
        push_ids: List[List[torch.Tensor]] = [[] for _ in range(W)]
        update_push_rows = [0] * W
        # step A: a dirty copy that another worker uses this iteration is pushed first
        for w in range(W):
            st = self._state[w][name]
            dslots = st.dirty.nonzero().view(-1)
            if dslots.numel() == 0:
                continue
            dids = st.ids[dslots]
            mine = torch.zeros(nrows, dtype=torch.bool)
            mine[used[w]] = True
            needed = (users[dids] - mine[dids].long()) > 0
            if needed.any():
                ps = dslots[needed]
                push_slots[w].append(ps)
                push_ids[w].append(st.ids[ps].clone())
                update_push_rows[w] += int(ps.numel())
                st.dirty[ps] = False
                owner[st.ids[ps]] = -1
        evicted_dirty = 0
        local_ids: List[torch.Tensor] = []
        local_slots: List[torch.Tensor] = []
        grad_ids: List[torch.Tensor] = []
        for w in range(W):
            st = self._state[w][name]
            ids = used[w]
            slot = st.find(ids)
            present = slot >= 0
            cur_ver = torch.where(present, st.ver[slot.clamp(min=0)], torch.zeros_like(ids))
            lag = latest[ids] - cur_ver
            usable = present & (lag <= s)
            current = present & (lag == 0)
            miss = ~present
            update = present & ~usable
            # step B: place misses in free slots, then in evicted unpinned slots
            miss_pos = miss.nonzero().view(-1)  # ascending id order (ids are sorted)
            n_miss = int(miss_pos.numel())
            free = (st.ids < 0).nonzero().view(-1)
            miss_push_rows = 0
            if n_miss > free.numel():
                pinned = torch.zeros(st.capacity, dtype=torch.bool)
                pinned[slot[present]] = True
                cand = ((st.ids >= 0) & ~pinned).nonzero().view(-1)
                k = min(n_miss - int(free.numel()), int(cand.numel()))
                if k > 0:
                    if self.config.cache_policy == "lru":
                        prio = st.last_use[cand]
                    else:
                        prio = st.freq[cand] * (1 << 32) + st.last_use[cand]
                    victims = cand[torch.argsort(prio, stable=True)[:k]]
                    vd = victims[st.dirty[victims]]
                    if vd.numel():
                        push_slots[w].append(vd)
                        push_ids[w].append(st.ids[vd].clone())
                        miss_push_rows = int(vd.numel())
                        evicted_dirty += miss_push_rows
                        owner[st.ids[vd]] = -1
                    st.ids[victims] = -1
                    st.dirty[victims] = False
                    st.freq[victims] = 0
                    free = torch.cat([free, victims])
            # misses beyond the capacity stay transient (smallest ids get slots)
            keep = miss_pos[: free.numel()]
            dst = free[: keep.numel()].sort().values
            slot[keep] = dst
            st.ids[dst] = ids[keep]
            st.dirty[dst] = False
            st.freq[dst] = 0
            pulled = miss | update
            cached_now = slot >= 0
            st.ver[slot[pulled & cached_now]] = latest[ids[pulled & cached_now]]
            st.last_use[slot[cached_now]] = self.iteration
            st.freq[slot[cached_now]] += 1
            # step C (after the backward): local update iff sole user with a
            # current cached copy; otherwise the gradient goes to the PS
            local = (users[ids] == 1) & cached_now & (current | pulled)
            grad = ~local
            local_ids.append(ids[local])
            local_slots.append(slot[local])
            grad_ids.append(ids[grad])
            plans[w][name] = TablePlan(
                used_ids=ids,
                used_slot=slot,
                push_ids=torch.cat(push_ids[w]) if push_ids[w] else torch.empty(0, dtype=torch.int64),
                push_slots=torch.cat(push_slots[w]) if push_slots[w] else torch.empty(0, dtype=torch.int64),
                pull_pos=pulled.nonzero().view(-1),
                local_pos=local.nonzero().view(-1),
                grad_pos=grad.nonzero().view(-1),
                rows={
                    "miss_pull": int(miss.sum()),
                    "update_pull": int(update.sum()),
                    "miss_push": miss_push_rows,
                    "update_push": update_push_rows[w] + int(grad.sum()),
                },
            )
        # end of iteration: every used row has one new version
        all_used = torch.unique(torch.cat(used)) if used else torch.empty(0, dtype=torch.int64)
        latest[all_used] += 1
        owner[all_used] = -1
        for w in range(W):
            st = self._state[w][name]
            if local_slots[w].numel():
                st.ver[local_slots[w]] = latest[local_ids[w]]
                st.dirty[local_slots[w]] = True
                owner[local_ids[w]] = w
        return evicted_dirty

    def flush_plan(self) -> List[Dict[str, TablePlan]]:
        """Push every dirty row (checkpoint / end of training); returns, per
        worker and table, the value pushes to execute, and marks rows clean."""
        out: List[Dict[str, TablePlan]] = []
        empty = torch.empty(0, dtype=torch.int64)
        for w in range(self.num_workers):
            d = {}
            for name, st in self._state[w].items():
                slots = st.dirty.nonzero().view(-1)
                ids = st.ids[slots].clone()
                st.dirty[slots] = False
                self._owner[name][ids] = -1
                d[name] = TablePlan(
                    used_ids=empty, used_slot=empty, push_ids=ids, push_slots=slots,
                    pull_pos=empty, local_pos=empty, grad_pos=empty,
                    rows={"miss_pull": 0, "update_pull": 0, "miss_push": 0,
                          "update_push": int(ids.numel())},
                )
            out.append(d)
        return out
