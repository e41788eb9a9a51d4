"""HybridDis: heuristic always, exact optimisation when it pays and fits.

Per batch:

1. run the fast heuristic (price-adjusted regret greedy for ``"total"``,
   multiplicative weights + swaps for ``"makespan"``) and compute a cheap
   lower bound (the dual bound of the greedy's prices, resp. the Lagrangian
   makespan bound); their gap certifies the heuristic's quality;
2. if the gap is above ``gap_threshold`` AND the exact solver's predicted time
   fits both what is left of ``time_budget_ms`` and the CPU credit, run the
   exact solver warm-started from the heuristic with a hard deadline at the end
   of the budget: for ``"total"`` the exact path of
   :func:`~torchrec_esd.dispatch.exact_total.solve_total` reusing the heuristic's
   prices and assignment (min-cost flow on the near-tight arcs, then
   negative-cycle cancelling -- anytime: every cancelled cycle lowers the cost
   -- which ends with an optimality certificate; the full min-cost flow if that
   does not certify and the prediction still fits), the MILP with ``time_limit = remaining budget`` for
   ``"makespan"``; keep the better answer.

*Prediction.*  The exact solver's time is modelled as ``k * B * W`` seconds
(the restricted flow has ``O(B)`` arcs, a cycle costs ``O(B W)`` and few are
needed from the heuristic's warm start); ``k`` starts at ``prior_s_per_cell`` and is refitted online as
an exponential moving average of ``time / (B W)`` over past exact solves
(including solves cut by the deadline, whose time is a lower estimate).

*CPU budget.*  ``cpu_budget`` is the long-run fraction of ``time_budget_ms``
that exact solves may use on average (a token bucket: every batch adds
``cpu_budget * time_budget`` seconds of credit, capped at ``burst`` batches'
worth; an exact solve spends its wall time).  ``1.0`` never restricts beyond
the per-batch budget; ``0.2`` lets the exact solver run on roughly a fifth of
the batches where it would fit, leaving the CPU to training on 2-core edge
machines.

*Stake* (:mod:`~torchrec_esd.dispatch.stake`): through :meth:`decide` (what
:class:`~torchrec_esd.distributed.EsdInputDist` calls) HybridDis takes
vanilla's plain split, without reading the caches, while its last full
decision took more CPU time than the predicted slowest link of that split
(equal fast links), and decides in full every ``probe_every``-th batch.

``DispatchResult.solver`` is ``"hybrid:heuristic"``, ``"hybrid:optimal"``
(exact and certified), ``"hybrid:partial"`` (exact solver cut by the
deadline, improved over the heuristic but not certified) or
``"hybrid:split"`` (skipped, see *Stake*); ``info`` records the
heuristic's cost and time, the lower bound and gap, the prediction, and the
exact solver's time and cost when it ran, and ``stake_s``, ``full_decision_s``
and ``full_decision_cpu_s`` after a full decision through :meth:`decide`.
"""

from __future__ import annotations

import time
from typing import Dict, Sequence

import numpy as np
import torch

from torchrec_esd.dispatch.base import Dispatcher, DispatchError, check_cost_input
from torchrec_esd.dispatch.heuristic import _loads, makespan_heuristic, pairwise_exchange, price_greedy
from torchrec_esd.dispatch.lower_bound import dual_value, makespan_lower_bound
from torchrec_esd.dispatch.exact_makespan import makespan_milp, preload_milp
from torchrec_esd.dispatch.exact_total import mcf_total, solve_total
from torchrec_esd.dispatch.stake import StakeRule


