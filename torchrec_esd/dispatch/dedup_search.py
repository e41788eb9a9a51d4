"""ESD dispatch on the de-duplicated (true) transmission cost.

The additive matrix ``c[s, w]`` charges a row once per SAMPLE, but the runtime
(:class:`~torchrec_esd.cache.CacheDirectory`) moves it once per WORKER, and at
staleness 0 every row used by more than one worker in an iteration costs one
gradient push per user (and an update-pull at its next use) while a row used
by one worker only is updated in that worker's cache for free.  Optimising the
additive matrix exactly therefore spends its effort on hot rows that every
worker pays anyway and ignores co-location.  :class:`DedupSearchDispatcher` decides on
:class:`~torchrec_esd.cost.DedupCost`, the batch's cost as a function of which
workers use each distinct row (what :meth:`~torchrec_esd.cost.CostModel.measure`
reports):

1. *Start*: the price-adjusted regret greedy on the **amortised** matrix
   (:meth:`DedupCost.amortised_matrix`: a row's cost divided by the number of
   samples expected to share it on that worker, plus the expected
   synchronisation push of rows likely to be shared elsewhere): hot rows stop
   dominating, rare rows decide (:func:`start`: the C++ operator
   :func:`torchrec_esd.ops.dedup_start` in one call, equal bit for bit to the
   numpy :func:`start_reference`).
2. *Local search on the exact de-duplicated objective* (:func:`refine`,
   the C++ operator :func:`torchrec_esd.ops.dedup_refine`, see
   ``csrc/cpu/dedup_refine_cpu.cpp``).  The exact change of moving one
   sample alone is kept per (sample, row) occurrence and updated after
   every applied move for the rows whose user set or single-user flags
   changed; since a row's cost only grows with its user set, the sum of the
   two single moves bounds a swap's change from below, which prunes the
   pairs.  Swaps (best exact partner per sample, samples in the order of
   their best bound) and group moves (the few users of a row on one worker
   join its other users, as many samples go back) are applied one at a
   time, each lowering the cost, until no swap improves (a local optimum of
   the swap neighbourhood) and no group move tried improves, after
   ``max_rounds`` passes or at the ``time_budget_ms`` deadline (anytime).
   About 1-3 ms at B=512, W=4 (the numpy search
   :func:`~torchrec_esd.dispatch.dedup_refine_reference.refine_reference`,
   its reference and fallback without the extension, takes 20-45 ms).

For ``"total"`` without ``budget_fraction`` both steps run in ONE operator
call (:func:`start_and_refine`, :func:`torchrec_esd.ops.dedup_decide`): a
custom operator releases the GIL, and a decision in a background dispatch
thread waits up to a switch interval (5 ms) to get it back whenever the
training thread runs Python, so every call between C++ and Python counts
end to end.

``objective="makespan"`` weights every link's costs by multiplicative-weight
multipliers (a few rounds, overloaded links get heavier) and keeps the
assignment with the smallest predicted slowest link.

Without a :class:`DedupCost` (``aux={"dedup": ...}``, see
:meth:`~torchrec_esd.dispatch.base.Dispatcher.inputs`) the dispatcher falls
back to the price-adjusted greedy on the additive matrix and reports
``solver="esd:additive"``.
"""

from __future__ import annotations

import time
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from torchrec_esd import ops
from torchrec_esd.cost.dedup import amortise_table
from torchrec_esd.dispatch.base import Dispatcher, DispatchError
from torchrec_esd.dispatch.dedup_refine_reference import refine_reference
from torchrec_esd.dispatch.heuristic import price_greedy
from torchrec_esd.dispatch.stake import StakeRule, plain_split


def refine(
    dedup,
    assignment: np.ndarray,
    max_rounds: int = 64,
    deadline: Optional[float] = None,
    group_size: int = 4,
) -> Tuple[np.ndarray, Dict[str, float]]:
    """Local search on :meth:`DedupCost.total` from ``assignment`` (the
    samples per worker never change): the C++ operator
    :func:`torchrec_esd.ops.dedup_refine` (swaps and group moves of at most
    ``group_size`` samples, 0: swaps only; see the module docstring) until a
    local optimum, ``max_rounds`` passes or ``deadline`` (a
    ``time.perf_counter()`` value), or :func:`refine_reference` (numpy,
    swaps only) where the extension lacks it.  Returns the improved
    assignment and ``info`` (``rounds``, ``swaps``, ``start_cost``,
    ``cost``, ``stopped_at_deadline``, ``local_optimum``; ``moves`` with the
    operator)."""
    if not ops.has_dedup_refine():
        return refine_reference(dedup, assignment, max_rounds, deadline)
    budget = float("inf") if deadline is None else deadline - time.perf_counter()
    arrays = (dedup.occ_s, dedup.occ_k, dedup.pull, dedup.push, dedup.owner, dedup.owner_push)
    a, _, info = ops.dedup_refine(*(torch.from_numpy(v) for v in arrays),
                                  torch.from_numpy(np.ascontiguousarray(assignment, dtype=np.int64)),
                                  max_rounds, max(budget, 0.0), group_size)
    return a.numpy(), _info(info)


