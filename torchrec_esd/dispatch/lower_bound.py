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
    """Per row: index of the minimum, the minimum, and the second minimum."""
    b, w = r.shape
    if w == 1:
        return np.zeros(b, dtype=np.int64), r[:, 0].copy(), np.full(b, np.inf)
    p = np.argpartition(r, 1, axis=1)[:, :2]
    v = np.take_along_axis(r, p, axis=1)
    swap = v[:, 0] > v[:, 1]
    best_i = np.where(swap, p[:, 1], p[:, 0])
    best_v = np.minimum(v[:, 0], v[:, 1])
    second_v = np.maximum(v[:, 0], v[:, 1])
    return best_i, best_v, second_v


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
    u = np.zeros(w) if u0 is None else np.asarray(u0, dtype=np.float64).copy()
    best_u, best_v = u.copy(), dual_value(cost, shares, u)
    cols = np.arange(w)
    for _ in range(max(0, sweeps)):
        r = cost - u[None, :]
        bi, bv, sv = _best_two(r)
        m = np.where(bi[:, None] == cols[None, :], sv[:, None], bv[:, None])
        d = cost - m
        new = np.empty(w)
        for j in range(w):
            k = int(sh[j])
            col = d[:, j]
            if not np.isfinite(col).any():
                new[j] = 0.0
            elif k <= 0:
                new[j] = float(col.min())
            elif k >= b:
                new[j] = float(col.max()) if np.isfinite(col.max()) else float(col[np.isfinite(col)].max())
            else:
                new[j] = float(np.partition(col, k - 1)[k - 1])
        u = new
        v = dual_value(cost, shares, u)
        if v > best_v:
            best_u, best_v = u.copy(), v
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
