"""The one interface every dispatcher implements.

A dispatcher maps a cost matrix ``c[s, w]`` (seconds of expected link time if
sample ``s`` is trained on worker ``w``) and per-worker shares ``B_w`` to an
assignment: ``assignment[s]`` is the worker of sample ``s``; every sample gets
exactly one worker and worker ``w`` gets exactly ``shares[w]`` samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence

import torch

from torchrec_esd.dispatch.clock import DecisionClock


class DispatchError(ValueError):
    """The dispatch problem has no valid answer (bad shares, bad costs)."""


@dataclass
class DispatchResult:
    assignment: torch.Tensor  # (B,) int64, worker of each sample
    objective: float  # value of the objective under the additive cost model
    solver: str  # which method produced it (e.g. "optimal", "heuristic")
    decision_s: float  # wall time spent deciding
    info: Dict[str, float] = field(default_factory=dict)


def check_shares(b: int, w: int, shares: Sequence[int]) -> None:
    """Validate ``shares`` of a batch of ``b`` samples over ``w`` workers; raises
    :class:`DispatchError`."""
    if len(shares) != w:
        raise DispatchError(f"{len(shares)} shares for {w} workers")
    if any(int(s) != s for s in shares):
        raise DispatchError(f"shares must be integers, got {list(shares)}")
    if any(int(s) < 0 for s in shares):
        raise DispatchError(f"shares must be >= 0, got {list(shares)}")
    if sum(int(s) for s in shares) != b:
        raise DispatchError(f"shares add up to {sum(shares)} but the batch has {b} samples")


def check_problem(cost: torch.Tensor, shares: Sequence[int]) -> None:
    """Validate a dispatch problem; raises :class:`DispatchError`.

    ``+inf`` costs are allowed only in the column of a worker whose share is 0
    (e.g. a worker that cannot be reached: it simply gets no samples); any NaN,
    ``-inf``, or ``+inf`` for a worker with a positive share is an error.
    """
    if cost.dim() != 2:
        raise DispatchError(f"cost must be a (B, W) matrix, got shape {tuple(cost.shape)}")
    b, w = cost.shape
    check_shares(b, w, shares)
    if b == 0:
        return
    finite = torch.isfinite(cost)
    if not finite.all():
        nan = torch.isnan(cost) | (cost == float("-inf"))
        if nan.any():
            bad = nan.nonzero()[0].tolist()
            raise DispatchError(
                f"cost matrix has a NaN/-inf entry at sample {bad[0]}, worker {bad[1]}"
            )
        active = torch.tensor([int(s) > 0 for s in shares], dtype=torch.bool)
        bad_mask = (~finite) & active.view(1, -1)
        if bad_mask.any():
            bad = bad_mask.nonzero()[0].tolist()
            raise DispatchError(
                f"cost matrix has a non-finite entry at sample {bad[0]}, worker {bad[1]},"
                f" but worker {bad[1]} has a share of {int(shares[bad[1]])} > 0"
                " (a worker with zero bandwidth can only get a share of 0)"
            )


def check_assignment(assignment: torch.Tensor, shares: Sequence[int]) -> None:
    """Assert that ``assignment`` places each sample once and respects shares."""
    if assignment.dim() != 1 or assignment.numel() != sum(int(s) for s in shares):
        raise DispatchError(
            f"assignment has shape {tuple(assignment.shape)}, expected ({sum(shares)},)"
        )
    if assignment.numel() and (int(assignment.min()) < 0 or int(assignment.max()) >= len(shares)):
        raise DispatchError(f"assignment names a worker outside [0, {len(shares)})")
    counts = torch.bincount(assignment, minlength=len(shares))
    if counts.numel() != len(shares) or counts.tolist() != [int(s) for s in shares]:
        raise DispatchError(
            f"assignment gives per-worker counts {counts.tolist()}, shares are {list(shares)}"
        )


class Dispatcher:
    """Base class: subclasses implement :meth:`_solve`."""

    name: str = "dispatcher"

    def assign(
        self,
        cost: torch.Tensor,
        shares: Sequence[int],
        aux: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> DispatchResult:
        """Decide the worker of every sample.

        Workers with a share of 0 are removed before :meth:`_solve` runs (their
        cost column may be ``inf``), so every ``_solve`` sees only workers with a
        positive share and a finite float64 CPU cost matrix.  ``aux`` holds
        extra ``[B, W]`` matrices a dispatcher needs (e.g. ``{"hits": ...}`` for
        LAIA) or per-batch models with a ``restrict(workers)`` method (e.g.
        ``{"dedup": CostModel.dedup_cost(...)}`` for ``esd``); they get the
        same worker selection and are passed to ``_solve`` as keyword
        arguments.  :meth:`inputs` builds exactly what a dispatcher needs.
        """
        check_problem(cost, shares)
        aux = dict(aux or {})
        objs = {k: m for k, m in aux.items() if not isinstance(m, torch.Tensor)}
        aux = {k: m for k, m in aux.items() if isinstance(m, torch.Tensor)}
        for k, m in objs.items():
            if not hasattr(m, "restrict"):
                raise DispatchError(
                    f"aux entry {k!r} must be a [B, W] tensor or a per-batch model with"
                    f" .restrict(workers), got {type(m).__name__}"
                )
        for k, m in aux.items():
            if tuple(m.shape) != tuple(cost.shape):
                raise DispatchError(
                    f"aux matrix {k!r} has shape {tuple(m.shape)}, cost has {tuple(cost.shape)}"
                )
        shares = [int(s) for s in shares]
        t0 = time.perf_counter()
        cost64 = cost.detach().to(device="cpu", dtype=torch.float64)
        active = [w for w, s in enumerate(shares) if s > 0]
        sel = None if len(active) == len(shares) else torch.tensor(active, dtype=torch.int64)
        sub = cost64.contiguous() if sel is None else cost64[:, sel].contiguous()
        extra = {
            k: (m.detach().cpu() if sel is None else m.detach().cpu()[:, sel]).contiguous()
            for k, m in aux.items()
        }
        extra.update({k: (m if sel is None else m.restrict(active)) for k, m in objs.items()})
        if sub.shape[0] == 0:
            assignment, info = torch.zeros(0, dtype=torch.int64), {}
        else:
            assignment, info = self._solve(sub, [shares[w] for w in active], **extra)
            assignment = torch.as_tensor(assignment, dtype=torch.int64).view(-1)
            if len(active) != len(shares):
                assignment = torch.tensor(active, dtype=torch.int64)[assignment]
        dt = time.perf_counter() - t0
        check_assignment(assignment, shares)
        solver = info.pop("solver", self.name)
        if not isinstance(solver, str):
            solver = self.name
        return DispatchResult(
            assignment=assignment,
            objective=self.objective_value(cost64, assignment),
            solver=solver,
            decision_s=dt,
            info={k: v for k, v in info.items() if isinstance(v, (int, float))},
        )

    def _solve(self, cost: torch.Tensor, shares: Sequence[int]):  # pragma: no cover
        raise NotImplementedError

    # what the dispatcher reads (see :meth:`inputs`)
    needs_cost: bool = True  # a cost matrix (else zeros: only for reporting)
    # which cost matrix: "additive" (CostModel.matrix: every distinct row of a
    # sample charged to it in full) or "expected" (CostModel.expected_matrix:
    # shared rows amortised over their expected users on the worker)
    cost_input: str = "additive"
    needs_hits: bool = False  # aux "hits": CostModel.hit_matrix
    needs_dedup: bool = False  # aux "dedup": CostModel.dedup_cost

    def inputs(self, cost_model, kjt, views):
        """``(cost, aux)`` to pass to :meth:`assign` for the batch ``kjt``.

        ``views`` are the cache views (``CacheDirectory.views()``) or a
        zero-argument callable returning them (only called when needed, so a
        cost-blind dispatcher never snapshots the directory)."""
        b, w = kjt.stride(), cost_model.num_workers
        if not (self.needs_cost or self.needs_hits or self.needs_dedup):
            return torch.zeros(b, w, dtype=torch.float64), None
        v = views() if callable(views) else views
        if not self.needs_cost:
            cost = torch.zeros(b, w, dtype=torch.float64)
        elif self.cost_input == "expected":
            cost = cost_model.expected_matrix(kjt, v)
        else:
            cost = cost_model.matrix(kjt, v)
        aux = {}
        if self.needs_hits:
            aux["hits"] = cost_model.hit_matrix(kjt, v)
        if self.needs_dedup:
            aux["dedup"] = cost_model.dedup_cost(kjt, v)
        return cost, (aux or None)

    def decide(self, cost_model, kjt, views, shares: Sequence[int]) -> DispatchResult:
        """Read this dispatcher's inputs for the batch ``kjt`` and decide
        (:meth:`inputs` then :meth:`assign`; ``decision_s`` is the solve
        alone, ``info["inputs_s"]`` the time :meth:`inputs` took: the whole
        decision is their sum; :meth:`DecisionClock.info` adds its wall time,
        its CPU time and its wait for a core).  Dispatchers that can decide without the full ``[B, W]``
        inputs override it (:class:`~torchrec_esd.dispatch.grouped.GroupedDispatcher`).

        A dispatcher that reads no inputs (``random``, ``round_robin``) decides
        without the ``[B, W]`` matrix :meth:`assign` takes: ``O(B + W)``, not
        ``O(B W)`` (at ``W = 256`` the zero matrix and its checks took ~70 ms
        of ``random``'s decision in ``benchmarks/scale.py``).  The same
        assignment as :meth:`assign` on any matrix; the objective is 0."""
        if not (self.needs_cost or self.needs_hits or self.needs_dedup) and type(self).assign is Dispatcher.assign:
            return self._decide_blind(kjt.stride(), cost_model.num_workers, shares)
        clock = DecisionClock()
        t0 = time.perf_counter()
        cost, aux = self.inputs(cost_model, kjt, views)
        inputs_s = time.perf_counter() - t0
        result = self.assign(cost, shares, aux=aux)
        result.info["inputs_s"] = inputs_s
        result.info.update(clock.info())
        return result

    def _decide_blind(self, b: int, w: int, shares: Sequence[int]) -> DispatchResult:
        """:meth:`decide` of a dispatcher that reads no inputs: its ``_solve`` on
        the active workers (as :meth:`assign` calls it) with a zero-stride view
        standing in for the matrix it does not read."""
        t0 = time.perf_counter()
        check_shares(b, w, shares)
        shares = [int(s) for s in shares]
        active = [v for v, s in enumerate(shares) if s > 0]
        inputs_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        if b == 0:
            assignment, info = torch.zeros(0, dtype=torch.int64), {}
        else:
            blank = torch.zeros(1, 1, dtype=torch.float64).expand(b, len(active))
            assignment, info = self._solve(blank, [shares[v] for v in active])
            assignment = torch.as_tensor(assignment, dtype=torch.int64).view(-1)
            if len(active) != len(shares):
                assignment = torch.tensor(active, dtype=torch.int64)[assignment]
        dt = time.perf_counter() - t0
        check_assignment(assignment, shares)
        return DispatchResult(assignment=assignment, objective=0.0, solver=self.name, decision_s=dt,
                              info={"inputs_s": inputs_s})

    objective: str = "total"

    def objective_value(self, cost: torch.Tensor, assignment: torch.Tensor) -> float:
        return objective_value(cost, assignment, self.objective)


COST_INPUTS = ("additive", "expected")


def check_cost_input(cost_input: str) -> str:
    if cost_input not in COST_INPUTS:
        raise DispatchError(f"cost_input must be one of {COST_INPUTS}, got {cost_input!r}")
    return cost_input


def objective_value(cost: torch.Tensor, assignment: torch.Tensor, objective: str = "total") -> float:
    """Objective of ``assignment`` under the additive cost model: ``"total"``
    (sum of the chosen costs) or ``"makespan"`` (largest per-worker sum)."""
    if objective not in ("total", "makespan"):
        raise DispatchError(f"objective must be 'total' or 'makespan', got {objective!r}")
    if assignment.numel() == 0:
        return 0.0
    per_sample = cost.gather(1, assignment.view(-1, 1)).view(-1)
    if objective == "makespan":
        per_worker = torch.zeros(cost.shape[1], dtype=cost.dtype).index_add_(
            0, assignment, per_sample
        )
        return float(per_worker.max())
    return float(per_sample.sum())
