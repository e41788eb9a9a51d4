"""A worker's cached embedding rows, on the sharded module's device.

Slots are the cache directory's: the concatenation of the worker's per-table
cache blocks (table-major).  A row is stored ``max_dim`` wide (narrower
tables zero-padded, see :mod:`~torchrec_esd.distributed.lookup`) with its
optimizer state beside it.  Nothing here is CPU-specific: the store lives on
the ``device`` the sharder was given (TorchRec's ``shard(..., device)``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from torchrec_esd.layout import STATE_DTYPE, KeySpace


class WorkerRowStore:
    """``rows [C, max_dim]`` and ``state [C, state_dim]`` of one worker's cache."""

    def __init__(self, keyspace: KeySpace, capacities: Sequence[int], device: torch.device) -> None:
        if len(capacities) != keyspace.num_tables:
            raise ValueError(f"{len(capacities)} capacities for {keyspace.num_tables} tables")
        self.device = torch.device(device)
        cap = int(sum(int(c) for c in capacities))
        dtype = keyspace.formats[0].dtype
        self.rows = torch.zeros(cap, keyspace.max_dim, dtype=dtype, device=self.device)
        self.state = torch.zeros(cap, keyspace.state_dim, dtype=STATE_DTYPE, device=self.device)

    @property
    def capacity(self) -> int:
        return int(self.rows.shape[0])

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        """``[n, max_dim + state_dim]``: value and state of ``slots``."""
        slots = slots.to(self.device, torch.int64)
        return torch.cat([self.rows.index_select(0, slots), self.state.index_select(0, slots)], 1)

    def write(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``values`` ``[n, max_dim + state_dim]`` (a PS reply) in ``slots``."""
        slots = slots.to(self.device, torch.int64)
        values = values.to(self.device)
        d = self.rows.shape[1]
        # index_copy_: advanced indexing's assignment without its index preparation
        # (slots are distinct: one per pulled row)
        self.rows.index_copy_(0, slots, values[:, :d].to(self.rows.dtype))
        self.state.index_copy_(0, slots, values[:, d:].to(self.state.dtype))

    def clear(self) -> None:
        """Zero every slot (the directory's caches were emptied)."""
        self.rows.zero_()
        self.state.zero_()
