"""One worker's cache slots: which row sits where, and the metadata the cache
step and the eviction policies read."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch


class WorkerSlots:
    """Metadata of one worker's cache slots (all tables, table-major blocks:
    table ``t`` owns slots ``table_start[t]:table_start[t + 1]``).

    Per slot: ``keys`` (global row key, ``-1`` empty), ``last_use`` (iteration
    of the last use), ``freq`` (uses since placed), ``ver`` (version of the
    cached copy), ``dirty`` (the only up-to-date copy), ``slot_table``, and the
    eviction policy's own tensors in ``policy_state``.  ``slot_map`` is the
    slot of every row key (``-1``: not cached) when ``dense``, else ``None``
    (then :meth:`find` sorts the cached keys)."""

    def __init__(self, capacities: List[int], total_rows: int, dense: bool,
                 policy_state: Optional[Dict[str, torch.Tensor]] = None) -> None:
        cap = torch.tensor(capacities, dtype=torch.int64)
        self.capacity = cap  # [T]
        n = int(cap.sum())
        self.slot_table = torch.repeat_interleave(torch.arange(len(capacities)), cap)
        self.table_start = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(cap, 0)])
        self.keys = torch.full((n,), -1, dtype=torch.int64)
        self.last_use = torch.zeros(n, dtype=torch.int64)
        self.freq = torch.zeros(n, dtype=torch.int64)
        self.ver = torch.zeros(n, dtype=torch.int64)
        self.dirty = torch.zeros(n, dtype=torch.bool)
        self.policy_state: Dict[str, torch.Tensor] = dict(policy_state or {})
        # kept in step with ``keys`` by :meth:`place`
        self.slot_map = torch.full((total_rows,), -1, dtype=torch.int32) if dense else None

    @property
    def num_slots(self) -> int:
        return self.keys.numel()

    def place(self, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """Put ``keys`` into ``slots`` (``-1``: empty them)."""
        if self.slot_map is not None:
            old = self.keys[slots]
            self.slot_map[old[old >= 0]] = -1
            new = keys >= 0
            self.slot_map[keys[new]] = slots[new].to(torch.int32)
        self.keys[slots] = keys

    def find(self, keys: torch.Tensor) -> torch.Tensor:
        """Slot of each key, -1 where not cached."""
        if self.slot_map is not None:
            return self.slot_map[keys].to(torch.int64)
        occupied = (self.keys >= 0).nonzero().view(-1)
        if occupied.numel() == 0 or keys.numel() == 0:
            return torch.full_like(keys, -1)
        ok = self.keys[occupied]
        order = torch.argsort(ok)
        sk = ok[order]
        pos = torch.searchsorted(sk, keys).clamp_(max=sk.numel() - 1)
        return torch.where(sk[pos] == keys, occupied[order[pos]], torch.full_like(keys, -1))

    def per_table(self, mask: torch.Tensor, num_tables: int) -> torch.Tensor:
        """``[T]`` slots of each table where ``mask`` holds."""
        return torch.bincount(self.slot_table[mask], minlength=num_tables)
