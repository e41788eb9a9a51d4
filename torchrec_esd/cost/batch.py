"""One batch read against the cache state: its row keys and, per distinct
key, every worker's cache state (what every cost-model output is built from)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from torchrec_esd import ops
from torchrec_esd.cache.state import CacheLookup, CacheState


@dataclass
class BatchState:
    keys: torch.Tensor  # [N] sample-major global row keys
    offsets: torch.Tensor  # [B+1]
    uniq: torch.Tensor  # [U] distinct keys of the batch (sorted)
    slots: torch.Tensor  # id table of uniq
    table_of: torch.Tensor  # [U] table index of every distinct key
    look: CacheLookup  # every worker's state of uniq: dense [W, U] and/or the cached pairs
    occupied: torch.Tensor  # [W, T] cached rows
    ndirty: torch.Tensor  # [W, T] dirty cached rows
    cap: torch.Tensor  # [W, T] capacity

    @property
    def cached(self) -> torch.Tensor:  # [W, U] bool
        return self.look.cached

    @property
    def outdated(self) -> torch.Tensor:  # [W, U] bool (only meaningful where cached)
        return self.look.outdated

    @property
    def dirty(self) -> torch.Tensor:  # [W, U] bool
        return self.look.dirty

    @property
    def num_samples(self) -> int:
        return self.offsets.numel() - 1


def read_batch(keys: torch.Tensor, offsets: torch.Tensor, state: CacheState, row_offset: torch.Tensor) -> BatchState:
    """The cache state of the batch's distinct keys (sample-major ``keys``,
    per-sample ``offsets``; ``row_offset`` of the tables)."""
    uniq, _ = ops.sorted_distinct(keys)  # keys are >= 0 (KeySpace.decode checks the ids)
    slots = ops.id_table_build(uniq)
    table_of = torch.searchsorted(row_offset, uniq, right=True) - 1
    look = state.lookup(uniq)
    return BatchState(keys, offsets, uniq, slots, table_of, look,
                      state.occupied, state.ndirty, state.capacity)
