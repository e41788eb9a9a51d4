"""ESD sharding of ``EmbeddingBagCollection``: worker cache + parameter servers.

:class:`EsdEmbeddingBagCollectionSharder` plugs into TorchRec's sharder API, so
``DistributedModelParallel`` (on the workers' process group) replaces every
``EmbeddingBagCollection`` it is given a plan for with a
:class:`~torchrec_esd.distributed.sharded_ebc.ShardedEsdEmbeddingBagCollection`
on the ``device`` DMP passes.  :func:`esd_module_plan` is the per-module plan
that puts every table on ESD (``esd_ps_cache``) or, for the runtime's
replicated tables, whole on every worker (``data_parallel``); the
``compute_kernel`` names the lookup backend
(:mod:`~torchrec_esd.distributed.lookup`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Type

import torch
import torch.distributed as dist
from torchrec.distributed.types import (
    EmbeddingModuleShardingPlan,
    ModuleSharder,
    ParameterSharding,
    ShardingEnv,
)
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_esd.distributed.fused_config import check_fused_optimizer
from torchrec_esd.distributed.lookup import ESD_COMPUTE_KERNEL, lookup_backends
from torchrec_esd.distributed.sharded_ebc import EsdContext, ShardedEsdEmbeddingBagCollection

ESD_SHARDING_TYPE = "esd_ps_cache"
REPLICATED_SHARDING_TYPE = "data_parallel"  # whole table on every worker, all-reduced gradients

__all__ = [
    "ESD_COMPUTE_KERNEL",
    "ESD_SHARDING_TYPE",
    "REPLICATED_SHARDING_TYPE",
    "EsdContext",
    "EsdEmbeddingBagCollectionSharder",
    "ShardedEsdEmbeddingBagCollection",
    "esd_module_plan",
]


class EsdEmbeddingBagCollectionSharder(ModuleSharder[EmbeddingBagCollection]):
    """Shards ``EmbeddingBagCollection`` s onto worker caches + parameter servers.

    ``fused_params`` is TorchRec's fused embedding-optimizer config (as for
    TorchRec's sharders), like ``apply_optimizer_in_backward`` on the tables: it
    must mean the EsdRuntime's optimizer, which the parameter servers apply
    (:mod:`torchrec_esd.distributed.fused_config`); anything else fails every rank.
    """

    def __init__(self, runtime, fused_params: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__()
        self._runtime = runtime
        self._fused_params = dict(fused_params) if fused_params is not None else None

    @property
    def fused_params(self) -> Optional[Dict[str, Any]]:
        return self._fused_params

    @property
    def module_type(self) -> Type[EmbeddingBagCollection]:
        return EmbeddingBagCollection

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return [ESD_SHARDING_TYPE, REPLICATED_SHARDING_TYPE]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        return lookup_backends()

    def shard(
        self,
        module: EmbeddingBagCollection,
        params: EmbeddingModuleShardingPlan,
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedEsdEmbeddingBagCollection:
        rt = self._runtime
        problem = self._env_problem(env) or check_fused_optimizer(module, self._fused_params, rt.optimizer)
        if problem is not None:  # every worker builds the model alike: all of them fail here
            rt.fail(problem)
        replicated = {t.name for t in rt.replicated_tables}
        for name, ps in params.items():
            want = REPLICATED_SHARDING_TYPE if name in replicated else ESD_SHARDING_TYPE
            if ps.sharding_type != want:
                rt.fail(
                    f"table {name!r}: the plan says {ps.sharding_type!r} but the EsdRuntime treats it as "
                    f"{want!r} (build the runtime and the plan from the same EsdPlan / esd_module_plan)"
                )
        kernels = sorted({ps.compute_kernel for ps in params.values()})
        if len(kernels) != 1 or kernels[0] not in lookup_backends():
            rt.fail(
                f"the plan's compute kernels {kernels}: one ESD module runs one lookup backend, one of "
                f"{lookup_backends()}"
            )
        return ShardedEsdEmbeddingBagCollection(module, rt, kernels[0], device)

    def _env_problem(self, env: ShardingEnv) -> Optional[str]:
        """The model of an ESD job runs on the workers only: DMP's env must be
        the workers' (``runtime.sharding_env()``); with the default (the whole
        world) DMP's collectives would wait for the parameter servers forever."""
        rt = self._runtime
        W = rt.config.num_workers
        pg = env.process_group
        if env.world_size == W and env.rank == rt.worker_index and pg is not None and dist.get_world_size(pg) == W:
            return None
        return (
            f"DistributedModelParallel got a ShardingEnv of {env.world_size} ranks (rank {env.rank}), but "
            f"the model of an ESD job runs on its {W} workers only, not on the parameter servers: pass "
            "env=runtime.sharding_env() to DistributedModelParallel (without it DMP uses the whole "
            "world, and its collectives would wait for the parameter servers forever)"
        )


def esd_module_plan(module: EmbeddingBagCollection, runtime,
                    compute_kernel: str = ESD_COMPUTE_KERNEL) -> EmbeddingModuleShardingPlan:
    """The per-module plan that puts every table of ``module`` on ESD (the
    runtime's replicated tables on every worker); ``compute_kernel`` names the
    lookup backend."""
    ranks = list(range(runtime.config.num_workers))
    replicated = {t.name for t in runtime.replicated_tables}
    return EmbeddingModuleShardingPlan(
        {
            t.name: ParameterSharding(
                sharding_type=REPLICATED_SHARDING_TYPE if t.name in replicated else ESD_SHARDING_TYPE,
                compute_kernel=compute_kernel,
                ranks=ranks,
            )
            for t in module.embedding_bag_configs()
        }
    )


