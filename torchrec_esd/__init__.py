"""torchrec_esd: Embedding Samples Dispatching (ESD) for TorchRec.

Trains DLRMs on heterogeneous edge workers that cache part of the embedding
tables while parameter servers hold the global tables; each iteration the
dispatcher decides which worker trains which sample so that the expected
embedding transmission cost is minimal.  See README.md.
"""

from torchrec_esd import ops
from torchrec_esd.config import EsdConfig, EsdConfigError, WorkerSpec, heterogeneous_workers
from torchrec_esd.workload import SyntheticWorkload, SyntheticWorkloadConfig

__version__ = "0.1.0"

__all__ = [
    "EsdConfig",
    "EsdConfigError",
    "SyntheticWorkload",
    "SyntheticWorkloadConfig",
    "WorkerSpec",
    "heterogeneous_workers",
    "ops",
]