class HybridDis(StakeRule, Dispatcher):
    """Heuristic + exact solver under a decision-time and CPU budget.

    Args:
        time_budget_ms: wall-clock budget of one decision (heuristic included).
        cpu_budget: long-run fraction of the budget the exact solver may use
            on average (token bucket, see module docstring), in ``(0, 1]``.
        objective: ``"total"`` or ``"makespan"``.
        gap_threshold: run the exact solver only if the heuristic is more than
            this relative gap above the lower bound.
        prior_s_per_cell: initial time model of the exact solver, seconds per
            cost-matrix entry (``"total"``).
        makespan_prior_s_per_cell: the same for the makespan MILP.
        improve_sweeps: pairwise-exchange sweeps of the total heuristic.
        burst: CPU credit cap, in batches' worth of ``cpu_budget * budget``.
        cost_input: the matrix :meth:`inputs` builds: ``"expected"`` (shared
            rows amortised, the default) or ``"additive"``.
        stake_ratio: :meth:`decide` takes the plain split while the predicted
            slowest link of that split is below this times the last full
            decision's CPU time (see *Stake* in the module docstring); ``0``
            always decides in full.
        probe_every: while skipping, every ``probe_every``-th batch decides
            in full (>= 1).
    """

    name = "hybrid"

    def __init__(
        self,
        time_budget_ms: float = 50.0,
        cpu_budget: float = 1.0,
        objective: str = "total",
        gap_threshold: float = 1e-4,
        prior_s_per_cell: float = 5e-7,
        makespan_prior_s_per_cell: float = 1e-4,
        improve_sweeps: int = 0,
        burst: float = 4.0,
        ema: float = 0.3,
        cost_input: str = "expected",
        stake_ratio: float = 1.0,
        probe_every: int = 8,
    ) -> None:
        self.cost_input = check_cost_input(cost_input)
        self.init_stake(stake_ratio, probe_every)
        if objective not in ("total", "makespan"):
            raise DispatchError(f"objective must be 'total' or 'makespan', got {objective!r}")
        if not time_budget_ms > 0:
            raise DispatchError(f"time_budget_ms must be > 0, got {time_budget_ms}")
        if not 0 < cpu_budget <= 1:
            raise DispatchError(f"cpu_budget must be in (0, 1], got {cpu_budget}")
        if gap_threshold < 0:
            raise DispatchError(f"gap_threshold must be >= 0, got {gap_threshold}")
        self.objective = objective
        if objective == "makespan":
            preload_milp()
        self.time_budget_s = time_budget_ms / 1e3
        self.cpu_budget = cpu_budget
        self.gap_threshold = gap_threshold
        # the makespan MILP is far slower per entry than the flow (and rarely
        # improves on the heuristic within a short limit): a conservative prior
        self.s_per_cell = {"total": prior_s_per_cell, "makespan": makespan_prior_s_per_cell}
        self.improve_sweeps = improve_sweeps
        self.burst = burst
        self.ema = ema
        self.credit = burst * cpu_budget * self.time_budget_s
        self.history = []  # (cells, seconds, certified) of past exact solves

    # -------------------------------------------------------------- model
    def predict_s(self, b: int, w: int) -> float:
        return self.s_per_cell[self.objective] * b * w

    def _observe(self, b: int, w: int, seconds: float, finished: bool) -> None:
        cells = max(1, b * w)
        rate = seconds / cells
        k = self.s_per_cell[self.objective]
        if finished:
            k = (1 - self.ema) * k + self.ema * rate
        else:  # cut by the deadline: the true time is at least this
            k = max(k, rate)
        self.s_per_cell[self.objective] = k
        self.history.append((cells, seconds, finished))

    # -------------------------------------------------------------- solve
    def _solve(self, cost: torch.Tensor, shares: Sequence[int]):
        t0 = time.perf_counter()
        deadline = t0 + self.time_budget_s
        c = np.ascontiguousarray(cost.numpy())
        b, w = c.shape
        self.credit = min(
            self.credit + self.cpu_budget * self.time_budget_s,
            self.burst * self.cpu_budget * self.time_budget_s,
        )
        if self.objective == "total":
            h, u = price_greedy(c, shares)
            if self.improve_sweeps > 0 and w > 1:
                h, _ = pairwise_exchange(c, h, self.improve_sweeps, 1e-12 * float(np.abs(c).max()))
            h_val = float(c[np.arange(b), h].sum())
            lb = dual_value(c, shares, u)
        else:
            h, hinfo = makespan_heuristic(c, shares, deadline=deadline)
            h_val = float(_loads(c, h).max())
            lb = max(float(hinfo.get("lower_bound", 0.0)), makespan_lower_bound(c, shares))
        t_h = time.perf_counter() - t0
        gap = (h_val - lb) / abs(lb) if lb > 0 else (0.0 if h_val <= lb else float("inf"))
        predicted = self.predict_s(b, w)
        remaining = deadline - time.perf_counter()
        info: Dict[str, float] = {
            "heuristic_cost": h_val,
            "heuristic_s": t_h,
            "lower_bound": lb,
            "gap_heuristic": gap,
            "predicted_exact_s": predicted,
            "exact_ran": 0.0,
        }
        run = gap > self.gap_threshold and predicted <= min(remaining, self.credit) and w > 1
        if not run:
            info.update(solver="hybrid:heuristic", gap=gap)
            info["skip_reason_budget"] = float(gap > self.gap_threshold)
            return torch.from_numpy(h), info
        t1 = time.perf_counter()
        if self.objective == "total":
            a, xinfo = solve_total(
                c, shares, "auto", warm_start=h, prices=u, deadline=deadline, fallback=False
            )
            finished = bool(xinfo.get("certified", 0.0))
            if not finished and deadline - time.perf_counter() >= predicted:
                a, _ = mcf_total(c, shares)  # exact, within its rounding bound
                finished = True
            t_x = time.perf_counter() - t1
            val = float(c[np.arange(b), a].sum())
            if val > h_val:  # cannot happen (cycles only improve), but never worse
                a, val = h, h_val
            lb = max(lb, float(xinfo.get("lower_bound", lb)))
            info["exact_path"] = float(xinfo.get("exact_path", 3.0))
            info["exact_iters"] = float(xinfo.get("cycles_iters", 0.0))
        else:
            # HiGHS may overrun its limit (model build, presolve, coarse
            # checks): give it half of what is left
            a, minfo = makespan_milp(c, shares, time_limit_s=max(1e-3, 0.5 * (deadline - t1)))
            t_x = time.perf_counter() - t1
            finished = bool(minfo.get("proven_optimal", 0.0))
            if "lower_bound" in minfo:
                lb = max(lb, float(minfo["lower_bound"]))
            if a is None:
                a = h
            val = float(_loads(c, a).max())
            if val > h_val:
                a, val = h, h_val
        self.credit -= t_x
        self._observe(b, w, t_x, finished)
        gap_final = (val - lb) / abs(lb) if lb > 0 else 0.0
        info.update(
            exact_ran=1.0,
            exact_s=t_x,
            exact_cost=val,
            exact_certified=float(finished),
            lower_bound=lb,
            gap=gap_final,
            solver="hybrid:optimal" if finished else "hybrid:partial",
        )
        return torch.from_numpy(a), info
