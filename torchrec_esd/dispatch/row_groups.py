"""Aggregation of interchangeable samples for the exact dispatch solvers.

Samples with bit-identical cost rows are interchangeable, so the exact solvers
(:func:`~torchrec_esd.dispatch.exact_total.mcf_total`,
:func:`~torchrec_esd.dispatch.exact_makespan.makespan_milp`) merge them into
one group whose size is their count (``K <= B`` groups): :func:`group_rows`
builds the groups, :func:`expand_group_flows` turns a per-group answer back
into a per-sample assignment.  The optimum is unchanged: a flow (or integer
allocation) over the groups splits back into a 0/1 assignment, integrality is
kept because group sizes and shares are integers.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np


def group_rows(cost: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge samples with bit-identical cost rows.

    Returns ``(rows [K, W], inverse [B], counts [K])`` with
    ``rows[inverse] == cost``.
    """
    b, w = cost.shape
    if b <= 1:
        return cost.copy(), np.zeros(b, dtype=np.int64), np.ones(b, dtype=np.int64)
    c = np.ascontiguousarray(cost)
    # a row-wise random projection orders rows so that equal rows are adjacent;
    # equality is then checked exactly (a projection collision only splits a
    # group that could have been merged, it never merges different rows).
    rng = np.random.default_rng(12345)
    # (elementwise product + row sum, not BLAS gemv, so that bit-identical rows
    # take the same arithmetic path and get bit-identical keys)
    proj = (c * rng.standard_normal(w)[None, :]).sum(axis=1)
    order = np.argsort(proj, kind="stable")
    sc = c[order]
    new = np.empty(b, dtype=bool)
    new[0] = True
    new[1:] = np.any(sc[1:] != sc[:-1], axis=1)
    gid_sorted = np.cumsum(new) - 1
    inverse = np.empty(b, dtype=np.int64)
    inverse[order] = gid_sorted
    rows = sc[new]
    counts = np.bincount(gid_sorted, minlength=rows.shape[0]).astype(np.int64)
    return rows, inverse, counts


def expand_group_flows(inverse: np.ndarray, counts: np.ndarray, flows: np.ndarray) -> np.ndarray:
    """Turn per-group flows ``flows[k, w]`` (rows summing to ``counts``) into a
    per-sample assignment: the samples of group ``k`` (in index order) go to
    worker 0 for the first ``flows[k, 0]``, then worker 1, and so on."""
    b = inverse.shape[0]
    order = np.argsort(inverse, kind="stable")
    starts = np.zeros(counts.shape[0], dtype=np.int64)
    starts[1:] = np.cumsum(counts)[:-1]
    g = inverse[order]
    rank = np.arange(b, dtype=np.int64) - starts[g]
    cum = np.cumsum(flows, axis=1)  # [K, W]
    worker_sorted = (cum[g] <= rank[:, None]).sum(axis=1)
    out = np.empty(b, dtype=np.int64)
    out[order] = worker_sorted
    return out
