"""One worker's cache slots: which row sits where, and the metadata the cache
step and the eviction policies read.

Memory (S slots, R rows of all tables): per slot 8 B key + 8 B last use +
8 B use count + 8 B lag + 1 B dirty + 8 B table, plus the key -> slot map:
dense, 4 B per *row* (``4 R``), or hashed, an id table of ``cap`` rows of
16 B, ``cap`` the next power of two >= ``2 S`` (``32 S``-``64 S`` B).  The
map is dense iff ``R <= max(DENSE_SLOT_MAP_ROWS, DENSE_ROWS_PER_SLOT * S)``
(:func:`use_dense_slot_map`): the dense map then costs at most ``4 *
DENSE_ROWS_PER_SLOT = 32`` B per slot, no more than the hashed one, and is one
array read per lookup.  Otherwise the whole state is O(S), whatever R.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from torchrec_esd import ops
from torchrec_esd.reference_ops import counts_in_ranges

# a dense slot map below this many rows whatever the slots (int32: 4 MiB)
DENSE_SLOT_MAP_ROWS = 1 << 20
# ... or while the rows are at most this many per slot (dense <= 32 B per slot)
DENSE_ROWS_PER_SLOT = 8
_INT32_MAX = (1 << 31) - 1


def use_dense_slot_map(total_rows: int, num_slots: int) -> bool:
    """The stated rule (module docstring): dense iff ``total_rows <=
    max(DENSE_SLOT_MAP_ROWS, DENSE_ROWS_PER_SLOT * num_slots)`` (and int32 keys fit)."""
    return 0 < total_rows <= min(_INT32_MAX, max(DENSE_SLOT_MAP_ROWS, DENSE_ROWS_PER_SLOT * num_slots))


class WorkerSlots:
    """Metadata of one worker's cache slots (all tables, table-major blocks:
    table ``t`` owns slots ``table_start[t]:table_start[t + 1]``).

    Per slot: ``keys`` (global row key, ``-1`` empty), ``last_use`` (iteration
    of the last use), ``freq`` (uses since placed), ``lag`` (versions the
    cached copy is behind the row's latest value: 0 current), ``dirty`` (the
    only up-to-date copy), ``slot_table``, and the eviction policy's own
    tensors in ``policy_state``.  ``lag`` and ``dirty`` may be views of the
    directory's holder-index buffers (:mod:`~torchrec_esd.cache.holders`): update
    them in place, never rebind them.  ``slot_map`` is the key -> slot map kept in
    step with ``keys``: dense int32 ``[total_rows]`` (``-1``: not cached) or
    hashed, an int64 ``[cap, 2]`` id table (:func:`torchrec_esd.ops.id_table_build`'s
    layout, rows ``(key, slot)``); ``dense`` says which (:func:`use_dense_slot_map`
    when not forced).  :meth:`find` is O(1) per key either way."""

    def __init__(self, capacities: List[int], total_rows: int, dense: Optional[bool] = None,
                 policy_state: Optional[Dict[str, torch.Tensor]] = None) -> None:
        cap = torch.tensor(capacities, dtype=torch.int64)
        self.capacity = cap  # [T]
        n = int(cap.sum())
        self.slot_table = torch.repeat_interleave(torch.arange(len(capacities)), cap)
        self.table_start = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(cap, 0)])
        self.keys = torch.full((n,), -1, dtype=torch.int64)
        self.last_use = torch.zeros(n, dtype=torch.int64)
        self.freq = torch.zeros(n, dtype=torch.int64)
        self.lag = torch.zeros(n, dtype=torch.int64)
        self.dirty = torch.zeros(n, dtype=torch.bool)
        self.policy_state: Dict[str, torch.Tensor] = dict(policy_state or {})
        self.dense = use_dense_slot_map(total_rows, n) if dense is None else bool(dense)
        if self.dense:
            self.slot_map = torch.full((total_rows,), -1, dtype=torch.int32)
        else:
            self.slot_map = torch.full((ops.id_table_capacity(n), 2), -1, dtype=torch.int64)

    @property
    def num_slots(self) -> int:
        return self.keys.numel()

    def nbytes(self) -> int:
        """Bytes of every tensor of this worker's state (slots, map, policy)."""
        ts = [self.capacity, self.slot_table, self.table_start, self.keys, self.last_use, self.freq,
              self.lag, self.dirty, self.slot_map, *self.policy_state.values()]
        return sum(t.numel() * t.element_size() for t in ts)

    def place(self, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """Put ``keys`` into ``slots`` (``-1``: empty them)."""
        old = self.keys[slots]
        old = old[old >= 0]
        new = keys >= 0
        if self.dense:
            self.slot_map[old] = -1
            self.slot_map[keys[new]] = slots[new].to(torch.int32)
        else:
            ops.id_table_assign(self.slot_map, old, keys[new], slots[new])
        self.keys[slots] = keys

    def find(self, keys: torch.Tensor) -> torch.Tensor:
        """Slot of each key, -1 where not cached."""
        if self.dense:  # index_select: a third of advanced indexing's CPU
            return self.slot_map.index_select(0, keys.reshape(-1)).to(torch.int64).view(keys.shape)
        if keys.numel() == 0:
            return torch.full_like(keys, -1)
        return ops.id_table_lookup(self.slot_map, keys)

    def per_table(self, mask: torch.Tensor, num_tables: int) -> torch.Tensor:
        """``[T]`` slots of each table where ``mask`` holds: differences of
        ``mask``'s running count at the tables' contiguous slot ranges
        (O(S), no gather of the masked slots' tables)."""
        if num_tables != self.table_start.numel() - 1:
            raise ValueError(f"{num_tables} tables asked of the slots of {self.table_start.numel() - 1}")
        return counts_in_ranges(mask, self.table_start)
