"""The ESD tables in TorchRec's ``state_dict``: sharded, saved and loaded by DCP.

The model's embedding rows live on the parameter servers (plus the dirty rows
of worker caches); TorchRec's checkpointing reads them through two doors, as
it does for its own sharded tables:

* ``DistributedModelParallel.state_dict()`` holds every ESD table at the key
  vanilla TorchRec uses (``<path>.embedding_bags.<table>.weight``) as a
  row-wise :class:`ShardedTensor` over the workers: worker ``w`` holds rows
  ``[w * ceil(n / W), (w + 1) * ceil(n / W))`` (:func:`row_shard`), so no rank
  materialises a whole table and DCP reshards to any other layout
  (TorchRec's table-wise or row-wise sharding, another worker count);
* the module's fused optimizer (a TorchRec :class:`KeyedOptimizer`, collected
  by ``DistributedModelParallel.fused_optimizer`` like TorchRec's own) holds
  the row-wise Adagrad state as ``{"<table>.momentum1": ShardedTensor[rows]}``
  per table weight (SGD: ``{}``), vanilla TorchRec's names and shapes.

Both are collective over the workers (every worker calls ``state_dict()`` /
``load_state_dict()`` at the same step, as ``dcp.save`` / ``dcp.load``
require): a snapshot first pushes the caches' dirty rows (``flush``), then
each worker pulls its shard from the PS ranks in chunks of at most
:data:`CHUNK_ROWS` rows.  Loading pushes each worker's shard back (value or
optimizer state, the other half is kept) after the worker caches are
emptied.

Cache policy on load: **rebuilt cold**.  Loading empties every worker cache
and the replicated directory (the same on every worker, so the directory stays
exact); the next batches pull what they use.  At staleness 0 the cached copies
never change the model (a cached row is the PS row plus the same updates), so
a resumed run trains the same model as an uninterrupted one; only which
worker trains which sample may differ (the dispatch sees cold caches), which
changes float summation order only.

Snapshots need a quiet point: no batch dispatched and not yet trained (a
dispatch-ahead iterator's queue must be drained) -- otherwise the
directory already counts updates the rows do not have yet; that is an error.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties
from torchrec.optim.keyed import KeyedOptimizer

from torchrec_esd.config import EsdConfigError

# rows per PS exchange of a snapshot or a load (bounds the transient memory:
# CHUNK_ROWS x (wire_dim + state_dim) x 4 bytes per worker)
CHUNK_ROWS = 1 << 18


class EsdCheckpointError(EsdConfigError):
    """A checkpoint that does not fit this model (raised before any state changes)."""


def row_shard(num_rows: int, num_workers: int, worker: int) -> Tuple[int, int]:
    """(first row, row count) of ``worker``'s row-wise shard of a table."""
    block = -(-int(num_rows) // int(num_workers))
    lo = min(worker * block, int(num_rows))
    return lo, min(lo + block, int(num_rows)) - lo


def sharded_rows(local: torch.Tensor, num_rows: int, num_workers: int, worker: int, group) -> ShardedTensor:
    """A row-wise :class:`ShardedTensor` of ``num_rows`` rows whose shard on
    ``worker`` is ``local`` (rows :func:`row_shard`; 1-D or 2-D)."""
    tail = list(local.shape[1:])
    metas = []
    for w in range(num_workers):
        lo, n = row_shard(num_rows, num_workers, w)
        if n:
            metas.append(ShardMetadata([lo] + [0] * len(tail), [n] + tail, f"rank:{w}/{local.device}"))
    size = torch.Size([int(num_rows)] + tail)
    props = TensorProperties(dtype=local.dtype, layout=local.layout, requires_grad=False,
                             memory_format=torch.contiguous_format, pin_memory=False)
    mine = [Shard(local, m) for m in metas if m.placement.rank() == worker]
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        mine, ShardedTensorMetadata(metas, size, props), process_group=group
    )


