"""torchrec_esd: Embedding Samples Dispatching (ESD) for TorchRec.

Trains DLRMs on heterogeneous edge workers that cache part of the embedding
tables while parameter servers hold the global tables; each iteration the
dispatcher decides which worker trains which sample so that the expected
embedding transmission cost is minimal.  See README.md.

Everything a user touches is importable from here (``__all__``).  The names
resolve on first use (PEP 562), so ``import torchrec_esd`` stays light (no
TorchRec sharding, no C++ extension until needed) and no submodule imports
this package's namespace while it is being built: no circular imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict, List

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: Dict[str, str] = {
    # topology and errors
    "EsdConfig": "torchrec_esd.config",
    "WorkerSpec": "torchrec_esd.config",
    "heterogeneous_workers": "torchrec_esd.config",
    "EsdConfigError": "torchrec_esd.config",
    "EsdIdError": "torchrec_esd.layout",
    "EsdRemoteError": "torchrec_esd.ps",
    "EsdCheckpointError": "torchrec_esd.distributed.checkpoint",
    # per-rank runtime, input dist, sharder and plan (the DMP drop-in)
    "EsdRuntime": "torchrec_esd.distributed.runtime",
    "EsdInputDist": "torchrec_esd.distributed.input_dist",
    "EsdEmbeddingBagCollectionSharder": "torchrec_esd.distributed.sharding",
    "ShardedEsdEmbeddingBagCollection": "torchrec_esd.distributed.sharding",
    "esd_module_plan": "torchrec_esd.distributed.sharding",
    "SparseOptimizer": "torchrec_esd.optim",
    # dispatchers
    "make_dispatcher": "torchrec_esd.dispatch",
    "Dispatcher": "torchrec_esd.dispatch",
    "DispatchResult": "torchrec_esd.dispatch",
    "DispatchError": "torchrec_esd.dispatch",
    # planner
    "EsdShardingPlanner": "torchrec_esd.distributed.planner",
    "EsdPlan": "torchrec_esd.distributed.planner",
    "WorkerResources": "torchrec_esd.distributed.planner",
    "PsResources": "torchrec_esd.distributed.planner",
    # dense gradients through the fastest worker
    "register_dense_sync": "torchrec_esd.distributed.dense_sync",
    # DES sharding (partial sums next to the weight shards)
    "DesEmbeddingBagCollectionSharder": "torchrec_esd.des.sharding",
    "des_module_plan": "torchrec_esd.des.sharding",
    # logging of the command-line programs: rank-prefixed records
    "configure_logging": "torchrec_esd.log",
    # synthetic Criteo-like workload (examples, benchmarks, tests)
    "SyntheticWorkload": "torchrec_esd.apps.workload",
    "SyntheticWorkloadConfig": "torchrec_esd.apps.workload",
}
_SUBMODULES = ("ops",)  # C++ operators (loads the extension)

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # resolved once
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
    from torchrec_esd import ops
    from torchrec_esd.config import EsdConfig, EsdConfigError, WorkerSpec, heterogeneous_workers
    from torchrec_esd.distributed.checkpoint import EsdCheckpointError
    from torchrec_esd.distributed.dense_sync import register_dense_sync
    from torchrec_esd.des.sharding import DesEmbeddingBagCollectionSharder, des_module_plan
    from torchrec_esd.dispatch import DispatchError, Dispatcher, DispatchResult, make_dispatcher
    from torchrec_esd.distributed.input_dist import EsdInputDist
    from torchrec_esd.layout import EsdIdError
    from torchrec_esd.optim import SparseOptimizer
    from torchrec_esd.distributed.planner import EsdPlan, EsdShardingPlanner, PsResources, WorkerResources
    from torchrec_esd.ps import EsdRemoteError
    from torchrec_esd.distributed.runtime import EsdRuntime
    from torchrec_esd.distributed.sharding import (
        EsdEmbeddingBagCollectionSharder,
        ShardedEsdEmbeddingBagCollection,
        esd_module_plan,
    )
    from torchrec_esd.apps.workload import SyntheticWorkload, SyntheticWorkloadConfig
