"""Exact min-makespan balanced dispatch (``objective="makespan"``).

The problem: ``x[s, w] in {0, 1}``, ``sum_w x[s, w] = 1`` (each sample once),
``sum_s x[s, w] = B_w`` (each worker its share), minimise
``max_w sum_s x[s,w] c[s,w]``.  This is scheduling on unrelated machines with
cardinality constraints (``R|card|Cmax``), which is NP-hard (already ``W = 2``
with identical rows contains PARTITION), so no polynomial exact method exists;
a bisection over bounds with max-flow feasibility checks would only be exact
for the *bottleneck* objective ``max_{s,w} x c``, not for sums.

:func:`solve_makespan` first runs the makespan heuristic and the Lagrangian
lower bound (:func:`~torchrec_esd.dispatch.lower_bound.makespan_lower_bound`);
when they meet, the heuristic's answer is proven optimal and nothing else runs
(the usual case on ESD matrices, whose LP relaxation is tight).  Otherwise it
solves a MILP over the aggregated groups (:func:`makespan_milp`; integer
``y[k, w] in [0, n_k]``, continuous ``T``; ``K * W + 1`` variables,
``K + 2 W`` rows; groups as in :mod:`~torchrec_esd.dispatch.row_groups`) with
HiGHS branch-and-cut (``scipy.optimize.milp``): exponential worst case; it
stops at ``time_limit_s`` or at relative MIP gap ``mip_rel_gap``.  Small
instances close in milliseconds, but e.g. continuous random costs with
``B ~ 250`` may not close within seconds: ``info["proven_optimal"]`` and
``info["lower_bound"]`` then say how far from proven the answer is (the
better of the MILP incumbent and the heuristic is returned).

``scipy.optimize`` is imported when a MILP is built (it takes ~0.3-1.5 s to
import and most dispatchers never need it); :func:`preload_milp` imports it
ahead of the first makespan decision.
"""

from __future__ import annotations

import importlib
import time
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from torchrec_esd.dispatch.heuristic import makespan_heuristic
from torchrec_esd.dispatch.lower_bound import makespan_lower_bound
from torchrec_esd.dispatch.row_groups import expand_group_flows, group_rows


def preload_milp() -> None:
    """Import the MILP solver now (scipy.optimize takes ~0.3-1.5 s to import),
    so that a first makespan decision does not pay it."""
    importlib.import_module("scipy.optimize")