def local_rows(value, name: str, what: str, shape: Tuple[int, ...], lo: int, n: int) -> torch.Tensor:
    """This worker's rows ``[lo, lo + n)`` of a loaded ``value``: the local
    shard of a ShardedTensor laid out as :func:`sharded_rows` (what DCP loads
    into this model's own ``state_dict()``), or a slice of a whole tensor."""
    if isinstance(value, ShardedTensor):
        if tuple(value.size()) != shape:
            raise EsdCheckpointError(f"{what} of table {name!r}: the checkpoint has shape "
                                     f"{tuple(value.size())}, this model {shape}")
        shards = value.local_shards()
        if n == 0 and not shards:
            return torch.empty((0,) + shape[1:])
        if len(shards) != 1 or list(shards[0].metadata.shard_offsets)[0] != lo or shards[0].tensor.shape[0] != n:
            raise EsdCheckpointError(
                f"{what} of table {name!r}: a ShardedTensor of another layout; load the checkpoint "
                "into this model's own state_dict() (torch.distributed.checkpoint.load reshards), "
                "then call load_state_dict with it"
            )
        return shards[0].tensor.detach()
    if not isinstance(value, torch.Tensor):
        raise EsdCheckpointError(f"{what} of table {name!r}: expected a tensor, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise EsdCheckpointError(f"{what} of table {name!r}: the checkpoint has shape "
                                 f"{tuple(value.shape)}, this model {shape}")
    return value.detach()[lo : lo + n]


