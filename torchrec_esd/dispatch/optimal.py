"""Exact balanced dispatch: :class:`OptimalDispatcher`.

The problem: ``x[s, w] in {0, 1}``, ``sum_w x[s, w] = 1`` (each sample once),
``sum_s x[s, w] = B_w`` (each worker its share), and

* ``objective="total"``: minimise ``sum_{s,w} x[s,w] c[s,w]``, a
  transportation problem solved exactly, with an optimality certificate, by
  dual prices + cycle cancelling or min-cost flow
  (:mod:`~torchrec_esd.dispatch.exact_total`);
* ``objective="makespan"``: minimise ``max_w sum_s x[s,w] c[s,w]``, NP-hard;
  the heuristic when the Lagrangian bound proves it optimal, else a MILP
  (:mod:`~torchrec_esd.dispatch.exact_makespan`).

Both merge samples with identical cost rows first
(:mod:`~torchrec_esd.dispatch.row_groups`).  The solvers' functions are
re-exported here (``__all__``), where callers have always imported them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from torchrec_esd.dispatch.base import Dispatcher, DispatchError, check_cost_input
from torchrec_esd.dispatch.exact_makespan import makespan_milp, preload_milp, solve_makespan
from torchrec_esd.dispatch.exact_total import (
    cancel_negative_cycles,
    exchange_graph,
    mcf_total,
    negative_cycle,
    restricted_mcf,
    solve_total,
)
from torchrec_esd.dispatch.row_groups import expand_group_flows, group_rows

__all__ = [
    "OptimalDispatcher",
    "cancel_negative_cycles",
    "exchange_graph",
    "expand_group_flows",
    "group_rows",
    "makespan_milp",
    "mcf_total",
    "negative_cycle",
    "preload_milp",
    "restricted_mcf",
    "solve_makespan",
    "solve_total",
]


def _to_numpy(cost: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(cost.detach().cpu().to(torch.float64).numpy())


class OptimalDispatcher(Dispatcher):
    """Exact dispatch: min-cost flow for ``"total"``, MILP for ``"makespan"``.

    Args:
        objective: ``"total"`` or ``"makespan"``.
        aggregate: merge samples with identical cost rows first (same optimum,
            fewer arcs).
        time_limit_s: makespan only, wall-clock limit of the MILP.
        mip_rel_gap: makespan only, relative gap at which the MILP stops.
        method: total only: ``"auto"`` (cycle cancelling from the heuristic,
            min-cost flow if that does not certify optimality quickly),
            ``"cycles"`` or ``"mcf"`` (min-cost flow only).
        cost_input: the matrix :meth:`inputs` builds: ``"expected"`` (shared
            rows amortised, the default) or ``"additive"``.
    """

    name = "optimal"

    def __init__(
        self,
        objective: str = "total",
        aggregate: bool = True,
        time_limit_s: float = 10.0,
        mip_rel_gap: float = 1e-6,
        method: str = "auto",
        cost_input: str = "expected",
    ) -> None:
        self.cost_input = check_cost_input(cost_input)
        if objective not in ("total", "makespan"):
            raise DispatchError(f"objective must be 'total' or 'makespan', got {objective!r}")
        self.objective = objective
        if objective == "makespan":
            preload_milp()
        self.aggregate = aggregate
        self.time_limit_s = time_limit_s
        self.mip_rel_gap = mip_rel_gap
        if method not in ("auto", "cycles", "mcf"):
            raise DispatchError(f"method must be 'auto', 'cycles' or 'mcf', got {method!r}")
        self.method = method

    def _solve(self, cost: torch.Tensor, shares: Sequence[int]):
        c = _to_numpy(cost)
        if self.objective == "total":
            a, info = solve_total(c, shares, self.method, aggregate=self.aggregate)
            return torch.from_numpy(a), info
        return solve_makespan(c, shares, self.time_limit_s, self.mip_rel_gap, self.aggregate)
