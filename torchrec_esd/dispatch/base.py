"""The one interface every dispatcher implements.

A dispatcher maps a cost matrix ``c[s, w]`` (seconds of expected link time if
sample ``s`` is trained on worker ``w``) and per-worker shares ``B_w`` to an
assignment: ``assignment[s]`` is the worker of sample ``s``; every sample gets
exactly one worker and worker ``w`` gets exactly ``shares[w]`` samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, Sequence

import torch


class DispatchError(ValueError):
    """The dispatch problem has no valid answer (bad shares, bad costs)."""


@dataclass
class DispatchResult:
    assignment: torch.Tensor  # (B,) int64, worker of each sample
    objective: float  # value of the objective under the additive cost model
    solver: str  # which method produced it (e.g. "optimal", "heuristic")
    decision_s: float  # wall time spent deciding
    info: Dict[str, float] = field(default_factory=dict)


def check_problem(cost: torch.Tensor, shares: Sequence[int]) -> None:
    """Validate a dispatch problem; raises :class:`DispatchError`."""
    if cost.dim() != 2:
        raise DispatchError(f"cost must be a (B, W) matrix, got shape {tuple(cost.shape)}")
    b, w = cost.shape
    if len(shares) != w:
        raise DispatchError(f"{len(shares)} shares for {w} workers")
    if any(int(s) < 0 for s in shares):
        raise DispatchError(f"shares must be >= 0, got {list(shares)}")
    if sum(int(s) for s in shares) != b:
        raise DispatchError(f"shares add up to {sum(shares)} but the batch has {b} samples")
    if not torch.isfinite(cost).all():
        bad = (~torch.isfinite(cost)).nonzero()[0].tolist()
        raise DispatchError(
            f"cost matrix has a non-finite entry at sample {bad[0]}, worker {bad[1]}"
            " (a worker with zero bandwidth can only get a share of 0)"
        )


def check_assignment(assignment: torch.Tensor, shares: Sequence[int]) -> None:
    """Assert that ``assignment`` places each sample once and respects shares."""
    counts = torch.bincount(assignment, minlength=len(shares))
    if counts.numel() != len(shares) or counts.tolist() != [int(s) for s in shares]:
        raise DispatchError(
            f"assignment gives per-worker counts {counts.tolist()}, shares are {list(shares)}"
        )


class Dispatcher:
    """Base class: subclasses implement :meth:`_solve`."""

    name: str = "dispatcher"

    def assign(self, cost: torch.Tensor, shares: Sequence[int]) -> DispatchResult:
        check_problem(cost, shares)
        t0 = time.perf_counter()
        assignment, info = self._solve(cost, [int(s) for s in shares])
        dt = time.perf_counter() - t0
        check_assignment(assignment, shares)
        return DispatchResult(
            assignment=assignment,
            objective=self.objective_value(cost, assignment),
            solver=info.pop("solver", self.name) if isinstance(info.get("solver"), str) else self.name,
            decision_s=dt,
            info={k: v for k, v in info.items() if isinstance(v, (int, float))},
        )

    def _solve(self, cost: torch.Tensor, shares: Sequence[int]):  # pragma: no cover
        raise NotImplementedError

    objective: str = "total"

    def objective_value(self, cost: torch.Tensor, assignment: torch.Tensor) -> float:
        per_sample = cost.gather(1, assignment.view(-1, 1)).view(-1)
        if self.objective == "makespan":
            per_worker = torch.zeros(cost.shape[1], dtype=cost.dtype).index_add_(
                0, assignment, per_sample
            )
            return float(per_worker.max())
        return float(per_sample.sum())


