"""The cache state as the cost model reads it: one protocol for every
representation (the live :class:`~torchrec_esd.cache.CacheDirectory`, or
per-table snapshots built by hand, :mod:`torchrec_esd.cache.views`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch


@dataclass(frozen=True)
class CacheLookup:
    """The state of some row keys in every worker's cache, each bool ``[W, U]``."""

    cached: torch.Tensor  # the worker holds a copy
    outdated: torch.Tensor  # the copy needs an update-pull before use (only where cached)
    dirty: torch.Tensor  # the worker holds the only up-to-date copy (the PS is stale)


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
