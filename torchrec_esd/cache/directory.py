"""The replicated cache directory: every worker's cache metadata, fed one
iteration at a time, and the plans it returns.

:class:`CacheDirectory` holds the metadata of *every* worker's cache (which row
sits in which slot, use clock / counts, dirty bits, copy versions) plus, per
row, the global version and which worker (if any) holds the only up-to-date
copy.  It is a deterministic function of the sequence of ``(global batch ids,
assignment)`` it is fed, so the dispatcher's mirror and the workers' real
caches are the *same* object replicated on every worker rank: no cache state
is ever exchanged.

Rows are named by *global row keys* ``row_offset[table] + id``; a worker's slots
are its per-table cache blocks end to end (a few vectorised operations per step).

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

Versions are kept per cached copy, as its *lag* (versions it is behind the
row's latest value: every iteration that uses a row adds one to every cached
copy of it, a local update sets the updater's copy to 0, a pull sets it to
0), so nothing is kept per table row.

Memory per tracked worker: O(S) for its S cache slots
(:class:`~torchrec_esd.cache.slots.WorkerSlots`: about 41 B per slot plus the
key -> slot map, 32-64 B per slot hashed, or 4 B per *table row* where the
dense map is chosen by its stated rule), plus O(N) transient per iteration for
the N keys of the batch.  Nothing is O(table rows) unless the dense map's rule
picks it (small tables).  A directory that dispatches keeps a holder index too,
row -> caching workers (:meth:`CacheDirectory.holder_index`, built on first use).

Time of one iteration (N batch values, U distinct keys, U_w of them on worker
w, S_w slots, H cached (worker, row) pairs of the batch's rows): the decode
and per-worker grouping, O(N log N) once; per tracked worker, the cache step in
O(S_w + U_w + D_w) expected for D_w dirty slots (step A scans the dirty slots
when U > S_w, else looks the U rows up; evictions scan the table's slots; the
users of a row come from an id table of the U rows that
:meth:`CacheDirectory.plan` builds once, O(U), where it steps several workers);
the end-of-iteration lag update, O(U) slot-map probes per worker, or
O(U + H) for all at once with the holder index (plus its O(S_w) sync).  A
worker planning from a :class:`StepSummary` (:meth:`CacheDirectory.plan_from_summary`)
replaces U by its summary's size, O(U_w + |rows of its cache others use|): it
does not grow with W at a fixed per-worker batch; building the summaries
(:meth:`CacheDirectory.step_summaries`) is the dispatcher's O(N + H) (radix
sorts and an id table).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd import ops
from torchrec_esd.cache.directory_state import DirectoryCacheState
from torchrec_esd.cache.holders import HolderIndex
from torchrec_esd.cache.lookahead import UpcomingUse
from torchrec_esd.cache.plans import EMPTY, IterationPlan, TransmissionKind, WorkerPlan, row_counts
from torchrec_esd.cache.policy import EvictionPolicy, make_policy
from torchrec_esd.cache.slots import WorkerSlots
from torchrec_esd.cache.sorted_keys import count_of, group_rank, sorted_member
from torchrec_esd.cache.summary import StepSummary
from torchrec_esd.cache.views import WorkerCacheView, slots_view
from torchrec_esd.config import EsdConfig, EsdConfigError
from torchrec_esd.des.served_misses import choose_des_rows, des_pairs
from torchrec_esd.layout import KeySpace

# the cache step of a worker runs in the C++ kernel (ops.plan_worker_cache) where it can:
# extension built, a policy with a kernel code, no DES-served rows; else in
# _push_shared_dirty's and _plan_worker's PyTorch code (the kernel's reference)
USE_PLAN_KERNEL = True


class CacheDirectory:
    """Replicated metadata of all worker caches; see the module docstring.

    ``config.cache_policy`` names the eviction policy (a registered
    :class:`~torchrec_esd.cache.policy.EvictionPolicy`)."""

    def __init__(self, config: EsdConfig, tables: Sequence[EmbeddingBagConfig], track: Optional[Sequence[int]] = None,
                 optimizer_state_dim: int = 0, keyspace: Optional[KeySpace] = None) -> None:
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
        # a worker's plan needs only its own cache and the batch: a worker may track
        # itself alone; the dispatcher (which needs every worker's cache) tracks all
        self.tracked = sorted(set(track)) if track is not None else list(range(self.num_workers))
        if any(w < 0 or w >= self.num_workers for w in self.tracked):
            raise EsdConfigError(f"tracked workers {self.tracked} outside [0, {self.num_workers})")
        self._pos = {w: i for i, w in enumerate(self.tracked)}  # a worker's position in the holder index
        self._w: Dict[int, WorkerSlots] = {}
        self.reset_caches()

    def nbytes(self, worker: Optional[int] = None) -> int:
        """Bytes of the directory's state: of ``worker``'s slots, or of all
        tracked workers (O(slots), see the module docstring)."""
        if worker is not None:
            return self._state(worker).nbytes()
        return sum(st.nbytes() for st in self._w.values()) + (self._holders.nbytes() if self._holders else 0)

    def reset_caches(self) -> None:
        """Empty every tracked worker's cache (cold start, e.g. after a checkpoint
        load; versions live with the cached copies, so none is left to keep).
        Call it on every worker at the same iteration, so that the replicated
        copies stay equal."""
        for w in self.tracked:
            caps = [self.config.workers[w].cache_rows_for(t.name) for t in self.tables]
            self._w[w] = WorkerSlots(caps, self.total_rows, None, self.policy.slot_state(sum(caps)))
        self._holders: Optional[HolderIndex] = None  # built by the first holder_index() call

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
        """The caches as the cost model reads them (a :class:`~torchrec_esd.cache.state.CacheState`):
        the batch's keys are looked up in :meth:`holder_index`.  Valid until the next :meth:`plan`."""
        self._require_all_tracked("cache_state()")
        return DirectoryCacheState(self)

    def holder_index(self) -> HolderIndex:
        """Row key -> the tracked workers caching it (:mod:`~torchrec_esd.cache.holders`), built
        on first use (``O(slots)``), then kept exact by every cache step (``O(S_w)``).  Its
        workers are positions in :attr:`tracked` (the worker ids where every worker is tracked,
        as in the dispatcher's directory; a group rank's directory,
        :mod:`~torchrec_esd.cache.split_step`, tracks its group's workers)."""
        self._holders = self._holders or HolderIndex([self._w[w] for w in self.tracked])
        return self._holders

    cost_views = cache_state  # the name the runtime's input dist calls

    def views(self) -> List[WorkerCacheView]:
        """Snapshots of every cached row: per worker, table -> TableCacheView
        (the same state as :meth:`cache_state`, materialised)."""
        self._require_all_tracked("views()")
        return [slots_view(st, self.tables, self.row_offset) for st in self._w.values()]

    # ------------------------------------------------------------ one iteration
    def plan(
        self, kjt: KeyedJaggedTensor, assignment: torch.Tensor,
        upcoming: Sequence[KeyedJaggedTensor] = (), flush: Sequence[int] = (),
    ) -> IterationPlan:
        """Plan one iteration for the global batch ``kjt`` dispatched by
        ``assignment`` and advance the directory to its end state.

        ``upcoming``: the next global batches (nearest first, at most
        ``config.cache_lookahead``), for a policy that reads them
        (:mod:`torchrec_esd.cache.lookahead`); every replica must get the same.
        ``flush``: workers that first write back every dirty row of their
        cache in this iteration's value push (``EsdConfig.flush_on_slowdown``;
        every replica must get the same)."""
        W = self.num_workers
        assignment = assignment.to(torch.int64).view(-1)
        if assignment.numel() != kjt.stride():
            raise EsdConfigError(f"assignment has {assignment.numel()} entries for a batch of {kjt.stride()} samples")
        if assignment.numel() and (int(assignment.min()) < 0 or int(assignment.max()) >= W):
            raise EsdConfigError(f"assignment names a worker outside [0, {W})")
        keys, sample = self.batch_keys(kjt)
        owner_of_value = assignment[sample]
        pairs = des_pairs(kjt, keys, owner_of_value, self.tracked) if self.config.des_misses else {}
        ukeys, uw, _ = ops.unique_keys_per_group(keys, owner_of_value, W)  # sorted by (worker, key)
        used = list(torch.split(ukeys, torch.bincount(uw, minlength=W).tolist()))
        user_keys, user_counts = ops.sorted_distinct(ukeys)  # each row's user workers
        num_samples = torch.bincount(assignment, minlength=W).tolist()
        user_table = self._user_table(user_keys)
        plans, _ = self._advance({w: (used[w], user_keys, user_counts, num_samples[w], pairs.get(w), user_table)
                                  for w in self.tracked}, user_keys, upcoming, flush)
        return IterationPlan(self.iteration, [plans.get(w) for w in range(W)], batch_keys=user_keys)

    def step_summaries(self, kjt: KeyedJaggedTensor, assignment: torch.Tensor) -> List[StepSummary]:
        """Per worker, the :class:`StepSummary` of this batch and assignment
        against the caches as they are now (call before :meth:`plan` of the
        same batch).  Needs every worker tracked (the dispatcher's directory);
        O(N + H) expected for N values and the H cached (worker, row) pairs of
        the rows used (:meth:`holder_index`), nothing per (worker, row) pair that is not cached."""
        self._require_all_tracked("step_summaries()")
        W = self.num_workers
        assignment = assignment.to(torch.int64).view(-1)
        keys, sample = self.batch_keys(kjt)
        ukeys, uw, _ = ops.unique_keys_per_group(keys, assignment[sample], W)
        used = list(torch.split(ukeys, torch.bincount(uw, minlength=W).tolist()))
        user_keys, user_counts = ops.sorted_distinct(ukeys)
        num_samples = torch.bincount(assignment, minlength=W).tolist()
        return self._summaries(ukeys, uw, used, user_keys, user_counts, num_samples)

    def _summaries(self, ukeys: torch.Tensor, uw: torch.Tensor, used: List[torch.Tensor], user_keys: torch.Tensor,
                   user_counts: torch.Tensor, num_samples: List[int]) -> List[StepSummary]:
        """The tracked workers' :class:`StepSummary` against the caches as they are now:
        ``ukeys`` the distinct keys of each tracked worker's samples (``uw`` its position in
        :attr:`tracked`, ``used`` split by position), ``user_keys`` / ``user_counts`` every row
        that one of them uses or caches and someone uses (ascending), with its user workers.
        ``O(N + H)`` for the ``H`` cached copies of ``user_keys``."""
        n = len(self.tracked)
        # per worker, the positions in user_keys of its own rows and of the rows its cache holds
        hp, hw, _ = self.holder_index().lookup(user_keys)
        u = max(user_keys.numel(), 1)
        # user_keys are ukeys' distinct values: an id-table lookup finds their places (O(N)), and
        # the pairs are non-negative, so the radix sort dedups them (both ~3x torch's sorts at W = 256)
        at = ops.id_table_lookup(ops.id_table_build(user_keys), ukeys) if ukeys.numel() else ukeys
        pair, _ = ops.sorted_distinct(torch.cat([uw * u + at, hw * u + hp]))
        mine = torch.split(pair % u, torch.bincount(pair // u, minlength=n).tolist())
        return [StepSummary(w, used[i], user_keys[mine[i]], user_counts[mine[i]], num_samples[i])
                for i, w in enumerate(self.tracked)]

    def plan_tracked(self, used: Sequence[torch.Tensor], user_keys: torch.Tensor, user_counts: torch.Tensor,
                     num_samples: Sequence[int], summaries: bool = False, upcoming: Sequence[KeyedJaggedTensor] = (),
                     flush: Sequence[int] = ()
                     ) -> Tuple[Dict[int, WorkerPlan], Optional[List[StepSummary]], Optional[torch.Tensor]]:
        """Plan one iteration of every tracked worker without the global batch, from what
        a group rank gets (:mod:`~torchrec_esd.cache.split_step`): ``used[i]`` the distinct
        keys (ascending) of the samples of ``tracked[i]``, ``num_samples[i]`` their number;
        ``user_keys`` (ascending) and ``user_counts``: every row that one of the tracked
        workers uses, or caches while any worker uses it, with its number of user workers
        over *all* workers.  That is a superset of each tracked worker's
        :class:`StepSummary` (and a subset of :meth:`plan`'s rows), so the plans and end
        state are :meth:`plan`'s.  Returns ``(plans by worker, summaries, changed)``:
        with ``summaries``, the tracked workers' :class:`StepSummary` against the caches
        before the step (what each would plan from on its own; each worker's cache step then
        reads its summary's rows alone, as :meth:`plan_from_summary` does, which is cheaper
        than the group's rows and gives the same plan); ``changed``: the keys whose
        group bits the holder index re-read (None where it keeps none).  ``upcoming`` and
        ``flush`` as in :meth:`plan`.  Not with DES-served misses.  ``O(sum_w (U_w + S_w) +
        U + H)`` for ``U = len(user_keys)`` and their ``H`` cached copies: nothing grows with
        the untracked workers."""
        if self.config.des_misses:
            raise EsdConfigError("plan_tracked does not plan DES-served misses (EsdConfig.des_misses)")
        n = len(self.tracked)
        if len(used) != n or len(num_samples) != n:
            raise EsdConfigError(f"plan_tracked needs the used keys and samples of {n} tracked workers,"
                                 f" got {len(used)} and {len(num_samples)}")
        if user_keys.numel() != user_counts.numel():
            raise EsdConfigError(f"{user_keys.numel()} user keys with {user_counts.numel()} counts")
        if summaries:  # each worker on its own summary's rows: a smaller step than on the group's (same plan)
            uw = torch.repeat_interleave(torch.arange(n), torch.tensor([k.numel() for k in used], dtype=torch.int64))
            sums = self._summaries(torch.cat(list(used)), uw, list(used), user_keys, user_counts, list(num_samples))
            steps = {s.worker: (s.keys, s.user_keys, s.user_counts, s.num_samples, None, None) for s in sums}
        else:
            sums, user_table = None, self._user_table(user_keys)
            steps = {w: (used[i], user_keys, user_counts, num_samples[i], None, user_table)
                     for i, w in enumerate(self.tracked)}
        plans, changed = self._advance(steps, user_keys, upcoming, flush)
        return plans, sums, changed

    def _user_table(self, user_keys: torch.Tensor) -> Optional[torch.Tensor]:
        """Several workers' kernel steps read the users of the same rows: an id table of
        them, built once, spares each step an O(U) order check and binary searches."""
        return (ops.id_table_build(user_keys) if len(self.tracked) > 1 and user_keys.numel()
                and any(self._kernel_plans(w) for w in self.tracked) else None)

    def _advance(self, steps: Dict[int, tuple], end_keys: torch.Tensor, upcoming: Sequence[KeyedJaggedTensor],
                 flush: Sequence[int]) -> Tuple[Dict[int, WorkerPlan], Optional[torch.Tensor]]:
        """One iteration of the tracked workers, what :meth:`plan`, :meth:`plan_from_summary`
        and :meth:`plan_tracked` share: the policy's look-ahead window, the iteration count,
        worker ``w``'s cache step on ``steps[w] = (keys, user_keys, user_counts, num_samples,
        DES pairs, user table)`` (flushing first where ``w`` is in ``flush``), then
        :meth:`_end_iteration` on ``end_keys`` (every row used, or held and used, by the
        tracked workers).  ``(plans by worker, the keys whose group bits were re-read)``."""
        if self.policy.reads_upcoming:
            self.policy.look_ahead(UpcomingUse.of_batches(self.keyspace, upcoming, self.config.cache_lookahead))
        self.iteration += 1
        flush = set(int(w) for w in flush)
        plans = {w: self._step(w, keys, uk, uc, int(n), pairs, w in flush, table)
                 for w, (keys, uk, uc, n, pairs, table) in steps.items()}
        return plans, self._end_iteration(end_keys, plans)

    def plan_from_summary(self, summary: StepSummary, upcoming: Sequence[KeyedJaggedTensor] = (),
                          flush: bool = False) -> WorkerPlan:
        """Plan one iteration of the one worker this directory tracks from its
        :class:`StepSummary` alone (no global batch): the same plan and end
        state as :meth:`plan`, in O(U_w log U_s + S_w + U_s) for a summary of
        U_s keys (module docstring).  Not with DES-served misses (they need
        the worker's bags); ``upcoming`` as in :meth:`plan`; ``flush``: this
        worker is in :meth:`plan`'s ``flush``."""
        if self.tracked != [summary.worker]:
            raise EsdConfigError(f"plan_from_summary needs a directory that tracks worker {summary.worker} alone"
                                 f" (tracks {self.tracked})")
        if self.config.des_misses:
            raise EsdConfigError("plan_from_summary does not plan DES-served misses (EsdConfig.des_misses)")
        w = summary.worker
        plans, _ = self._advance({w: (summary.keys, summary.user_keys, summary.user_counts, summary.num_samples,
                                      None, None)}, summary.user_keys, upcoming, [w] if flush else ())
        return plans[w]

    def _step(self, w: int, keys: torch.Tensor, user_keys: torch.Tensor, user_counts: torch.Tensor,
              num_samples: int, pairs, flush: bool = False,
              user_table: Optional[torch.Tensor] = None) -> WorkerPlan:
        """Worker ``w``'s cache step (and the holder index told its placements).
        With ``flush``, every dirty row of its cache is written back first:
        marked clean before the step (which then neither pushes it as shared
        nor as evicted) and pushed with the step's own value pushes (read
        from their slots before any pull overwrites them).  ``user_table``:
        an id table of ``user_keys`` for the C++ step (built once by
        :meth:`plan` for all its workers)."""
        st = self._w[w]
        flushed = self._take_dirty(st) if flush else None
        if self._kernel_plans(w):  # step A included
            p = self._plan_worker_kernel(st, keys, user_keys, user_counts, num_samples, user_table)
        else:
            pushed = self._push_shared_dirty(st, keys, user_keys, user_counts)
            p = self._plan_worker(w, keys, user_keys, user_counts, pushed, num_samples, pairs)
        if flushed is not None and flushed[0].numel():
            keys, slots = flushed
            if self._holders is not None:
                self._holders.note_changed(keys)  # their dirty flags changed: group bits re-read
            p.push_keys, p.push_slots = torch.cat([keys, p.push_keys]), torch.cat([slots, p.push_slots])
            p.flushed_rows = int(keys.numel())
            p.rows[TransmissionKind.UPDATE_PUSH] = int(p.rows.get(TransmissionKind.UPDATE_PUSH, 0)) + p.flushed_rows
        if self._holders is not None:
            self._holders.sync(self._pos[w], st)
        return p

    def _end_iteration(self, user_keys: torch.Tensor, plans) -> Optional[torch.Tensor]:
        """After every tracked worker's cache step (``plans[w]``): every row used
        this iteration has one new version, and a worker's local update is it.
        The lag update is one holder-index lookup for all workers' copies
        (``O(U + hits)``) where the index exists, else one slot-map probe per
        key and worker.  Returns the keys whose group bits the index re-read
        (:meth:`HolderIndex.refresh_group_bits`; None without group bits)."""
        holders = self._holders
        if holders is not None:
            looked = holders.lookup(user_keys)
            holders.lag[looked[2]] += 1
        for w in self.tracked:
            st, p = self._w[w], plans[w]
            if holders is None:
                held = st.find(user_keys)
                st.lag[held[held >= 0]] += 1
            slots = p.used_slot[p.local_pos]
            st.lag[slots] = 0
            st.dirty[slots] = True
            if holders is not None:
                holders.count(self._pos[w], st)  # its dirty slots per table
        if holders is not None:
            return holders.refresh_group_bits(user_keys, looked)  # every copy of these rows changed lag or flags
        return None

    def _kernel_plans(self, w: int) -> bool:
        """Whether worker ``w``'s cache step runs in the C++ kernel."""
        return (USE_PLAN_KERNEL and self.policy.kernel_code is not None and not self.config.des_misses
                and ops.has_plan_kernel())

    def _push_shared_dirty(self, st: WorkerSlots, used: torch.Tensor, user_keys: torch.Tensor,
                           user_counts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Step A: a dirty copy that another worker uses this iteration is pushed."""
        dslots = st.dirty.nonzero().view(-1)
        if dslots.numel() == 0:
            return EMPTY, EMPTY
        dkeys = st.keys[dslots]
        mine = sorted_member(used, dkeys).long()
        needed = (count_of(dkeys, user_keys, user_counts) - mine) > 0
        slots = dslots[needed]
        st.dirty[slots] = False
        return dkeys[needed], slots

    def _victims(self, st: WorkerSlots, pinned: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
        """Step B's evictions: per table, the ``need[t]`` unpinned cached slots
        first in the policy's order (ties in slot order)."""
        cand = ((st.keys >= 0) & ~pinned).nonzero().view(-1)
        cand = cand[torch.argsort(self.policy.priority(st, cand), stable=True)]
        cand = cand[torch.argsort(st.slot_table[cand], stable=True)]  # by table, then priority
        ct = st.slot_table[cand]
        rank, _ = group_rank(ct, self.num_tables)
        return cand[rank < need[ct]]

    def _plan_worker(
        self, w: int, keys: torch.Tensor, user_keys: torch.Tensor, user_counts: torch.Tensor, pushed,
        num_samples: int, pairs=None
    ) -> WorkerPlan:
        st, T = self._w[w], self.num_tables
        s = self.config.staleness
        slot = st.find(keys)
        present = slot >= 0
        lag = torch.where(present, st.lag[slot.clamp(min=0)], torch.zeros_like(keys))
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
        f_rank, f_start = group_rank(st.slot_table[free], T)
        m_rank, _ = group_rank(miss_t, T)
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
        st.lag[slot[refreshed]] = 0
        st.last_use[slot[cached_now]] = self.iteration
        st.freq[slot[cached_now]] += 1
        # step C (after the backward): local update iff sole user with a current cached copy
        local = (count_of(keys, user_keys, user_counts) == 1) & cached_now & (current | pulled)
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
        self, st: WorkerSlots, keys: torch.Tensor, user_keys: torch.Tensor, user_counts: torch.Tensor,
        num_samples: int, user_table: Optional[torch.Tensor] = None,
    ) -> WorkerPlan:
        """Steps A-C of one worker (:meth:`_push_shared_dirty` and
        :meth:`_plan_worker`) in the C++ kernel: same plan, same end state."""
        used_slot, pull_pos, local_pos, grad_pos, push_keys, push_slots, counts = ops.plan_worker_cache(
            st.keys, st.last_use, st.freq, st.lag, st.dirty, st.slot_map, st.table_start,
            user_keys.contiguous(), user_counts.contiguous(), keys.contiguous(), self.row_offset, self.iteration,
            self.config.staleness, int(self.policy.kernel_code), user_table,
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

    @staticmethod
    def _take_dirty(st: WorkerSlots) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(keys, slots)`` of every dirty row of ``st``, now marked clean (to
        be written back by the caller's plan)."""
        slots = st.dirty.nonzero().view(-1)
        keys = st.keys[slots].clone()
        st.dirty[slots] = False
        return keys, slots

    def flush_plan(self) -> List[WorkerPlan]:
        """Push every dirty row (checkpoint / end of training): per worker, the
        value pushes to execute; marks all rows clean."""
        out: List[Optional[WorkerPlan]] = [None] * self.num_workers
        for w, st in self._w.items():
            keys, slots = self._take_dirty(st)
            if self._holders is not None:
                self._holders.count(self._pos[w], st)  # no key moved, dirty flags did
            out[w] = WorkerPlan(
                used_keys=EMPTY, used_slot=EMPTY, push_keys=keys, push_slots=slots,
                pull_pos=EMPTY, local_pos=EMPTY, grad_pos=EMPTY,
                rows=row_counts(0, 0, 0, int(keys.numel())),
            )
        if self._holders is not None:
            self._holders.refresh_group_bits(torch.cat([p.push_keys for p in out if p is not None]))
        return out

