"""A synthetic workload whose ids are hashed into very large tables (e.g.
2^31 rows), and its *renumbered twin* on small dense tables.

:class:`HashedWorkloadConfig` draws every batch from a
:class:`~torchrec_esd.apps.workload.SyntheticWorkload` (``base``, small
cardinalities, Zipf ids, labels from the raw ids) and maps feature ``f``'s
ids through :func:`torchrec_esd.ops.hash_ids` (salt ``f + 1``) into
``[0, rows[f])``: tables of ``rows[f]`` rows that are never allocated (build
the job with ``JobConfig.lazy_tables``; ESD's PS then creates the rows the
batches touch, the ESD module's collection stays on the meta device).

With ``renumber=(steps, global_batch)`` the same batches use, per feature,
the rank of the hashed id among the distinct hashed ids of the global
batches ``0 .. steps - 1`` instead, on tables of exactly that many rows,
initialised (:meth:`HashedWorkload.table_init`) with the hashed tables'
initial values of those ids: vanilla TorchRec on it trains the very same
model as the hashed job, on tables small enough to materialise (the
reference of ``tests/test_ps_lazy.py``).  Building the twin reads those
batches once: O(steps x batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd import ops
from torchrec_esd.apps.workload import SyntheticWorkload, SyntheticWorkloadConfig, feature_table_configs, slice_batch
from torchrec_esd.config import EsdConfigError
from torchrec_esd.ps.row_storage import HashedUniformInit


@dataclass
class HashedWorkloadConfig:
    """``rows``: table rows per feature of ``base`` (ids hashed into them);
    ``renumber``: ``(steps, global_batch)`` for the renumbered twin."""

    base: SyntheticWorkloadConfig = field(default_factory=SyntheticWorkloadConfig)
    rows: Tuple[int, ...] = ()
    renumber: Optional[Tuple[int, int]] = None

    def __post_init__(self) -> None:
        self.rows = tuple(self.rows)
        if len(self.rows) != self.base.num_sparse or any(not isinstance(n, int) or n <= 0 for n in self.rows):
            raise EsdConfigError(f"HashedWorkloadConfig.rows must be {self.base.num_sparse} positive ints, "
                                 f"got {self.rows}")

    @property
    def num_dense(self) -> int:
        return self.base.num_dense

    @property
    def feature_names(self) -> List[str]:
        return self.base.feature_names

    def make_workload(self) -> "HashedWorkload":
        return HashedWorkload(self)


class RenumberedInit:
    """Initial rows of the renumbered tables: row ``i`` of table ``t`` is the
    hashed table's initial row of ``ids[t][i]`` (``init``, a
    :class:`HashedUniformInit` of the hashed tables)."""

    def __init__(self, init: HashedUniformInit, ids: Dict[str, torch.Tensor]) -> None:
        self.init, self.ids = init, ids
        self.names = init.names

    def rows_of(self, table: int, ids: torch.Tensor) -> torch.Tensor:
        """``[n, dim]`` initial values of rows ``ids`` of renumbered table ``table``."""
        return self.init.rows_of(table, self.ids[self.names[table]][ids])


class HashedWorkload:
    """The batches of :class:`HashedWorkloadConfig` (module docstring)."""

    def __init__(self, config: HashedWorkloadConfig) -> None:
        self.config = config
        self.base = SyntheticWorkload(config.base)
        self.ids: Optional[Dict[str, torch.Tensor]] = None  # the twin's hashed id of each row
        if config.renumber is not None:
            steps, b = config.renumber
            seen: List[List[torch.Tensor]] = [[] for _ in self.config.rows]
            for s in range(steps):
                kjt = self._hashed(self.base.global_batch(s, b)).sparse_features
                for f, name in enumerate(kjt.keys()):
                    seen[f].append(kjt[name].values())
            names = [t.name for t in self._hashed_tables(8)]
            self.ids = {n: torch.unique(torch.cat(v)) for n, v in zip(names, seen)}

    def _hashed_tables(self, embedding_dim: int, pooling: PoolingType = PoolingType.SUM) -> List[EmbeddingBagConfig]:
        return feature_table_configs(self.config.feature_names, self.config.rows, embedding_dim, pooling)

    def table_configs(self, embedding_dim: int, pooling: PoolingType = PoolingType.SUM) -> List[EmbeddingBagConfig]:
        """One table per feature: ``rows[f]`` rows, or the twin's distinct ids."""
        if self.ids is None:
            return self._hashed_tables(embedding_dim, pooling)
        rows = [int(self.ids[t.name].numel()) for t in self._hashed_tables(embedding_dim, pooling)]
        return feature_table_configs(self.config.feature_names, rows, embedding_dim, pooling)

    def table_init(self, tables: List[EmbeddingBagConfig], seed: int):
        """The per-(table, row) initialiser of a ``lazy_tables`` job on these tables."""
        dim, pooling = tables[0].embedding_dim, tables[0].pooling
        init = HashedUniformInit(self._hashed_tables(dim, pooling), seed=seed)
        return init if self.ids is None else RenumberedInit(init, self.ids)

    def _hashed(self, batch):
        kjt = batch.sparse_features
        vals = []
        for f, name in enumerate(kjt.keys()):
            vals.append(ops.hash_ids(kjt[name].values(), f + 1, self.config.rows[f]))
        if self.ids is not None:
            vals = [torch.searchsorted(self.ids[t.name], v) for t, v in zip(self._hashed_tables(8), vals)]
        out = KeyedJaggedTensor(keys=kjt.keys(), values=torch.cat(vals), lengths=kjt.lengths())
        return type(batch)(dense_features=batch.dense_features, sparse_features=out, labels=batch.labels)

    def global_batch(self, step: int, batch_size: int):
        return self._hashed(self.base.global_batch(step, batch_size))

    def local_batch(self, step: int, batch_size: int, rank: int, world_size: int):
        if batch_size % world_size != 0:
            raise EsdConfigError(f"global batch {batch_size} is not divisible by {world_size} ranks")
        per = batch_size // world_size
        return slice_batch(self.global_batch(step, batch_size), rank * per, (rank + 1) * per)
