"""A live :class:`~torchrec_esd.cache.directory.CacheDirectory` read as a
:class:`~torchrec_esd.cache.state.CacheState` (what the cost model reads)."""

from __future__ import annotations

import torch

from torchrec_esd.cache.state import CacheLookup
from torchrec_esd.config import EsdConfigError


class DirectoryCacheState:
    """A :class:`CacheDirectory` read as a
    :class:`~torchrec_esd.cache.state.CacheState` at its current iteration:
    occupancy is counted now, :meth:`lookup` reads the slot maps and refuses
    once the directory has planned another iteration."""

    def __init__(self, directory: "CacheDirectory") -> None:  # noqa: F821
        d = directory
        W, T = d.num_workers, d.num_tables
        self.tables = [t.name for t in d.tables]
        self.occupied = torch.zeros(W, T, dtype=torch.int64)
        self.ndirty = torch.zeros(W, T, dtype=torch.int64)
        for w, st in d._w.items():
            self.occupied[w] = st.per_table(st.keys >= 0, T)
            self.ndirty[w] = st.per_table(st.dirty, T)
        self.capacity = torch.stack([st.capacity for st in d._w.values()])
        self._directory = d
        self._iteration = d.iteration

    def __len__(self) -> int:
        return self.capacity.shape[0]

    def lookup(self, keys: torch.Tensor) -> CacheLookup:
        d = self._directory
        if d.iteration != self._iteration:
            raise EsdConfigError("cache state used after the directory planned another iteration")
        W, u = d.num_workers, keys.numel()
        # one C++ probe per (worker, key); the slot metadata is read at the hits
        # only (a batch hits few of a worker's slots): O(W u) probes, O(hits) gathers
        cached = torch.zeros(W, u, dtype=torch.bool)
        dirty = torch.zeros(W, u, dtype=torch.bool)
        outdated = torch.zeros(W, u, dtype=torch.bool)
        for w, st in d._w.items():
            s = st.find(keys)
            c = s >= 0
            cached[w] = c
            idx = c.nonzero().view(-1)
            hit = s[idx]
            dw = st.dirty[hit]
            dirty[w, idx] = dw
            outdated[w, idx] = (st.lag[hit] > 0) & ~dw
        return CacheLookup(cached, outdated, dirty)
