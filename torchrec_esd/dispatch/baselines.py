"""Baseline dispatchers, in the same code path as ESD's.

* ``random``: a seeded random balanced assignment (a new draw every batch).
* ``round_robin`` (vanilla): what TorchRec data-parallel loading does: worker
  ``w`` trains the contiguous slice of the global batch that it reads itself
  (``shares`` consecutive samples each, in worker order); ignores costs.
* ``laia``: LAIA/Herald-style greedy by cache-hit count, ignoring bandwidth:
  each sample goes to the worker holding the most of its ids (with room left);
  ties are broken at random (seeded) so that no worker is favoured by its
  index.  Needs the hit-count matrix (``CostModel.hit_matrix``), passed as
  ``assign(cost, shares, aux={"hits": hits})``; ``cost`` is only used to
  report the objective of the chosen assignment.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from torchrec_esd.dispatch.base import Dispatcher, DispatchError
from torchrec_esd.dispatch.heuristic import greedy_rounds


def _check_objective(objective: str) -> str:
    if objective not in ("total", "makespan"):
        raise DispatchError(f"objective must be 'total' or 'makespan', got {objective!r}")
    return objective


def contiguous_slices(shares: Sequence[int]) -> torch.Tensor:
    """``[0]*B_0 + [1]*B_1 + ...``: worker ``w`` gets its own slice."""
    return torch.repeat_interleave(
        torch.arange(len(shares), dtype=torch.int64), torch.tensor(list(shares), dtype=torch.int64)
    )


class RandomDispatcher(Dispatcher):
    name = "random"
    needs_cost = False  # the cost matrix only serves to report the objective

    def __init__(self, seed: int = 0, objective: str = "total") -> None:
        self.objective = _check_objective(objective)
        self._gen = torch.Generator().manual_seed(int(seed))

    def _solve(self, cost: torch.Tensor, shares: Sequence[int]):
        b = cost.shape[0]
        perm = torch.randperm(b, generator=self._gen)
        out = torch.empty(b, dtype=torch.int64)
        out[perm] = contiguous_slices(shares)
        return out, {}


class RoundRobinDispatcher(Dispatcher):
    """Vanilla TorchRec: contiguous per-rank slices of the global batch."""

    name = "round_robin"
    needs_cost = False

    def __init__(self, objective: str = "total") -> None:
        self.objective = _check_objective(objective)

    def _solve(self, cost: torch.Tensor, shares: Sequence[int]):
        return contiguous_slices(shares), {}


class LaiaDispatcher(Dispatcher):
    """Greedy by cache-hit count (LAIA-style), bandwidth-blind.

    Samples are taken in batch order in rounds: every unplaced sample asks for
    its open worker with the most hits, a worker with more requests than room
    keeps the earliest samples, full workers close (a vectorised form of the
    sequential greedy, at most ``W`` rounds).
    """

    name = "laia"
    needs_hits = True  # pass aux={"hits": CostModel.hit_matrix(kjt, views)}
    # LAIA reads hit counts only: decide() builds no cost matrix for it (the additive matrix
    # it built to report an objective took ~4.7 of its ~7 ms inputs per 512-sample batch on
    # the hetero mix, CPU the baseline spent on the dispatching worker); assign() on a
    # matrix still reports that matrix's objective
    needs_cost = False

    def __init__(self, seed: int = 0, objective: str = "total") -> None:
        self.objective = _check_objective(objective)
        self._rng = np.random.default_rng(int(seed))

    def _solve(self, cost: torch.Tensor, shares: Sequence[int], hits: Optional[torch.Tensor] = None):
        if hits is None:
            raise DispatchError(
                "laia dispatch needs the cache-hit matrix: assign(cost, shares,"
                " aux={'hits': CostModel.hit_matrix(kjt, views)})"
            )
        h = hits.to(torch.float64).numpy()
        if not np.isfinite(h).all():
            raise DispatchError("laia: the hit matrix has non-finite entries")
        b = h.shape[0]
        # random tie-break below the integer resolution of hit counts
        score = -(h + 0.5 * self._rng.random(h.shape))
        a = greedy_rounds(score, shares, priority=-np.arange(b, dtype=np.float64))
        return torch.from_numpy(a), {}
