"""A live :class:`~torchrec_esd.cache.directory.CacheDirectory` read as a
:class:`~torchrec_esd.cache.state.CacheState` (what the cost model reads)."""

from __future__ import annotations

from typing import Tuple

import torch

from torchrec_esd.cache.state import CacheHits, CacheLookup
from torchrec_esd.config import EsdConfigError


class DirectoryCacheState:
    """A :class:`CacheDirectory` read as a
    :class:`~torchrec_esd.cache.state.CacheState` at its current iteration:
    occupancy is read from the holder index's per-step counts (``O(W T)``), :meth:`lookup` reads the directory's
    holder index (``O(U + hits)``, :mod:`~torchrec_esd.cache.holders`) and refuses
    once the directory has planned another iteration."""

    def __init__(self, directory: "CacheDirectory") -> None:  # noqa: F821
        d = directory
        self.tables = [t.name for t in d.tables]
        # counted by the holder index at every cache step (O(W T) here)
        self.occupied, self.ndirty = d.holder_index().occupancy()
        self.capacity = torch.stack([st.capacity for st in d._w.values()])
        self._directory = d
        self._iteration = d.iteration

    def __len__(self) -> int:
        return self.capacity.shape[0]

    def _index(self):
        """The directory's holder index, refused once the directory planned another iteration."""
        d = self._directory
        if d.iteration != self._iteration:
            raise EsdConfigError("cache state used after the directory planned another iteration")
        return d.holder_index()

    def lookup(self, keys: torch.Tensor) -> CacheLookup:
        # the holder index (cache/holders.py): O(u + hits), the slot state read at the hits only
        pos, worker, outdated, dirty = self._index().read(keys)
        return CacheLookup.from_hits(CacheHits(worker, pos, outdated, dirty), len(self), keys.numel())

    def group_bits(self, keys: torch.Tensor, group_of: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(held, fresh)`` int64 group bits of ``keys`` for the partition ``group_of``
        (:meth:`~torchrec_esd.cache.holders.HolderIndex.group_bits`): ``O(len(keys))``
        from bits the directory keeps exact (built on the first read of a partition)."""
        return self._index().group_bits(group_of, keys)

    def group_bits_table(self, group_of: torch.Tensor) -> torch.Tensor:
        """The id table behind :meth:`group_bits`
        (:meth:`~torchrec_esd.cache.holders.HolderIndex.group_bits_table`)."""
        return self._index().group_bits_table(group_of)

    def group_view(self, group_of: torch.Tensor, group: int) -> "GroupCacheState":
        """The caches of group ``group``'s workers alone (:class:`GroupCacheState`), for the
        partition ``group_of`` (the holder index keeps one list per key and group)."""
        self._index().partition(group_of)
        return GroupCacheState(self, group_of, group)


class GroupCacheState:
    """A :class:`~torchrec_esd.cache.state.CacheState` whose :meth:`lookup` lists only the
    copies on one group's workers (``O(U + H_g)``: the holder index's list of the key and
    group, :meth:`~torchrec_esd.cache.holders.HolderIndex.read_group`), with every key's
    dirty owner over all workers (:meth:`dirty_owner`, kept with the group bits).  What one
    group of the grouped dispatcher reads: its slice of the cost matrix needs its own
    workers' copies and, of the others, only who would push a dirty row."""

    def __init__(self, full: DirectoryCacheState, group_of: torch.Tensor, group: int) -> None:
        self._full, self._group_of, self._group = full, group_of, int(group)
        self.tables, self.occupied, self.ndirty, self.capacity = full.tables, full.occupied, full.ndirty, full.capacity

    def __len__(self) -> int:
        return len(self._full)

    def lookup(self, keys: torch.Tensor) -> CacheLookup:
        pos, worker, outdated, dirty = self._full._index().read_group(self._group, keys)
        return CacheLookup.from_hits(CacheHits(worker, pos, outdated, dirty), len(self), keys.numel())

    def dirty_owner(self, keys: torch.Tensor) -> torch.Tensor:
        """Each key's dirty owner over every worker (-1: none)."""
        return self._full._index().dirty_owner(self._group_of, keys)
