"""The de-duplicated transmission cost of one batch as a function of an
assignment (:class:`DedupCost`), which the ``esd`` dispatcher optimises and the
true-cost benchmark evaluates; built by
:meth:`~torchrec_esd.cost.model.CostModel.dedup_cost`."""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from torchrec_esd import ops


def segment_sum(rows: np.ndarray, segment: np.ndarray, num_segments: int) -> np.ndarray:
    """``out[j] = sum of rows[i] with segment[i] == j`` (float64 ``[num_segments, W]``)."""
    out = torch.zeros(num_segments, rows.shape[1], dtype=torch.float64)
    if segment.size:
        out.index_add_(0, torch.from_numpy(np.ascontiguousarray(segment, dtype=np.int64)),
                       torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float64)))
    return out.numpy()


def per_sample_sum(rows: np.ndarray, sample_ptr: np.ndarray) -> np.ndarray:
    """``out[s] = rows[sample_ptr[s]:sample_ptr[s + 1]].sum(0)`` (float64
    ``[B, W]``) for rows sorted by sample: one ``np.add.reduceat`` over the
    non-empty segments, O(len(rows) W), about 4x faster than
    :func:`segment_sum`'s scatter on a batch's occurrences."""
    B = sample_ptr.size - 1
    out = np.zeros((B, rows.shape[1]), dtype=np.float64)
    nonempty = np.flatnonzero(sample_ptr[1:] > sample_ptr[:-1])
    if nonempty.size:
        out[nonempty] = np.add.reduceat(rows, sample_ptr[nonempty], axis=0)
    return out


def amortise_factors(uses: np.ndarray, shares: Sequence[float], num_samples: int):
    """``(m, p)`` float64 ``[len(uses), W]`` of :meth:`DedupCost.amortised_matrix`
    for rows used by ``uses`` samples of the batch (``num_samples``): ``m``
    the expected samples sharing the row on each worker, ``p`` the probability
    that some other sample uses it elsewhere.  Elementwise per (row, worker),
    so a table over ``uses = 0..B`` (:func:`amortise_table`) gives, bit for
    bit, the rows' values (numpy's ``**`` is not the C library's pow: the C++
    start reads these tables).  O(len(uses) W)."""
    B = num_samples
    sh = np.asarray(shares, dtype=np.float64).reshape(1, -1)
    n = np.asarray(uses, dtype=np.float64)[:, None]
    m = 1.0 + (n - 1.0) * np.maximum(sh - 1.0, 0.0) / max(1, B - 1)
    p_shared = 1.0 - (sh / max(1, B)) ** np.maximum(n - 1.0, 0.0)
    return m, p_shared


