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

Cost: memory ``n`` x (24 B lists and keys + 32-64 B id table) for ``n``
slots of all workers, nothing per table row; :meth:`sync` ``O(S_w)`` compares
in C++ plus ``O(1)`` expected per changed slot (the cache step itself is
``O(U_w log U + S_w)``); :meth:`lookup` ``O(U + H)`` for ``U`` keys with
``H`` holders in all (the workers named by buckets of slots, ``O(H)``).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

from torchrec_esd import ops
from torchrec_esd.cache.slots import WorkerSlots


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
        self.head = torch.full((ops.id_table_capacity(n), 2), -1, dtype=torch.int64)
        self.next = torch.full((n,), -1, dtype=torch.int64)
        self.prev = torch.full((n,), -1, dtype=torch.int64)
        self.gkey = torch.full((n,), -1, dtype=torch.int64)
        self.lag = torch.cat([st.lag for st in slots]) if slots else torch.zeros(0, dtype=torch.int64)
        self.dirty = torch.cat([st.dirty for st in slots]) if slots else torch.zeros(0, dtype=torch.bool)
        T = slots[0].table_start.numel() - 1 if slots else 0
        self.occupied = torch.zeros(len(slots), T, dtype=torch.int64)
        self.ndirty = torch.zeros(len(slots), T, dtype=torch.int64)
        self._stale = {}  # worker -> its slots, counted at the next occupancy() (count() is lazy)
        for w, st in enumerate(slots):
            b, e = int(self.base[w]), int(self.base[w + 1])
            st.lag, st.dirty = self.lag[b:e], self.dirty[b:e]
            self.sync(w, st)
            self.count(w, st)

    def nbytes(self) -> int:
        """Bytes of the index's own tensors (the flat lag / dirty are counted
        with the workers' slots)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.base, self.occupied, self.ndirty, self.head, self.next, self.prev, self.gkey))

    def occupancy(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(occupied, ndirty)`` int64 ``[W, T]``, as each worker's last :meth:`count` found them
        (the workers counted since the last call are counted now: ``O(S_w)`` each)."""
        T = self.occupied.shape[1]
        for w, st in self._stale.items():
            self.occupied[w] = st.per_table(st.keys >= 0, T)
            self.ndirty[w] = st.per_table(st.dirty, T)
        self._stale = {}
        return self.occupied.clone(), self.ndirty.clone()

    def sync(self, worker: int, st: WorkerSlots) -> None:
        """Record which keys ``worker``'s slots hold now (after its cache step):
        ``O(S_w)`` compares in C++, a relink per changed slot."""
        ops.holder_index_sync(self.head, self.next, self.prev, self.gkey, int(self.base[worker]), st.keys)

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
        :attr:`lag` / :attr:`dirty`).  ``O(U + H)``."""
        pos, g = ops.holder_index_lookup(self.head, self.next, keys)
        return pos, self.slot_workers(g), g

    def read(self, keys: torch.Tensor, kernel: bool = True
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pos, worker, outdated, dirty)`` of every cached copy of ``keys``:
        :meth:`lookup` and the copies' slot flags (``outdated``: lag > 0 and
        not dirty).  With ``kernel`` (and the extension built) one C++ pass
        (:func:`~torchrec_esd.ops.holder_index_read`), else the lookup and
        PyTorch gathers (the reference).  ``O(U + H)``."""
        if kernel and ops.HAS_HOLDER_READ:
            bw = self._bucket_worker if self._bucket_worker is not None else torch.zeros(0, dtype=torch.int64)
            return ops.holder_index_read(self.head, self.next, self.base, bw, self._shift, self.lag, self.dirty, keys)
        pos, worker, g = self.lookup(keys)
        dirty = self.dirty[g]
        return pos, worker, (self.lag[g] > 0) & ~dirty, dirty

    def slot_workers(self, g: torch.Tensor) -> torch.Tensor:
        """The worker of every global slot ``g`` (``searchsorted(base, g,
        right=True) - 1``): ``O(len(g))`` by buckets of slots, a binary search
        when some worker has no slots."""
        if self._bucket_worker is None:
            return torch.searchsorted(self.base, g, right=True) - 1
        worker = self._bucket_worker[g >> self._shift]
        return worker + (g >= self.base[worker + 1]).to(torch.int64)
