"""A live :class:`~torchrec_esd.cache.directory.CacheDirectory` read as a
:class:`~torchrec_esd.cache.state.CacheState` (what the cost model reads)."""

from __future__ import annotations

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

    def lookup(self, keys: torch.Tensor) -> CacheLookup:
        d = self._directory
        if d.iteration != self._iteration:
            raise EsdConfigError("cache state used after the directory planned another iteration")
        # the holder index (cache/holders.py): O(u + hits), the slot state read at the hits only
        pos, worker, outdated, dirty = d.holder_index().read(keys)
        return CacheLookup.from_hits(CacheHits(worker, pos, outdated, dirty), d.num_workers, keys.numel())
