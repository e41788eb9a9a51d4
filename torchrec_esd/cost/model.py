"""The cost model: per-sample cost matrices for the dispatchers, the
de-duplicated model and the measured cost of a batch, from the cache state
(:class:`~torchrec_esd.cache.state.CacheState`) and the workers' links.
The rules are in the package docstring (:mod:`torchrec_esd.cost`)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd import ops
from torchrec_esd.cache.state import CacheState
from torchrec_esd.cache.views import TableViewsState, WorkerCacheView
from torchrec_esd.config import EsdConfig
from torchrec_esd.cost.batch import BatchState, read_batch
from torchrec_esd.cost.dedup import DedupCost
from torchrec_esd.cost.measure import measured_rows, summarize
from torchrec_esd.des.served_misses import KEY_BYTES, des_bag_bytes
from torchrec_esd.layout import KeySpace

# what the cost model reads the caches from: a CacheState, or per-table views
# (per worker, table name -> TableCacheView) which it reads as one
Caches = Union[CacheState, Sequence[WorkerCacheView]]


class CostModel:
    """Cost matrix and measured cost of dispatching a global batch.

    Args:
        config: topology (links of every worker, cache capacities).
        tables: the embedding tables; a KJT feature maps to the table listing
            it in ``feature_names``.  Global row key of id ``i`` of table ``t``
            is ``row_offset[t] + i`` (tables in the given order).
        value_bytes: bytes per embedding value (4 for fp32).
        optimizer_state_bytes_per_row: optimizer state moved with every row.

    Every method takes the caches as a
    :class:`~torchrec_esd.cache.state.CacheState` (e.g.
    ``CacheDirectory.cache_state()``) or as per-table views
    (``CacheDirectory.views()``, or built by hand), read as one.
    """

    def __init__(
        self,
        config: EsdConfig,
        tables: Sequence[EmbeddingBagConfig],
        value_bytes: int = 4,
        optimizer_state_bytes_per_row: int = 0,
        keyspace: Optional[KeySpace] = None,
    ) -> None:
        if value_bytes <= 0:
            raise ValueError(f"value_bytes must be > 0, got {value_bytes}")
        if optimizer_state_bytes_per_row < 0:
            raise ValueError(
                f"optimizer_state_bytes_per_row must be >= 0, got {optimizer_state_bytes_per_row}"
            )
        self.config = config
        self.tables = list(tables)
        if not self.tables:
            raise ValueError("CostModel needs at least one embedding table")
        self.num_workers = config.num_workers
        self.table_names = [t.name for t in self.tables]
        self._last_state: Optional[tuple] = None  # (kjt, caches, BatchState) of the last _state call
        self.table_index = {t.name: i for i, t in enumerate(self.tables)}
        if len(self.table_index) != len(self.tables):
            raise ValueError("CostModel: two tables have the same name")
        # the key space is shared with the cache directory (one decode per batch)
        self.keyspace = keyspace if keyspace is not None else KeySpace(self.tables)
        if self.table_names != self.keyspace.names:
            raise ValueError(f"tables {self.table_names} are not the key space's {self.keyspace.names}")
        self.table_rows = self.keyspace.rows
        self.row_offset = self.keyspace.offsets
        self.feature_table: Dict[str, int] = self.keyspace.feature_table
        # values a row moves: its table's dim, or with a runtime's key space the
        # wire width rows really travel at (tables of different dims are zero-padded)
        moved_dims = [t.embedding_dim for t in self.tables] if keyspace is None else [keyspace.wire_dim] * len(self.tables)
        self.row_bytes = torch.tensor(
            [d * value_bytes + optimizer_state_bytes_per_row for d in moved_dims], dtype=torch.float64,
        )
        self.value_bytes = value_bytes
        self.table_dims = torch.tensor(moved_dims, dtype=torch.int64)
        self.set_links([w.bytes_per_second for w in config.workers])
        self.capacity = torch.tensor(
            [[w.cache_rows_for(n) for n in self.table_names] for w in config.workers],
            dtype=torch.int64,
        )

    def set_links(self, bytes_per_second: Sequence[float]) -> None:
        """Price rows at these per-worker bandwidths (the config's, or the
        runtime's online estimates, :mod:`torchrec_esd.distributed.link_estimates`)."""
        bps = torch.tensor([float(b) for b in bytes_per_second], dtype=torch.float64)
        if bps.numel() != self.num_workers or not bool((bps > 0).all()) or not bool(torch.isfinite(bps).all()):
            raise ValueError(f"set_links needs {self.num_workers} finite bandwidths > 0, got {bps.tolist()}")
        self.bytes_per_second = bps
        # rt[w, t]: seconds to move one row of table t over worker w's link
        self.row_time = self.row_bytes.view(1, -1) / bps.view(-1, 1)
        self._last_state = None

    # ------------------------------------------------------------------ keys
    def row_keys(self, kjt: KeyedJaggedTensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sample-major global row keys of a batch and their per-sample offsets
        (:meth:`~torchrec_esd.layout.BatchKeys.sample_major` of the key
        space's one decode of ``kjt``)."""
        return self.keyspace.decode(kjt).sample_major()

    # --------------------------------------------------------------- state
    def cache_state(self, caches: Caches) -> CacheState:
        """``caches`` as the :class:`CacheState` this model reads (per-table
        views are read through :class:`~torchrec_esd.cache.views.TableViewsState`)."""
        if not isinstance(caches, CacheState):
            return TableViewsState(caches, self.table_names, self.table_rows, self.capacity)
        if list(caches.tables) != self.table_names or tuple(caches.capacity.shape) != tuple(self.capacity.shape):
            raise ValueError(
                f"the caches of tables {list(caches.tables)} on {caches.capacity.shape[0]} workers do not "
                f"match the cost model's tables {self.table_names} and {self.num_workers} workers"
            )
        return caches

    def _state(self, kjt: KeyedJaggedTensor, caches: Caches) -> BatchState:
        # a dispatcher that reads several inputs (matrix, hits, de-duplicated model)
        # of one batch asks with the same two objects: build the state once
        memo = self._last_state
        if memo is not None and memo[0] is kjt and memo[1] is caches:
            return memo[2]
        state = self.cache_state(caches)
        keys, offsets = self.row_keys(kjt)
        st = read_batch(keys, offsets, state, self.row_offset)
        self._last_state = (kjt, caches, st)
        return st

    def _evict_fraction(self, st: BatchState) -> torch.Tensor:
        """[W, T]: dirty fraction of the cache where it is full, else 0."""
        full = (st.occupied > 0) & (st.occupied >= st.cap)
        frac = st.ndirty.double() / st.occupied.clamp(min=1).double()
        return torch.where(full, frac, torch.zeros_like(frac))

    def _key_costs(self, st: BatchState) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(own, push_elsewhere)``, each ``[W, U]``: the cost of every distinct
        batch key on every worker's own link (0 fresh, update-pull, or miss-pull
        + expected miss-push), and the dirty owner's push it causes elsewhere."""
        rt = self.row_time[:, st.table_of]  # [W, U]
        own = self._own_key_costs(st, rt)
        push_all = (st.dirty.double() * rt).sum(0, keepdim=True)
        push_elsewhere = push_all - st.dirty.double() * rt
        return own, push_elsewhere

    def _own_key_costs(self, st: BatchState, rt: torch.Tensor) -> torch.Tensor:
        """``[W, U]`` the first term of :meth:`_key_costs` alone (what
        :meth:`dedup_cost` reads); ``rt`` is ``row_time[:, st.table_of]``."""
        evict = (self._evict_fraction(st) * self.row_time)[:, st.table_of]
        return torch.where(st.cached, st.outdated.double() * rt, rt + evict)

    def key_weights(self, st: BatchState) -> torch.Tensor:
        """[W, U] expected cost of every distinct batch key on every worker."""
        own, push_elsewhere = self._key_costs(st)
        return own + push_elsewhere

    # --------------------------------------------------------------- matrix
    def matrix(self, kjt: KeyedJaggedTensor, views: Caches) -> torch.Tensor:
        """Expected transmission cost ``c[s, w]`` (float64 seconds, ``[B, W]``).

        With ``config.des_misses`` every bag (sample, feature) is priced as the
        cheaper of pulling its rows to pull (each with its key up; see
        :mod:`torchrec_esd.des.served_misses` for why their later write-back is not
        charged) and having the PS serve them as one partial sum, plus in both
        cases the dirty-elsewhere pushes."""
        st = self._state(kjt, views)
        if self.config.des_misses:
            return self._des_matrix(kjt, st)
        weights = self.key_weights(st)
        return self._sum(st, [weights[w].contiguous() for w in range(self.num_workers)])

    def _des_matrix(self, kjt: KeyedJaggedTensor, st: BatchState) -> torch.Tensor:
        W, b, nf = self.num_workers, st.num_samples, len(kjt.keys())
        if st.keys.numel() == 0:
            return torch.zeros(b, W, dtype=torch.float64)
        bag_len = kjt.lengths().view(nf, b).to(torch.int64).t().reshape(-1)  # sample-major bags (s, f)
        bag_offsets = torch.zeros(b * nf + 1, dtype=torch.int64)
        bag_offsets[1:] = torch.cumsum(bag_len, 0)
        bps = self.bytes_per_second.view(-1, 1)  # [W, 1]
        own, push_elsewhere = self._key_costs(st)
        cand = (~st.cached | st.outdated).double()
        pull = own + cand * KEY_BYTES / bps
        miss = torch.zeros(W, dtype=torch.float64)

        def per_bag(weights: torch.Tensor) -> torch.Tensor:
            return ops.sample_cost_matrix(
                st.keys, bag_offsets, [st.slots] * W, [weights[w].contiguous() for w in range(W)], miss
            )

        n_cand = per_bag(cand)  # [B*F, W] rows of the bag this worker would pull
        feat_dim = self.table_dims[[self.feature_table[f] for f in kjt.keys()]]
        bag_dim = feat_dim.repeat(b).view(-1, 1)
        weighted = kjt.weights_or_none() is not None
        des = des_bag_bytes(n_cand, bag_dim, self.value_bytes, weighted) / bps.view(1, -1)
        c_bag = torch.minimum(per_bag(pull), des) + per_bag(push_elsewhere)
        return c_bag.view(b, nf, W).sum(1)

    def hit_matrix(self, kjt: KeyedJaggedTensor, views: Caches) -> torch.Tensor:
        """``h[s, w]``: distinct ids of sample ``s`` cached on worker ``w``
        (fresh or outdated), float64 ``[B, W]`` (what LAIA-style dispatch uses)."""
        st = self._state(kjt, views)
        return self._sum(st, [st.cached[w].double().contiguous() for w in range(self.num_workers)])

    def _sum(self, st: BatchState, weights: List[torch.Tensor]) -> torch.Tensor:
        if st.keys.numel() == 0:
            return torch.zeros(st.num_samples, self.num_workers, dtype=torch.float64)
        miss = torch.zeros(self.num_workers, dtype=torch.float64)
        return ops.sample_cost_matrix(
            st.keys, st.offsets, [st.slots] * self.num_workers, weights, miss
        )

    def expected_matrix(
        self, kjt: KeyedJaggedTensor, views: Caches, shares: Optional[Sequence[int]] = None
    ) -> torch.Tensor:
        """``[B, W]`` expected cost of a sample on a worker with every row's
        cost shared by the samples expected to use it there
        (:meth:`DedupCost.amortised_matrix`, for ``shares``, by default the
        config's shares of this batch).  Unlike :meth:`matrix`, a hot row
        that the worker pulls once for many samples is not charged in full
        to each of them, so the rows that decide are the rare ones.

        With DES-served misses the per-bag DES price exists only in
        :meth:`matrix`, which is returned unchanged."""
        if self.config.des_misses:
            return self.matrix(kjt, views)
        if shares is None:
            shares = self.config.batch_shares(kjt.stride())
        return torch.from_numpy(self.dedup_cost(kjt, views).amortised_matrix(shares))

    # --------------------------------------------------------------- de-duplicated model
    def dedup_cost(self, kjt: KeyedJaggedTensor, views: Caches) -> DedupCost:
        """The batch's de-duplicated cost model (:class:`DedupCost`): the cost
        of an assignment as a function of which workers use each distinct row,
        so that a dispatcher can evaluate (and locally improve) the TRUE cost
        that :meth:`measure` reports instead of the additive matrix.  Built by
        the extension where it has the operator (:meth:`dedup_inputs`), else
        in PyTorch / numpy (the same arrays)."""
        if ops.HAS_DEDUP_INPUTS:
            return self.dedup_inputs(kjt, views, native=True)[0]
        return self._dedup_cost_torch(kjt, views)

    def _dedup_cost_torch(self, kjt: KeyedJaggedTensor, views: Caches) -> DedupCost:
        """:meth:`dedup_cost` in PyTorch / numpy (the reference of the operator)."""
        st = self._state(kjt, views)
        W = self.num_workers
        b = st.num_samples
        u = st.uniq.numel()
        if st.keys.numel():
            sample = torch.repeat_interleave(torch.arange(b), st.offsets[1:] - st.offsets[:-1])
            kidx = ops.id_table_lookup(st.slots, st.keys)
            # distinct (sample, key) pairs, sorted by (sample, key)
            occ_k, occ_s, _ = ops.unique_keys_per_group(kidx, sample, b)
            occ_s, occ_k = occ_s.numpy(), occ_k.numpy()
        else:
            occ_s = occ_k = np.zeros(0, dtype=np.int64)
        rt_wu = self.row_time[:, st.table_of]  # [W, U]
        rt = rt_wu.t().contiguous().numpy()  # [U, W]
        dirty = st.dirty.t().numpy()
        pull = self._own_key_costs(st, rt_wu).t().contiguous().numpy()  # own-link cost of using each row
        has_owner = dirty.any(1)
        owner = np.where(has_owner, dirty.argmax(1), -1)
        owner_push = np.where(has_owner, rt[np.arange(u), np.maximum(owner, 0)], 0.0)
        return DedupCost(b, W, occ_s, occ_k, pull, rt.copy(), owner, owner_push)

    def dedup_inputs(self, kjt: KeyedJaggedTensor, views: Caches,
                     native: Optional[bool] = None) -> Tuple[DedupCost, np.ndarray]:
        """:meth:`dedup_cost` and its :meth:`DedupCost.additive_matrix`, from
        one C++ call (:func:`torchrec_esd.ops.dedup_inputs`) where the
        extension has it (``native=None``), bit for bit what the PyTorch /
        numpy path (``native=False``) gives.  What the ``esd`` dispatcher
        reads: built in a background thread while the training thread runs
        Python, the dozen steps of that path each wait for the GIL again."""
        if native is None:
            native = ops.HAS_DEDUP_INPUTS
        if not native:
            dedup = self._dedup_cost_torch(kjt, views)
            return dedup, dedup.additive_matrix()
        st = self._state(kjt, views)
        h = st.look.hits  # what a live directory's lookup holds (a dense lookup derives it)
        occ_s, occ_k, pull, push, owner, owner_push, additive = ops.dedup_inputs(
            st.keys, st.offsets, st.slots, st.table_of, h.worker, h.key, h.outdated, h.dirty,
            st.occupied, st.ndirty, st.cap, self.row_time)
        dedup = DedupCost(st.num_samples, self.num_workers, occ_s.numpy(), occ_k.numpy(), pull.numpy(),
                          push.numpy(), owner.numpy(), owner_push.numpy())
        return dedup, additive.numpy()

    # --------------------------------------------------------------- measure
    def measure(
        self,
        kjt: KeyedJaggedTensor,
        assignment: torch.Tensor,
        views: Caches,
    ) -> Dict:
        """True (de-duplicated) transmission of an assignment.

        Per worker ``w`` and per table, over the DISTINCT ids its samples use:

        * ``miss_pull``: ids not cached on ``w``;
        * ``update_pull``: ids cached on ``w`` but outdated;
        * ``miss_push``: dirty rows evicted to make room for the misses.  The
          number of evictions is exact (``misses - free slots``, at most the
          cached rows ``w`` does not use this iteration); which rows are evicted
          depends on the LRU/LFU order, which a view does not carry, so the
          dirty share among them is the expected one (dirty unused rows /
          unused rows; exact when every unused row is evicted);
        * ``update_push`` (on the pushing worker's link): a dirty row of ``w``
          that another worker uses this iteration (pushed once), plus one
          gradient push per using worker for ids used by more than one worker
          (synchronous, staleness-0 semantics), plus the gradients of ids that
          find no cache slot (misses beyond the capacity stay transient: the
          smallest ids get the slots, as in :class:`~torchrec_esd.cache.CacheDirectory`).

        Link seconds of a kind = ``bytes / bandwidth + latency`` if at least one
        row moves (one message per worker and kind).  Returns ``{"per_worker":
        [{kind: {"rows", "bytes", "seconds"}, "rows", "bytes", "seconds"}],
        "per_kind": {kind: {"rows", "bytes", "seconds"}}, "link_s": [W],
        "rows", "bytes", "total_s", "makespan_s"}``.
        """
        st = self._state(kjt, views)
        W = self.num_workers
        b = st.num_samples
        assignment = torch.as_tensor(assignment, dtype=torch.int64).view(-1)
        if assignment.numel() != b:
            raise ValueError(f"assignment has {assignment.numel()} entries for {b} samples")
        if b and (int(assignment.min()) < 0 or int(assignment.max()) >= W):
            raise ValueError(f"assignment names a worker outside [0, {W})")
        rows = measured_rows(st, assignment, self.row_offset, W)
        return summarize(rows, self.row_bytes, self.config.workers)