def start_reference(dedup, shares: Sequence[int]) -> np.ndarray:
    """The start assignment in numpy: :func:`price_greedy` on
    :meth:`DedupCost.amortised_matrix` (the reference of :func:`start`)."""
    return price_greedy(dedup.amortised_matrix(shares), shares)[0]


def start(dedup, shares: Sequence[int]) -> np.ndarray:
    """The start assignment (price-adjusted regret greedy on the amortised
    matrix): the C++ operator :func:`torchrec_esd.ops.dedup_start` in one
    call, equal to :func:`start_reference` (its fallback without the
    extension)."""
    if not ops.has_dedup_start():
        return start_reference(dedup, shares)
    shares = tuple(int(s) for s in shares)
    divisor, p_shared = amortise_table(shares, dedup.num_samples)
    arrays = (dedup.occ_s, dedup.occ_k, dedup.pull, dedup.push, dedup.owner, dedup.owner_push)
    a, _ = ops.dedup_start(*(torch.from_numpy(v) for v in arrays), divisor, p_shared, list(shares))
    return a.numpy()


def _info(info: torch.Tensor) -> Dict[str, float]:
    rounds, moves, swaps, start_cost, cost, stop, _ = info.tolist()
    return {"rounds": rounds, "moves": moves, "swaps": swaps, "start_cost": start_cost, "cost": cost,
            "stopped_at_deadline": float(stop == 2), "local_optimum": float(stop == 0)}


def start_and_refine(dedup, shares: Sequence[int], max_rounds: int = 64, deadline: Optional[float] = None,
                     group_size: int = 4) -> Tuple[np.ndarray, Dict[str, float]]:
    """:func:`start` then :func:`refine` until ``deadline``: in one call of
    :func:`torchrec_esd.ops.dedup_decide` where it is built (the same
    assignment and ``info``; a custom operator releases the GIL, and a
    decision in a background thread waits for it again after every call
    while the training thread runs Python), else the two calls."""
    if not ops.has_dedup_decide():
        return refine(dedup, start(dedup, shares), max_rounds, deadline, group_size)
    budget = float("inf") if deadline is None else max(deadline - time.perf_counter(), 0.0)
    shares = tuple(int(s) for s in shares)
    divisor, p_shared = amortise_table(shares, dedup.num_samples)
    arrays = (dedup.occ_s, dedup.occ_k, dedup.pull, dedup.push, dedup.owner, dedup.owner_push)
    a, _, info, _ = ops.dedup_decide(*(torch.from_numpy(v) for v in arrays), divisor, p_shared, list(shares),
                                     3, max_rounds, budget, group_size)
    return a.numpy(), _info(info)