def makespan_milp(
    cost: np.ndarray,
    shares: Sequence[int],
    time_limit_s: float = 10.0,
    mip_rel_gap: float = 1e-6,
    aggregate: bool = True,
) -> Tuple[Optional[np.ndarray], Dict[str, float]]:
    """MILP for the min-makespan balanced assignment (see module docstring).

    Returns ``(assignment or None, info)``; ``None`` when HiGHS found no
    incumbent within ``time_limit_s``.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    b, w = cost.shape
    shares_a = np.asarray(shares, dtype=np.float64)
    if aggregate:
        rows, inverse, counts = group_rows(cost)
    else:
        rows, inverse, counts = cost, np.arange(b, dtype=np.int64), np.ones(b, dtype=np.int64)
    k = rows.shape[0]
    nv = k * w + 1  # y[k, w] row-major, then T
    var = np.arange(k * w).reshape(k, w)
    # sum_w y[k, w] = n_k
    r1 = np.repeat(np.arange(k), w)
    c1 = var.reshape(-1)
    # sum_k y[k, w] = B_w
    r2 = k + np.tile(np.arange(w), k)
    c2 = var.reshape(-1)
    # sum_k c[k, w] y[k, w] - T <= 0
    r3 = k + w + np.tile(np.arange(w), k)
    c3 = var.reshape(-1)
    rows_i = np.concatenate([r1, r2, r3, k + w + np.arange(w)])
    cols_i = np.concatenate([c1, c2, c3, np.full(w, nv - 1)])
    vals = np.concatenate(
        [np.ones(k * w), np.ones(k * w), rows.reshape(-1), -np.ones(w)]
    )
    a = coo_matrix((vals, (rows_i, cols_i)), shape=(k + 2 * w, nv)).tocsr()
    lo = np.concatenate([counts.astype(np.float64), shares_a, np.full(w, -np.inf)])
    hi = np.concatenate([counts.astype(np.float64), shares_a, np.zeros(w)])
    obj = np.zeros(nv)
    obj[-1] = 1.0
    integrality = np.ones(nv)
    integrality[-1] = 0
    ub = np.concatenate([np.minimum(counts[:, None], shares_a[None, :].astype(np.int64)).reshape(-1), [np.inf]])
    t0 = time.perf_counter()
    res = milp(
        obj,
        constraints=LinearConstraint(a, lo, hi),
        integrality=integrality,
        bounds=Bounds(np.zeros(nv), ub.astype(np.float64)),
        options={"time_limit": float(time_limit_s), "mip_rel_gap": float(mip_rel_gap), "disp": False},
    )
    dt = time.perf_counter() - t0
    info: Dict[str, float] = {
        "groups": float(k),
        "milp_s": dt,
        "milp_status": float(res.status),
        "proven_optimal": float(res.status == 0),
    }
    bound = getattr(res, "mip_dual_bound", None)
    if bound is not None and np.isfinite(bound):
        info["lower_bound"] = float(bound)
    if res.x is None:
        return None, info
    y = np.rint(res.x[:-1]).astype(np.int64).reshape(k, w)
    # HiGHS works with a feasibility tolerance; rounding must keep the
    # assignment exact, check it
    if not (np.array_equal(y.sum(axis=1), counts) and np.array_equal(y.sum(axis=0), shares_a.astype(np.int64))):
        return None, info
    assignment = expand_group_flows(inverse, counts, y)
    info["mip_gap"] = float(getattr(res, "mip_gap", float("nan")))
    return assignment, info


def solve_makespan(
    c: np.ndarray,
    shares: Sequence[int],
    time_limit_s: float = 10.0,
    mip_rel_gap: float = 1e-6,
    aggregate: bool = True,
    certify_rel_tol: float = 1e-9,
):
    """Exact min-makespan assignment with a certificate.

    1. The makespan heuristic (multiplicative weights + bottleneck swaps) and
       the Lagrangian lower bound (:func:`~torchrec_esd.dispatch.lower_bound.makespan_lower_bound`);
       if they meet (relative ``certify_rel_tol``) the heuristic's answer is
       proven optimal and no MILP is needed (common: the LP relaxation is
       tight on these matrices).
    2. Otherwise the MILP (:func:`makespan_milp`, ``time_limit_s``); the better
       of its incumbent and the heuristic is returned with the best proven
       bound, ``info["proven_optimal"]`` says whether optimality is proven.
    """
    t0 = time.perf_counter()
    h, hinfo = makespan_heuristic(c, shares)
    h_val = _makespan(c, h)
    lb = max(float(hinfo.get("lower_bound", 0.0)), makespan_lower_bound(c, shares))
    info: Dict[str, float] = {"heuristic_makespan": h_val, "heuristic_s": time.perf_counter() - t0}
    if h_val - lb <= certify_rel_tol * max(abs(h_val), 1e-300):
        info.update(lower_bound=lb, proven_optimal=1.0, milp_ran=0.0)
        return torch.from_numpy(h), info
    a, minfo = makespan_milp(c, shares, time_limit_s, mip_rel_gap, aggregate)
    info.update(minfo)
    info["milp_ran"] = 1.0
    info["lower_bound"] = max(lb, float(minfo.get("lower_bound", 0.0)))
    if a is None or _makespan(c, a) > h_val:
        best = h
    else:
        best = a
    val = _makespan(c, best)
    if val - info["lower_bound"] <= max(certify_rel_tol, mip_rel_gap) * max(abs(val), 1e-300):
        info["proven_optimal"] = 1.0
    info["fallback"] = float(best is h)
    return torch.from_numpy(best), info


def _makespan(c: np.ndarray, a: np.ndarray) -> float:
    loads = np.bincount(a, weights=c[np.arange(c.shape[0]), a], minlength=c.shape[1])
    return float(loads.max())
