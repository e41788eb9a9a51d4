"""Worker embedding caches: the replicated cache directory, its plans, the
eviction policies and the cache state the cost model reads.

* :mod:`~torchrec_esd.cache.directory`: :class:`CacheDirectory` (the plans of
  one iteration from the batch and the assignment);
* :mod:`~torchrec_esd.cache.plans`: :class:`WorkerPlan`, :class:`IterationPlan`,
  :class:`TransmissionKind`;
* :mod:`~torchrec_esd.cache.policy`: :class:`EvictionPolicy` (:class:`LruPolicy`,
  :class:`LfuPolicy`) and the registry ``EsdConfig.cache_policy`` names;
* :mod:`~torchrec_esd.cache.lookahead`: :class:`LookaheadPolicy` (Belady within
  the upcoming batches) and :class:`UpcomingUse`;
* :mod:`~torchrec_esd.cache.prefetch`: :func:`prefetch_keys`, the rows a
  worker may pull iterations ahead (``EsdConfig.prefetch_depth``);
* :mod:`~torchrec_esd.cache.slots`: one worker's slots and key -> slot map
  (dense or hashed, :func:`use_dense_slot_map`);
* :mod:`~torchrec_esd.cache.summary`: :class:`StepSummary`, what a worker
  needs to plan its own cache;
* :mod:`~torchrec_esd.cache.state`: the :class:`CacheState` protocol;
* :mod:`~torchrec_esd.cache.views`: per-table snapshots (:class:`TableCacheView`).
"""

from torchrec_esd.cache.directory import CacheDirectory, DirectoryCacheState
from torchrec_esd.cache.lookahead import LookaheadPolicy, UpcomingUse
from torchrec_esd.cache.plans import DES_ROWS, KINDS, IterationPlan, TransmissionKind, WorkerPlan
from torchrec_esd.cache.policy import (
    EvictionPolicy,
    KernelPolicy,
    LfuPolicy,
    LruPolicy,
    make_policy,
    policy_names,
    register_policy,
    unregister_policy,
)
from torchrec_esd.cache.prefetch import prefetch_keys
from torchrec_esd.cache.slots import WorkerSlots, use_dense_slot_map
from torchrec_esd.cache.summary import StepSummary
from torchrec_esd.cache.state import CacheHits, CacheLookup, CacheState
from torchrec_esd.cache.views import TableCacheView, TableViewsState, WorkerCacheView

__all__ = [
    "CacheDirectory",
    "CacheHits",
    "CacheLookup",
    "CacheState",
    "DES_ROWS",
    "DirectoryCacheState",
    "EvictionPolicy",
    "IterationPlan",
    "KINDS",
    "KernelPolicy",
    "LfuPolicy",
    "LookaheadPolicy",
    "LruPolicy",
    "StepSummary",
    "TableCacheView",
    "TableViewsState",
    "TransmissionKind",
    "UpcomingUse",
    "WorkerCacheView",
    "WorkerPlan",
    "WorkerSlots",
    "make_policy",
    "policy_names",
    "prefetch_keys",
    "register_policy",
    "unregister_policy",
    "use_dense_slot_map",
]
