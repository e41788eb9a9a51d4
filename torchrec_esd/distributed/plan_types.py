"""What an ESD plan is made of: the resources the planner plans for
(:class:`WorkerResources`, :class:`PsResources`) and its result,
:class:`EsdPlan`.

:class:`EsdPlan` records, per table, its choice (``ESD``: cached by the
workers and held by the parameter servers; ``REPLICATED``: whole on every
worker), per worker its link, share of the global batch, cache rows and
memory, per PS its bytes and expected traffic.  It prints as a table,
round-trips through JSON (:meth:`EsdPlan.to_json` / :meth:`EsdPlan.from_json`,
:meth:`EsdPlan.save` / :meth:`EsdPlan.load`), and builds the
:class:`EsdConfig` of the runtime and the TorchRec ``ShardingPlan`` that
``DistributedModelParallel`` takes with the ESD sharder.  The planner that
makes it is :class:`~torchrec_esd.distributed.planner.EsdShardingPlanner`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Dict, List

from torchrec.distributed.types import EmbeddingModuleShardingPlan, ParameterSharding, ShardingPlan

from torchrec_esd.config import EsdConfig, EsdConfigError, WorkerSpec
from torchrec_esd.distributed.lookup import ESD_COMPUTE_KERNEL

ESD = "esd_ps_cache"
REPLICATED = "data_parallel"


@dataclass(frozen=True)
class WorkerResources:
    memory_bytes: int  # memory for embeddings (caches, replicated tables, directory)
    bandwidth_mbps: float
    latency_ms: float = 0.0
    samples_per_s: float = 2000.0  # the worker's measured training throughput (compute only)

    def __post_init__(self) -> None:
        if not (isinstance(self.memory_bytes, int) and self.memory_bytes > 0):
            raise EsdConfigError(f"worker memory_bytes must be a positive int, got {self.memory_bytes!r}")
        if not self.bandwidth_mbps > 0:
            raise EsdConfigError(f"worker bandwidth_mbps must be > 0, got {self.bandwidth_mbps!r}")
        if not self.samples_per_s > 0:
            raise EsdConfigError(f"worker samples_per_s must be > 0, got {self.samples_per_s!r}")


@dataclass(frozen=True)
class PsResources:
    memory_bytes: int

    def __post_init__(self) -> None:
        if not (isinstance(self.memory_bytes, int) and self.memory_bytes > 0):
            raise EsdConfigError(f"PS memory_bytes must be a positive int, got {self.memory_bytes!r}")


@dataclass
class EsdPlan:
    tables: List[Dict]  # name, rows, dim, choice ("esd_ps_cache" | "data_parallel")
    workers: List[Dict]  # bandwidth_mbps, latency_ms, share, cache_rows {table: rows}, memory used/budget
    ps: List[Dict]  # bytes, budget, expected traffic share
    num_ps: int
    notes: List[str] = field(default_factory=list)

    # -------------------------------------------------------------- views
    @property
    def replicated(self) -> List[str]:
        return [t["name"] for t in self.tables if t["choice"] == REPLICATED]

    @property
    def esd_tables(self) -> List[str]:
        return [t["name"] for t in self.tables if t["choice"] == ESD]

    def esd_config(self, **kwargs) -> EsdConfig:
        """The runtime topology (``kwargs``: staleness, objective, ...)."""
        return EsdConfig(
            [
                WorkerSpec(
                    cache_rows=dict(w["cache_rows"]),
                    bandwidth_mbps=w["bandwidth_mbps"],
                    latency_ms=w["latency_ms"],
                    share=w["share"],
                )
                for w in self.workers
            ],
            num_ps=self.num_ps,
            **kwargs,
        )

    def sharding_plan(self, module_path: str) -> ShardingPlan:
        """TorchRec plan for the EmbeddingBagCollection at ``module_path``."""
        ranks = list(range(len(self.workers)))
        return ShardingPlan(
            {
                module_path: EmbeddingModuleShardingPlan(
                    {
                        t["name"]: ParameterSharding(
                            sharding_type=t["choice"], compute_kernel=ESD_COMPUTE_KERNEL, ranks=ranks
                        )
                        for t in self.tables
                    }
                )
            }
        )

    # -------------------------------------------------------------- (de)serialisation
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EsdPlan":
        d = json.loads(text)
        return cls(**d)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str) -> "EsdPlan":
        with open(path) as f:
            return cls.from_json(f.read())

    def __str__(self) -> str:
        lines = ["EsdPlan", "", f"{'table':<14}{'rows':>10}{'dim':>5}  {'choice':<14}" + "".join(
            f"{'cache w' + str(i):>10}" for i in range(len(self.workers)))]
        for t in self.tables:
            caches = "".join(
                f"{w['cache_rows'].get(t['name'], t['rows'] if t['choice'] == REPLICATED else 0):>10}"
                for w in self.workers
            )
            lines.append(f"{t['name']:<14}{t['rows']:>10}{t['dim']:>5}  {t['choice']:<14}{caches}")
        lines += ["", f"{'worker':<8}{'Mbit/s':>9}{'lat ms':>8}{'share':>8}{'memory used / budget':>26}"]
        for i, w in enumerate(self.workers):
            lines.append(
                f"w{i:<7}{w['bandwidth_mbps']:>9g}{w['latency_ms']:>8g}{w['share']:>8.3f}"
                f"{w['memory_used_bytes'] / 2**20:>14.2f} / {w['memory_budget_bytes'] / 2**20:.2f} MiB"
            )
        lines += ["", f"{'PS':<8}{'MiB':>10}{'budget MiB':>12}{'traffic share':>15}"]
        for i, p in enumerate(self.ps):
            lines.append(f"ps{i:<6}{p['bytes'] / 2**20:>10.2f}{p['budget_bytes'] / 2**20:>12.2f}{p['traffic_share']:>15.3f}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
