"""Thin Python entry points of the torchrec_esd C++/CUDA operators.

Each operator's schema is in ``csrc/esd_ops.cpp``; this module registers its
fake (meta) kernel so it works under ``torch.compile`` / FakeTensor, and calls
it through ``torch.ops.torchrec_esd``.  If the extension is not built, the
pure-PyTorch references of :mod:`torchrec_esd.reference_ops` are used instead
and a loud warning says so (tests fail in that state unless explicitly allowed).
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Tuple

import torch

from torchrec_esd import reference_ops

try:
    from torchrec_esd import _C  # noqa: F401  (registers the operators)

    EXTENSION_LOADED = True
    EXTENSION_ERROR = None
except ImportError as e:  # pragma: no cover - exercised on broken installs only
    EXTENSION_LOADED = False
    EXTENSION_ERROR = e
    warnings.warn(
        "torchrec_esd: the C++ extension torchrec_esd._C is NOT built/loadable "
        f"({e}); falling back to the slow pure-PyTorch reference operators. "
        "Build it with `pip install -e . --no-build-isolation` (see README).",
        RuntimeWarning,
        stacklevel=2,
    )


if EXTENSION_LOADED:

    @torch.library.register_fake("torchrec_esd::hash_ids")
    def _hash_ids_fake(ids: torch.Tensor, feature: int, num_buckets: int) -> torch.Tensor:
        torch._check(ids.dim() == 1, lambda: "hash_ids: ids must be 1-D")
        torch._check(
            ids.dtype in (torch.int32, torch.int64), lambda: "hash_ids: ids must be int32/int64"
        )
        return torch.empty_like(ids, dtype=torch.int64)

    @torch.library.register_fake("torchrec_esd::id_table_build")
    def _id_table_build_fake(keys: torch.Tensor) -> torch.Tensor:
        torch._check(keys.dim() == 1, lambda: "id_table_build: keys must be 1-D")
        torch._check(
            keys.dtype in (torch.int32, torch.int64),
            lambda: "id_table_build: keys must be int32/int64",
        )
        n = keys.shape[0]
        if isinstance(n, int):
            cap = reference_ops.id_table_capacity(n)
        else:  # symbolic length: the capacity is a new unbacked size
            cap = torch.library.get_ctx().new_dynamic_size(min=2)
        return keys.new_empty((cap, 2), dtype=torch.int64)

    @torch.library.register_fake("torchrec_esd::id_table_lookup")
    def _id_table_lookup_fake(slots: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        torch._check(slots.dim() == 2 and slots.dtype == torch.int64,
                     lambda: "id_table_lookup: slots must be int64 [cap, 2]")
        torch._check(queries.dim() == 1, lambda: "id_table_lookup: queries must be 1-D")
        return torch.empty_like(queries, dtype=torch.int64)

    @torch.library.register_fake("torchrec_esd::sample_cost_matrix")
    def _sample_cost_matrix_fake(
        keys: torch.Tensor,
        offsets: torch.Tensor,
        slots: List[torch.Tensor],
        weights: List[torch.Tensor],
        miss_weight: torch.Tensor,
    ) -> torch.Tensor:
        torch._check(offsets.dim() == 1, lambda: "sample_cost_matrix: offsets must be 1-D")
        torch._check(len(slots) == len(weights),
                     lambda: "sample_cost_matrix: slots and weights must have the same length")
        return keys.new_empty((offsets.shape[0] - 1, len(slots)), dtype=torch.float64)

    @torch.library.register_fake("torchrec_esd::unique_keys_per_group")
    def _unique_keys_per_group_fake(
        keys: torch.Tensor, group: torch.Tensor, num_groups: int
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        torch._check(keys.dim() == 1 and group.dim() == 1,
                     lambda: "unique_keys_per_group: keys and group must be 1-D")
        u = torch.library.get_ctx().new_dynamic_size()
        return (
            keys.new_empty((u,)),
            keys.new_empty((u,), dtype=torch.int64),
            keys.new_empty((u,), dtype=torch.int64),
        )


# the cache-step kernel is absent from builds older than it
HAS_PLAN_KERNEL = EXTENSION_LOADED and hasattr(torch.ops.torchrec_esd, "plan_worker_cache")

if HAS_PLAN_KERNEL:

    @torch.library.register_fake("torchrec_esd::plan_worker_cache")
    def _plan_worker_cache_fake(
        slot_keys, last_use, freq, lag, dirty, slot_map, table_start, user_keys, user_counts, keys,
        row_offset, iteration: int, staleness: int, policy: int, user_table=None,
    ):
        torch._check(keys.dim() == 1, lambda: "plan_worker_cache: keys must be 1-D")
        ctx = torch.library.get_ctx()
        sizes = [ctx.new_dynamic_size() for _ in range(5)]
        return (
            keys.new_empty(keys.shape, dtype=torch.int64),
            *(keys.new_empty((n,), dtype=torch.int64) for n in sizes),
            keys.new_empty((4,), dtype=torch.int64),
        )


def hash_ids(ids: torch.Tensor, feature: int = 0, num_buckets: int = 0) -> torch.Tensor:
    """Stable 64-bit hash of every ``(feature, id)`` pair (int64 bit pattern), or
    its bucket in ``[0, num_buckets)`` when ``num_buckets > 0``.

    The same on every run, process and device: use it for PS shard routing and
    cache-set selection.  ``ids`` is a 1-D int32/int64 tensor of ids >= 0.
    """
    if EXTENSION_LOADED:
        return torch.ops.torchrec_esd.hash_ids(ids, int(feature), int(num_buckets))
    return reference_ops.hash_ids_ref(ids, int(feature), int(num_buckets))


def id_table_capacity(num_keys: int) -> int:
    """Rows of the table :func:`id_table_build` makes for ``num_keys`` keys."""
    return reference_ops.id_table_capacity(num_keys)


def id_table_build(keys: torch.Tensor) -> torch.Tensor:
    """Open-addressing (linear probing) hash table of unique keys >= 0.

    Returns an int64 ``[cap, 2]`` tensor on ``keys``' device, ``cap`` the next
    power of two ``>= max(2, 2 * len(keys))``; row = ``(key, index of the key in
    keys)``, empty rows ``(-1, -1)``.  Home slot of a key:
    ``hash_ids(key, 0) & (cap - 1)``.  Duplicate or negative keys raise.
    """
    if EXTENSION_LOADED:
        return torch.ops.torchrec_esd.id_table_build(keys)
    return reference_ops.id_table_build_ref(keys)


def id_table_lookup(slots: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """int64 index of every query key in the table (``-1`` when absent)."""
    if EXTENSION_LOADED:
        return torch.ops.torchrec_esd.id_table_lookup(slots, queries)
    return reference_ops.id_table_lookup_ref(slots, queries)


def sample_cost_matrix(
    keys: torch.Tensor,
    offsets: torch.Tensor,
    slots: List[torch.Tensor],
    weights: List[torch.Tensor],
    miss_weight: torch.Tensor,
) -> torch.Tensor:
    """float64 ``[B, W]`` cost of sending sample ``b`` to worker ``w``.

    ``keys`` (int32/int64 ``[N]``) holds the row keys of the batch sample-major:
    sample ``b`` owns ``keys[offsets[b]:offsets[b+1]]`` (``offsets`` int32/int64
    ``[B+1]``, ``offsets[0] == 0``, non-decreasing, ``offsets[B] == N``).
    ``out[b, w]`` sums, over the DISTINCT keys of sample ``b``,
    ``weights[w][idx]`` when the key is in table ``slots[w]`` (built by
    :func:`id_table_build`) at index ``idx``, else ``miss_weight[w]``.
    ``weights[w]`` is float64 1-D (one per key of worker ``w``'s table),
    ``miss_weight`` float64 ``[W]``.
    """
    if EXTENSION_LOADED:
        return torch.ops.torchrec_esd.sample_cost_matrix(
            keys, offsets, list(slots), list(weights), miss_weight
        )
    return reference_ops.sample_cost_matrix_ref(keys, offsets, list(slots), list(weights),
                                                miss_weight)


def cache_hit_counts(
    keys: torch.Tensor, offsets: torch.Tensor, slots: List[torch.Tensor]
) -> torch.Tensor:
    """int64 ``[B, W]``: number of distinct keys of sample ``b`` present in
    worker ``w``'s table (``sample_cost_matrix`` with weight 1 per hit, 0 per miss)."""
    slots = list(slots)
    dev = keys.device
    # A table of capacity cap holds at most cap // 2 keys, so cap // 2 weights cover it.
    weights = [
        torch.ones(s.size(0) // 2 if s.dim() == 2 else 0, dtype=torch.float64, device=dev)
        for s in slots
    ]
    miss = torch.zeros(len(slots), dtype=torch.float64, device=dev)
    return sample_cost_matrix(keys, offsets, slots, weights, miss).to(torch.int64)


def unique_keys_per_group(
    keys: torch.Tensor, group: torch.Tensor, num_groups: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct ``(group, key)`` pairs of a dispatched batch, sorted by
    ``(group, key)``.

    ``group[i]`` in ``[0, num_groups)`` is the worker of ``keys[i]``.  Returns
    ``(unique_keys, unique_group, counts)``: ``unique_keys`` has ``keys``' dtype,
    ``unique_group`` and ``counts`` (occurrences of each pair) are int64.
    """
    if EXTENSION_LOADED:
        return torch.ops.torchrec_esd.unique_keys_per_group(keys, group, int(num_groups))
    return reference_ops.unique_keys_per_group_ref(keys, group, int(num_groups))


def sorted_distinct(keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(distinct keys ascending, occurrences of each)`` of non-negative
    integer ``keys``: ``torch.unique(keys, return_counts=True)`` by
    :func:`unique_keys_per_group` with one group (a radix sort, O(N); about
    6x faster than ``torch.unique``'s comparison sort on CPU for 10^4-10^5 keys)."""
    keys = keys.view(-1)
    u, _, counts = unique_keys_per_group(keys, torch.zeros(keys.numel(), dtype=torch.int64, device=keys.device), 1)
    return u, counts


def sorted_distinct_inverse(keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(distinct keys ascending, index of every key among them)``:
    ``torch.unique(keys, return_inverse=True)`` for non-negative keys, by
    :func:`sorted_distinct` and an id-table lookup (O(N) expected)."""
    u, _ = sorted_distinct(keys)
    return u, id_table_lookup(id_table_build(u), keys.view(-1))


def has_plan_kernel() -> bool:
    """Whether the C++ cache-step kernel (:func:`plan_worker_cache`) is built."""
    return HAS_PLAN_KERNEL


def plan_worker_cache(
    slot_keys: torch.Tensor, last_use: torch.Tensor, freq: torch.Tensor, lag: torch.Tensor,
    dirty: torch.Tensor, slot_map: torch.Tensor, table_start: torch.Tensor, user_keys: torch.Tensor,
    user_counts: torch.Tensor, keys: torch.Tensor, row_offset: torch.Tensor, iteration: int,
    staleness: int, policy: int, user_table: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, ...]:
    """One worker's cache step of one iteration, in place (the C++ kernel of
    ``CacheDirectory._push_shared_dirty`` + ``_plan_worker`` without DES-served
    rows; those Python methods are its reference).  ``slot_map`` is dense
    (int32 ``[rows]``) or an id table (int64 ``[cap, 2]``, :func:`id_table_assign`);
    ``lag`` is how many versions each cached copy is behind; ``user_keys``
    (ascending) / ``user_counts`` the rows used this iteration and their number
    of user workers (at least this worker's keys and its cached rows others use);
    ``user_table``, optional, :func:`id_table_build` of ``user_keys``: a caller
    that steps many workers on the same rows builds it once, and each step then
    probes it instead of checking ``user_keys``' order and searching them.
    O(N + S + (U + D) log N) for U keys, N user keys, S slots, D dirty slots
    (O(S + U + D) expected with ``user_table``).  Returns ``(used_slot,
    pull_pos, local_pos, grad_pos, push_keys, push_slots, counts)``: the value
    pushes are the dirty rows other workers use (slot order), then the evicted
    dirty rows; ``counts`` = (miss pulls, update pulls, shared pushes, miss pushes).
    ``policy`` is the eviction order's kernel code
    (:class:`torchrec_esd.cache.policy.KernelPolicy`: 0 LRU, 1 LFU)."""
    return torch.ops.torchrec_esd.plan_worker_cache(
        slot_keys, last_use, freq, lag, dirty, slot_map, table_start, user_keys, user_counts, keys,
        row_offset, int(iteration), int(staleness), int(policy), user_table,
    )


HAS_TABLE_ASSIGN = EXTENSION_LOADED and hasattr(torch.ops.torchrec_esd, "id_table_assign")


def id_table_assign(table: torch.Tensor, erase_keys: torch.Tensor, keys: torch.Tensor,
                    values: torch.Tensor) -> None:
    """In place on an id table (:func:`id_table_build`'s layout, linear
    probing): erase ``erase_keys`` (absent ones ignored), then map
    ``keys[i] -> values[i]``.  O(len) expected at load <= 1/2; a full table
    raises.  CPU tensors (a cache directory's slot map)."""
    erase_keys, keys, values = (t.to(torch.int64).contiguous() for t in (erase_keys, keys, values))
    if HAS_TABLE_ASSIGN:
        torch.ops.torchrec_esd.id_table_assign(table, erase_keys, keys, values)
    else:
        reference_ops.id_table_assign_ref(table, erase_keys, keys, values)


def id_table_reserve(table: torch.Tensor, num_keys: int, more: int) -> torch.Tensor:
    """``table`` (:func:`id_table_build`'s layout, holding ``num_keys`` keys) itself, or,
    where ``more`` keys could load it over 1/2, a copy with the same entries grown to a
    load of at most 1/4 (``O(its capacity)``), so that growth is rare."""
    if 2 * (num_keys + more) <= table.shape[0]:
        return table
    live = table[table[:, 0] >= 0]
    grown = torch.full((id_table_capacity(2 * (num_keys + more)), 2), -1, dtype=torch.int64)
    id_table_assign(grown, torch.zeros(0, dtype=torch.int64), live[:, 0], live[:, 1])
    return grown


HAS_DEDUP_REFINE = EXTENSION_LOADED and hasattr(torch.ops.torchrec_esd, "dedup_refine")

if HAS_DEDUP_REFINE:

    @torch.library.register_fake("torchrec_esd::dedup_refine")
    def _dedup_refine_fake(occ_s, occ_k, pull, push, owner, owner_push, assignment, max_rounds: int,
                           time_budget_s: float, group_size: int):
        torch._check(assignment.dim() == 1, lambda: "dedup_refine: assignment must be 1-D")
        n = torch.library.get_ctx().new_dynamic_size()
        return (assignment.new_empty(assignment.shape), assignment.new_empty((n, 3)),
                pull.new_empty((7,)))


def has_dedup_refine() -> bool:
    """Whether the C++ local search of the de-duplicated cost (:func:`dedup_refine`) is built."""
    return HAS_DEDUP_REFINE


def dedup_refine(occ_s: torch.Tensor, occ_k: torch.Tensor, pull: torch.Tensor, push: torch.Tensor,
                 owner: torch.Tensor, owner_push: torch.Tensor, assignment: torch.Tensor,
                 max_rounds: int, time_budget_s: float, group_size: int = 4,
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local search on a batch's de-duplicated cost (the arrays of
    :class:`~torchrec_esd.cost.DedupCost`; CPU tensors: int64 ``occ_s``
    (sorted) / ``occ_k`` distinct (sample, row) pairs, float64 ``[U, W]``
    ``pull`` / ``push`` >= 0, int64 ``owner`` ``[U]`` (``-1``: none), float64
    ``owner_push`` ``[U]`` >= 0, int64 ``assignment`` ``[B]``).  Moves are swaps
    of two samples' workers and group moves (the at most ``group_size``
    users of a row on one worker move to another worker using the row, as
    many samples come back; 0: swaps only), so the samples per worker never
    change; every applied move lowers the cost.  It stops at a local optimum
    of the swap neighbourhood where no group move it tries improves, after
    ``max_rounds`` passes or after ``time_budget_s`` seconds (``inf``: none;
    ``<= 0``: no pass).  Returns ``(assignment, swaps, info)``: the applied
    swaps in order (int64 ``[n, 3]``: the sample moving ``x -> y``, the one
    moving ``y -> x``, the index of the move it belongs to), float64
    ``info`` = (passes, moves, swaps, start cost, cost, stop code: 0 local
    optimum, 1 max_rounds, 2 deadline; pairs evaluated).  The numpy search
    :func:`torchrec_esd.dispatch.dedup_refine_reference.refine_reference` is
    its reference (swaps only, another visiting order).  Per pass
    O(N W + W^2 B log B + evaluated pairs x occurrences per sample) for N
    occurrences (``csrc/cpu/dedup_refine_cpu.cpp``)."""
    return torch.ops.torchrec_esd.dedup_refine(occ_s, occ_k, pull, push, owner, owner_push, assignment,
                                               int(max_rounds), float(time_budget_s), int(group_size))
HAS_DEDUP_START = EXTENSION_LOADED and hasattr(torch.ops.torchrec_esd, "dedup_start")

if HAS_DEDUP_START:

    @torch.library.register_fake("torchrec_esd::dedup_start")
    def _dedup_start_fake(occ_s, occ_k, pull, push, owner, owner_push, divisor, p_shared, shares,
                          price_sweeps: int):
        torch._check(pull.dim() == 2, lambda: "dedup_start: pull must be [U, W]")
        torch._check(len(shares) == pull.shape[1], lambda: "dedup_start: one share per worker")
        return occ_s.new_empty((sum(shares),)), pull.new_empty((pull.shape[1],))


def has_dedup_start() -> bool:
    """Whether the C++ start of the ``esd`` dispatcher (:func:`dedup_start`) is built."""
    return HAS_DEDUP_START


def dedup_start(occ_s: torch.Tensor, occ_k: torch.Tensor, pull: torch.Tensor, push: torch.Tensor,
                owner: torch.Tensor, owner_push: torch.Tensor, divisor: torch.Tensor,
                p_shared: torch.Tensor, shares: List[int], price_sweeps: int = 3,
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``esd`` dispatcher's start in one call: the amortised matrix
    (:meth:`~torchrec_esd.cost.DedupCost.amortised_matrix`, with ``divisor`` /
    ``p_shared`` the tables of :func:`torchrec_esd.cost.dedup.amortise_table`),
    ``price_sweeps`` sweeps of dual prices and the price-adjusted regret greedy
    (:func:`~torchrec_esd.dispatch.heuristic.price_greedy`) with ``shares``.
    The arrays are :func:`dedup_refine`'s.  Returns ``(assignment, prices)``,
    equal bit for bit to the numpy path
    :func:`torchrec_esd.dispatch.dedup_search.start_reference`.  O(N + U W +
    sweeps B W + W (B W + B log B)) for N occurrences, U rows
    (``csrc/cpu/dedup_start_cpu.cpp``)."""
    return torch.ops.torchrec_esd.dedup_start(occ_s, occ_k, pull, push, owner, owner_push, divisor,
                                              p_shared, [int(x) for x in shares], int(price_sweeps))


HAS_DEDUP_DECIDE = EXTENSION_LOADED and hasattr(torch.ops.torchrec_esd, "dedup_decide")

if HAS_DEDUP_DECIDE:

    @torch.library.register_fake("torchrec_esd::dedup_decide")
    def _dedup_decide_fake(occ_s, occ_k, pull, push, owner, owner_push, divisor, p_shared, shares,
                           price_sweeps: int, max_rounds: int, time_budget_s: float, group_size: int):
        n = torch.library.get_ctx().new_dynamic_size()
        b = sum(shares)
        return (occ_s.new_empty((b,)), occ_s.new_empty((n, 3)), pull.new_empty((7,)), occ_s.new_empty((b,)))


def has_dedup_decide() -> bool:
    """Whether the one-call ``esd`` decision (:func:`dedup_decide`) is built."""
    return HAS_DEDUP_DECIDE


HAS_DEDUP_INPUTS = EXTENSION_LOADED and hasattr(torch.ops.torchrec_esd, "dedup_inputs")

if HAS_DEDUP_INPUTS:

    @torch.library.register_fake("torchrec_esd::dedup_inputs")
    def _dedup_inputs_fake(keys, offsets, slots, table_of, hit_worker, hit_key, hit_outdated, hit_dirty,
                           occupied, ndirty, capacity, row_time):
        n = torch.library.get_ctx().new_dynamic_size()
        w, u, b = row_time.shape[0], table_of.shape[0], offsets.shape[0] - 1
        return (keys.new_empty((n,)), keys.new_empty((n,)), row_time.new_empty((u, w)),
                row_time.new_empty((u, w)), keys.new_empty((u,)), row_time.new_empty((u,)),
                row_time.new_empty((b, w)))


def dedup_inputs(keys: torch.Tensor, offsets: torch.Tensor, slots: torch.Tensor, table_of: torch.Tensor,
                 hit_worker: torch.Tensor, hit_key: torch.Tensor, hit_outdated: torch.Tensor,
                 hit_dirty: torch.Tensor, occupied: torch.Tensor, ndirty: torch.Tensor, capacity: torch.Tensor,
                 row_time: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The arrays of a batch's :class:`~torchrec_esd.cost.DedupCost` and its
    additive ``[B, W]`` matrix in one call (``csrc/cpu/dedup_inputs_cpu.cpp``):
    ``(occ_s, occ_k, pull, push, owner, owner_push, additive)`` from the batch
    read (:class:`~torchrec_esd.cost.batch.BatchState`: sample-major ``keys``,
    ``offsets``, the id table ``slots`` of its distinct keys, their
    ``table_of``, the cached (worker, key index) pairs with their outdated and
    dirty flags, :class:`~torchrec_esd.cache.state.CacheHits`), the int64
    ``[W, T]`` ``occupied`` / ``ndirty`` / ``capacity`` rows of every cache and
    the float64 ``[W, T]`` seconds of one row (``row_time``).  Equal bit for
    bit to :meth:`CostModel.dedup_cost` and :meth:`DedupCost.additive_matrix`
    on the PyTorch / numpy path.  O(N log N + H + U W + P W) for N keys, H
    hits and P distinct (sample, row) pairs."""
    return torch.ops.torchrec_esd.dedup_inputs(keys, offsets, slots, table_of, hit_worker, hit_key, hit_outdated,
                                               hit_dirty, occupied, ndirty, capacity, row_time)


def dedup_decide(occ_s: torch.Tensor, occ_k: torch.Tensor, pull: torch.Tensor, push: torch.Tensor,
                 owner: torch.Tensor, owner_push: torch.Tensor, divisor: torch.Tensor,
                 p_shared: torch.Tensor, shares: List[int], price_sweeps: int, max_rounds: int,
                 time_budget_s: float, group_size: int = 4,
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`dedup_start` then :func:`dedup_refine` from its assignment in
    one call (one release of the GIL instead of two; the start's time counts
    in ``time_budget_s``).  Returns ``(refined, swaps, info, start)``: the
    outputs of :func:`dedup_refine` and the start assignment."""
    return torch.ops.torchrec_esd.dedup_decide(occ_s, occ_k, pull, push, owner, owner_push, divisor,
                                               p_shared, [int(x) for x in shares], int(price_sweeps),
                                               int(max_rounds), float(time_budget_s), int(group_size))


HAS_HOLDER_INDEX = EXTENSION_LOADED and hasattr(torch.ops.torchrec_esd, "holder_index_lookup")


def holder_index_sync(head: torch.Tensor, next_: torch.Tensor, prev: torch.Tensor, gkey: torch.Tensor,
                      base: int, slot_keys: torch.Tensor) -> torch.Tensor:
    """In place on a holder index (:class:`torchrec_esd.cache.holders.HolderIndex`):
    global slots ``[base, base + len(slot_keys))`` record ``slot_keys``
    (negative: empty).  Returns the keys that left a slot (int64, in slot
    order).  O(len(slot_keys)) compares plus O(1) expected per changed slot.
    CPU tensors."""
    slot_keys = slot_keys.to(torch.int64).contiguous()
    if HAS_HOLDER_INDEX:
        return torch.ops.torchrec_esd.holder_index_sync(head, next_, prev, gkey, int(base), slot_keys)
    from torchrec_esd.reference_holder_ops import holder_index_sync_ref

    return holder_index_sync_ref(head, next_, prev, gkey, int(base), slot_keys)


def holder_index_lookup(head: torch.Tensor, next_: torch.Tensor,
                        queries: torch.Tensor, lanes: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every holder of every query key: ``(pos, slots)``, ``pos`` the query's
    position (ascending) and ``slots`` the global slot.  O(len(queries) +
    holders found).  ``lanes``: lists walked side by side in C++ (0: one after
    the other; -1: by the index's size); the same result either way."""
    queries = queries.to(torch.int64).contiguous()
    if HAS_HOLDER_INDEX:
        return torch.ops.torchrec_esd.holder_index_lookup(head, next_, queries, int(lanes))
    from torchrec_esd.reference_holder_ops import holder_index_lookup_ref

    return holder_index_lookup_ref(head, next_, queries)


HAS_GROUPED_KERNELS = EXTENSION_LOADED and hasattr(torch.ops.torchrec_esd, "heuristic_total_solve")

if HAS_GROUPED_KERNELS:

    @torch.library.register_fake("torchrec_esd::heuristic_total_solve")
    def _heuristic_total_solve_fake(cost: torch.Tensor, shares: torch.Tensor, price_sweeps: int):
        torch._check(cost.dim() == 2, lambda: "heuristic_total_solve: cost must be [B, W]")
        return (cost.new_empty((cost.shape[0],), dtype=torch.int64), cost.new_empty((cost.shape[1],)),
                cost.new_empty(()))

    @torch.library.register_fake("torchrec_esd::group_price")
    def _group_price_fake(hit_key, hit_group, hit_outdated, table_of, row_time, evict_time, uses, per,
                          num_samples: int, occ_s, occ_k):
        torch._check(per.dim() == 1, lambda: "group_price: per must be 1-D")
        return row_time.new_empty((num_samples, per.shape[0]))


    @torch.library.register_fake("torchrec_esd::group_slice_expected")
    def _group_slice_expected_fake(samples, workers, pair_ptr, occ_k, hit_ptr, hit_key, hit_outdated, table_of,
                                   row_time, evict_time, uses, owner, owner_push, shares, p_shared, uses_index,
                                   num_samples: int):
        return row_time.new_empty((samples.shape[0], workers.shape[0]))


    @torch.library.register_fake("torchrec_esd::sample_key_pairs")
    def _sample_key_pairs_fake(offsets, kidx, num_keys: int):
        n = torch.library.get_ctx().new_dynamic_size()
        return (kidx.new_empty((n,)), kidx.new_empty((n,)), offsets.new_empty(offsets.shape),
                kidx.new_empty((num_keys,), dtype=torch.float64))


    @torch.library.register_fake("torchrec_esd::bucket_order")
    def _bucket_order_fake(bins, num_bins: int):
        return bins.new_empty(bins.shape), bins.new_empty((num_bins + 1,))


def has_grouped_kernels() -> bool:
    """Whether the C++ kernels of the grouped dispatcher (:func:`heuristic_total_solve`,
    :func:`group_price`, :func:`group_slice_expected`, :func:`sample_key_pairs`, :func:`bucket_order`) are built."""
    return HAS_GROUPED_KERNELS


def heuristic_total_solve(cost: torch.Tensor, shares, price_sweeps: int = 3
                          ) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """The regret heuristic for the total objective on a float64 ``[B, W]``
    cost (:func:`torchrec_esd.dispatch.heuristic.price_greedy` with
    ``price_sweeps`` dual sweeps, then :func:`~torchrec_esd.dispatch.lower_bound.dual_value`
    of the prices): ``(assignment, prices, lower_bound)``, equal bit for bit to
    the numpy reference (``csrc/cpu/heuristic_cpu.cpp``).
    O((price_sweeps + W) B W).  Without the extension: the reference."""
    if not HAS_GROUPED_KERNELS:
        import numpy as np

        from torchrec_esd.dispatch.heuristic import price_greedy
        from torchrec_esd.dispatch.lower_bound import dual_value

        c = np.ascontiguousarray(cost.detach().cpu().numpy())
        a, u = price_greedy(c, [int(s) for s in shares], price_sweeps)
        return torch.from_numpy(a), torch.from_numpy(u), dual_value(c, [int(s) for s in shares], u)
    sh = torch.as_tensor([int(s) for s in shares], dtype=torch.int64)
    a, u, lb = torch.ops.torchrec_esd.heuristic_total_solve(cost.to(torch.float64), sh, int(price_sweeps))
    return a, u, float(lb)


def group_price(hit_key: torch.Tensor, hit_group: torch.Tensor, hit_outdated: torch.Tensor,
                table_of: torch.Tensor, row_time: torch.Tensor, evict_time: torch.Tensor,
                uses: torch.Tensor, per: torch.Tensor, num_samples: int, occ_s: torch.Tensor,
                occ_k: torch.Tensor) -> torch.Tensor:
    """float64 ``[num_samples, G]`` stage-1 price of grouped dispatch
    (:meth:`torchrec_esd.cost.group_inputs.GroupInputs.group_matrix`, its
    reference): key ``k`` costs ``0`` on a group holding it fresh (a hit with
    ``hit_group`` = the group, not outdated), ``row_time[t, g]`` if held
    outdated, else ``row_time + evict_time``, divided by ``1 + (uses[k] - 1)
    per[g] / max(1, num_samples - 1)``; a sample sums its distinct keys
    (pairs ``occ_s`` / ``occ_k``) in pair order.  O(H + U G + P G)."""
    return torch.ops.torchrec_esd.group_price(
        hit_key.to(torch.int64).contiguous(), hit_group.to(torch.int64).contiguous(),
        hit_outdated.to(torch.bool).contiguous(), table_of.to(torch.int64).contiguous(),
        row_time.to(torch.float64).contiguous(), evict_time.to(torch.float64).contiguous(),
        uses.to(torch.float64).contiguous(), per.to(torch.float64).contiguous(), int(num_samples),
        occ_s.to(torch.int64).contiguous(), occ_k.to(torch.int64).contiguous())


def group_slice_expected(samples: torch.Tensor, workers: torch.Tensor, pair_ptr: torch.Tensor,
                         occ_k: torch.Tensor, hit_ptr: torch.Tensor, hit_key: torch.Tensor,
                         hit_outdated: torch.Tensor, table_of: torch.Tensor, row_time: torch.Tensor,
                         evict_time: torch.Tensor, uses: torch.Tensor, owner: torch.Tensor,
                         owner_push: torch.Tensor, shares: torch.Tensor, p_shared: torch.Tensor,
                         uses_index: torch.Tensor, num_samples: int) -> torch.Tensor:
    """float64 ``[len(samples), len(workers)]``: one group's slice of the
    expected cost matrix (:meth:`torchrec_esd.cost.group_inputs.GroupInputs.sub_matrix`
    with ``"expected"``, its reference; the argument layout is in
    ``csrc/esd_ops.cpp``).  ``p_shared[uses_index[x], j]`` is the probability
    term ``1 - (share / B)^(uses_x - 1)`` of worker ``j``, computed by the
    caller with numpy so that the kernel equals the reference bit for bit.
    O(N_g + H_g + U_g |g|)."""
    i64 = lambda t: t.to(torch.int64).contiguous()  # noqa: E731
    f64 = lambda t: t.to(torch.float64).contiguous()  # noqa: E731
    return torch.ops.torchrec_esd.group_slice_expected(
        i64(samples), i64(workers), i64(pair_ptr), i64(occ_k), i64(hit_ptr), i64(hit_key),
        hit_outdated.to(torch.bool).contiguous(), i64(table_of), f64(row_time), f64(evict_time), f64(uses),
        i64(owner), f64(owner_push), f64(shares), f64(p_shared), i64(uses_index), int(num_samples))


def sample_key_pairs(offsets: torch.Tensor, kidx: torch.Tensor,
                     num_keys: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(occ_s, occ_k, pair_ptr, uses)``: the distinct (sample, key index)
    pairs of sample-major key indices ``kidx`` with per-sample ``offsets``,
    sorted by (sample, key), their per-sample offsets and every key's use
    count (float64 ``[num_keys]``); what :class:`~torchrec_esd.cost.group_inputs.GroupInputs`
    builds with ``torch.unique`` (its reference).  O(N log L), ``L`` the
    longest sample."""
    return torch.ops.torchrec_esd.sample_key_pairs(offsets.to(torch.int64).contiguous(),
                                                   kidx.to(torch.int64).contiguous(), int(num_keys))


HAS_GROUP_PRICE_BITS = EXTENSION_LOADED and hasattr(torch.ops.torchrec_esd, "group_price_bits")

if HAS_GROUP_PRICE_BITS:

    @torch.library.register_fake("torchrec_esd::group_price_bits")
    def _group_price_bits_fake(keys, offsets, bits_table, row_offset, row_time, evict_time, per):
        torch._check(offsets.dim() == 1, lambda: "group_price_bits: offsets must be 1-D")
        return row_time.new_empty((offsets.shape[0] - 1, per.shape[0]))


def group_price_bits(keys: torch.Tensor, offsets: torch.Tensor, bits_table: torch.Tensor, row_offset: torch.Tensor,
                     row_time: torch.Tensor, evict_time: torch.Tensor, per: torch.Tensor) -> torch.Tensor:
    """float64 ``[B, G]`` stage-1 price of a batch slice in one C++ pass (``csrc/cpu/group_bits_cpu.cpp``):
    sample-major int64 row ``keys`` with per-sample ``offsets`` ``[B + 1]``, the holder index's group
    bits (an id table, :meth:`~torchrec_esd.cache.holders.HolderIndex.group_bits_table`), the
    tables' ``row_offset`` ``[T + 1]``, per group ``[T, G]`` row time and eviction push and ``per``
    ``[G]`` (:func:`~torchrec_esd.cost.group_inputs.group_matrix_from_bits`, whose PyTorch path is
    the reference).  Only with the extension built (:data:`HAS_GROUP_PRICE_BITS`)."""
    return torch.ops.torchrec_esd.group_price_bits(keys, offsets, bits_table, row_offset, row_time, evict_time, per)


HAS_GROUP_BITS_ASSIGN = EXTENSION_LOADED and hasattr(torch.ops.torchrec_esd, "group_bits_assign")


def group_bits_assign(bits_table: torch.Tensor, owner_table: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor,
                      worker: torch.Tensor, outdated: torch.Tensor, dirty: torch.Tensor, list_of: torch.Tensor,
                      num_groups: int) -> None:
    """In place: the holder index's group bits (held groups | fresh groups << 31) and dirty
    owners of ``keys`` from every cached copy of them (``pos`` the key of each, its
    ``worker``, flags), ``list_of`` each worker's group (``num_groups``: none); keys held by
    no group / dirty nowhere are erased.  One C++ pass, ``O(U + H)``
    (:meth:`~torchrec_esd.cache.holders.HolderIndex._assign_reference` is the reference).
    Only with the extension built (:data:`HAS_GROUP_BITS_ASSIGN`)."""
    torch.ops.torchrec_esd.group_bits_assign(bits_table, owner_table, keys.to(torch.int64), pos, worker, outdated,
                                             dirty, list_of, int(num_groups))


def bucket_order(bins: torch.Tensor, num_bins: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(order, ptr)``: the stable order of ``bins`` (int values in ``[0,
    num_bins)``) by value, and every bin's offsets in it (``[num_bins + 1]``).
    A counting sort, O(n + num_bins); without the extension
    ``torch.argsort(stable=True)`` and a bincount (the reference)."""
    bins = bins.to(torch.int64).contiguous()
    if HAS_GROUPED_KERNELS:
        return torch.ops.torchrec_esd.bucket_order(bins, int(num_bins))
    ptr = torch.zeros(int(num_bins) + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(bins, minlength=int(num_bins)), 0, out=ptr[1:])
    return torch.argsort(bins, stable=True), ptr


HAS_SLOT_COUNTS = EXTENSION_LOADED and hasattr(torch.ops.torchrec_esd, "slot_table_counts")

if HAS_SLOT_COUNTS:

    @torch.library.register_fake("torchrec_esd::slot_table_counts")
    def _slot_table_counts_fake(keys: torch.Tensor, dirty: torch.Tensor, table_start: torch.Tensor):
        torch._check(keys.dim() == 1 and dirty.dim() == 1 and table_start.dim() == 1,
                     lambda: "slot_table_counts: 1-D tensors")
        t = table_start.numel() - 1
        return keys.new_empty(t, dtype=torch.int64), keys.new_empty(t, dtype=torch.int64)


def slot_table_counts(keys: torch.Tensor, dirty: torch.Tensor, table_start: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(occupied, ndirty)`` int64 ``[T]``: per table, the slots holding a key
    (``keys >= 0``) and the dirty ones, for slots laid out table by table
    (``table_start`` ``[T + 1]``, from 0 to ``len(keys)``).  One C++ pass;
    without the extension :func:`torchrec_esd.reference_ops.slot_table_counts`
    (two running counts, as :meth:`torchrec_esd.cache.slots.WorkerSlots.per_table`)."""
    if HAS_SLOT_COUNTS:
        return torch.ops.torchrec_esd.slot_table_counts(keys, dirty, table_start)
    return reference_ops.slot_table_counts(keys, dirty, table_start)


HAS_HOLDER_READ = EXTENSION_LOADED and hasattr(torch.ops.torchrec_esd, "holder_index_read")


def holder_index_read(head: torch.Tensor, next_: torch.Tensor, base: torch.Tensor, bucket_worker: torch.Tensor,
                      shift: int, lag: torch.Tensor, dirty: torch.Tensor, queries: torch.Tensor, lanes: int = -1
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`holder_index_lookup` plus, per holder, its worker (``base`` the
    workers' first global slots; ``bucket_worker[g >> shift]`` the worker of
    each bucket's first slot, or empty for a binary search) and its slot's
    flags: ``(pos, worker, outdated, dirty)`` with ``outdated = (lag > 0) &
    ~dirty``.  One C++ pass that prefetches the per-slot state: O(len(queries)
    + holders) (``lanes`` as in :func:`holder_index_lookup`).  CPU tensors; :meth:`torchrec_esd.cache.holders.HolderIndex.read`
    falls back to the lookup and PyTorch gathers (its reference) without it."""
    return torch.ops.torchrec_esd.holder_index_read(head, next_, base, bucket_worker, int(shift), lag, dirty,
                                                    queries.to(torch.int64).contiguous(), int(lanes))


def native_reply_clock(markers: List, replies: List, timeout_s: float):
    """A native waiter of posted c10d receives (``csrc/reply_clock.cpp``):
    a thread that never takes the GIL waits for ``markers`` then ``replies``
    (c10d ``Work`` objects, each wait bounded by ``timeout_s``) and reads
    ``CLOCK_MONOTONIC`` after the last of each; its ``join()`` (the GIL
    released) returns ``(first, end, failed, error)``: the two times, the
    index (markers first) of the wait that failed or -1, and its message.
    ``None`` without the extension (the caller then times in Python)."""
    if not HAS_NATIVE_REPLY_CLOCK:
        return None
    return _C.NativeReplyClock(list(markers), list(replies), float(timeout_s))


HAS_NATIVE_REPLY_CLOCK = EXTENSION_LOADED and hasattr(_C, "NativeReplyClock")


HAS_MIX_SUM = EXTENSION_LOADED and hasattr(torch.ops.torchrec_esd, "positioned_mix_sum")
_MIX_SUM_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)

if HAS_MIX_SUM:

    @torch.library.register_fake("torchrec_esd::positioned_mix_sum")
    def _positioned_mix_sum_fake(values: torch.Tensor, salt: int) -> torch.Tensor:
        torch._check(values.dtype in _MIX_SUM_DTYPES,
                     lambda: "positioned_mix_sum: values must be int64/int32/int16/uint8")
        return values.new_empty((), dtype=torch.int64)


def positioned_mix_sum(values: torch.Tensor, salt: int) -> torch.Tensor:
    """0-d int64: the wrapping sum over ``i`` of ``mix(values[i] * C + i * P + salt)``:
    one part of the order-aware global batch fingerprint
    (:func:`torchrec_esd.distributed.plan_channel.global_batch_fingerprint`).  One C++
    pass for CPU integer tensors, else :func:`reference_ops.positioned_mix_sum_ref`
    (any device: the same value)."""
    if HAS_MIX_SUM and values.device.type == "cpu" and values.dtype in _MIX_SUM_DTYPES:
        return torch.ops.torchrec_esd.positioned_mix_sum(values, int(salt))
    return reference_ops.positioned_mix_sum_ref(values, int(salt))


HAS_DEDUP_PER_WORKER = EXTENSION_LOADED and hasattr(torch.ops.torchrec_esd, "dedup_per_worker")

if HAS_DEDUP_PER_WORKER:

    @torch.library.register_fake("torchrec_esd::dedup_per_worker")
    def _dedup_per_worker_fake(occ_s, occ_k, pull, push, owner, owner_push, assignment) -> torch.Tensor:
        torch._check(pull.dim() == 2, lambda: "dedup_per_worker: pull must be [U, W]")
        return pull.new_empty((pull.shape[1],))


def dedup_per_worker(occ_s: torch.Tensor, occ_k: torch.Tensor, pull: torch.Tensor, push: torch.Tensor,
                     owner: torch.Tensor, owner_push: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """float64 ``[W]``: :meth:`torchrec_esd.cost.DedupCost.per_worker` of ``assignment``
    (its numpy form is the reference) in one C++ pass, ``O(N + U W)``.  CPU tensors."""
    return torch.ops.torchrec_esd.dedup_per_worker(occ_s, occ_k, pull, push, owner, owner_push, assignment)
