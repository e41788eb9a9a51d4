"""Lookahead eviction: keep the rows the next batches use (Belady within a window).

Batches are dispatched ahead (:meth:`EsdInputDist.dispatch_ahead`), so when the
directory plans iteration ``t`` the global batches ``t + 1 .. t + k`` are
already known on every worker.  The future-use information reaches the
directory through one interface:

    ``CacheDirectory.plan(kjt, assignment, upcoming=[kjt_1, ..., kjt_k])``

``upcoming`` are the next global batches (ESD features), nearest first, at most
``EsdConfig.cache_lookahead`` of them.  A policy that reads them
(``EvictionPolicy.reads_upcoming``) gets them as an :class:`UpcomingUse`
through :meth:`EvictionPolicy.look_ahead` before the iteration is planned;
other policies never see them (the directory does not even decode them).

What is known is *which rows* the next batches use, not *which worker* will
use them: batch ``t + 1``'s assignment is decided from the cache state that
this plan produces.  :class:`LookaheadPolicy` therefore orders a worker's
eviction candidates by the distance to the row's next use by the job (rows a
cache-aware dispatcher tends to bring to the workers holding them):

* rows not used in the window first, least recently used first (LRU);
* then rows used in the window, the one used furthest ahead first (Belady),
  ties least recently used first, then in slot order.

Determinism (the directory is replicated): the priority is a function of the
slot metadata and of the upcoming batches' row keys only, and every worker is
fed the same global batches in the same order, so every replica evicts the
same rows.  Without upcoming batches (``forward`` batch by batch, the end of
the stream) the window is empty and the policy is LRU.

Cost: per planned iteration, one decode and ``unique`` of the ``k`` upcoming
batches (``O(k n log n)`` for ``n`` ids per batch); per eviction, one
``searchsorted`` of the candidates (``O(c log(k n))``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from torchrec_esd.cache.policy import EvictionPolicy, register_policy
from torchrec_esd.cache.slots import WorkerSlots
from torchrec_esd.config import EsdConfigError

# priority = (window + 1 - distance) << LAST_USE_BITS | last_use (last_use < 2**32 iterations)
LAST_USE_BITS = 32


class UpcomingUse:
    """Which rows the next batches use: ``keys`` (sorted distinct global row
    keys used in the window) and ``distance`` (int64, the number of batches
    until the first use: 1 for the next batch); ``window`` batches seen."""

    def __init__(self, keys: torch.Tensor, distance: torch.Tensor, window: int) -> None:
        self.keys = keys
        self.distance = distance
        self.window = int(window)

    @classmethod
    def empty(cls) -> "UpcomingUse":
        e = torch.empty(0, dtype=torch.int64)
        return cls(e, e, 0)

    @classmethod
    def from_batches(cls, batch_keys: Sequence[torch.Tensor]) -> "UpcomingUse":
        """From the row keys of each upcoming batch (nearest first, any order,
        repeats allowed)."""
        if not batch_keys:
            return cls.empty()
        keys = torch.cat([k.to(torch.int64).view(-1) for k in batch_keys])
        dist = torch.repeat_interleave(
            torch.arange(1, len(batch_keys) + 1, dtype=torch.int64),
            torch.tensor([k.numel() for k in batch_keys], dtype=torch.int64),
        )
        if keys.numel() == 0:
            return cls(keys, dist, len(batch_keys))
        # first use of each key: sort by (key, distance) and keep the first of each key
        order = torch.argsort(keys * (len(batch_keys) + 1) + dist)
        keys, dist = keys[order], dist[order]
        first = torch.ones_like(keys, dtype=torch.bool)
        first[1:] = keys[1:] != keys[:-1]
        return cls(keys[first], dist[first], len(batch_keys))

    @classmethod
    def of_batches(cls, keyspace, batches: Sequence, window: int) -> "UpcomingUse":
        """From upcoming KJTs (at most ``window``), decoded by ``keyspace``
        (a :class:`~torchrec_esd.layout.KeySpace`; bad ids raise its ``EsdIdError``)."""
        if len(batches) > window:
            raise EsdConfigError(f"{len(batches)} upcoming batches given, EsdConfig.cache_lookahead is {window}")
        return cls.from_batches([keyspace.decode(k).keys for k in batches])

    def next_use(self, keys: torch.Tensor) -> torch.Tensor:
        """Distance to the next use of each key, ``window + 1`` where not used."""
        out = torch.full_like(keys, self.window + 1)
        if self.keys.numel() == 0 or keys.numel() == 0:
            return out
        pos = torch.searchsorted(self.keys, keys).clamp_(max=self.keys.numel() - 1)
        hit = self.keys[pos] == keys
        out[hit] = self.distance[pos[hit]]
        return out


class LookaheadPolicy(EvictionPolicy):
    """Rows used furthest ahead (or not in the window, least recently used
    first) are evicted first; see the module docstring."""

    name = "lookahead"
    kernel_code = None  # the reference path of the directory
    reads_upcoming = True

    def __init__(self) -> None:
        self.upcoming = UpcomingUse.empty()

    def look_ahead(self, upcoming: UpcomingUse) -> None:
        self.upcoming = upcoming

    def priority(self, cache: WorkerSlots, slots: torch.Tensor) -> torch.Tensor:
        u = self.upcoming
        soon = (u.window + 1) - u.next_use(cache.keys[slots])  # 0: not used in the window
        return (soon << LAST_USE_BITS) | cache.last_use[slots]


register_policy(LookaheadPolicy)
