"""Lower bounds on the optimal dispatch cost (quality certificates).

``total``: the LP dual of the transportation problem.  For ANY worker prices
``u`` (one per worker),

    LB(u) = sum_s min_w (c[s, w] - u_w) + sum_w B_w u_w  <=  OPT

(weak duality: for a feasible ``x``, ``sum c x = sum_s sum_w x (c - u) +
sum_w B_w u_w >= LB(u)``); the maximum over ``u`` equals ``OPT`` (the LP is
integral).  ``u = 0`` gives the trivial bound "every sample at its cheapest
worker ignoring capacity", which is weak when links are heterogeneous (every
sample wants the fastest link).  :func:`dual_prices` finds good prices with a
few Jacobi sweeps of exact coordinate ascent (each price set to the value that
makes its worker exactly wanted by ``B_w`` samples given the others), ``O(B W)``
per sweep.

``makespan``: for any weights ``lambda >= 0`` with ``sum lambda = 1``,
``max_w load_w >= sum_w lambda_w load_w >= LB_total(lambda_w c[:, w])``; also
``max_w load_w >= load_w >= `` the sum of worker ``w``'s ``B_w`` smallest
costs.  :func:`makespan_lower_bound` takes the best of these.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import numpy as np


def _best_two(r: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: index of the minimum, the minimum, and the second minimum
    (``inf`` with one column).  ``O(B W)``: argmin, then the min of a copy with
    the argmin masked (faster than a partial sort along rows)."""
    b, w = r.shape
    rows = np.arange(b)
    bi = r.argmin(axis=1)
    bv = r[rows, bi]
    if w == 1:
        return bi, bv, np.full(b, np.inf)
    r2 = r.copy()
    r2[rows, bi] = np.inf
    return bi, bv, r2.min(axis=1)


def dual_value(cost: np.ndarray, shares: Sequence[int], u: np.ndarray) -> float:
    """``LB(u)``: a valid lower bound on the optimal total cost for any ``u``."""
    sh = np.asarray(shares, dtype=np.float64)
    return float((cost - u[None, :]).min(axis=1).sum() + float((sh * u).sum()))


def dual_prices(
    cost: np.ndarray, shares: Sequence[int], sweeps: int = 3, u0: Optional[np.ndarray] = None
) -> np.ndarray:
    """Worker prices by Jacobi coordinate ascent on the transportation dual.

    Sweep: with ``m_s^{-w} = min_{w' != w} (c[s, w'] - u_w')``, the dual is
    maximised in ``u_w`` alone by the ``B_w``-th smallest ``c[s, w] - m_s^{-w}``;
    all workers are updated at once (``O(B W)``, vectorised).  The best prices
    seen (highest ``LB``) are returned.
    """
    b, w = cost.shape
    sh = np.asarray(shares, dtype=np.int64)
    shf = sh.astype(np.float64)
    u = np.zeros(w) if u0 is None else np.asarray(u0, dtype=np.float64).copy()
    rows = np.arange(b)
    best_u, best_v = u.copy(), -np.inf
    # workers grouped by share, so that one partition call serves a group
    groups = [(int(k), np.flatnonzero(sh == k)) for k in np.unique(sh)]
    for it in range(max(0, sweeps) + 1):
        r = cost - u[None, :]
        bi, bv, sv = _best_two(r)
        v = float(bv.sum() + (shf * u).sum())  # LB(u), see module docstring
        if v > best_v:
            best_u, best_v = u.copy(), v
        if it == max(0, sweeps):
            break
        # d[s, w] = c[s, w] - min_{w' != w} (c[s, w'] - u_w')
        d = cost - bv[:, None]
        d[rows, bi] = cost[rows, bi] - sv
        dt = np.ascontiguousarray(d.T)
        new = np.empty(w)
        for k, ws in groups:
            block = dt[ws]
            if k <= 0:
                new[ws] = block.min(axis=1)
            elif k >= b:
                new[ws] = block.max(axis=1)
            else:
                new[ws] = np.partition(block, k - 1, axis=1)[:, k - 1]
        bad = ~np.isfinite(new)
        if bad.any():
            new[bad] = 0.0
        u = new
    return best_u


def transport_lower_bound(
    cost: np.ndarray, shares: Sequence[int], sweeps: int = 3
) -> Tuple[float, np.ndarray]:
    """``(LB, prices)`` for the total objective (see module docstring)."""
    u = dual_prices(cost, shares, sweeps)
    return dual_value(cost, shares, u), u


def row_min_bound(cost: np.ndarray) -> float:
    """Each sample at its cheapest worker, capacities ignored (``LB(0)``)."""
    return float(cost.min(axis=1).sum())


def makespan_lower_bound(
    cost: np.ndarray,
    shares: Sequence[int],
    weights: Iterable[np.ndarray] = (),
    sweeps: int = 3,
) -> float:
    """Lower bound on the optimal makespan: per-worker cheapest-``B_w`` sums and
    the weighted-total bounds for the uniform weights, inverse-cost weights and
    any ``weights`` given (each normalised to sum 1)."""
    b, w = cost.shape
    sh = np.asarray(shares, dtype=np.int64)
    lb = 0.0
    for j in range(w):
        k = int(sh[j])
        if k > 0:
            lb = max(lb, float(np.partition(cost[:, j], k - 1)[:k].sum()))
    cands = [np.ones(w)]
    colmean = cost.mean(axis=0)
    if np.all(colmean > 0):
        cands.append(1.0 / colmean)
    cands.extend(np.asarray(x, dtype=np.float64) for x in weights)
    for lam in cands:
        if lam.shape != (w,) or np.any(lam < 0) or lam.sum() <= 0:
            continue
        lam = lam / lam.sum()
        v, _ = transport_lower_bound(cost * lam[None, :], shares, sweeps)
        lb = max(lb, v)
    return lb