class DedupSearchDispatcher(StakeRule, Dispatcher):
    """Dispatch on the de-duplicated cost: amortised start + exact local search.

    Args:
        objective: ``"total"`` (sum of link seconds) or ``"makespan"``.
        time_budget_ms: wall-clock budget of one decision; the local search
            stops at the deadline (the start is always computed).
        budget_fraction: if set, the budget is also at most this fraction of
            the predicted link makespan of the start assignment (the
            iteration's slowest link, a lower bound on the iteration time of
            a synchronous step), so the decision stays a small part of the
            iteration whatever the batch and the links.
        max_rounds: local-search rounds at most.
        makespan_rounds: multiplicative-weight rounds for ``"makespan"``.
        stake_ratio, probe_every: the stake rule of :meth:`decide`
            (:mod:`~torchrec_esd.dispatch.stake`: vanilla's plain split while
            the link at stake is below the last full decision's CPU time).

    Needs ``aux={"dedup": CostModel.dedup_cost(kjt, views)}``
    (:meth:`Dispatcher.inputs` builds it); without it, it is the additive
    price-adjusted greedy (``solver="esd:additive"``).
    """

    name = "esd"
    needs_dedup = True

    def __init__(
        self,
        objective: str = "total",
        time_budget_ms: float = 50.0,
        budget_fraction: Optional[float] = None,
        max_rounds: int = 64,
        makespan_rounds: int = 4,
        stake_ratio: float = 1.0,
        probe_every: int = 8,
    ) -> None:
        if objective not in ("total", "makespan"):
            raise DispatchError(f"objective must be 'total' or 'makespan', got {objective!r}")
        if not time_budget_ms > 0:
            raise DispatchError(f"time_budget_ms must be > 0, got {time_budget_ms}")
        self.objective = objective
        if budget_fraction is not None and not budget_fraction > 0:
            raise DispatchError(f"budget_fraction must be > 0, got {budget_fraction}")
        self.time_budget_s = time_budget_ms / 1e3
        self.budget_fraction = budget_fraction
        self.max_rounds = int(max_rounds)
        self.makespan_rounds = int(makespan_rounds)
        self.init_stake(stake_ratio, probe_every)

    def inputs(self, cost_model, kjt, views):
        """The de-duplicated model of the batch, and the additive matrix from
        it (one pass over the cache state instead of two)."""
        v = views() if callable(views) else views
        dedup, additive = cost_model.dedup_inputs(kjt, v)
        return torch.from_numpy(additive), {"dedup": dedup}

    def stake_s(self, cost, aux, shares) -> float:
        """The plain split's slowest link on the de-duplicated model (what the
        directory would move), not on the additive matrix."""
        dedup = (aux or {}).get("dedup")
        if dedup is None or dedup.num_samples == 0:
            return super().stake_s(cost, aux, shares)
        return float(dedup.per_worker(plain_split(shares).numpy()).max())

    def _start(self, dedup, shares) -> np.ndarray:
        return start(dedup, shares)

    def _deadline(self, t0: float, dedup, start: np.ndarray) -> float:
        budget = self.time_budget_s
        if self.budget_fraction is not None:
            budget = min(budget, self.budget_fraction * float(dedup.per_worker(start).max()))
        return t0 + budget

    def _solve(self, cost: torch.Tensor, shares: Sequence[int], dedup=None):
        t0 = time.perf_counter()
        c = np.ascontiguousarray(cost.numpy())
        b, w = c.shape
        if dedup is None:
            a, _ = price_greedy(c, shares)
            return torch.from_numpy(a), {"solver": "esd:additive"}
        if dedup.num_samples != b or dedup.num_workers != w:
            raise DispatchError(
                f"dedup cost is for {dedup.num_samples} samples x {dedup.num_workers} workers,"
                f" the cost matrix is {b} x {w}"
            )
        if w == 1:
            return torch.zeros(b, dtype=torch.int64), {"solver": "esd"}
        if self.objective == "total" and self.budget_fraction is None:
            # the budget does not depend on the start: start and local search in one call
            deadline = t0 + self.time_budget_s
            a, info = start_and_refine(dedup, shares, self.max_rounds, deadline)
            info["predicted_total_s"] = info["cost"]
            info["budget_ms"] = (deadline - t0) * 1e3
            return torch.from_numpy(a), info
        start = self._start(dedup, shares)
        deadline = self._deadline(t0, dedup, start)
        if self.objective == "total":
            a, info = refine(dedup, start, self.max_rounds, deadline)
            info["predicted_total_s"] = info["cost"]
            info["budget_ms"] = (deadline - t0) * 1e3
            return torch.from_numpy(a), info
        # makespan: multiplicative weights on the links' multipliers
        lam = np.ones(w)
        best, best_v, step = None, np.inf, 1.0
        n = max(1, self.makespan_rounds)
        for r in range(n):
            left = deadline - time.perf_counter()
            sub_deadline = time.perf_counter() + max(0.0, left) / (n - r)
            scaled = dedup.scaled(lam)
            a, _ = refine(scaled, start if r == 0 else self._start(scaled, shares), self.max_rounds,
                          sub_deadline)
            loads = dedup.per_worker(a)
            v = float(loads.max())
            if v < best_v:
                best, best_v = a, v
            mean = float(loads.mean())
            if mean <= 0 or time.perf_counter() > deadline:
                break
            lam = lam * np.exp(step * (loads / mean - 1.0))
            lam = lam / lam.mean()
            step *= 0.7
        info = {"predicted_makespan_s": best_v, "predicted_total_s": dedup.total(best)}
        return torch.from_numpy(best), info
