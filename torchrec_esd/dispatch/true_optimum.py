"""The best possible dispatch of one batch on the TRUE (de-duplicated) cost.

A dispatcher is judged on :class:`~torchrec_esd.cost.DedupCost` (what the
cache directory really moves: a row used by several samples of one worker is
pulled once; a row used by more than one worker costs every user's gradient
push; a dirty copy is pushed by its owner first unless the owner is the sole
user).  This module gives the optimum of that objective, and a proven lower
bound where the optimum is out of reach, so that every dispatcher's gap to the
best possible dispatch can be reported (``benchmarks/dispatch_true_cost.py``).

Model (one 0-1 program, ``objective="total"`` or ``"makespan"``):

* ``x[s, w]``: sample ``s`` on worker ``w``; ``sum_w x[s, w] = 1``,
  ``sum_s x[s, w] = B_w``;
* ``y[x, w] >= x[s, w]`` for every sample ``s`` using row ``x``: ``w`` uses
  the row (a row used by one sample only is that sample's ``x``, no variable);
* ``p[x, w] >= y[x, w] + y[x, w'] - 1`` (``w' != w``): ``w`` pushes its
  gradient of a row another worker also uses;
* ``d[x] >= y[x, w]`` (``w`` not the row's dirty owner): the owner pushes the
  dirty copy;
* total: ``min sum pull[x, w] y + push[x, w] p + owner_push[x] d``;
  makespan: ``min T`` with ``T >=`` every link's share of those terms (the
  owner's push on the owner's link, as :meth:`DedupCost.per_worker`).

Every cost is ``>= 0``, so with integral ``x`` the minimum sets ``y``, ``p``,
``d`` to exactly the indicator they bound, and the program's optimum is the
optimum of :meth:`DedupCost.total` (resp. ``max`` of :meth:`DedupCost.per_worker`).

* :func:`exact_optimum` solves it with OR-Tools CP-SAT.  CP-SAT needs integer
  costs: they are scaled to at most ``2**24`` and rounded; the returned value
  is the float cost of the returned assignment and the returned lower bound is
  CP-SAT's bound minus the largest possible rounding error, so both stay exact
  statements about the float objective.  Exponential worst case; meant for
  ``B <= ~64``, ``W <= 4`` (seconds); ``time_limit_s`` makes it anytime
  (``optimal`` says whether optimality was proven).
* :func:`lp_lower_bound` solves the LP relaxation (HiGHS through
  :func:`scipy.optimize.linprog`; polynomial, ``~(B + U) W`` variables and
  ``~(occurrences + U W) W`` rows): a proven lower bound at any size.
* :func:`brute_force_optimum` enumerates every assignment (tests, ``B <= ~10``).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np

from torchrec_esd.dispatch.base import DispatchError

OBJECTIVES = ("total", "makespan")


@dataclass
class TrueOptimum:
    assignment: Optional[np.ndarray]  # best assignment found (None: none within the limit)
    value: float  # its float de-duplicated cost (inf without an assignment)
    lower_bound: float  # proven lower bound on the optimum
    optimal: bool  # optimality proven (value - lower_bound within the rounding error)
    wall_s: float
    info: Dict[str, float]


def true_value(dedup, assignment, objective: str = "total") -> float:
    """The de-duplicated objective of ``assignment``: total link seconds or
    the slowest link's seconds."""
    _check_objective(objective)
    a = np.asarray(assignment, dtype=np.int64)
    return dedup.total(a) if objective == "total" else float(dedup.per_worker(a).max())


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise DispatchError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def _check_shares(dedup, shares: Sequence[int]) -> np.ndarray:
    sh = np.asarray([int(s) for s in shares], dtype=np.int64)
    if sh.size != dedup.num_workers or (sh < 0).any() or int(sh.sum()) != dedup.num_samples:
        raise DispatchError(
            f"shares {list(shares)} must be {dedup.num_workers} non-negative integers adding up to"
            f" the batch's {dedup.num_samples} samples"
        )
    return sh