class TableCheckpoint:
    """Snapshots and loads of the ESD tables of one worker's sharded module
    (``module``: :class:`~torchrec_esd.distributed.sharded_ebc.ShardedEsdEmbeddingBagCollection`).

    Per call: one flush, then ``ceil(max shard rows / CHUNK_ROWS)`` PS
    exchanges (pull; a load also pushes); memory ``O(shard rows)`` per worker.
    """

    def __init__(self, module) -> None:
        self._module = module
        rt = module._runtime
        self._rt = rt
        ks = rt.keyspace
        self.names: List[str] = list(ks.names)
        self.rows = [int(r) for r in ks.rows.tolist()]
        self.dims = [f.dim for f in ks.formats]
        self.state_dim = rt.optimizer.state_dim
        self.W = rt.config.num_workers
        self.me = rt.worker_index
        self.shards = [row_shard(n, self.W, self.me) for n in self.rows]
        # every worker's key count, so that all agree on the number of exchanges
        counts = [sum(row_shard(n, self.W, w)[1] for n in self.rows) for w in range(self.W)]
        self.exchanges = -(-max(counts) // CHUNK_ROWS) if counts else 0
        self._shard_keys: Optional[torch.Tensor] = None  # built at the first snapshot or load (O(shard rows))
        self._staged: Optional[Tuple[List[torch.Tensor], List[torch.Tensor]]] = None
        self._pending_state: Dict[str, torch.Tensor] = {}

    def _require_materialisable(self) -> None:
        """Refuse (clearly, before allocating anything) to snapshot or load lazy tables."""
        if self._rt.lazy_tables:
            total = sum(self.rows)
            raise EsdCheckpointError(
                f"the ESD tables {self.names} are lazy (JobConfig.lazy_tables: the PS creates rows on "
                f"first touch): a state_dict / checkpoint / load of them would pull or write all {total} "
                "rows through the PS and materialise them; checkpoints of lazy tables are not supported"
            )

    @property
    def _keys(self) -> torch.Tensor:
        """This worker's shard keys, every row of its shards (O(shard rows):
        built on first use, refused for lazy tables)."""
        self._require_materialisable()
        if self._shard_keys is None:
            ks = self._rt.keyspace
            self._shard_keys = torch.cat([ks.keys(t, torch.arange(lo, lo + n))
                                          for t, (lo, n) in enumerate(self.shards)]) \
                if self.names else torch.empty(0, dtype=torch.int64)
        return self._shard_keys

    # ------------------------------------------------------------ exchanges
    def _quiesce(self) -> None:
        """Push every dirty cached row (the PS then holds the model's rows)."""
        self._rt.flush()

    def _pulled_chunks(self):
        """``(first, last, rows)`` per exchange: this worker's shard keys
        ``[first, last)`` with their ``[n, wire_dim + state_dim]`` rows."""
        client = self._rt.client
        empty = torch.empty(0, dtype=torch.int64)
        no_values = torch.empty(0, self._rt.keyspace.wire_dim + self.state_dim)
        for c in range(self.exchanges):
            lo, hi = c * CHUNK_ROWS, min((c + 1) * CHUNK_ROWS, self._keys.numel())
            got, _, _ = client.push_pull(empty, no_values, self._keys[lo:hi])
            yield lo, hi, got

    def _pull(self) -> torch.Tensor:
        """``[shard keys, wire_dim + state_dim]`` of this worker's shard rows."""
        out = torch.empty(self._keys.numel(), self._rt.keyspace.wire_dim + self.state_dim)
        for lo, hi, got in self._pulled_chunks():
            out[lo:hi] = got
        return out

    def _push(self, values: torch.Tensor) -> None:
        client = self._rt.client
        empty = torch.empty(0, dtype=torch.int64)
        for c in range(self.exchanges):
            sl = slice(c * CHUNK_ROWS, (c + 1) * CHUNK_ROWS)
            client.push_pull(self._keys[sl], values[sl], empty)

    def _snapshot(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """(weights, states) of this worker's shards.  Kept until the next
        forward (:meth:`release`) or load, so that the model's and the
        optimizer's state_dict() of one step share it.  Pulled chunk by chunk
        into the per-table tensors (memory: the shard + a chunk)."""
        if self._staged is None:
            self._require_materialisable()
            self._quiesce()
            d = self._rt.keyspace.wire_dim
            weights = [torch.empty(n, self.dims[t]) for t, (_, n) in enumerate(self.shards)]
            states = [torch.empty(n, self.state_dim) for _, n in self.shards]
            starts = [0]  # table t's rows are shard keys [starts[t], starts[t + 1])
            for _, n in self.shards:
                starts.append(starts[-1] + n)
            for lo, hi, got in self._pulled_chunks():
                for t in range(len(self.shards)):
                    a, b = max(lo, starts[t]), min(hi, starts[t + 1])
                    if a < b:
                        weights[t][a - starts[t] : b - starts[t]] = got[a - lo : b - lo, : self.dims[t]]
                        states[t][a - starts[t] : b - starts[t]] = got[a - lo : b - lo, d:]
            self._staged = (weights, states)
        return self._staged

    # ------------------------------------------------------------ model state
    def weights(self) -> Dict[str, ShardedTensor]:
        """Every ESD table as a row-wise ShardedTensor over the workers."""
        weights, _ = self._snapshot()
        dev, g = self._module.device, self._rt.worker_group
        return {name: sharded_rows(weights[t].to(dev), self.rows[t], self.W, self.me, g)
                for t, name in enumerate(self.names)}

    def momentum(self) -> Dict[str, ShardedTensor]:
        """Every ESD table's row-wise optimizer state (TorchRec's ``momentum1``)."""
        _, states = self._snapshot()
        dev, g = self._module.device, self._rt.worker_group
        return {name: sharded_rows(states[t].reshape(-1).to(dev), self.rows[t], self.W, self.me, g)
                for t, name in enumerate(self.names)}

    def load(self, weights: Optional[Mapping[str, torch.Tensor]] = None,
             states: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        """Write this worker's shard of ``weights`` (``[rows, dim]`` per table)
        and/or ``states`` (``[rows]``) to the PS ranks, keeping the other half;
        the worker caches restart cold.  Every value is checked first."""
        self._require_materialisable()
        mine: List[Tuple[int, Optional[torch.Tensor], Optional[torch.Tensor]]] = []
        for t, name in enumerate(self.names):
            lo, n = self.shards[t]
            w = s = None
            if weights is not None:
                w = local_rows(weights[name], name, "weights", (self.rows[t], self.dims[t]), lo, n)
            if states is not None:
                s = local_rows(states[name], name, "optimizer state", (self.rows[t],), lo, n)
            mine.append((t, w, s))
        self._quiesce()
        self._module._restart_caches_cold()
        rows = self._pull()
        d = self._rt.keyspace.wire_dim
        off = 0
        for t, w, s in mine:
            n = self.shards[t][1]
            if w is not None:
                rows[off : off + n, : self.dims[t]] = w.to(rows.device, rows.dtype)
            if s is not None:
                rows[off : off + n, d:] = s.reshape(n, -1).to(rows.device, rows.dtype)
            off += n
        self._push(rows)
        self._staged = None

    def release(self) -> None:
        """Drop the last snapshot (the module computes a new batch)."""
        self._staged = None

    def stage_state(self, name: str, value: torch.Tensor) -> None:
        """Keep one table's loaded optimizer state until :meth:`apply_staged_states`."""
        self._pending_state[name] = value

    def apply_staged_states(self) -> None:
        if not self._pending_state:
            return
        missing = [n for n in self.names if n not in self._pending_state]
        pending, self._pending_state = self._pending_state, {}
        if missing:
            raise EsdCheckpointError(f"optimizer state of tables {missing} missing from the loaded state")
        self.load(states=pending)


class _TableMomentum:
    """One table's ``momentum1`` in the fused optimizer's state: a snapshot on
    ``state_dict()``, staged on ``load_state_dict()`` (written to the PS ranks
    for all tables at once by ``post_load_state_dict``)."""

    def __init__(self, checkpoint: TableCheckpoint, name: str) -> None:
        self._ckpt, self._name = checkpoint, name

    def state_dict(self) -> ShardedTensor:
        return self._ckpt.momentum()[self._name]

    def load_state_dict(self, value) -> None:
        self._ckpt.stage_state(self._name, value)


class EsdFusedOptimizer(KeyedOptimizer):
    """The ESD module's fused optimizer, as TorchRec's sharded modules expose
    theirs (``DistributedModelParallel.fused_optimizer`` collects it): the
    updates happen in the backward (on the PS ranks and for cached rows), so
    ``step`` and ``zero_grad`` do nothing; ``state_dict()`` /
    ``load_state_dict()`` carry the row-wise state of every ESD table
    (``{"<table>.momentum1": ShardedTensor[rows]}``, SGD ``{}``) and of the
    replicated tables (whole tensors)."""

    def __init__(self, checkpoint: TableCheckpoint, replicas: Mapping[str, torch.Tensor],
                 replica_state: Mapping[str, torch.Tensor], optimizer) -> None:
        self._ckpt = checkpoint
        self._tokens: Dict[str, torch.Tensor] = {}
        params: Dict[str, torch.Tensor] = {}
        state: Dict[torch.Tensor, Dict] = {}
        rowwise = optimizer.state_dim > 0
        for name in list(checkpoint.names) + list(replicas):
            # a stand-in per table weight (the rows live on the PS ranks): keys the state
            tok = torch.empty(0)
            params[f"embedding_bags.{name}.weight"] = tok
            if not rowwise:
                state[tok] = {}
            elif name in replicas:
                state[tok] = {f"{name}.momentum1": replica_state[name][:, 0]}
            else:
                state[tok] = {f"{name}.momentum1": _TableMomentum(checkpoint, name)}
        group = {"params": list(params.values()), "lr": optimizer.lr}
        if rowwise:
            group["eps"] = optimizer.eps
        super().__init__(params, state, [group])

    def step(self, closure=None) -> None:  # fused into the backward
        return None

    def zero_grad(self, set_to_none: bool = False) -> None:
        return None

    def post_load_state_dict(self) -> None:
        self._ckpt.apply_staged_states()
