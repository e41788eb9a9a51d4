"""The replicated cache directory: every worker's cache metadata, fed one
iteration at a time, and the plans it returns.

:class:`CacheDirectory` holds the metadata of *every* worker's cache (which row
sits in which slot, use clock / counts, dirty bits, copy versions) plus, per
row, the global version and which worker (if any) holds the only up-to-date
copy.  It is a deterministic function of the sequence of ``(global batch ids,
assignment)`` it is fed, so the dispatcher's mirror and the workers' real
caches are the *same* object replicated on every worker rank: no cache state
is ever exchanged.

Rows are named by *global row keys* ``row_offset[table] + id`` (tables in
order); a worker's slots are the concatenation of its per-table cache blocks,
so every step below is a few vectorised operations per worker whatever the
number of tables.

Feeding it one iteration (:meth:`CacheDirectory.plan`) returns, per worker, the
:class:`~torchrec_esd.cache.plans.WorkerPlan` that the worker's sharded
embedding module executes:

1. *value pushes* (before the forward): dirty rows that are evicted
   (**miss-push**) or that another worker uses this iteration (**update-push**);
2. *pulls*: rows not cached (**miss-pull**) or cached but outdated beyond the
   staleness bound (**update-pull**); misses beyond the table's capacity (after
   evicting unpinned rows in the order of the eviction policy,
   :mod:`torchrec_esd.cache.policy`) are used transiently, not cached;
3. after the backward, per used row: a *local update* when this worker is its
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

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd import ops
from torchrec_esd.cache.lookahead import UpcomingUse
from torchrec_esd.cache.plans import EMPTY, IterationPlan, WorkerPlan, row_counts
from torchrec_esd.cache.policy import EvictionPolicy, make_policy
from torchrec_esd.cache.slots import WorkerSlots
from torchrec_esd.cache.state import CacheLookup
from torchrec_esd.cache.views import TableCacheView, WorkerCacheView
from torchrec_esd.config import EsdConfig, EsdConfigError
from torchrec_esd.des.served_misses import choose_des_rows
from torchrec_esd.layout import KeySpace

# a worker's key -> slot map is a dense array below this many rows (all tables), else a sort per lookup
DENSE_SLOT_MAP_ROWS = 1 << 23  # int32: at most 32 MiB per tracked worker
# the cache step of a worker runs in the C++ kernel (ops.plan_worker_cache) where it can:
# extension built, a policy with a kernel code, dense slot map, no DES-served rows; else in
# _push_shared_dirty's and _plan_worker's PyTorch code (the kernel's reference)
USE_PLAN_KERNEL = True


def _group_rank(groups: torch.Tensor, num_groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """For values sorted by group: rank of each inside its group, and group starts."""
    counts = torch.bincount(groups, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(groups.numel()) - starts[groups], starts


def _sorted_member(sorted_keys: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``keys`` in ``sorted_keys`` (ascending), as a bool mask."""
    if sorted_keys.numel() == 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    pos = torch.searchsorted(sorted_keys, keys).clamp_(max=sorted_keys.numel() - 1)
    return sorted_keys[pos] == keys