class _Program:
    """Variable layout and constraints of the 0-1 program (numpy index arrays).

    Variables: ``x`` (``B W``), then ``y`` of the rows used by >= 2 samples
    (``M W``), ``p`` of those rows (``M W``, only with ``W > 1``), ``d`` of
    the rows with a dirty owner (``D``).  Constraints are all of the form
    ``sum(+-1 * var) <= rhs`` (see :meth:`rows`)."""

    def __init__(self, dedup, shares: np.ndarray) -> None:
        d = dedup
        B, W, U = d.num_samples, d.num_workers, d.num_keys
        self.B, self.W = B, W
        uses = np.bincount(d.occ_k, minlength=U)
        first_sample = np.full(U, -1, dtype=np.int64)
        first_sample[d.occ_k[::-1]] = d.occ_s[::-1]
        multi = np.flatnonzero(uses >= 2)
        single = np.flatnonzero(uses == 1)
        M = multi.size
        nx = B * W
        w_ar = np.arange(W)
        # yidx[k, w]: the variable saying "worker w uses row k"
        yidx = np.full((U, W), -1, dtype=np.int64)
        yidx[single] = first_sample[single][:, None] * W + w_ar[None, :]
        yidx[multi] = nx + np.arange(M)[:, None] * W + w_ar[None, :]
        self.yidx = yidx
        self.multi = multi
        base_p = nx + M * W
        np_ = M * W if W > 1 else 0
        pidx = base_p + np.arange(M)[:, None] * W + w_ar[None, :] if W > 1 else np.zeros((0, W), np.int64)
        base_d = base_p + np_
        has_owner = np.flatnonzero((d.owner >= 0) & (d.owner_push > 0) & (uses > 0))
        didx = base_d + np.arange(has_owner.size)
        self.pidx, self.didx, self.owned = pidx, didx, has_owner
        self.nvar = base_d + has_owner.size
        # constraint rows: lists of (coef, var) with rhs, as COO arrays
        ri, ci, vi, rhs = [], [], [], []
        nrow = 0

        def add(cols: np.ndarray, coefs: np.ndarray, b: np.ndarray) -> None:
            # cols/coefs [n, m]: n rows of m terms each
            nonlocal nrow
            n, m = cols.shape
            ri.append(np.repeat(np.arange(nrow, nrow + n), m))
            ci.append(cols.reshape(-1))
            vi.append(coefs.reshape(-1).astype(np.float64))
            rhs.append(np.broadcast_to(b, (n,)).astype(np.float64).copy())
            nrow += n

        # linking of multi rows: x[s, w] - y[k, w] <= 0 for every occurrence and worker
        is_multi = uses[d.occ_k] >= 2
        os_, ok = d.occ_s[is_multi], d.occ_k[is_multi]
        if os_.size:
            xs = (os_[:, None] * W + w_ar[None, :]).reshape(-1)
            ys = yidx[ok].reshape(-1)
            add(np.stack([xs, ys], 1), np.tile([1.0, -1.0], (xs.size, 1)), np.zeros(1))
        # a row used by more samples than worker w's share cannot be w's alone:
        # y[k, w] - p[k, w] <= 0 (valid cuts; they tighten the LP relaxation)
        n_k = uses[multi]
        if W > 1 and M:
            for w in range(W):
                sel = n_k > shares[w]
                if sel.any():
                    cols = np.stack([yidx[multi[sel], w], pidx[sel, w]], 1)
                    add(cols, np.tile([1.0, -1.0], (int(sel.sum()), 1)), np.zeros(1))
        # shared pushes: y[k, w] + y[k, w'] - p[k, w] <= 1
        if W > 1 and M:
            for w in range(W):
                for v in range(W):
                    if v != w:
                        cols = np.stack([yidx[multi, w], yidx[multi, v], pidx[:, w]], 1)
                        add(cols, np.tile([1.0, 1.0, -1.0], (M, 1)), np.ones(1))
        # dirty owner: y[k, w] - d[k] <= 0 for w != owner
        if has_owner.size:
            ow = d.owner[has_owner]
            for w in range(W):
                sel = ow != w
                if sel.any():
                    cols = np.stack([yidx[has_owner[sel], w], didx[sel]], 1)
                    add(cols, np.tile([1.0, -1.0], (int(sel.sum()), 1)), np.zeros(1))
        self.clauses = nrow  # rows so far are clauses (pos => some neg); the cover rows follow
        # cover: the n_k samples of a row fit in its users' shares,
        # sum_w min(n_k, B_w) y[k, w] >= n_k (only where it is not implied by y >= x)
        tight = np.flatnonzero(n_k > shares.max()) if M else np.zeros(0, np.int64)
        if tight.size:
            caps = np.minimum(n_k[tight][:, None], shares[None, :])
            add(yidx[multi[tight]], -caps, -n_k[tight].astype(np.float64))
        self.A = (
            (np.concatenate(ri), np.concatenate(ci), np.concatenate(vi), np.concatenate(rhs), nrow)
            if ri else (np.zeros(0, np.int64),) * 2 + (np.zeros(0), np.zeros(0), 0)
        )
        # per-worker cost vectors: load_w = costs[w] @ vars
        costs = np.zeros((W, self.nvar))
        for w in range(W):
            used = uses > 0  # a row no sample uses (none in a CostModel's batch) costs nothing
            np.add.at(costs[w], yidx[used, w], d.pull[used, w])
            if W > 1 and M:
                costs[w, pidx[:, w]] += d.push[multi, w]
            if has_owner.size:
                mine = d.owner[has_owner] == w
                costs[w, didx[mine]] += d.owner_push[has_owner[mine]]
        self.costs = costs


