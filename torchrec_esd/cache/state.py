"""The cache state as the cost model reads it: one protocol for every
representation (the live :class:`~torchrec_esd.cache.CacheDirectory`, or
per-table snapshots built by hand, :mod:`torchrec_esd.cache.views`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch


@dataclass(frozen=True)
class CacheHits:
    """The cached (worker, key) pairs of a lookup, one entry per pair (no
    order promised): ``worker`` and ``key`` (index into the looked-up keys)
    int64, ``outdated`` and ``dirty`` bool, each ``[H]``."""

    worker: torch.Tensor
    key: torch.Tensor
    outdated: torch.Tensor
    dirty: torch.Tensor


class CacheLookup:
    """The state of some row keys in every worker's cache, each bool ``[W, U]``:
    ``cached`` (the worker holds a copy), ``outdated`` (the copy needs an
    update-pull before use; only where cached), ``dirty`` (the worker holds the
    only up-to-date copy, the PS is stale).

    Built dense (``CacheLookup(cached, outdated, dirty)``) or from the cached
    pairs alone (:meth:`from_hits`, ``O(hits)``); either form is derived from
    the other on first use: the dense one in ``O(W U)``, :attr:`hits` from the
    dense one in an ``O(W U)`` scan.  Readers that need only the hits (the
    grouped dispatcher's inputs) never pay ``O(W U)`` on a lookup built from hits."""

    def __init__(self, cached: torch.Tensor, outdated: torch.Tensor, dirty: torch.Tensor) -> None:
        self._dense: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = (cached, outdated, dirty)
        self._hits: Optional[CacheHits] = None
        self.shape = tuple(cached.shape)

    @classmethod
    def from_hits(cls, hits: CacheHits, num_workers: int, num_keys: int) -> "CacheLookup":
        out = cls.__new__(cls)
        out._dense, out._hits, out.shape = None, hits, (int(num_workers), int(num_keys))
        return out

    def _densify(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._dense is None:
            h = self._hits
            cached, outdated, dirty = (torch.zeros(self.shape, dtype=torch.bool) for _ in range(3))
            cached[h.worker, h.key] = True
            outdated[h.worker, h.key] = h.outdated
            dirty[h.worker, h.key] = h.dirty
            self._dense = (cached, outdated, dirty)
        return self._dense

    @property
    def cached(self) -> torch.Tensor:
        return self._densify()[0]

    @property
    def outdated(self) -> torch.Tensor:
        return self._densify()[1]

    @property
    def dirty(self) -> torch.Tensor:
        return self._densify()[2]

    @property
    def hits(self) -> CacheHits:
        """The cached pairs (:class:`CacheHits`)."""
        if self._hits is None:
            cached, outdated, dirty = self._dense
            w, k = cached.nonzero(as_tuple=True)
            self._hits = CacheHits(w, k, outdated[w, k], dirty[w, k])
        return self._hits


@runtime_checkable
class CacheState(Protocol):
    """Every worker's cache, as the cost model reads it.

    Occupancy and capacity are per ``(worker, table)``, int64 ``[W, T]``,
    tables in row-key order (:attr:`tables`): ``occupied`` rows cached,
    ``ndirty`` of them dirty, ``capacity`` slots.  :meth:`lookup` reads the
    state of ascending distinct global row keys (``row_offset[table] + id``).
    A state may be a view of a live directory: read it before the directory
    plans the next iteration."""

    @property
    def tables(self) -> Sequence[str]: ...

    @property
    def occupied(self) -> torch.Tensor: ...

    @property
    def ndirty(self) -> torch.Tensor: ...

    @property
    def capacity(self) -> torch.Tensor: ...

    def lookup(self, keys: torch.Tensor) -> CacheLookup: ...
