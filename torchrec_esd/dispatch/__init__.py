"""Sample dispatchers: one interface (:class:`Dispatcher`), several solvers.

============ ============================================================
name         class
============ ============================================================
random       :class:`RandomDispatcher` (seeded)
round_robin  :class:`RoundRobinDispatcher` (vanilla TorchRec slices)
laia         :class:`LaiaDispatcher` (greedy by cache hits, needs ``aux={"hits": ...}``)
heuristic    :class:`HeuristicDispatcher` (regret greedy + local search)
optimal      :class:`OptimalDispatcher` (exact: cycle cancelling / min-cost flow, MILP)
hybrid       :class:`HybridDis` (heuristic, exact when it pays and fits a budget)
shares       :class:`PerBatchShares` (shares decided per batch from compute rates
             ``samples_per_s`` and predicted link times, around an inner dispatcher)
dedup_search :class:`DedupSearchDispatcher` (de-duplicated true cost: amortised start +
             exact local search; needs ``aux={"dedup": CostModel.dedup_cost(...)}``);
             also registered as ``esd``, the name benchmarks and saved configs use
grouped      :class:`GroupedDispatcher` (samples to worker groups, then ``inner=`` per group
             of ``group_size=`` workers: decision time ~linear in B and W)
============ ============================================================
"""

from torchrec_esd.dispatch.base import (
    Dispatcher,
    DispatchError,
    DispatchResult,
    check_assignment,
    check_problem,
    objective_value,
)
from torchrec_esd.dispatch.dedup_search import DedupSearchDispatcher, refine
from torchrec_esd.dispatch.baselines import LaiaDispatcher, RandomDispatcher, RoundRobinDispatcher
from torchrec_esd.dispatch.grouped import GroupedDispatcher
from torchrec_esd.dispatch.heuristic import HeuristicDispatcher
from torchrec_esd.dispatch.hybrid import HybridDis
from torchrec_esd.dispatch.lower_bound import (
    dual_prices,
    dual_value,
    makespan_lower_bound,
    row_min_bound,
    transport_lower_bound,
)
from torchrec_esd.dispatch.optimal import OptimalDispatcher
from torchrec_esd.dispatch.shares import PerBatchShares

DISPATCHERS = {
    "random": RandomDispatcher,
    "round_robin": RoundRobinDispatcher,
    "laia": LaiaDispatcher,
    "heuristic": HeuristicDispatcher,
    "optimal": OptimalDispatcher,
    "hybrid": HybridDis,
    "dedup_search": DedupSearchDispatcher,
    "esd": DedupSearchDispatcher,  # the name of the paper's method in benchmarks and configs
    "grouped": GroupedDispatcher,  # inner= dispatcher per group of group_size= workers
    "shares": PerBatchShares,  # an inner dispatcher at shares decided per batch (needs samples_per_s)
}


def make_dispatcher(name: str, **kw) -> Dispatcher:
    """Build a dispatcher by name (``random``, ``round_robin``, ``laia``,
    ``heuristic``, ``optimal``, ``hybrid``, ``dedup_search`` alias ``esd``); keyword arguments go to its class
    (e.g. ``objective="makespan"``, ``seed=1``, ``time_budget_ms=20``)."""
    if name not in DISPATCHERS:
        raise DispatchError(f"unknown dispatcher {name!r}; choose one of {sorted(DISPATCHERS)}")
    return DISPATCHERS[name](**kw)


def proven_lower_bound(cost, shares, objective: str = "total") -> float:
    """Proven lower bound on the optimal objective of ``cost`` (a [B, W]
    tensor or array) with ``shares``: the quality certificate of any answer."""
    import numpy as np
    import torch

    c = cost.detach().cpu().double().numpy() if isinstance(cost, torch.Tensor) else np.asarray(cost, dtype=np.float64)
    sh = [int(s) for s in shares]
    active = [w for w, s in enumerate(sh) if s > 0]
    c = np.ascontiguousarray(c[:, active])
    sh = [sh[w] for w in active]
    if c.shape[0] == 0:
        return 0.0
    if objective == "total":
        return transport_lower_bound(c, sh)[0]
    if objective == "makespan":
        return makespan_lower_bound(c, sh)
    raise DispatchError(f"objective must be 'total' or 'makespan', got {objective!r}")


__all__ = [
    "DISPATCHERS",
    "DispatchError",
    "DispatchResult",
    "Dispatcher",
    "DedupSearchDispatcher",
    "GroupedDispatcher",
    "HeuristicDispatcher",
    "HybridDis",
    "LaiaDispatcher",
    "OptimalDispatcher",
    "PerBatchShares",
    "RandomDispatcher",
    "RoundRobinDispatcher",
    "check_assignment",
    "check_problem",
    "dual_prices",
    "dual_value",
    "proven_lower_bound",
    "make_dispatcher",
    "makespan_lower_bound",
    "objective_value",
    "refine",
    "row_min_bound",
    "transport_lower_bound",
]
