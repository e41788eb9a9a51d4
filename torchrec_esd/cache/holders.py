"""Row key -> the cache slots, over every worker, that hold it: an exactly
maintained index of the dispatcher's directory, so that reading a batch
against ``W`` caches costs ``O(U + hits)`` instead of one slot-map probe per
distinct key and worker (``O(W U)``).

:class:`HolderIndex` names every slot of every worker by a *global slot*
``g = base[w] + s`` and keeps, per cached row key, a doubly linked list of its
holders' global slots (``next`` / ``prev`` ``[n]``, the heads in an id table
of the cached keys, ``gkey[g]`` the key recorded at ``g``; C++ kernels
``holder_index_sync`` / ``holder_index_lookup`` in
``csrc/cpu/holders_cpu.cpp``).  The workers' per-slot ``lag`` and ``dirty``
move into flat ``[n]`` buffers (each :class:`~torchrec_esd.cache.slots.WorkerSlots`
keeps views of its range), so a lookup reads them at the hits alone.

Exactness: after every cache step of worker ``w`` the directory calls
:meth:`HolderIndex.sync` with ``w``'s slots, which compares every slot's key
with the recorded one and relinks the slots that changed (placements and the
evictions they replaced, whatever path changed them), so the index always
equals the slot maps (``tests/test_holder_index.py`` checks it against
brute-force probes after evicting steps).

Groups (for the grouped dispatcher, :meth:`HolderIndex.partition`): given a
partition of the workers into ``G <= 31`` groups, the index keeps one list per
(key, group) instead of one per key: a head table per group, the ``next`` /
``prev`` arrays unchanged (every slot is in one list).  A group reads its own
workers' copies of a key without walking the others' (:meth:`read_group`,
``O(U + H_g)``); a full :meth:`lookup` walks the key's list in every group.
With it come, per cached row key, the groups that hold it and the groups that
hold it fresh (some copy neither lagging nor outdated), in one int64 (held bits
0-30, fresh bits 31-61) in an id table, and its dirty owner in another
(:meth:`group_bits`, :meth:`dirty_owner`; ``32-64 B`` per cached key each).
They are built on first use for a partition (``O(n)``); after every iteration
the directory re-reads the keys whose copies changed
(:meth:`refresh_group_bits`: the iteration's rows, whose lags and dirty flags it
changed, from the lag update's own lookup; the keys that left a slot, which
:meth:`sync` gets back from ``holder_index_sync``; the flushed ones), so they
always equal the slots (``tests/test_holder_index.py`` checks them, the
per-group lists and the owners against the slots after evicting steps and
flushes).  Reading them costs one id-table probe per key, ``O(U)``, however
many workers hold the key.

Cost: memory ``n`` x (24 B lists and keys + 32-64 B id table) for ``n``
slots of all workers, nothing per table row; :meth:`sync` ``O(S_w)`` compares
in C++ plus ``O(1)`` expected per changed slot (the cache step itself is
``O(U_w log U + S_w)``); :meth:`lookup` ``O(U + H)`` for ``U`` keys with
``H`` holders in all (the workers named by buckets of slots, ``O(H)``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from torchrec_esd import ops
from torchrec_esd.cache.slots import WorkerSlots


USE_BITS_KERNEL = True  # HolderIndex._assign in C++ when built (tests compare both ways)


class HolderIndex:
    """The holders of every cached row key over ``slots`` (worker ``w``'s at
    position ``w``); see the module docstring.  Built from the slots' current
    state (``O(n)``); their ``lag`` / ``dirty`` become views of :attr:`lag` /
    :attr:`dirty`."""

    def __init__(self, slots: Sequence[WorkerSlots]) -> None:
        sizes = torch.tensor([st.num_slots for st in slots], dtype=torch.int64)
        self.base = torch.zeros(len(slots) + 1, dtype=torch.int64)
        torch.cumsum(sizes, 0, out=self.base[1:])
        n = int(self.base[-1])
        # global slot -> worker in O(1): buckets of 2^shift slots, each within at most two
        # workers when every worker has >= 2^shift slots (else None: a binary search)
        self._bucket_worker, self._shift = None, 0
        if len(slots) and int(sizes.min()) > 0:
            self._shift = int(sizes.min()).bit_length() - 1
            starts = torch.arange(0, n, 1 << self._shift, dtype=torch.int64)
            self._bucket_worker = torch.searchsorted(self.base, starts, right=True) - 1
        # one head table per list: one list per key, or per (key, group) once partition() is called
        self.heads = [torch.full((ops.id_table_capacity(n), 2), -1, dtype=torch.int64)]
        self._list_of = torch.zeros(len(slots), dtype=torch.int64)  # each worker's head table
        self._partition = None
        self._slots = list(slots)
        self.next = torch.full((n,), -1, dtype=torch.int64)
        self.prev = torch.full((n,), -1, dtype=torch.int64)
        self.gkey = torch.full((n,), -1, dtype=torch.int64)
        self.lag = torch.cat([st.lag for st in slots]) if slots else torch.zeros(0, dtype=torch.int64)
        self.dirty = torch.cat([st.dirty for st in slots]) if slots else torch.zeros(0, dtype=torch.bool)
        T = slots[0].table_start.numel() - 1 if slots else 0
        self.occupied = torch.zeros(len(slots), T, dtype=torch.int64)
        self.ndirty = torch.zeros(len(slots), T, dtype=torch.int64)
        self._stale = {}  # worker -> its slots, counted at the next occupancy() (count() is lazy)
        # group bits: (partition as a tuple, group of every worker [W], id table key -> bits,
        # id table key -> its dirty owner), or None
        self._gbits = None
        self._gb_changed = []  # keys whose slots changed since the last refresh_group_bits
        for w, st in enumerate(slots):
            b, e = int(self.base[w]), int(self.base[w + 1])
            st.lag, st.dirty = self.lag[b:e], self.dirty[b:e]
            self.sync(w, st)
            self.count(w, st)

    def nbytes(self) -> int:
        """Bytes of the index's own tensors (the flat lag / dirty are counted
        with the workers' slots)."""
        tables = list(self.heads) + (list(self._gbits[2:]) if self._gbits is not None else [])
        return sum(t.numel() * t.element_size()
                   for t in [self.base, self.occupied, self.ndirty, self.next, self.prev, self.gkey] + tables)

    @property
    def head(self) -> torch.Tensor:
        """The head table (key -> its first holder) of an index with one list per key."""
        if len(self.heads) != 1:
            raise ValueError("the holder index is partitioned: one head table per group (heads)")
        return self.heads[0]

    def occupancy(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(occupied, ndirty)`` int64 ``[W, T]``, as each worker's last :meth:`count` found them
        (the workers counted since the last call are counted now: ``O(S_w)`` each)."""
        for w, st in self._stale.items():
            self.occupied[w], self.ndirty[w] = ops.slot_table_counts(st.keys, st.dirty, st.table_start)
        self._stale = {}
        return self.occupied.clone(), self.ndirty.clone()

    def sync(self, worker: int, st: WorkerSlots) -> None:
        """Record which keys ``worker``'s slots hold now (after its cache step):
        ``O(S_w)`` compares in C++, a relink per changed slot."""
        left = ops.holder_index_sync(self.heads[int(self._list_of[worker])], self.next, self.prev, self.gkey,
                                     int(self.base[worker]), st.keys)
        if self._gbits is not None:
            # the keys that left a slot: their group bits change (a key enters a slot only in
            # the cache step of a worker that uses it: the iteration's rows, re-read anyway)
            self._gb_changed.append(left)

    def count(self, worker: int, st: WorkerSlots) -> None:
        """Count ``worker``'s occupied and dirty slots per table (after its
        iteration's local updates or a flush, which change dirty flags but
        no keys), for :meth:`occupancy`.  Lazy: the count runs (``O(S_w)``) at
        the next :meth:`occupancy`, which the directory's callers read only
        before a full decision, and no slot changes between the two (every
        change is followed by a ``count``).  The dispatcher of a plain-split
        step (``dispatch/stake.py``) or an input-blind one reads none (in a
        cProfile of ``benchmarks/profile_step.py`` on 4 x 1000 Mbit/s, these
        counts were 2.3 of the dispatching worker's ~12 ms directory step)."""
        self._stale[worker] = st

    def lookup(self, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pos, worker, g)`` of every cached copy of ``keys``: the key's
        position in ``keys``, the worker and the global slot (index of
        :attr:`lag` / :attr:`dirty`), key by key (:meth:`partition`: in each key, group
        by group).  ``O(U + H)`` (partitioned: ``O(G U + H)``)."""
        parts = [ops.holder_index_lookup(h, self.next, keys) for h in self.heads]
        pos, g = self._merged(parts, keys.numel())
        return pos, self.slot_workers(g), g

    def _merged(self, parts, u: int) -> Tuple[torch.Tensor, ...]:
        """The per-list results ``parts`` (tuples whose first entry is ``pos``) as one, by
        key (a stable counting sort, ``O(H + U)``; within a key, list by list)."""
        if len(parts) == 1:
            return parts[0]
        cols = [torch.cat(c) for c in zip(*parts)]
        order, _ = ops.bucket_order(cols[0], u)
        return tuple(c.index_select(0, order) for c in cols)

    def read(self, keys: torch.Tensor, kernel: bool = True
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pos, worker, outdated, dirty)`` of every cached copy of ``keys``:
        :meth:`lookup` and the copies' slot flags (``outdated``: lag > 0 and
        not dirty).  With ``kernel`` (and the extension built) one C++ pass
        (:func:`~torchrec_esd.ops.holder_index_read`), else the lookup and
        PyTorch gathers (the reference).  ``O(U + H)``."""
        if kernel and ops.HAS_HOLDER_READ:
            return self._merged([self._read_list(h, keys) for h in self.heads], keys.numel())
        pos, worker, g = self.lookup(keys)
        return (pos, worker) + self.slot_flags(g)

    def slot_flags(self, g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(outdated, dirty)`` of the global slots ``g`` (``outdated``: lag > 0 and not dirty)."""
        dirty = self.dirty[g]
        return (self.lag[g] > 0) & ~dirty, dirty

    def _read_list(self, head: torch.Tensor, keys: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if ops.HAS_HOLDER_READ:
            bw = self._bucket_worker if self._bucket_worker is not None else torch.zeros(0, dtype=torch.int64)
            return ops.holder_index_read(head, self.next, self.base, bw, self._shift, self.lag, self.dirty, keys)
        pos, g = ops.holder_index_lookup(head, self.next, keys)
        return (pos, self.slot_workers(g)) + self.slot_flags(g)

    # ------------------------------------------------------------ partition
    def partition(self, group_of: torch.Tensor) -> None:
        """Keep one holder list per (key, group) of workers: ``group_of`` int64 ``[W]``,
        each worker's group in ``[0, G)`` (``G <= 31``) or -1 (the workers in no group share
        one more list).  Then :meth:`read_group` reads one group's copies of a key without
        walking the others', and :meth:`group_bits` are kept for this partition.  A full
        :meth:`lookup` / :meth:`read` walks every list of a key (the hits come key by key,
        list by list).  Re-links every slot (``O(n)``) when the partition changes; the
        next / prev / gkey arrays stay one per global slot (each slot is in one list), the
        head tables together take about what the one table took."""
        group_of = group_of.to(torch.int64)
        part = tuple(group_of.tolist())
        W = self.base.numel() - 1
        if len(part) != W or (part and (max(part) >= self.MAX_GROUPS or min(part) < -1)):
            raise ValueError(f"group_of must give each of {W} workers a group in [0, {self.MAX_GROUPS}) or -1,"
                             f" got {list(part)}")
        if part == self._partition:
            return
        G = max(part) + 1 if part else 0
        lists = torch.where(group_of >= 0, group_of, torch.full_like(group_of, G))
        sizes = torch.zeros(G + 1, dtype=torch.int64).index_add_(0, lists, self.base[1:] - self.base[:-1])
        self.heads = [torch.full((ops.id_table_capacity(int(c)), 2), -1, dtype=torch.int64) for c in sizes.tolist()]
        self._list_of, self._partition, self._gbits, self._gb_changed = lists, part, None, []
        for t in (self.next, self.prev, self.gkey):
            t.fill_(-1)
        for w, st in enumerate(self._slots):
            self.sync(w, st)

    def read_group(self, group: int, keys: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """:meth:`read` of the copies on group ``group``'s workers only (after
        :meth:`partition`): ``O(U + H_g)`` for their ``H_g`` copies."""
        if self._partition is None or not 0 <= group < len(self.heads) - 1:
            raise ValueError(f"read_group({group}): the index has no such group (partition: {self._partition})")
        return self._read_list(self.heads[group], keys)

    # ------------------------------------------------------------ group bits
    MAX_GROUPS = 31  # held bits 0-30, fresh bits 31-61 of one non-negative int64
    GROUP_TABLE_MIN_KEYS = 1024  # the bits and owner tables start with room for this many keys at least

    def group_bits(self, group_of: torch.Tensor, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(held, fresh)`` int64 ``[len(keys)]``: bit ``g`` set where a worker of group
        ``g`` caches the key (``held``), and where one caches it neither lagging nor
        outdated (``fresh``: lag 0, or dirty).  ``group_of``: int64 ``[W]``, each worker's
        group in ``[0, G)``, ``G <= 31``, or -1 (in none).  The first call for a
        partition builds the bits of every cached key (``O(n)``); the directory keeps them
        exact after every iteration (module docstring); a read is ``O(len(keys))``."""
        self._group_state(group_of)
        v = ops.id_table_lookup(self._gbits[2], keys.to(torch.int64)).clamp(min=0)
        return v & ((1 << self.MAX_GROUPS) - 1), v >> self.MAX_GROUPS

    def group_bits_table(self, group_of: torch.Tensor) -> torch.Tensor:
        """The id table behind :meth:`group_bits` (row key -> held | fresh << 31; absent:
        held nowhere), for a C++ reader (:func:`~torchrec_esd.ops.group_price_bits`).  Valid
        until the directory's next iteration; read only."""
        self._group_state(group_of)
        return self._gbits[2]

    def dirty_owner(self, group_of: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """int64 ``[len(keys)]``: the worker holding the only up-to-date copy of each key
        (its dirty copy; the lowest worker if ever several), -1 where none.  Kept with
        the :meth:`group_bits` of the partition ``group_of``; ``O(len(keys))``."""
        self._group_state(group_of)
        return ops.id_table_lookup(self._gbits[3], keys.to(torch.int64))

    def _group_state(self, group_of: torch.Tensor) -> None:
        """Partition the lists by ``group_of`` and build its group bits and dirty owners
        (``O(n)``) unless they are kept already."""
        self.partition(group_of)
        if self._gbits is None:
            cached = torch.unique(self.gkey[self.gkey >= 0])
            # sized to the distinct cached rows (far fewer than the slots where hot rows are in
            # many caches), grown on demand by _reserve
            cap = ops.id_table_capacity(max(int(cached.numel()), self.GROUP_TABLE_MIN_KEYS))
            self._gbits = [self._partition, self._list_of.clone(), torch.full((cap, 2), -1, dtype=torch.int64),
                           torch.full((cap, 2), -1, dtype=torch.int64)]
            self._gb_rows = [0, 0]  # entries in the two tables, exactly
            self._gb_changed = []
            self._refresh(cached)

    def note_changed(self, keys: torch.Tensor) -> None:
        """Record ``keys`` whose copies' flags changed outside a slot move (a flush):
        the next :meth:`refresh_group_bits` re-reads them."""
        if self._gbits is not None:
            self._gb_changed.append(keys.to(torch.int64))

    def refresh_group_bits(self, keys: torch.Tensor,
                           looked: Optional[Tuple[torch.Tensor, ...]] = None) -> Optional[torch.Tensor]:
        """Re-read the group bits and dirty owners of ``keys`` (ascending, distinct) and of
        every key that left a slot or was flushed since the last refresh (the directory
        calls it after each iteration with the iteration's rows, and after a flush with the
        flushed ones).  ``looked``: ``(pos, worker, g)``, :meth:`lookup` of ``keys`` (the
        directory's lag update has it), so that only the other keys are walked.
        ``O(U + H)`` for their ``H`` copies; nothing without group bits.  Returns
        the keys re-read (``keys``, then the others; None without group bits): every
        key whose bits or owner may have changed since the last refresh."""
        if self._gbits is None:
            return None
        keys = keys.to(torch.int64)
        if looked is None:
            self._refresh(keys)
        else:
            pos, worker, g = looked
            self._assign(keys, pos, worker, *self.slot_flags(g))
        if self._gb_changed:
            changed, self._gb_changed = torch.cat(self._gb_changed), []
            if changed.numel():
                changed = ops.sorted_distinct(changed)[0]
                self._refresh(changed)
                return torch.cat([keys, changed])
        return keys

    def _refresh(self, keys: torch.Tensor) -> None:
        if keys.numel():
            self._assign(keys, *self.read(keys))

    def _assign(self, keys: torch.Tensor, pos: torch.Tensor, worker: torch.Tensor, outdated: torch.Tensor,
                dirty: torch.Tensor) -> None:
        """Store the group bits and dirty owners of ``keys`` from all their copies (``pos``
        the key of each): one C++ pass (:func:`~torchrec_esd.ops.group_bits_assign`) when
        built and :data:`USE_BITS_KERNEL`, else :meth:`_assign_reference`."""
        if keys.numel() == 0:
            return
        self._reserve(keys.numel())
        part, lists, table, owners = self._gbits
        before = [int((ops.id_table_lookup(t, keys) >= 0).sum()) for t in (table, owners)]
        if USE_BITS_KERNEL and ops.HAS_GROUP_BITS_ASSIGN:
            ops.group_bits_assign(table, owners, keys, pos, worker, outdated, dirty, lists,
                                  len(self.heads) - 1 if part else 0)
        else:
            self._assign_reference(keys, pos, worker, outdated, dirty)
        for i, t in enumerate((table, owners)):
            self._gb_rows[i] += int((ops.id_table_lookup(t, keys) >= 0).sum()) - before[i]

    def reserve(self, u: int) -> None:
        """Room for ``u`` more keys in the group bits and owner tables (built by a first
        :meth:`group_bits`), so that they do not grow while those keys come: a group rank's
        index (:mod:`~torchrec_esd.cache.split_step`) reserves its slots' count once."""
        if self._gbits is None:
            raise ValueError("reserve() needs the group bits (call group_bits() first)")
        self._reserve(int(u))

    def _reserve(self, u: int) -> None:
        """Grow the bits or owner table where ``u`` more keys could load it over 1/2
        (:func:`~torchrec_esd.ops.id_table_reserve`)."""
        for i in (0, 1):
            self._gbits[2 + i] = ops.id_table_reserve(self._gbits[2 + i], self._gb_rows[i], u)

    def _assign_reference(self, keys: torch.Tensor, pos: torch.Tensor, worker: torch.Tensor,
                          outdated: torch.Tensor, dirty: torch.Tensor) -> None:
        """:meth:`_assign` in PyTorch (the kernel's reference)."""
        part, lists, table, owners = self._gbits
        u, W = keys.numel(), self.base.numel() - 1
        first = torch.full((u,), W, dtype=torch.int64).scatter_reduce_(0, pos[dirty], worker[dirty], "amin")
        has = first < W
        ops.id_table_assign(owners, keys[~has], keys[has], first[has])
        # which lists (groups; the last: workers in none) hold each key, and hold it fresh
        L = len(self.heads)
        g = lists.index_select(0, worker)
        held_m = torch.zeros(u * L, dtype=torch.bool)
        held_m[pos * L + g] = True
        fresh_m = torch.zeros(u * L, dtype=torch.bool)
        fresh = ~outdated
        fresh_m[pos[fresh] * L + g[fresh]] = True
        held = torch.zeros(u, dtype=torch.int64)
        fr = torch.zeros(u, dtype=torch.int64)
        held_m, fresh_m = held_m.view(u, L), fresh_m.view(u, L)
        for gi in range(L - 1 if part else 0):
            held |= held_m[:, gi].to(torch.int64) << gi
            fr |= fresh_m[:, gi].to(torch.int64) << gi
        some = held > 0
        ops.id_table_assign(table, keys[~some], keys[some], held[some] | (fr[some] << self.MAX_GROUPS))

    def slot_workers(self, g: torch.Tensor) -> torch.Tensor:
        """The worker of every global slot ``g`` (``searchsorted(base, g,
        right=True) - 1``): ``O(len(g))`` by buckets of slots, a binary search
        when some worker has no slots."""
        if self._bucket_worker is None:
            return torch.searchsorted(self.base, g, right=True) - 1
        worker = self._bucket_worker[g >> self._shift]
        return worker + (g >= self.base[worker + 1]).to(torch.int64)

