"""Expected embedding transmission cost of dispatching a sample to a worker.

Given the dispatcher's mirror of every worker's cache (a
:class:`~torchrec_esd.cache.state.CacheState`: occupancy and capacity per
worker and table, and the cached / outdated / dirty state of any row key) and
each worker's link, the cost
matrix ``c[s, w]`` (float64 seconds, ``[B, W]``) is the link time that putting
sample ``s`` on worker ``w`` is expected to cause.  Per distinct row id ``x`` of
the sample (``rt_w = row_bytes / bytes_per_second_w``, ``row_bytes =
embedding_dim * value_bytes + optimizer_state_bytes_per_row``):

* cached on ``w`` and fresh: ``0``;
* cached on ``w`` but outdated: ``rt_w`` (**update-pull**);
* not cached on ``w``: ``rt_w`` (**miss-pull**) plus the expected
  **miss-push** of the row it evicts: if ``w``'s cache of the table is full
  (``len(ids) >= capacity``), the fraction of dirty rows in it times ``rt_w``;
* in every case, if another worker ``w'`` holds ``x`` dirty (the only
  up-to-date copy), ``+ rt_{w'}``: ``w'`` must **update-push** it first.

The matrix is additive over the DISTINCT keys of each sample (an id used twice
in one bag counts once); an id shared by two samples placed on the same worker
is counted for both, and latency (a per-message constant) is not in it.
:meth:`CostModel.measure` gives the true, de-duplicated cost of an assignment.

:meth:`CostModel.dedup_cost` gives that true cost as a model a dispatcher can
optimise (:class:`DedupCost`): per distinct row, the cost of the set of
workers that use it (pulls once per worker, one gradient push per user when
the row is shared, the dirty owner's push), with exact single-move changes
(:meth:`DedupCost.move_deltas`) and amortised per-sample costs
(:meth:`DedupCost.amortised_matrix`); the ``esd`` dispatcher decides on it.

For the ``"makespan"`` objective the same matrix is used; the dirty-elsewhere
push really loads ``w'``'s link, not ``w``'s, which the per-worker sums of the
additive model attribute to ``w`` (``measure`` puts it on ``w'``).

Computation.  The C++ operators of :mod:`torchrec_esd.ops` do the per-sample
work: one :func:`~torchrec_esd.ops.id_table_build` over the batch's distinct
global row keys, one ``CacheState.lookup`` of those keys (the cache state of
every batch key), and one :func:`~torchrec_esd.ops.sample_cost_matrix` that
sums, per sample and worker, the weights of the sample's distinct keys.  Every batch key is in the
(shared) table, so the per-worker weight vectors carry the full per-key cost
(fresh / outdated / miss + expected miss-push, + dirty-elsewhere push) and
``miss_weight`` is never used: unlike a per-worker scalar miss weight, this is
exact when tables differ in row size or in the dirty fraction of their cache.

Modules, by reader: :mod:`~torchrec_esd.cost.model` (:class:`CostModel`, the
dispatchers' inputs), :mod:`~torchrec_esd.cost.dedup` (:class:`DedupCost`, the
``dedup_search`` dispatcher and the true-cost benchmark), :mod:`~torchrec_esd.cost.measure`
(``CostModel.measure``'s accounting, the benchmarks), :mod:`~torchrec_esd.cost.batch`
(a batch read against the cache state), :mod:`~torchrec_esd.cost.group_inputs` (the
``grouped`` dispatcher's ``[B, G]`` and per-group inputs, without the ``[B, W]`` matrix).  Batches are decoded into row keys by the
key space (:mod:`torchrec_esd.layout`), shared with the cache directory.
"""

from torchrec_esd.cache.plans import KINDS, TransmissionKind
from torchrec_esd.cache.state import CacheLookup, CacheState
from torchrec_esd.cache.views import TableCacheView, TableViewsState, WorkerCacheView
from torchrec_esd.cost.dedup import DedupCost, segment_sum
from torchrec_esd.cost.model import Caches, CostModel

__all__ = [
    "CacheLookup",
    "CacheState",
    "Caches",
    "CostModel",
    "DedupCost",
    "KINDS",
    "TableCacheView",
    "TableViewsState",
    "TransmissionKind",
    "WorkerCacheView",
    "segment_sum",
]
