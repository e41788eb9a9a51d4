"""DES plans: the sharding types of the DES sharder, what DES can shard, and
the per-module plan.

* ``DES_TABLE_WISE``: each table lives whole on one rank;
* ``DES_ROW_WISE``: rank ``r`` owns rows ``[r*B, (r+1)*B)`` of every table,
  ``B = ceil(N / W)`` (TorchRec's row-wise blocks);
* ``DES_COMPUTE_KERNEL``: the one compute kernel (partial sums at the owner).

:func:`validate_des_module` rejects what cannot be split into partial sums
(MAX pooling, per-id ``EmbeddingCollection`` features, mixed embedding dims)
with :class:`EsdConfigError`; :func:`des_module_plan` places every table of a
module row-wise or table-wise.
"""

from __future__ import annotations

from typing import Dict, List

from torch import nn
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ParameterSharding
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from torchrec_esd.config import EsdConfigError

DES_TABLE_WISE = "des_table_wise"
DES_ROW_WISE = "des_row_wise"
DES_COMPUTE_KERNEL = "des_partial_sum"
_SHORT = {"table_wise": DES_TABLE_WISE, "row_wise": DES_ROW_WISE, DES_TABLE_WISE: DES_TABLE_WISE,
          DES_ROW_WISE: DES_ROW_WISE}


def validate_des_module(module: nn.Module) -> None:
    """Raise :class:`EsdConfigError` naming the features DES cannot split."""
    if isinstance(module, EmbeddingCollection):
        feats = [f for c in module.embedding_configs() for f in c.feature_names]
        raise EsdConfigError(
            f"DES needs pooled features: feature(s) {feats} of an EmbeddingCollection are per-id "
            "(unpooled) sequence embeddings, whose result is as big as the rows themselves; shard "
            "them with TorchRec or ESD instead"
        )
    if not isinstance(module, EmbeddingBagCollection):
        raise EsdConfigError(f"DES shards EmbeddingBagCollection, got {type(module).__name__}")
    for t in module.embedding_bag_configs():
        if t.pooling not in (PoolingType.SUM, PoolingType.MEAN):
            raise EsdConfigError(
                f"DES splits a pooling into partial sums: feature(s) {list(t.feature_names)} of table "
                f"{t.name!r} use {t.pooling} pooling, which is not a sum (use SUM or MEAN, or shard "
                "this table with TorchRec)"
            )
    dims = {t.embedding_dim for t in module.embedding_bag_configs()}
    if len(dims) != 1:
        raise EsdConfigError(
            "DES tables must share one embedding_dim, got "
            f"{[(t.name, t.embedding_dim) for t in module.embedding_bag_configs()]}"
        )


def des_module_plan(
    module: nn.Module, world_size: int, sharding: str = "row_wise"
) -> EmbeddingModuleShardingPlan:
    """A DES plan for every table of ``module``.

    ``sharding``: ``"row_wise"`` (every table over all ranks) or
    ``"table_wise"`` (whole tables, largest first onto the least loaded rank).
    """
    validate_des_module(module)
    if sharding not in _SHORT:
        raise EsdConfigError(f"DES sharding must be 'row_wise' or 'table_wise', got {sharding!r}")
    kind = _SHORT[sharding]
    configs = list(module.embedding_bag_configs())
    owner: Dict[str, List[int]] = {}
    if kind == DES_ROW_WISE:
        owner = {t.name: list(range(world_size)) for t in configs}
    else:
        load = [0] * world_size
        for t in sorted(configs, key=lambda t: (-t.num_embeddings, t.name)):
            r = min(range(world_size), key=lambda i: (load[i], i))
            load[r] += t.num_embeddings
            owner[t.name] = [r]
    return EmbeddingModuleShardingPlan(
        {
            t.name: ParameterSharding(sharding_type=kind, compute_kernel=DES_COMPUTE_KERNEL, ranks=owner[t.name])
            for t in configs
        }
    )