@functools.lru_cache(maxsize=32)
def amortise_table(shares: Tuple[int, ...], num_samples: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`amortise_factors` for ``uses = 0..num_samples`` as float64
    ``[B + 1, W]`` tensors (what :func:`torchrec_esd.ops.dedup_start` reads;
    cached: the shares rarely change between batches, do not modify)."""
    m, p = amortise_factors(np.arange(num_samples + 1, dtype=np.float64), shares, num_samples)
    return torch.from_numpy(np.ascontiguousarray(m)), torch.from_numpy(np.ascontiguousarray(p))


def amortised_key_costs(pull: np.ndarray, push: np.ndarray, uses: np.ndarray, has_owner: np.ndarray,
                        owner_col: np.ndarray, owner_push: np.ndarray, shares: Sequence[float],
                        num_samples: int) -> np.ndarray:
    """``[U, W]`` per-row terms of :meth:`DedupCost.amortised_matrix` (see
    there) for the rows and worker columns given: ``pull``/``push`` ``[U, W]``,
    ``uses`` ``[U]`` samples of the whole batch (``num_samples``) using each
    row, ``has_owner`` ``[U]`` whether some worker holds the row dirty,
    ``owner_col`` ``[U]`` the owner's column among these workers (``-1``: none
    or outside them), ``owner_push`` ``[U]``, ``shares`` the columns' shares.
    Elementwise per ``(row, column)``: a column subset of the rows' full
    ``[U, W]`` gives exactly that subset of the full result (what the grouped
    dispatcher's per-group inputs rely on).  O(U W)."""
    W = pull.shape[1]
    m, p_shared = amortise_factors(uses, shares, num_samples)
    h = (pull + p_shared * push) / m
    if has_owner.any():
        share = owner_push / np.maximum(uses, 1.0)
        extra = np.repeat(share[:, None], W, axis=1)
        rows = np.flatnonzero(owner_col >= 0)
        extra[rows, owner_col[rows]] *= p_shared[rows, owner_col[rows]]
        h = h + np.where(has_owner[:, None], extra, 0.0)
    return h


class DedupCost:
    """De-duplicated transmission cost of one batch as a function of an assignment.

    The cost :meth:`CostModel.measure` reports is separable over the batch's
    DISTINCT rows: a row ``x`` costs what the set ``U_x`` of workers whose
    samples use it causes, whatever the number of samples behind each worker.
    With the cache state of the batch (``pull[x, w]``: ``0`` fresh,
    ``rt_w`` outdated (update-pull), ``rt_w + e_w`` not cached (miss-pull plus
    the expected miss-push of the row it evicts); ``push[x, w] = rt_w``; the
    worker ``o_x`` holding ``x`` dirty, if any):

    ``f_x(U) = sum_{w in U} pull[x, w]``
    ``      + [|U| > 1] * sum_{w in U} push[x, w]``  (every user pushes its gradient
    to the PS: staleness-0 synchronisation of a shared row; a sole user
    updates its cached copy locally)
    ``      + [o_x exists and U != {o_x}] * rt_{o_x}``  (the dirty copy is pushed
    first, on ``o_x``'s link).

    The total is ``sum_x f_x(U_x)``; :meth:`per_worker` attributes every term
    to the link that carries it.  Compared with :meth:`CostModel.measure`, the
    only approximation is the eviction push (expected dirty fraction per miss,
    as in the matrix) and that misses beyond a full cache's free slots are
    treated like cached ones (``measure`` counts a gradient push for such
    transient rows of sole users).

    Arrays (numpy): ``occ_s``/``occ_k`` the distinct (sample, row) pairs
    (sorted by sample), ``pull``/``push`` ``[U, W]``, ``owner`` ``[U]``
    (``-1``: none), ``owner_push`` ``[U]`` (``rt`` of the owner's link).
    """

    def __init__(self, num_samples, num_workers, occ_s, occ_k, pull, push, owner, owner_push):
        self.num_samples = int(num_samples)
        self.num_workers = int(num_workers)
        self.occ_s = np.ascontiguousarray(occ_s, dtype=np.int64)
        self.occ_k = np.ascontiguousarray(occ_k, dtype=np.int64)
        self.pull = np.ascontiguousarray(pull, dtype=np.float64)
        self.push = np.ascontiguousarray(push, dtype=np.float64)
        self.owner = np.ascontiguousarray(owner, dtype=np.int64)
        self.owner_push = np.ascontiguousarray(owner_push, dtype=np.float64)
        self.num_keys = self.pull.shape[0]
        if self.pull.shape != (self.num_keys, self.num_workers) or self.push.shape != self.pull.shape:
            raise ValueError("DedupCost: pull and push must be [num_keys, num_workers]")
        if self.occ_s.shape != self.occ_k.shape:
            raise ValueError("DedupCost: occ_s and occ_k must have the same length")
        # samples using each row (the batch frequency used by amortised costs)
        self.uses = np.bincount(self.occ_k, minlength=self.num_keys).astype(np.float64)
        self._index = None
        self._sample_ptr = None

    def sample_ptr(self) -> np.ndarray:
        """``[B + 1]``: the occurrences of sample ``s`` are
        ``sample_ptr[s]:sample_ptr[s + 1]`` (computed once)."""
        if self._sample_ptr is None:
            self._sample_ptr = np.searchsorted(self.occ_s, np.arange(self.num_samples + 1))
        return self._sample_ptr

    def occurrence_index(self):
        """``(sample_ptr, by_key, key_ptr)``: the occurrences of sample ``s``
        are ``sample_ptr[s]:sample_ptr[s + 1]``; those of row ``x`` are
        ``by_key[key_ptr[x]:key_ptr[x + 1]]`` (computed once)."""
        if self._index is None:
            by_key = np.argsort(self.occ_k, kind="stable")
            self._index = (
                self.sample_ptr(),
                by_key,
                np.searchsorted(self.occ_k[by_key], np.arange(self.num_keys + 1)),
            )
        return self._index

    # ----------------------------------------------------------- transforms
    def restrict(self, workers) -> "DedupCost":
        """The same batch on a subset of the workers (e.g. those with a
        positive share): a row's dirty owner outside the subset still pushes
        it whenever it is used (its link is not part of the problem)."""
        idx = np.asarray(list(workers), dtype=np.int64)
        remap = np.full(self.num_workers, -1, dtype=np.int64)
        remap[idx] = np.arange(idx.size)
        owner = np.where(self.owner >= 0, remap[np.maximum(self.owner, 0)], -1)
        # an owner outside the subset always pushes: a constant, kept out
        owner_push = np.where(owner >= 0, self.owner_push, 0.0)
        return DedupCost(self.num_samples, idx.size, self.occ_s, self.occ_k, self.pull[:, idx],
                         self.push[:, idx], owner, owner_push)

    def scaled(self, weights) -> "DedupCost":
        """Every worker's link costs times ``weights[w]`` (e.g. makespan multipliers)."""
        lam = np.asarray(weights, dtype=np.float64).reshape(1, -1)
        op = self.owner_push * np.where(self.owner >= 0, lam[0, np.maximum(self.owner, 0)], 0.0)
        out = DedupCost(self.num_samples, self.num_workers, self.occ_s, self.occ_k,
                        self.pull * lam, self.push * lam, self.owner, op)
        out._index, out._sample_ptr = self._index, self._sample_ptr  # same occurrences
        return out

    # ----------------------------------------------------------- evaluation
    def counts(self, assignment) -> np.ndarray:
        """``[U, W]``: samples of each worker that use each row."""
        a = np.asarray(assignment, dtype=np.int64)
        W = self.num_workers
        return np.bincount(self.occ_k * W + a[self.occ_s], minlength=self.num_keys * W).reshape(
            self.num_keys, W
        )

    def key_state(self, used: np.ndarray, keys: Optional[np.ndarray] = None):
        """Per row, given its user set ``used`` (bool ``[n, W]``, rows ``keys``
        or all): ``(n_users, pull_sum, push_sum, cost)`` where ``push_sum``
        sums every user's push whether or not the row is shared and ``cost``
        is ``f_x(U_x)``."""
        k = np.arange(self.num_keys) if keys is None else keys
        n_users = used.sum(1)
        pull = (self.pull[k] * used).sum(1)
        push = (self.push[k] * used).sum(1)
        owner = self.owner[k]
        only_owner = (n_users == 1) & used[np.arange(k.size), np.maximum(owner, 0)]
        dirty = np.where((owner >= 0) & ~only_owner & (n_users > 0), self.owner_push[k], 0.0)
        return n_users, pull, push, pull + np.where(n_users > 1, push, 0.0) + dirty

    def key_costs(self, counts: np.ndarray) -> np.ndarray:
        """``f_x(U_x)`` of every row given the per-worker use counts."""
        return self.key_state(counts > 0)[3]

    def total(self, assignment) -> float:
        """Predicted de-duplicated link seconds of ``assignment`` (sum over links)."""
        return float(self.key_costs(self.counts(assignment)).sum())

    def per_worker(self, assignment) -> np.ndarray:
        """``[W]`` predicted link seconds of every worker (its pulls, its
        gradient pushes, and the dirty rows it pushes): one C++ pass
        (:func:`torchrec_esd.ops.dedup_per_worker`) where built, else
        :meth:`per_worker_reference`, summed in the same order."""
        if not ops.HAS_DEDUP_PER_WORKER:
            return self.per_worker_reference(assignment)
        a = torch.from_numpy(np.ascontiguousarray(assignment, dtype=np.int64))
        arrays = (self.occ_s, self.occ_k, self.pull, self.push, self.owner, self.owner_push)
        return ops.dedup_per_worker(*(torch.from_numpy(v) for v in arrays), a).numpy()

    def per_worker_reference(self, assignment) -> np.ndarray:
        """:meth:`per_worker` in numpy (the kernel's reference)."""
        used = self.counts(assignment) > 0
        n_users = used.sum(1)
        out = (self.pull * used + np.where((n_users > 1)[:, None], self.push * used, 0.0)).sum(0)
        has = self.owner >= 0
        only_owner = (n_users == 1) & used[np.arange(self.num_keys), np.maximum(self.owner, 0)]
        pushed = has & ~only_owner & (n_users > 0)
        out += np.bincount(self.owner[pushed], weights=self.owner_push[pushed], minlength=self.num_workers)
        return out

    def occurrence_deltas(self, occ: np.ndarray, assignment, counts: np.ndarray, state=None) -> np.ndarray:
        """``[len(occ), W]``: change of row ``occ_k[i]``'s cost when sample
        ``occ_s[i]`` alone moves to each worker (``0`` for its own worker);
        ``state`` is :meth:`key_state` of all rows (computed if not given)."""
        a = np.asarray(assignment, dtype=np.int64)
        W = self.num_workers
        used = counts > 0
        n_users, pull, push, f = self.key_state(used) if state is None else state
        k, s = self.occ_k[occ], self.occ_s[occ]
        w = a[s]
        r = np.arange(k.size)
        drop = counts[k, w] == 1
        add = ~used[k]  # [n, W]
        pk, qk = self.pull[k], self.push[k]
        dr = drop.astype(np.float64)[:, None]
        n2 = n_users[k][:, None] - drop[:, None] + add
        pull2 = pull[k][:, None] - dr * pk[r, w][:, None] + add * pk
        push2 = push[k][:, None] - dr * qk[r, w][:, None] + add * qk
        ok = self.owner[k]
        # with |U'| == 1 the sole user is v (if w stays, v joins: |U'| >= 2)
        only_owner = (n2 == 1) & (np.arange(W)[None, :] == ok[:, None])
        f2 = pull2 + np.where(n2 > 1, push2, 0.0) + np.where(
            (ok >= 0)[:, None] & ~only_owner, self.owner_push[k][:, None], 0.0
        )
        d = f2 - f[k][:, None]
        d[r, w] = 0.0
        return d

    def movable(self, occ: np.ndarray, assignment, counts: np.ndarray, n_users: np.ndarray) -> np.ndarray:
        """Occurrences whose row can change its user set when their sample
        moves (its worker's only user of the row, or a worker without it);
        the others have a zero :meth:`occurrence_deltas` row."""
        a = np.asarray(assignment, dtype=np.int64)
        k = self.occ_k[occ]
        return (counts[k, a[self.occ_s[occ]]] == 1) | (n_users[k] < self.num_workers)

    def move_deltas(self, assignment, counts: Optional[np.ndarray] = None) -> np.ndarray:
        """``[B, W]``: exact change of :meth:`total` when sample ``s`` alone
        moves to worker ``v`` (``0`` for its own worker).

        Only rows whose user set can change matter (:meth:`movable`); a row
        every worker already uses several times is skipped."""
        a = np.asarray(assignment, dtype=np.int64)
        B = self.num_samples
        cnt = self.counts(a) if counts is None else counts
        state = self.key_state(cnt > 0)
        occ = np.flatnonzero(self.movable(np.arange(self.occ_k.size), a, cnt, state[0]))
        d = self.occurrence_deltas(occ, a, cnt, state)
        return segment_sum(d, self.occ_s[occ], B)

    def additive_matrix(self) -> np.ndarray:
        """``[B, W]`` the additive matrix of :meth:`CostModel.matrix` (every
        distinct row of a sample charged to it: pull + the dirty owner's push)."""
        h = self.pull.copy()
        has = np.flatnonzero(self.owner >= 0)
        h[has] += self.owner_push[has, None]
        h[has, self.owner[has]] -= self.owner_push[has]
        return per_sample_sum(h[self.occ_k], self.sample_ptr())

    def amortised_matrix(self, shares: Sequence[int]) -> np.ndarray:
        """``[B, W]`` additive costs with every row's cost spread over the
        samples expected to share it.

        A row used by ``n_x`` samples of the batch is expected on worker ``w``
        ``m = 1 + (n_x - 1) (B_w - 1) / (B - 1)`` times if ``s`` is there
        (random placement of the others), and some other sample uses it
        elsewhere with probability ``p = 1 - (B_w / B)^(n_x - 1)`` (then every
        user pushes).  Entry: ``sum_{x in s} (pull[x, w] + p push[x, w]) / m``
        plus the dirty owner's push shared by the ``n_x`` users (only with
        probability ``p`` on the owner itself).  Hot rows, paid once per
        worker whatever the dispatch, stop dominating; rare rows decide."""
        has = self.owner >= 0
        h = amortised_key_costs(self.pull, self.push, self.uses, has, np.where(has, self.owner, -1),
                                self.owner_push, shares, self.num_samples)
        # the scatter, not per_sample_sum: GroupInputs' sums of sample subsets equal these bit for bit
        return segment_sum(h[self.occ_k], self.occ_s, self.num_samples)
