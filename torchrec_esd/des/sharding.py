"""DES sharding of ``EmbeddingBagCollection``: partial results next to the weights.

DES (arXiv 1909.04823) replaces a weights-rich operator by sub-operators that
run where the weight shards live and exchange *partial results* instead of
weights.  For an ``EmbeddingBagCollection`` the weights-rich operator is the
pooling ``pooled[s, f] = sum_{i in bag(s, f)} w_f[i]`` (times a per-sample
weight, or divided by the bag length for MEAN).  Pooling is a sum, so it
splits over any partition of the rows: every rank that owns rows of table
``t_f`` pools the ids of ``bag(s, f)`` it owns into one partial vector, and
the sample's rank adds the partial vectors up.  A sample therefore moves one
vector per (feature, owning shard) instead of one row per id.

:class:`DesEmbeddingBagCollectionSharder` (here) is a TorchRec
``ModuleSharder``; ``DistributedModelParallel`` builds a
:class:`~torchrec_esd.des.sharded_ebc.ShardedDesEmbeddingBagCollection` (the
per-iteration protocol is described there) from a plan made by
:func:`~torchrec_esd.des.plan.des_module_plan`.  Tables are split over the
ranks

* table-wise (``DES_TABLE_WISE``): each table lives whole on one rank;
* row-wise (``DES_ROW_WISE``): rank ``r`` owns rows ``[r*B, (r+1)*B)`` of every
  table, ``B = ceil(N / W)`` (TorchRec's row-wise blocks).

This is fully synchronous: it trains the same model as vanilla TorchRec DMP
(``tests/test_des.py``).  Only sum-decomposable poolings can be split this
way: MAX pooling and per-id (unpooled, ``EmbeddingCollection``) features are
rejected with :class:`EsdConfigError`.

The plan helpers and the sharded module are re-exported here (``__all__``),
where callers import them from.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Type

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ModuleSharder, ShardingEnv
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_esd.des.plan import (
    DES_COMPUTE_KERNEL,
    DES_ROW_WISE,
    DES_TABLE_WISE,
    des_module_plan,
    validate_des_module,
)
from torchrec_esd.des.sharded_ebc import DesContext, ShardedDesEmbeddingBagCollection
from torchrec_esd.ps import SparseOptimizer

__all__ = [
    "DES_COMPUTE_KERNEL",
    "DES_ROW_WISE",
    "DES_TABLE_WISE",
    "DesContext",
    "DesEmbeddingBagCollectionSharder",
    "ShardedDesEmbeddingBagCollection",
    "des_module_plan",
    "find_des_modules",
    "validate_des_module",
]


class DesEmbeddingBagCollectionSharder(ModuleSharder[EmbeddingBagCollection]):
    """Shards ``EmbeddingBagCollection`` s with DES (partial sums at the weights).

    ``optimizer`` is the fused sparse optimizer applied by the owners during
    the backward.  DES traffic uses its own process group (same ranks as the
    sharding env's), created at sharding time on every rank.
    """

    def __init__(self, optimizer: SparseOptimizer) -> None:
        super().__init__()
        self._optimizer = optimizer

    @property
    def module_type(self) -> Type[EmbeddingBagCollection]:
        return EmbeddingBagCollection

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return [DES_ROW_WISE, DES_TABLE_WISE]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        return [DES_COMPUTE_KERNEL]

    def shard(
        self,
        module: EmbeddingBagCollection,
        params: EmbeddingModuleShardingPlan,
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedDesEmbeddingBagCollection:
        validate_des_module(module)
        ranks = dist.get_process_group_ranks(env.process_group) if env.process_group is not None else None
        group = dist.new_group(ranks=ranks)
        return ShardedDesEmbeddingBagCollection(module, params, env, self._optimizer, group=group)


def find_des_modules(model: nn.Module) -> Sequence[ShardedDesEmbeddingBagCollection]:
    return [m for m in model.modules() if isinstance(m, ShardedDesEmbeddingBagCollection)]