def exact_optimum(
    dedup,
    shares: Sequence[int],
    objective: str = "total",
    time_limit_s: float = 60.0,
    hint: Optional[np.ndarray] = None,
    workers: int = 1,
    scale_max: float = float(2**24),
) -> TrueOptimum:
    """Optimum of the de-duplicated objective by CP-SAT (see module docstring).

    ``hint``: an assignment to start from (e.g. the best dispatcher's);
    ``workers``: CP-SAT search threads."""
    from ortools.sat.python import cp_model

    _check_objective(objective)
    sh = _check_shares(dedup, shares)
    t0 = time.perf_counter()
    B, W = dedup.num_samples, dedup.num_workers
    if B == 0 or W == 1:
        a = np.zeros(B, dtype=np.int64)
        v = true_value(dedup, a, objective) if B else 0.0
        return TrueOptimum(a, v, v, True, time.perf_counter() - t0, {"status": 4.0})
    prog = _Program(dedup, sh)
    m = cp_model.CpModel()
    v = [m.NewBoolVar("") for _ in range(prog.nvar)]
    X = np.arange(B * W).reshape(B, W)
    for s in range(B):
        m.AddExactlyOne([v[i] for i in X[s]])
    for w in range(W):
        m.Add(sum(v[i] for i in X[:, w]) == int(sh[w]))
    r, c, val, rhs, nrow = prog.A
    # every constraint is an implication or a 3-literal clause (see _Program)
    order = np.argsort(r, kind="stable")
    r, c, val = r[order], c[order], val[order]
    starts = np.searchsorted(r, np.arange(nrow + 1))
    for i in range(nrow):
        cols, coefs = c[starts[i]:starts[i + 1]], val[starts[i]:starts[i + 1]]
        if i >= prog.clauses:  # a cover row (integer coefficients)
            m.Add(sum(int(a) * v[j] for j, a in zip(cols, coefs)) <= int(rhs[i]))
            continue
        pos = [v[j] for j, a in zip(cols, coefs) if a > 0]
        neg = [v[j] for j, a in zip(cols, coefs) if a < 0]
        # sum(pos) - sum(neg) <= len(pos) - 1  <=>  (all pos) => (some neg)
        m.AddBoolOr([p.Not() for p in pos] + neg)
    cmax = float(prog.costs.max()) if prog.costs.size else 0.0
    scale = scale_max / cmax if cmax > 0 else 1.0
    ic = np.rint(prog.costs * scale).astype(np.int64)
    # |float objective - integer objective / scale| <= (terms of one worker or all) * 0.5 / scale
    nz = prog.costs > 0
    if objective == "total":
        tot = ic.sum(0)
        idx = np.flatnonzero(tot)
        m.Minimize(sum(int(tot[j]) * v[j] for j in idx))
        err = 0.5 * float(nz.sum()) / scale
    else:
        T = m.NewIntVar(0, int(ic.sum(1).max()) + 1, "T")
        for w in range(W):
            idx = np.flatnonzero(ic[w])
            m.Add(sum(int(ic[w, j]) * v[j] for j in idx) <= T)
        m.Minimize(T)
        err = 0.5 * float(nz.sum(1).max()) / scale
    if hint is not None:
        h = np.asarray(hint, dtype=np.int64)
        for s in range(B):
            for w in range(W):
                m.AddHint(v[X[s, w]], int(h[s] == w))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit_s)
    solver.parameters.num_search_workers = int(workers)
    # the full LP relaxation of the clauses in the search (a far better bound than level 1's)
    solver.parameters.linearization_level = 2
    status = solver.Solve(m)
    info = {"status": float(status), "variables": float(prog.nvar), "constraints": float(nrow + B + W),
            "scale": scale, "rounding_error_bound": err}
    bound = float(solver.BestObjectiveBound()) / scale - err
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        a = np.array([[solver.BooleanValue(v[X[s, w]]) for w in range(W)] for s in range(B)]).argmax(1)
        value = true_value(dedup, a, objective)
        optimal = status == cp_model.OPTIMAL
        bound = max(0.0, bound if not optimal else min(bound, value))
        return TrueOptimum(a.astype(np.int64), value, bound, optimal, time.perf_counter() - t0, info)
    return TrueOptimum(None, float("inf"), max(0.0, bound), False, time.perf_counter() - t0, info)


