"""The numpy swap local search on the de-duplicated cost
(:func:`refine_reference`): the reference of the C++ operator
:func:`torchrec_esd.ops.dedup_refine` and the fallback of
:func:`torchrec_esd.dispatch.dedup_search.refine` where the extension lacks it.

The exact change ``M[s, v]`` of moving one sample ``s`` to worker ``v`` is
kept for every sample and worker (:class:`_Search`: per (sample, row)
change, updated incrementally after every round for the rows whose user
set or single-user flags changed).  A round pairs, for every worker pair,
the best movers each way into candidate swaps (:func:`_swap_candidates`),
computes their exact gains, keeps a set of improving swaps that do not
interact (:func:`_select_swaps`: then the true change is at most the sum
of their gains, so every round lowers the cost) and applies it.  Rounds
stop at a local optimum (no improving swap among the candidates), after
``max_rounds`` or at the deadline (anytime).  About 1 ms of numpy call
overhead per round (20-45 ms per decision at B=512, W=4).
"""

from __future__ import annotations

import time
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from torchrec_esd.cost import segment_sum


def _ranges(ptr: np.ndarray, idx: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Concatenated ``arange(ptr[i], ptr[i + 1])`` for ``i`` in ``idx``, and
    the position in ``idx`` each element comes from."""
    lens = ptr[idx + 1] - ptr[idx]
    rep = np.repeat(np.arange(idx.size), lens)
    pos = np.arange(rep.size) - np.repeat(np.cumsum(lens) - lens, lens) + ptr[idx][rep]
    return pos, rep


def _distinct(idx: np.ndarray, size: int) -> np.ndarray:
    """``np.unique(idx)`` for indices in ``[0, size)``: a mark per index,
    ``O(len(idx) + size)`` without sorting (the search calls it every round)."""
    mark = np.zeros(size, dtype=bool)
    mark[idx] = True
    return np.flatnonzero(mark)


class _Search:
    """Assignment, per-row use counts and user-set state, and the single-move
    change matrix ``M`` of a :class:`~torchrec_esd.cost.DedupCost`, updated
    incrementally: after a batch of moves only the occurrences of rows whose
    user set or single-user flags changed (and of the moved samples) are
    recomputed."""

    def __init__(self, dedup, assignment: np.ndarray) -> None:
        d = self.d = dedup
        B, W = d.num_samples, d.num_workers
        self.a = np.asarray(assignment, dtype=np.int64).copy()
        self.cnt = d.counts(self.a)
        self.state = list(d.key_state(self.cnt > 0))
        self.cur = float(self.state[3].sum())
        self.sample_ptr, self.by_key, self.key_ptr = d.occurrence_index()
        n = d.occ_k.size
        self.docc = np.zeros((n, W))
        occ = np.flatnonzero(d.movable(np.arange(n), self.a, self.cnt, self.state[0]))
        rows = d.occurrence_deltas(occ, self.a, self.cnt, self.state)
        self.docc[occ] = rows
        self.M = segment_sum(rows, d.occ_s[occ], B)

    def apply(self, samples: np.ndarray, dest: np.ndarray) -> None:
        d, cnt = self.d, self.cnt
        B = d.num_samples
        occ, rep = _ranges(self.sample_ptr, samples)
        k = d.occ_k[occ]
        ks = _distinct(k, d.num_keys)
        old = cnt[ks].copy()
        np.subtract.at(cnt, (k, self.a[samples][rep]), 1)
        self.a[samples] = dest
        np.add.at(cnt, (k, dest[rep]), 1)
        new = cnt[ks]
        used_changed = ((old > 0) != (new > 0)).any(1)
        changed = ks[used_changed | ((old == 1) != (new == 1)).any(1)]
        uk = ks[used_changed]
        if uk.size:
            st = d.key_state(cnt[uk] > 0, uk)
            self.cur += float((st[3] - self.state[3][uk]).sum())
            for i in range(4):
                self.state[i][uk] = st[i]
        kocc, _ = _ranges(self.key_ptr, changed)
        aff = _distinct(np.concatenate([self.by_key[kocc], occ]), d.occ_k.size)
        if aff.size == 0:
            return
        nd = d.occurrence_deltas(aff, self.a, cnt, self.state)
        diff = nd - self.docc[aff]
        self.docc[aff] = nd
        self.M += segment_sum(diff, d.occ_s[aff], B)


def _swap_candidates(M: np.ndarray, a: np.ndarray, per_pair: int, cross: int) -> Tuple[np.ndarray, ...]:
    """Candidate swaps from the single-move changes ``M``: for every worker
    pair ``(x, y)``, the ``i``-th best mover ``x -> y`` with the ``i``-th best
    mover ``y -> x`` while their summed change is negative (at most
    ``per_pair``), plus every combination of the ``cross`` best movers each
    way.  Returns ``(s, t, x, y)`` (unsorted, may repeat)."""
    W = M.shape[1]
    members = [np.flatnonzero(a == w) for w in range(W)]
    S, T, X, Y = [], [], [], []
    for x in range(W):
        for y in range(x + 1, W):
            mx, my = members[x], members[y]
            if mx.size == 0 or my.size == 0:
                continue
            gx, gy = M[mx, y], M[my, x]
            kx = min(max(per_pair, cross), mx.size)
            ky = min(max(per_pair, cross), my.size)
            ix = np.argpartition(gx, kx - 1)[:kx] if kx < mx.size else np.arange(mx.size)
            iy = np.argpartition(gy, ky - 1)[:ky] if ky < my.size else np.arange(my.size)
            ix = ix[np.argsort(gx[ix], kind="stable")]
            iy = iy[np.argsort(gy[iy], kind="stable")]
            k = min(kx, ky)
            n = int(np.count_nonzero(gx[ix[:k]] + gy[iy[:k]] < 0))  # non-decreasing sums: a prefix
            n = min(n, per_pair)
            cs, ct = mx[ix[:n]], my[iy[:n]]
            cx, cy = min(cross, kx), min(cross, ky)
            if cx * cy > 1:
                cs = np.concatenate([cs, np.repeat(mx[ix[:cx]], cy)])
                ct = np.concatenate([ct, np.tile(my[iy[:cy]], cx)])
            S.append(cs); T.append(ct)
            X.append(np.full(cs.size, x)); Y.append(np.full(cs.size, y))
    if not S:
        e = np.zeros(0, dtype=np.int64)
        return e, e, e, e
    return tuple(np.concatenate(v).astype(np.int64) for v in (S, T, X, Y))


def _group_min(idx: np.ndarray, vals: np.ndarray, size: int, empty: int) -> np.ndarray:
    """``out[i] = min(vals[idx == i])`` (``empty`` where none), via a C++ scatter."""
    out = torch.full((size,), empty, dtype=torch.int64)
    if idx.size:
        out.scatter_reduce_(0, torch.from_numpy(idx), torch.from_numpy(vals), "amin")
    return out.numpy()


def _select_swaps(S: "_Search", s, t, x, y, tol: float, passes: int = 12, unique_pairs: bool = True):
    """Exact gains of the candidate swaps and a set of them that do not interact.

    *Exact gain of one swap* ``(s: x -> y, t: y -> x)``: ``M[s, y] + M[t, x]``
    minus the single-move changes of the rows both samples use (those rows
    keep their counts on both workers, so the swap does not change them).

    *Interaction.*  A move ``s: w -> v`` is *sensitive* on a row of ``s`` (not
    shared with its swap partner) when it changes the row's user set alone
    (``s`` is ``w``'s only user of it, or ``v`` does not use it).  Two swaps
    conflict if they move the same sample, or one is sensitive on a row the
    other moves.  For a conflict-free set the true change is at most the sum
    of the exact swap gains: every row is changed by at most one swap as
    predicted, and the only joint effect left (several non-sensitive moves
    emptying a worker of a row) removes a user, which never costs more
    (``f_x`` is monotone in the user set).  Candidates are taken greedily in
    parallel (one is taken when no better remaining candidate conflicts with
    it; ``passes`` times).  Returns ``(chosen candidate indices, gains)``."""
    d = S.d
    B, K = d.num_samples, d.num_keys
    n = s.size
    cand = np.concatenate([np.arange(n), np.arange(n)])
    samp = np.concatenate([s, t])
    frm = np.concatenate([x, y])
    to = np.concatenate([y, x])
    pos, rep = _ranges(S.sample_ptr, samp)
    key = d.occ_k[pos]
    c_of = cand[rep]
    to_e, frm_e = to[rep], frm[rep]
    sens = (S.cnt[key, frm_e] == 1) | (S.cnt[key, to_e] == 0)
    dv = S.docc[pos, to_e]
    # rows used by both samples of a swap are neutral; only rows that some
    # move changes (sensitive or with a nonzero change) need looking at
    hot = np.zeros(K, dtype=bool)
    hot[key[sens | (dv != 0.0)]] = True
    sub = np.flatnonzero(hot[key])
    code = c_of[sub] * K + key[sub]
    order = np.argsort(code, kind="stable")
    sc = code[order]
    same = np.flatnonzero(sc[1:] == sc[:-1])
    neutral = np.zeros(key.size, dtype=bool)
    neutral[sub[order[same]]] = True
    neutral[sub[order[same + 1]]] = True
    corr = np.bincount(c_of[neutral], weights=dv[neutral], minlength=n)
    gain = S.M[s, y] + S.M[t, x] - corr
    alive = gain < -tol
    if unique_pairs:  # one copy of every (s, t) pair
        _, first = np.unique(s * B + t, return_index=True)
        dup = np.ones(n, dtype=bool)
        dup[first] = False
        alive &= ~dup
    if not alive.any():
        return np.zeros(0, dtype=np.int64), gain
    # rank candidates by gain (best first)
    rank_of = np.empty(n, dtype=np.int64)
    rank_of[np.argsort(gain, kind="stable")] = np.arange(n)
    keep = ~neutral
    key, c_of, sens = key[keep], c_of[keep], sens[keep]
    r_of = rank_of[c_of]
    r_cand = rank_of[cand]
    taken = np.zeros(n, dtype=bool)
    big = n + 1
    for _ in range(max(1, passes)):
        live = alive[c_of]
        kl, rl, sl, cl = key[live], r_of[live], sens[live], c_of[live]
        min_sens = _group_min(kl[sl], rl[sl], K, big)
        min_touch = _group_min(kl, rl, K, big)
        ac = alive[cand]
        min_samp = _group_min(samp[ac], r_cand[ac], B, big)
        # a candidate is bad if a better live one conflicts with it
        bad = np.zeros(n, dtype=bool)
        bad[cl[(min_sens[kl] < rl) | (sl & (min_touch[kl] < rl))]] = True
        bad[cand[ac][min_samp[samp[ac]] < r_cand[ac]]] = True
        pick = alive & ~bad
        if not pick.any():
            break
        taken |= pick
        # drop the picked and everything conflicting with them
        pe = pick[c_of]
        used_key = np.zeros(K, dtype=bool)
        used_key[key[pe]] = True
        sens_key = np.zeros(K, dtype=bool)
        sens_key[key[pe & sens]] = True
        used_samp = np.zeros(B, dtype=bool)
        used_samp[samp[pick[cand]]] = True
        kill = np.zeros(n, dtype=bool)
        kill[c_of[sens_key[key] | (sens & used_key[key])]] = True
        kill[cand[used_samp[samp]]] = True
        alive &= ~kill & ~taken
        if not alive.any():
            break
    return np.flatnonzero(taken), gain


def refine_reference(
    dedup,
    assignment: np.ndarray,
    max_rounds: int = 64,
    deadline: Optional[float] = None,
    per_pair: int = 32,
    cross: int = 8,
) -> Tuple[np.ndarray, Dict[str, float]]:
    """Local search on :meth:`DedupCost.total` (see the module docstring).

    Every round takes candidate swaps (:func:`_swap_candidates`: the
    ``per_pair`` best movers each way per worker pair, paired in order, or
    when that finds nothing the ``cross`` best each way in every
    combination), computes their exact gains, keeps a set of improving ones that do not interact
    (:func:`_select_swaps`: the true change is then at most the predicted
    one, so every round lowers the cost) and applies it.  Returns the
    improved assignment and ``info`` (``rounds``, ``swaps``, ``start_cost``,
    ``cost``, ``stopped_at_deadline``)."""
    S = _Search(dedup, assignment)
    start = S.cur
    tol = 1e-12 * max(abs(start), 1e-300)
    rounds = swaps = 0
    stop = "max_rounds"
    while rounds < max_rounds:
        if deadline is not None and time.perf_counter() > deadline:
            stop = "deadline"
            break
        rounds += 1
        # the best movers paired in order; all combinations of the best few
        # only when that finds nothing (they rarely help on large batches)
        for c in (0, cross):
            s, t, x, y = _swap_candidates(S.M, S.a, per_pair, c)
            sel, g = _select_swaps(S, s, t, x, y, tol, unique_pairs=c > 1) if s.size else (s, s)
            if sel.size or c == cross:
                break
        if sel.size == 0 or not float(g[sel].sum()) < -tol:
            stop = "local_optimum"
            break
        before = S.cur
        samples = np.concatenate([s[sel], t[sel]])
        S.apply(samples, np.concatenate([y[sel], x[sel]]))
        worse = not S.cur < before - tol  # cannot happen (see _select_swaps); be safe
        if worse:
            S.apply(samples, np.concatenate([x[sel], y[sel]]))
            stop = "local_optimum"
            break
        swaps += int(sel.size)
    cost = dedup.total(S.a)
    return S.a, {"rounds": float(rounds), "swaps": float(swaps), "start_cost": start, "cost": cost,
                 "stopped_at_deadline": float(stop == "deadline"), "local_optimum": float(stop == "local_optimum")}
