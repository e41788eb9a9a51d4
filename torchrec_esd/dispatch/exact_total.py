"""Exact min-total-cost balanced dispatch (``objective="total"``).

The problem: ``x[s, w] in {0, 1}``, ``sum_w x[s, w] = 1`` (each sample once),
``sum_s x[s, w] = B_w`` (each worker its share), minimise
``sum_{s,w} x[s,w] c[s,w]``.  This is a transportation problem (totally
unimodular, so its LP is integral).  Exact methods (:func:`solve_total`):

- ``"auto"`` (default): dual prices ``u`` (a few Jacobi sweeps of the LP dual,
  ``O(B W)`` each) and the regret greedy on ``c - u``; if it meets the dual
  bound ``LB(u)`` it is optimal.  Otherwise a min-cost flow on the arcs that
  are near-tight under ``u`` (about 2 per sample, :func:`restricted_mcf`),
  then negative-cycle cancelling on the full costs until the certificate
  holds (:func:`cancel_negative_cycles`); the full min-cost flow if that
  takes more than a few cycles.
- ``"cycles"``: negative-cycle cancelling from the greedy.  The exchange
  graph (:func:`exchange_graph`) has one node per worker, arc ``x -> y`` =
  cheapest change of moving a sample from ``x`` to ``y``; it is the residual
  graph of the transportation problem with the sample nodes contracted, so
  the assignment is optimal iff it has no negative cycle.  Bellman-Ford on
  ``W`` nodes (``O(W^3)``, :func:`negative_cycle`) finds one, it is cancelled
  in bulk (``O(B W)``), and at the end the Bellman-Ford potentials are optimal
  dual prices: ``LB(u) = cost`` (up to ``B * tol``) certifies optimality.
- ``"mcf"``: OR-Tools ``SimpleMinCostFlow`` (cost-scaling push-relabel,
  ``O(n^2 m log(n C))`` worst case with ``n`` nodes, ``m`` arcs and ``C``
  the largest integer cost; in practice near-linear in the arcs) on the full
  bipartite network (:func:`mcf_total`).

*Aggregation* (``"mcf"``).  Samples with identical cost rows are merged into
one supply node whose supply is their count (``K <= B`` groups, ``K * W`` arcs
instead of ``B * W``; :mod:`~torchrec_esd.dispatch.row_groups`); the optimum
is unchanged.

*Integer costs and the rounding certificate* (``"mcf"``).  Costs are first
reduced per row (``c[s, w] - min_w c[s, w]``: every sample ships exactly
once, so this shifts every feasible objective by the same constant) and then
scaled by ``scale`` and rounded to integers, with ``scale`` chosen so that
the largest integer cost is at most ``2**31``.  Each chosen entry is off by
at most ``0.5 / scale``, so the returned assignment ``x`` satisfies
``c(x) <= OPT + B / scale`` (it is optimal for the rounded costs, whose
value differs from the true one by at most ``B * 0.5 / scale`` for ``x`` and
for the true optimum).  ``info["rounding_bound_s"]`` reports the bound
(``B / scale``, or ``B * tol`` for the certified paths); it is ~1e-9
relative or smaller on realistic matrices.
"""

from __future__ import annotations

import time
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from ortools.graph.python import min_cost_flow  # imported eagerly: ~0.1-0.5 s on first use

from torchrec_esd.dispatch.base import DispatchError
from torchrec_esd.dispatch.heuristic import greedy_rounds, price_greedy
from torchrec_esd.dispatch.lower_bound import _best_two, dual_prices, dual_value
from torchrec_esd.dispatch.row_groups import expand_group_flows, group_rows

_MAX_INT_COST = 2**31