def lp_lower_bound(dedup, shares: Sequence[int], objective: str = "total") -> TrueOptimum:
    """Proven lower bound on the optimum: the LP relaxation of the program
    (HiGHS dual simplex / IPM).  ``value`` is ``inf`` (no assignment)."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    _check_objective(objective)
    sh = _check_shares(dedup, shares)
    t0 = time.perf_counter()
    B, W = dedup.num_samples, dedup.num_workers
    if B == 0 or W == 1:
        v = true_value(dedup, np.zeros(B, dtype=np.int64), objective) if B else 0.0
        return TrueOptimum(None, float("inf"), v, False, time.perf_counter() - t0, {})
    prog = _Program(dedup, sh)
    r, c, val, rhs, nrow = prog.A
    n = prog.nvar + (objective == "makespan")
    X = np.arange(B * W).reshape(B, W)
    er = np.concatenate([np.repeat(np.arange(B), W), B + np.tile(np.arange(W), B)])
    ec = np.concatenate([X.reshape(-1), X.reshape(-1)])
    A_eq = coo_matrix((np.ones(er.size), (er, ec)), shape=(B + W, n)).tocsr()
    b_eq = np.concatenate([np.ones(B), sh.astype(np.float64)])
    if objective == "total":
        obj = prog.costs.sum(0)
        A_ub = coo_matrix((val, (r, c)), shape=(nrow, n)).tocsr()
        b_ub = rhs
    else:
        obj = np.zeros(n)
        obj[-1] = 1.0
        lw = coo_matrix(prog.costs)
        lr = np.concatenate([r, nrow + lw.row, nrow + np.arange(W)])
        lc = np.concatenate([c, lw.col, np.full(W, n - 1)])
        lv = np.concatenate([val, lw.data, -np.ones(W)])
        A_ub = coo_matrix((lv, (lr, lc)), shape=(nrow + W, n)).tocsr()
        b_ub = np.concatenate([rhs, np.zeros(W)])
    bounds = np.zeros((n, 2))
    bounds[:, 1] = 1.0
    if objective == "makespan":
        bounds[-1, 1] = np.inf
    res = linprog(obj, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=bounds, method="highs-ipm")
    info = {"status": float(res.status), "variables": float(n), "constraints": float(A_ub.shape[0] + B + W)}
    if res.status != 0:
        raise DispatchError(f"LP relaxation failed: {res.message}")
    # HiGHS solves the LP to optimality (primal = dual objective within its 1e-7
    # feasibility / optimality tolerances): its optimum bounds the 0-1 optimum from below
    lb = float(res.fun)
    return TrueOptimum(None, float("inf"), max(0.0, lb), False, time.perf_counter() - t0, info)


def brute_force_optimum(dedup, shares: Sequence[int], objective: str = "total") -> TrueOptimum:
    """Every assignment with the given shares (``B! / prod B_w!`` of them)."""
    _check_objective(objective)
    sh = _check_shares(dedup, shares)
    t0 = time.perf_counter()
    best, best_a = float("inf"), None
    for a in _assignments(dedup.num_samples, [int(x) for x in sh]):
        v = true_value(dedup, a, objective)
        if v < best:
            best, best_a = v, a
    return TrueOptimum(best_a, best, best, True, time.perf_counter() - t0, {})


def _assignments(B: int, shares: Sequence[int]):
    """Every assignment of ``B`` samples with the given shares (combinations
    of positions worker by worker)."""
    out = np.zeros(B, dtype=np.int64)

    def rec(w: int, free: list):
        if w == len(shares) - 1:
            out[free] = w
            yield out.copy()
            return
        for pos in itertools.combinations(free, shares[w]):
            out[list(pos)] = w
            rest = [s for s in free if s not in pos]
            yield from rec(w + 1, rest)

    yield from rec(0, list(range(B)))