class CacheDirectory:
    """Replicated metadata of all worker caches; see the module docstring.

    ``config.cache_policy`` names the eviction policy (a registered
    :class:`~torchrec_esd.cache.policy.EvictionPolicy`)."""

    def __init__(
        self,
        config: EsdConfig,
        tables: Sequence[EmbeddingBagConfig],
        track: Optional[Sequence[int]] = None,
        optimizer_state_dim: int = 0,
        keyspace: Optional[KeySpace] = None,
    ) -> None:
        self.config = config
        self.policy: EvictionPolicy = make_policy(config.cache_policy)
        self.optimizer_state_dim = optimizer_state_dim
        # the key space is shared with the cost model and the sharded module (one decode per batch)
        self.keyspace = keyspace if keyspace is not None else KeySpace(tables, state_dim=optimizer_state_dim)
        if [t.name for t in tables] != self.keyspace.names:
            raise EsdConfigError(f"tables {[t.name for t in tables]} are not the key space's {self.keyspace.names}")
        self.tables = list(tables)
        self.table_rows = {t.name: t.num_embeddings for t in self.tables}
        config.validate_tables(self.table_rows)
        self.feature_table = self.keyspace.feature_table
        self.rows = self.keyspace.rows
        self.row_offset = self.keyspace.offsets
        self.total_rows = self.keyspace.total_rows
        self.num_workers = config.num_workers
        self.num_tables = len(self.tables)
        self.iteration = 0
        # A worker's plan needs only its own cache, the global row versions and
        # the batch, so a worker may track itself alone; the dispatcher (which
        # needs every worker's cache) tracks all.
        self.tracked = sorted(set(track)) if track is not None else list(range(self.num_workers))
        if any(w < 0 or w >= self.num_workers for w in self.tracked):
            raise EsdConfigError(f"tracked workers {self.tracked} outside [0, {self.num_workers})")
        self._w: Dict[int, WorkerSlots] = {}
        self.reset_caches()
        self._latest = torch.zeros(self.total_rows, dtype=torch.int64)

    def reset_caches(self) -> None:
        """Empty every tracked worker's cache (cold start, e.g. after a checkpoint
        load; the row versions are kept).  Call it on every worker at the same
        iteration, so that the replicated copies stay equal."""
        dense = 0 < self.total_rows <= DENSE_SLOT_MAP_ROWS
        for w in self.tracked:
            caps = [self.config.workers[w].cache_rows_for(t.name) for t in self.tables]
            self._w[w] = WorkerSlots(caps, self.total_rows, dense, self.policy.slot_state(sum(caps)))

    # ------------------------------------------------------------ keys
    def table_of(self, keys: torch.Tensor) -> torch.Tensor:
        return self.keyspace.table_of(keys)

    def batch_keys(self, kjt: KeyedJaggedTensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Global row key of every KJT value (KJT order) and its sample index,
        from the key space's one decode of ``kjt``; raises
        :class:`~torchrec_esd.layout.EsdIdError` for unknown features, bad
        dtypes, ids out of range."""
        bk = self.keyspace.decode(kjt)
        return bk.keys, bk.sample

    def check_batch(self, kjt: KeyedJaggedTensor) -> None:
        """Raise :class:`EsdConfigError` for ids outside their table etc."""
        self.batch_keys(kjt)

    # ------------------------------------------------------------ inspection
    def _state(self, worker: int) -> WorkerSlots:
        if worker not in self._w:
            raise EsdConfigError(f"worker {worker} is not tracked by this directory (tracks {self.tracked})")
        return self._w[worker]

    def cached_keys(self, worker: int) -> torch.Tensor:
        st = self._state(worker)
        return st.keys[st.keys >= 0]

    def dirty_keys(self, worker: int) -> torch.Tensor:
        st = self._state(worker)
        return st.keys[st.dirty]

    def capacity(self, worker: int) -> torch.Tensor:
        return self._state(worker).capacity.clone()

    def slot_of(self, worker: int, keys: torch.Tensor) -> torch.Tensor:
        return self._state(worker).find(keys)

    def slot_table(self, worker: int) -> torch.Tensor:
        return self._state(worker).slot_table

    def _require_all_tracked(self, what: str) -> None:
        if len(self.tracked) != self.num_workers:
            raise EsdConfigError(f"{what} needs a directory that tracks every worker (the dispatcher's)")

    def cache_state(self) -> "DirectoryCacheState":
        """The caches as the cost model reads them (a
        :class:`~torchrec_esd.cache.state.CacheState`): only the batch's keys
        are looked up, in the slot maps.  Valid until the next :meth:`plan`."""
        self._require_all_tracked("cache_state()")
        return DirectoryCacheState(self)

    cost_views = cache_state  # the name the runtime's input dist calls

    def views(self) -> List[WorkerCacheView]:
        """Snapshots of every cached row: per worker, table -> TableCacheView
        (the same state as :meth:`cache_state`, materialised)."""
        self._require_all_tracked("views()")
        out = []
        for st in self._w.values():
            occ = (st.keys >= 0).nonzero().view(-1)  # slots are table-major
            keys = st.keys[occ]
            outdated = (st.ver[occ] < self._latest[keys]) & ~st.dirty[occ]
            dirty = st.dirty[occ]
            counts = torch.bincount(st.slot_table[occ], minlength=self.num_tables).tolist()
            parts = zip(
                torch.split(keys, counts), torch.split(outdated, counts), torch.split(dirty, counts)
            )
            out.append(
                {
                    t.name: TableCacheView(
                        ids=k - self.row_offset[ti], outdated=o, dirty=d, capacity=int(st.capacity[ti])
                    )
                    for ti, (t, (k, o, d)) in enumerate(zip(self.tables, parts))
                }
            )
        return out

    # ------------------------------------------------------------ one iteration
    def plan(
        self, kjt: KeyedJaggedTensor, assignment: torch.Tensor,
        upcoming: Sequence[KeyedJaggedTensor] = (),
    ) -> IterationPlan:
        """Plan one iteration for the global batch ``kjt`` dispatched by
        ``assignment`` and advance the directory to its end state.

        ``upcoming``: the next global batches (nearest first, at most
        ``config.cache_lookahead``), for a policy that reads them
        (:mod:`torchrec_esd.cache.lookahead`); every replica must get the same."""
        if self.policy.reads_upcoming:
            self.policy.look_ahead(UpcomingUse.of_batches(self.keyspace, upcoming, self.config.cache_lookahead))
        W = self.num_workers
        assignment = assignment.to(torch.int64).view(-1)
        if assignment.numel() != kjt.stride():
            raise EsdConfigError(
                f"assignment has {assignment.numel()} entries for a batch of {kjt.stride()} samples"
            )
        if assignment.numel() and (int(assignment.min()) < 0 or int(assignment.max()) >= W):
            raise EsdConfigError(f"assignment names a worker outside [0, {W})")
        keys, sample = self.batch_keys(kjt)
        owner_of_value = assignment[sample]
        pairs = self._des_pairs(kjt, keys, owner_of_value) if self.config.des_misses else {}
        ukeys, uw, _ = ops.unique_keys_per_group(keys, owner_of_value, W)  # sorted by (worker, key)
        used = list(torch.split(ukeys, torch.bincount(uw, minlength=W).tolist()))
        users = torch.bincount(ukeys, minlength=self.total_rows)
        num_samples = torch.bincount(assignment, minlength=W).tolist()
        self.iteration += 1
        plans: List[Optional[WorkerPlan]] = [None] * W
        kernel = [w for w in self.tracked if self._kernel_plans(w)]  # step A included
        pushes = self._push_shared_dirty(used, users, [w for w in self.tracked if w not in kernel])
        for w in self.tracked:
            if w in kernel:
                plans[w] = self._plan_worker_kernel(self._w[w], used[w], users, num_samples[w])
            else:
                plans[w] = self._plan_worker(w, used[w], users, pushes[w], num_samples[w], pairs.get(w))
        # end of iteration: every used row has one new version
        all_used = torch.unique(torch.cat(used)) if used else EMPTY
        self._latest[all_used] += 1
        for w in self.tracked:
            p = plans[w]
            slots = p.used_slot[p.local_pos]
            if slots.numel():
                st = self._w[w]
                st.ver[slots] = self._latest[p.used_keys[p.local_pos]]
                st.dirty[slots] = True
        return IterationPlan(self.iteration, plans)

    def _des_pairs(self, kjt: KeyedJaggedTensor, keys: torch.Tensor, owner: torch.Tensor):
        """Per tracked worker: distinct (row key, bag) pairs of its samples."""
        b = kjt.stride()
        nbags = max(len(kjt.keys()) * b, 1)
        bag = torch.repeat_interleave(torch.arange(len(kjt.keys()) * b), kjt.lengths().to(torch.int64))
        out = {}
        for w in self.tracked:
            m = owner == w
            pair = torch.unique(keys[m] * nbags + bag[m])
            out[w] = (pair // nbags, pair % nbags, kjt.weights_or_none() is not None)
        return out

    def _kernel_plans(self, w: int) -> bool:
        """Whether worker ``w``'s cache step runs in the C++ kernel."""
        return (USE_PLAN_KERNEL and self.policy.kernel_code is not None and not self.config.des_misses
                and self._w[w].slot_map is not None and ops.has_plan_kernel())

    def _push_shared_dirty(self, used: List[torch.Tensor], users: torch.Tensor, workers: Sequence[int]):
        """Step A: a dirty copy that another worker uses this iteration is pushed."""
        out: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        for w in workers:
            st = self._w[w]
            dslots = st.dirty.nonzero().view(-1)
            if dslots.numel() == 0:
                out[w] = (EMPTY, EMPTY)
                continue
            dkeys = st.keys[dslots]
            mine = _sorted_member(used[w], dkeys).long()
            needed = (users[dkeys] - mine) > 0
            slots = dslots[needed]
            st.dirty[slots] = False
            out[w] = (dkeys[needed], slots)
        return out

    def _victims(self, st: WorkerSlots, pinned: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
        """Step B's evictions: per table, the ``need[t]`` unpinned cached slots
        first in the policy's order (ties in slot order)."""
        cand = ((st.keys >= 0) & ~pinned).nonzero().view(-1)
        cand = cand[torch.argsort(self.policy.priority(st, cand), stable=True)]
        cand = cand[torch.argsort(st.slot_table[cand], stable=True)]  # by table, then priority
        ct = st.slot_table[cand]
        rank, _ = _group_rank(ct, self.num_tables)
        return cand[rank < need[ct]]

    def _plan_worker(
        self, w: int, keys: torch.Tensor, users: torch.Tensor, pushed, num_samples: int, pairs=None
    ) -> WorkerPlan:
        st, T = self._w[w], self.num_tables
        s = self.config.staleness
        slot = st.find(keys)
        present = slot >= 0
        cur_ver = torch.where(present, st.ver[slot.clamp(min=0)], torch.zeros_like(keys))
        lag = self._latest[keys] - cur_ver
        usable = present & (lag <= s)
        current = present & (lag == 0)
        des = torch.zeros_like(present)
        if pairs is not None and keys.numel():
            dim = self.tables[0].embedding_dim
            des = choose_des_rows(
                torch.searchsorted(keys, pairs[0]), pairs[1], ~usable,
                (dim + self.optimizer_state_dim) * 4, dim, weighted=pairs[2],
            )
        miss = ~present & ~des
        update = present & ~usable & ~des
        # step B: misses go to free slots of their table, then to evicted ones
        miss_pos = miss.nonzero().view(-1)  # keys are sorted: table-major, ids ascending
        miss_t = self.table_of(keys[miss_pos])
        n_miss = torch.bincount(miss_t, minlength=T)
        free = (st.keys < 0).nonzero().view(-1)
        n_free = torch.bincount(st.slot_table[free], minlength=T)
        need = (n_miss - n_free).clamp(min=0)
        push_keys, push_slots = [pushed[0]], [pushed[1]]
        miss_push = 0
        if bool((need > 0).any()):
            pinned = torch.zeros_like(st.dirty)
            pinned[slot[present]] = True
            victims = self._victims(st, pinned, need)
            vd = victims[st.dirty[victims]]
            if vd.numel():
                push_keys.append(st.keys[vd].clone())
                push_slots.append(vd)
                miss_push = int(vd.numel())
            st.place(victims, torch.full_like(victims, -1))
            st.dirty[victims] = False
            st.freq[victims] = 0
            free = torch.cat([free, victims])
        # pair the r-th miss of table t with the r-th free slot of table t
        free = free.sort().values  # slots are table-major: this also groups them by table
        f_rank, f_start = _group_rank(st.slot_table[free], T)
        m_rank, _ = _group_rank(miss_t, T)
        n_free = torch.bincount(st.slot_table[free], minlength=T)
        keep = m_rank < n_free[miss_t]
        dst = free[f_start[miss_t[keep]] + m_rank[keep]]
        kept = miss_pos[keep]
        slot[kept] = dst
        st.place(dst, keys[kept])
        st.dirty[dst] = False
        st.freq[dst] = 0
        self.policy.on_place(st, dst, self.iteration)
        pulled = miss | update
        cached_now = slot >= 0
        refreshed = pulled & cached_now
        st.ver[slot[refreshed]] = self._latest[keys[refreshed]]
        st.last_use[slot[cached_now]] = self.iteration
        st.freq[slot[cached_now]] += 1
        # step C (after the backward): local update iff sole user with a current cached copy
        local = (users[keys] == 1) & cached_now & (current | pulled)
        grad = ~local & ~des
        return WorkerPlan(
            used_keys=keys,
            used_slot=slot,
            push_keys=torch.cat(push_keys),
            push_slots=torch.cat(push_slots),
            pull_pos=pulled.nonzero().view(-1),
            local_pos=local.nonzero().view(-1),
            grad_pos=grad.nonzero().view(-1),
            rows=row_counts(miss_pull=int(miss.sum()), update_pull=int(update.sum()), miss_push=miss_push,
                            update_push=int(pushed[0].numel()) + int(grad.sum()), des_rows=int(des.sum())),
            num_samples=num_samples,
            des_pos=des.nonzero().view(-1),
        )

    def _plan_worker_kernel(
        self, st: WorkerSlots, keys: torch.Tensor, users: torch.Tensor, num_samples: int
    ) -> WorkerPlan:
        """Steps A-C of one worker (:meth:`_push_shared_dirty` and
        :meth:`_plan_worker`) in the C++ kernel: same plan, same end state."""
        used_slot, pull_pos, local_pos, grad_pos, push_keys, push_slots, counts = ops.plan_worker_cache(
            st.keys, st.last_use, st.freq, st.ver, st.dirty, st.slot_map, st.table_start,
            self._latest, users, keys.contiguous(), self.row_offset, self.iteration,
            self.config.staleness, int(self.policy.kernel_code),
        )
        n_miss, n_update, n_shared, n_miss_push = counts.tolist()
        return WorkerPlan(
            used_keys=keys,
            used_slot=used_slot,
            push_keys=push_keys,
            push_slots=push_slots,
            pull_pos=pull_pos,
            local_pos=local_pos,
            grad_pos=grad_pos,
            rows=row_counts(miss_pull=n_miss, update_pull=n_update, miss_push=n_miss_push,
                            update_push=n_shared + int(grad_pos.numel())),
            num_samples=num_samples,
        )

    def flush_plan(self) -> List[WorkerPlan]:
        """Push every dirty row (checkpoint / end of training): per worker, the
        value pushes to execute; marks all rows clean."""
        out: List[Optional[WorkerPlan]] = [None] * self.num_workers
        for w, st in self._w.items():
            slots = st.dirty.nonzero().view(-1)
            keys = st.keys[slots].clone()
            st.dirty[slots] = False
            out[w] = WorkerPlan(
                used_keys=EMPTY, used_slot=EMPTY, push_keys=keys, push_slots=slots,
                pull_pos=EMPTY, local_pos=EMPTY, grad_pos=EMPTY,
                rows=row_counts(0, 0, 0, int(keys.numel())),
            )
        return out


class DirectoryCacheState:
    """A :class:`CacheDirectory` read as a
    :class:`~torchrec_esd.cache.state.CacheState` at its current iteration:
    occupancy is counted now, :meth:`lookup` reads the slot maps and refuses
    once the directory has planned another iteration."""

    def __init__(self, directory: CacheDirectory) -> None:
        d = directory
        W, T = d.num_workers, d.num_tables
        self.tables = [t.name for t in d.tables]
        self.occupied = torch.zeros(W, T, dtype=torch.int64)
        self.ndirty = torch.zeros(W, T, dtype=torch.int64)
        for w, st in d._w.items():
            self.occupied[w] = st.per_table(st.keys >= 0, T)
            self.ndirty[w] = st.per_table(st.dirty, T)
        self.capacity = torch.stack([st.capacity for st in d._w.values()])
        self._directory = d
        self._iteration = d.iteration

    def __len__(self) -> int:
        return self.capacity.shape[0]

    def lookup(self, keys: torch.Tensor) -> CacheLookup:
        d = self._directory
        if d.iteration != self._iteration:
            raise EsdConfigError("cache state used after the directory planned another iteration")
        W, u = d.num_workers, keys.numel()
        cached = torch.zeros(W, u, dtype=torch.bool)
        outdated = torch.zeros(W, u, dtype=torch.bool)
        dirty = torch.zeros(W, u, dtype=torch.bool)
        latest = d._latest[keys]
        for w, st in d._w.items():
            s = st.find(keys)
            c = s >= 0
            sc = s.clamp(min=0)
            dw = c & st.dirty[sc]
            cached[w], dirty[w] = c, dw
            outdated[w] = c & (st.ver[sc] < latest) & ~dw
        return CacheLookup(cached, outdated, dirty)