def exchange_graph(cost: np.ndarray, a: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``D[x, y] = min over samples s on x of (c[s, y] - c[s, x])``: the cheapest
    change of moving one sample from worker ``x`` to worker ``y`` (``inf`` on
    the diagonal).  Also returns the samples sorted by worker, the start and
    the count of every worker's block.  ``O(B W)``."""
    b, w = cost.shape
    order = np.argsort(a, kind="stable")
    cnt = np.bincount(a, minlength=w)
    starts = np.cumsum(cnt) - cnt
    ca = cost[order]
    r = ca - ca[np.arange(b), a[order]][:, None]
    d = np.full((w, w), np.inf)
    nz = cnt > 0
    if nz.any():
        d[nz] = np.minimum.reduceat(r, starts[nz], axis=0)
    np.fill_diagonal(d, np.inf)
    return d, order, starts, cnt


def negative_cycle(d: np.ndarray, tol: float) -> Tuple[Optional[list], np.ndarray]:
    """Bellman-Ford from a virtual source on the ``W``-node exchange graph.

    Returns ``(cycle, phi)``: ``cycle`` lists the workers of a negative cycle in
    arc order (``None`` if there is none, up to ``tol`` per relaxation), and
    ``phi`` the shortest-path potentials, which satisfy
    ``phi[y] <= phi[x] + d[x, y] + tol`` for every arc when there is no cycle.  ``O(W^3)``."""
    w = d.shape[0]
    phi = np.zeros(w)
    pred = np.full(w, -1, dtype=np.int64)
    cols = np.arange(w)
    upd = np.zeros(w, dtype=bool)
    for _ in range(w + 1):
        cand = phi[:, None] + d
        arg = cand.argmin(axis=0)
        best = cand[arg, cols]
        upd = best < phi - tol
        if not upd.any():
            return None, phi
        phi = np.where(upd, best, phi)
        pred = np.where(upd, arg, pred)
    v = int(np.flatnonzero(upd)[0])
    for _ in range(w):
        v = int(pred[v])
    cyc = [v]
    x = int(pred[v])
    while x != v:
        cyc.append(x)
        x = int(pred[x])
    cyc.reverse()  # pred[x] -> x is an arc
    return cyc, phi


def cancel_negative_cycles(
    cost: np.ndarray,
    assignment: np.ndarray,
    max_iters: int = 64,
    rel_tol: float = 1e-12,
    deadline: Optional[float] = None,
) -> Tuple[np.ndarray, Optional[np.ndarray], int, float]:
    """Improve a balanced assignment by cancelling negative cycles of the
    exchange graph until there is none (then it is optimal).

    A simple cycle ``x1 -> x2 -> ... -> x1`` moves one sample from every worker
    of the cycle to the next one (counts unchanged); it is cancelled in bulk:
    the ``t``-th cheapest mover of every arc together, for every ``t`` whose
    summed change is negative.  The assignment is optimal iff the exchange
    graph has no negative cycle (it is the residual graph of the
    transportation problem with the sample nodes contracted).

    Returns ``(assignment, prices, iterations, tol)``: ``prices`` are the
    Bellman-Ford potentials when no negative cycle (beyond ``tol`` per
    relaxation) is left, else ``None``.  With those prices the dual bound
    ``LB(prices) >= cost(assignment) - B * tol`` certifies optimality.
    ``deadline`` (a ``time.perf_counter()`` value) stops early (anytime: every
    cancelled cycle lowers the cost).
    """
    a = assignment.copy()
    b, w = cost.shape
    tol = rel_tol * max(float(np.abs(cost).max()), 1e-300)
    for it in range(max_iters + 1):
        d, order, starts, cnt = exchange_graph(cost, a)
        cyc, phi = negative_cycle(d, tol)
        if cyc is None:
            return a, phi, it, tol
        if it == max_iters or (deadline is not None and time.perf_counter() > deadline):
            break
        k = len(cyc)
        deltas, movers = [], []
        for i in range(k):
            x, y = cyc[i], cyc[(i + 1) % k]
            m = order[starts[x] : starts[x] + cnt[x]]
            dl = cost[m, y] - cost[m, x]
            o = np.argsort(dl, kind="stable")
            deltas.append(dl[o])
            movers.append(m[o])
        n = min(dl.size for dl in deltas)
        tot = np.sum([dl[:n] for dl in deltas], axis=0)
        t = int(np.count_nonzero(tot < -tol))  # non-decreasing: a prefix
        if t == 0:
            break  # not a negative cycle beyond the tolerance: let the caller decide
        for i in range(k):
            a[movers[i][:t]] = cyc[(i + 1) % k]
    return a, None, it, tol


def mcf_total(
    cost: np.ndarray, shares: Sequence[int], aggregate: bool = True
) -> Tuple[np.ndarray, Dict[str, float]]:
    """Exact min-total-cost balanced assignment by OR-Tools min-cost flow over
    the aggregated groups (see module docstring)."""

    t0 = time.perf_counter()
    b, w = cost.shape
    shares_a = np.asarray(shares, dtype=np.int64)
    if w == 1:
        return np.zeros(b, dtype=np.int64), {"groups": 1.0, "arcs": 0.0, "rounding_bound_s": 0.0}
    if aggregate:
        rows, inverse, counts = group_rows(cost)
    else:
        rows, inverse, counts = cost, np.arange(b, dtype=np.int64), np.ones(b, dtype=np.int64)
    t_group = time.perf_counter() - t0
    k = rows.shape[0]
    red = rows - rows.min(axis=1, keepdims=True)
    cmax = float(red.max())
    # keep every integer cost <= 2**31 and the cost-scaling arithmetic
    # (costs * (nodes + 1) * flow) far away from int64 overflow
    cap = min(_MAX_INT_COST, 2**61 // ((k + w + 1) * max(b, 1)))
    scale = cap / cmax if cmax > 0 else 1.0
    icost = np.rint(red * scale).astype(np.int64)
    tails = np.repeat(np.arange(k, dtype=np.int32), w)
    heads = np.tile(np.arange(k, k + w, dtype=np.int32), k)
    caps = np.minimum(counts[:, None], shares_a[None, :]).reshape(-1)
    smcf = min_cost_flow.SimpleMinCostFlow()
    arcs = smcf.add_arcs_with_capacity_and_unit_cost(tails, heads, caps.astype(np.int64), icost.reshape(-1))
    smcf.set_nodes_supplies(
        np.arange(k + w, dtype=np.int32), np.concatenate([counts, -shares_a]).astype(np.int64)
    )
    t1 = time.perf_counter()
    status = smcf.solve()
    t_flow = time.perf_counter() - t1
    if status != smcf.OPTIMAL:
        raise DispatchError(f"min-cost flow failed with status {status}")
    flows = np.asarray(smcf.flows(arcs), dtype=np.int64).reshape(k, w)
    assignment = expand_group_flows(inverse, counts, flows)
    info = {
        "groups": float(k),
        "arcs": float(k * w),
        "scale": float(scale),
        "rounding_bound_s": float(b / scale) if cmax > 0 else 0.0,
        "group_s": t_group,
        "flow_s": t_flow,
    }
    return assignment, info


def restricted_mcf(
    cost: np.ndarray,
    shares: Sequence[int],
    prices: np.ndarray,
    start: np.ndarray,
    quantile: float = 0.5,
    int_cap: int = 2**20,
) -> Tuple[np.ndarray, Dict[str, float]]:
    """Min-cost flow on the arcs that can matter given near-optimal prices.

    Keeps, per sample, the workers whose price-reduced cost
    ``c[s, w] - u_w - min_w' (c[s, w'] - u_w')`` is at most ``delta`` (the
    ``quantile`` of the samples' second-best reduced cost, so about
    ``1 + 2 * quantile`` arcs per sample and always every tie) plus the arc of
    ``start`` (so the restricted problem is feasible).  Its optimum is not
    guaranteed optimal for the full problem: the caller certifies it (or not)
    with :func:`cancel_negative_cycles`, which also repairs the coarse integer
    rounding (``int_cap``) used here to keep the flow solver fast."""
    b, w = cost.shape
    r = cost - prices[None, :]
    _, bv, sv = _best_two(r)
    red = r - bv[:, None]
    delta = float(np.quantile(sv - bv, quantile))
    mask = red <= delta
    mask[np.arange(b), start] = True
    # a sample with a single allowed arc is forced onto it: pre-assign it and
    # give the flow solver only the flexible samples (same optimum, fewer nodes)
    narcs = mask.sum(axis=1)
    a = np.empty(b, dtype=np.int64)
    fixed = narcs == 1
    a[fixed] = mask[fixed].argmax(axis=1)
    rest = np.asarray(shares, dtype=np.int64) - np.bincount(a[fixed], minlength=w)
    flex = np.flatnonzero(~fixed)
    if flex.size == 0:
        return a, {"restricted_arcs": float(b), "flexible": 0.0}
    if (rest < 0).any():  # cannot happen (start is feasible); be safe
        raise DispatchError("restricted min-cost flow: forced samples exceed a share")
    nf = flex.size
    k, j = np.nonzero(mask[flex])
    rv = red[flex[k], j]
    top = float(rv.max())
    scale = int_cap / top if top > 0 else 1.0
    smcf = min_cost_flow.SimpleMinCostFlow()
    arcs = smcf.add_arcs_with_capacity_and_unit_cost(
        k.astype(np.int32), (nf + j).astype(np.int32), np.ones(k.size, np.int64),
        np.rint(rv * scale).astype(np.int64),
    )
    smcf.set_nodes_supplies(
        np.arange(nf + w, dtype=np.int32),
        np.concatenate([np.ones(nf, np.int64), -rest]),
    )
    status = smcf.solve()
    if status != smcf.OPTIMAL:
        raise DispatchError(f"restricted min-cost flow failed with status {status}")
    fl = np.asarray(smcf.flows(arcs))
    a[flex[k[fl > 0]]] = j[fl > 0]
    return a, {"restricted_arcs": float(k.size), "flexible": float(nf)}


def solve_total(
    cost: np.ndarray,
    shares: Sequence[int],
    method: str = "auto",
    aggregate: bool = True,
    max_cancel_iters: int = 64,
    warm_start: Optional[np.ndarray] = None,
    prices: Optional[np.ndarray] = None,
    deadline: Optional[float] = None,
    fallback: bool = True,
) -> Tuple[np.ndarray, Dict[str, float]]:
    """Exact min-total-cost balanced assignment.

    * ``"mcf"``: OR-Tools min-cost flow over the aggregated groups
      (:func:`mcf_total`).
    * ``"cycles"``: from ``warm_start`` (default the price-adjusted regret
      greedy) cancel negative cycles of the ``W``-node exchange graph
      (:func:`cancel_negative_cycles`, ``O(B W + W^3)`` per cycle).
    * ``"auto"``: dual prices (``prices`` or 3 Jacobi sweeps, ``O(B W)``) and
      the greedy on price-reduced costs; if the greedy already meets the dual
      bound it is optimal; otherwise the min-cost flow restricted to the
      near-tight arcs (:func:`restricted_mcf`), then cycle cancelling to
      certify it (usually 0-2 cycles).

    Every answer of ``"cycles"``/``"auto"`` is certified by the dual bound of
    the final Bellman-Ford potentials (``info["lower_bound"]``; ``cost(x) -
    OPT <= info["rounding_bound_s"] = B * tol``, ``tol`` = 1e-12 of the
    largest cost); when no certificate is reached within ``max_cancel_iters``
    cycles (or by ``deadline``) the full min-cost flow decides if ``fallback``,
    else the improved but uncertified assignment is returned with
    ``info["certified"] = 0``.
    """
    if method not in ("auto", "cycles", "mcf"):
        raise DispatchError(f"unknown exact method {method!r}")
    b, w = cost.shape
    if w == 1:
        return np.zeros(b, dtype=np.int64), {
            "rounding_bound_s": 0.0, "lower_bound": float(cost.sum()), "certified": 1.0}
    info: Dict[str, float] = {}
    a = None
    if method in ("auto", "cycles"):
        t0 = time.perf_counter()
        if method == "auto":
            u = dual_prices(cost, shares, 3) if prices is None else np.asarray(prices, dtype=np.float64)
            a = greedy_rounds(cost - u[None, :], shares) if warm_start is None else np.asarray(warm_start, dtype=np.int64)
            tol = 1e-12 * max(float(np.abs(cost).max()), 1e-300)
            lb = dual_value(cost, shares, u)
            info["lower_bound"] = lb
            if float(cost[np.arange(b), a].sum()) - lb <= b * tol:
                info.update(certified=1.0, rounding_bound_s=float(b * tol), exact_path=0.0,
                            exact_s=time.perf_counter() - t0)
                return a, info
            a, rinfo = restricted_mcf(cost, shares, u, a)
            info.update(rinfo)
            iters_cap = min(max_cancel_iters, 16)
        else:
            a = price_greedy(cost, shares)[0] if warm_start is None else np.asarray(warm_start, dtype=np.int64)
            iters_cap = max_cancel_iters
        a, phi, iters, tol = cancel_negative_cycles(cost, a, iters_cap, deadline=deadline)
        info["cycles_iters"] = float(iters)
        info["exact_s"] = time.perf_counter() - t0
        if phi is not None:
            info.update(certified=1.0, rounding_bound_s=float(b * tol),
                        exact_path=1.0 if method == "auto" else 2.0)
            info["lower_bound"] = max(info.get("lower_bound", -np.inf), dual_value(cost, shares, phi))
            return a, info
        if not fallback:
            info["certified"] = 0.0
            return a, info
    t1 = time.perf_counter()
    a, minfo = mcf_total(cost, shares, aggregate)
    info.update(minfo)
    info.update(certified=1.0, exact_path=3.0, mcf_s=time.perf_counter() - t1)
    return a, info
