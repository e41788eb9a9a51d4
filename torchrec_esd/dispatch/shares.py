"""Shares decided per batch: fewer samples to a worker whose link or compute
is the bottleneck of this batch, more to the others.

With compute rates ``r_w`` (samples per second per worker), the predicted
iteration time of an assignment is

    ``T(a) = max_w ( n_w / r_w + link_w(a) )``

(``n_w`` samples on worker ``w``, plus its measured compute seconds per
step whatever its samples where known; ``link_w``: the predicted link seconds of
its rows, from the de-duplicated model when the inner dispatcher reads it,
else the additive matrix's per-worker sums; the worker that runs the
dispatcher also spends the decision time, ``dispatching_worker``).
:class:`PerBatchShares` wraps a dispatcher (``esd`` by default) and decides
the shares of every batch.  Online (the default): ONE inner decision per
batch, at the shares water-filled (as in 2. below) from exponential averages
of every worker's predicted link seconds per sample over the past batches
(the first batch runs at the base shares), so the decision costs what the
inner dispatcher costs.  Offline (``online=False``), per batch:

1. the inner dispatcher decides at the base shares (the config's);
2. from its answer, every worker's time per sample ``t_w = 1 / r_w +
   link_w / n_w``; the shares that equalise ``n_w t_w`` (water filling:
   ``n_w = clip(T / t_w, lo_w, hi_w)`` with ``sum n_w = B``, bisection on
   ``T``, then largest-remainder rounding inside the bounds) are the next
   candidate; the inner dispatcher decides at them;
3. repeated while the shares change, for ``rounds`` rounds or until
   ``time_budget_ms`` (the inner dispatcher's decisions included); the
   assignment with the smallest predicted ``T`` is returned (never worse than
   the base shares' answer, by its own prediction).

Compute rates: measured by default (``measured_compute``): in a training
job every worker times its own compute per sample and the runtime gathers the
estimates at every dispatch, the same on every worker
(:mod:`~torchrec_esd.distributed.compute_estimates`; ``EsdInputDist`` sets
them with :meth:`PerBatchShares.set_rates` before each decision);
``samples_per_s`` (the planner's numbers or a guess) is the prior, used until
the first measurements arrive.  ``measured_compute=False`` keeps the
configured rates.

Bounds: ``lo_w = floor(B_w (1 - bound))`` (at least 1 for a worker with a
positive base share while ``bound < 1``), ``hi_w = ceil(B_w (1 + bound))``; a
worker with a base share of 0 stays at 0.  With ``bound = 1`` (the default) a
worker may also get no sample in a batch: it then costs its *idle* seconds
(``set_rates(idle_s=...)``: in a job, the dense all-reduce's receive alone,
since a worker without samples sends no dense gradients) plus the rows it must
push for the others, instead of its fixed seconds plus its samples'; the
shares try leaving out the costliest workers one by one
(:func:`fill_with_idle`).  This is a heuristic: the joint problem (shares and
assignment, makespan with compute) contains the makespan dispatch, which is
NP-hard (:mod:`~torchrec_esd.dispatch.exact_makespan`); each round costs one
inner decision, ``O(W log B)`` besides.

The model does not change: every sample is still trained exactly once, and
``EsdInputDist.loss`` scales the summed per-sample losses by ``W / B``
whatever the shares (:mod:`~torchrec_esd.distributed.loss_scaling`), which is
why the runtime requires that loss when a dispatcher varies the shares
(``varies_shares``).
"""

from __future__ import annotations

import math
import time
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from torchrec_esd.dispatch.base import Dispatcher, DispatchError, DispatchResult, check_problem


def water_fill(per_sample_s: np.ndarray, total: int, lo: np.ndarray, hi: np.ndarray,
               fixed_s: Optional[np.ndarray] = None) -> np.ndarray:
    """Integer shares ``n`` with ``lo <= n <= hi``, ``sum n = total`` that
    (nearly) equalise ``fixed_s[w] + n_w * per_sample_s[w]``: the level where
    the real-valued fill holds ``total`` (solved exactly on the piece of the
    piecewise-linear sum where it does, ``O(W^2)`` numpy, no bisection), then
    the largest remainders."""
    t = np.asarray(per_sample_s, dtype=np.float64)
    c = np.zeros_like(t) if fixed_s is None else np.asarray(fixed_s, dtype=np.float64)
    lo, hi = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
    if int(lo.sum()) > total or int(hi.sum()) < total:
        raise DispatchError(f"share bounds {lo.tolist()}..{hi.tolist()} cannot hold {total} samples")

    def fill(T: float) -> np.ndarray:
        return np.clip((T - c) / np.maximum(t, 1e-300), lo, hi)

    # the sum of fill(T) is piecewise linear and non-decreasing in T, with kinks where
    # a worker reaches lo or hi: find the piece where it reaches total and solve it there
    kinks = np.unique(np.concatenate([c + lo * t, c + hi * t]))
    sums = np.clip((kinks[:, None] - c) / np.maximum(t, 1e-300), lo, hi).sum(1)
    k = int(np.searchsorted(sums, total, side="left"))  # first kink with sum >= total
    if k == 0:
        T = float(kinks[0])
    else:
        T0, s0 = float(kinks[k - 1]), float(sums[k - 1])
        T1 = float(kinks[min(k, kinks.size - 1)])
        mid = 0.5 * (T0 + T1)
        free = (c + lo * t < mid) & (mid < c + hi * t)  # the workers between their bounds on this piece
        slope = float((1.0 / np.maximum(t[free], 1e-300)).sum())
        T = T1 if slope <= 0 else min(T1, T0 + (total - s0) / slope)
    x = fill(T)
    n = np.floor(x).astype(np.int64)
    n = np.clip(n, lo, hi)
    rest = total - int(n.sum())
    order = np.argsort(-(x - np.floor(x)), kind="stable")
    i = 0
    while rest > 0:  # largest remainders first, then any worker with room
        w = order[i % len(order)]
        if n[w] < hi[w]:
            n[w] += 1
            rest -= 1
        i += 1
    i = 0
    while rest < 0:  # smallest remainders first
        w = order[::-1][i % len(order)]
        if n[w] > lo[w]:
            n[w] -= 1
            rest += 1
        i += 1
    return n


MIN_INNER_BUDGET_S = 5e-4  # the inner search's least budget under decision_share (its start always runs)


def fill_with_idle(per_sample_s: np.ndarray, total: int, lo: np.ndarray, hi: np.ndarray,
                   fixed_s: np.ndarray, idle_s: np.ndarray) -> np.ndarray:
    """:func:`water_fill` where a worker with ``lo == 0`` may get no sample
    and then costs ``idle_s`` instead of ``fixed_s + n per_sample_s``: the
    fills leaving out none, then the 1, 2, ... costliest such workers (by
    ``fixed_s + per_sample_s``), the one with the smallest predicted
    maximum (``O(W)`` fills)."""
    t = np.asarray(per_sample_s, dtype=np.float64)
    c = np.asarray(fixed_s, dtype=np.float64)
    idle = np.asarray(idle_s, dtype=np.float64)
    lo, hi = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
    may = [int(w) for w in np.argsort(-(c + t), kind="stable") if lo[w] == 0 and hi[w] > 0]
    best: Optional[Tuple[float, np.ndarray]] = None
    for k in range(len(may) + 1):
        lo2, hi2 = np.where(hi > 0, np.maximum(lo, 1), 0), hi.copy()
        lo2[may[:k]], hi2[may[:k]] = 0, 0
        if int(lo2.sum()) > total or int(hi2.sum()) < total:
            continue
        n = water_fill(t, total, lo2, hi2, c)
        worst = float(np.where(n > 0, c + n * t, idle).max())
        if best is None or worst < best[0]:
            best = (worst, n)
    if best is None:
        raise DispatchError(f"share bounds {lo.tolist()}..{hi.tolist()} cannot hold {total} samples")
    return best[1]


def _rates(samples_per_s: Sequence[float]) -> list:
    rates = [float(r) for r in samples_per_s]
    if not rates or any(not (r > 0 and math.isfinite(r)) for r in rates):
        raise DispatchError(f"samples_per_s must be positive and finite, got {list(samples_per_s)}")
    return rates


class PerBatchShares(Dispatcher):
    """An inner dispatcher at shares decided per batch (see module docstring).

    Args:
        inner: the dispatcher deciding the assignment at given shares (name).
        samples_per_s: compute rate of every worker (samples / s), required:
            the prior of the measured rates, or the rates themselves with
            ``measured_compute=False``.
        measured_compute: price compute with the rates the runtime measures
            online (:meth:`set_rates`; see the module docstring).
        bound: shares stay within ``(1 -+ bound)`` of the base shares (``1``:
            a worker may also get none, see the module docstring).
        online: one inner decision per batch, at the shares water-filled from
            the previous batches' per-sample link estimates (exponential
            average, weight ``ema``); the first batch runs at the base
            shares.  ``False``: every batch starts at the base shares and
            runs up to ``rounds`` more inner decisions (more decision time).
        rounds: water-filling rounds of the offline mode.
        dispatching_worker: the worker that runs the dispatcher (the
            runtime's worker 0) or ``None``; its predicted step includes the
            decision time (averaged over past batches), which it spends while
            it also trains (``decision_load`` of it: 1.0 when they share the
            cores, 0.0 on a machine with cores to spare).
        time_budget_ms: offline mode: no new round starts after it.
        decision_share: online mode: the whole decision is to take at most
            this fraction of the iteration time predicted at the previous
            batch, so it stays a small part of the step it decides: the inner
            dispatcher's time budget (``esd``'s anytime local search; other
            inner dispatchers keep theirs) is that share less what the rest of
            the decision took at the previous batch, and at least
            ``MIN_INNER_BUDGET_S`` (``None``: the inner dispatcher's own budget).
        objective: passed to the inner dispatcher.
        inner_kwargs: more options of the inner dispatcher.
    """

    name = "shares"
    varies_shares = True

    def __init__(self, inner: str = "esd", samples_per_s: Optional[Sequence[float]] = None, bound: float = 1.0,
                 online: bool = True, rounds: int = 2, dispatching_worker: Optional[int] = 0,
                 decision_load: float = 1.0, ema: float = 0.5, time_budget_ms: float = 50.0,
                 objective: str = "total", inner_kwargs: Optional[Mapping] = None,
                 measured_compute: bool = True, decision_share: Optional[float] = 0.06) -> None:
        from torchrec_esd.dispatch import make_dispatcher

        if samples_per_s is None:
            raise DispatchError("per-batch shares need every worker's compute rate (samples_per_s)")
        rates = _rates(samples_per_s)
        if not 0 <= bound <= 1:
            raise DispatchError(f"bound must be in [0, 1], got {bound}")
        if rounds < 0 or not time_budget_ms > 0:
            raise DispatchError(f"need rounds >= 0 and time_budget_ms > 0, got {rounds}, {time_budget_ms}")
        if not 0 < ema <= 1 or not 0 <= decision_load <= 1:
            raise DispatchError(f"need 0 < ema <= 1 and 0 <= decision_load <= 1, got {ema}, {decision_load}")
        if dispatching_worker is not None and not 0 <= int(dispatching_worker) < len(rates):
            raise DispatchError(f"dispatching_worker {dispatching_worker} is not one of the {len(rates)} workers")
        if inner == "shares":
            raise DispatchError("per-batch shares cannot wrap itself")
        if decision_share is not None and not 0 < decision_share < 1:
            raise DispatchError(f"decision_share must be in (0, 1) or None, got {decision_share}")
        self.inner = make_dispatcher(inner, objective=objective, **dict(inner_kwargs or {}))
        self.inner_name = inner
        self.rates = np.asarray(rates)
        self.prior_samples_per_s = tuple(rates)
        self._compute_fixed = np.zeros(len(rates))  # seconds per step whatever the share (measured)
        self._idle = np.zeros(len(rates))  # seconds per step of a worker without samples (measured)
        self.reads_compute_rates = bool(measured_compute)
        self.bound, self.online, self.rounds, self.budget_s = bound, bool(online), rounds, time_budget_ms / 1e3
        self.dispatching_worker = None if dispatching_worker is None else int(dispatching_worker)
        self.decision_load, self.ema = float(decision_load), float(ema)
        self.objective = objective
        # it predicts link times from the de-duplicated model or, without one, from the cost
        # matrix, which it reads even where its inner dispatcher does not (LAIA, random)
        self.needs_cost = self.inner.needs_cost or not self.inner.needs_dedup
        self.needs_hits = self.inner.needs_hits
        self.needs_dedup, self.cost_input = self.inner.needs_dedup, self.inner.cost_input
        self._link_per_sample: Optional[np.ndarray] = None  # online estimate, seconds per sample per worker
        self._decision_s = 0.0  # average decision time (the dispatching worker's extra load)
        self.decision_share = decision_share
        from torchrec_esd.dispatch.dedup_search import DedupSearchDispatcher

        # an anytime inner search whose deadline the decision share may shorten
        self._inner_budget_s: Optional[float] = (self.inner.time_budget_s
                                                 if isinstance(self.inner, DedupSearchDispatcher) else None)
        self._predicted_iter_s = 0.0  # of the previous online decision (0: none yet)
        self._rest_s = 0.0  # the previous online decision's time outside the inner dispatcher

    def set_rates(self, samples_per_s: Sequence[float], fixed_s: Optional[Sequence[float]] = None,
                  idle_s: Optional[Sequence[float]] = None) -> None:
        """Every worker's compute rate (samples / s), its seconds per step
        whatever its samples (``fixed_s``, default 0) and its seconds per step
        with no sample (``idle_s``, default 0) from now on: the measured ones
        (:mod:`~torchrec_esd.distributed.compute_estimates`)."""
        rates = _rates(samples_per_s)
        fixed = np.zeros(len(rates)) if fixed_s is None else np.asarray([float(f) for f in fixed_s])
        idle = np.zeros(len(rates)) if idle_s is None else np.asarray([float(f) for f in idle_s])
        if len(rates) != self.rates.size or fixed.size != self.rates.size or idle.size != self.rates.size:
            raise DispatchError(f"{len(rates)} compute rates, {fixed.size} fixed and {idle.size} idle times for "
                                f"{self.rates.size} workers")
        for what, v in (("fixed", fixed), ("idle", idle)):
            if not (np.isfinite(v).all() and (v >= 0).all()):
                raise DispatchError(f"{what} times must be finite and >= 0, got {v.tolist()}")
        self.rates, self._compute_fixed, self._idle = np.asarray(rates), fixed, idle

    def inputs(self, cost_model, kjt, views):
        if self.needs_cost and not self.inner.needs_cost:  # the matrix for the link prediction
            return Dispatcher.inputs(self, cost_model, kjt, views)
        return self.inner.inputs(cost_model, kjt, views)

    def _link(self, cost: torch.Tensor, a: torch.Tensor, aux) -> np.ndarray:
        W = cost.shape[1]
        if aux and "dedup" in aux:
            return aux["dedup"].per_worker(a.numpy())
        per = cost.detach().cpu().double().gather(1, a.view(-1, 1)).view(-1)
        return torch.zeros(W, dtype=torch.float64).index_add_(0, a, per).numpy()

    def _fixed(self, W: int) -> np.ndarray:
        """``[W]`` seconds a worker spends whatever its share: its fixed
        compute per step (:meth:`set_rates`) and the dispatching worker's
        decision load."""
        out = self._compute_fixed.copy() if self._compute_fixed.size == W else np.zeros(W)
        if self.dispatching_worker is not None:
            out[self.dispatching_worker] = self.decision_load * self._decision_s
        return out

    def predicted_s(self, cost, a: torch.Tensor, aux, link: Optional[np.ndarray] = None) -> np.ndarray:
        """``[W]`` predicted seconds of every worker: compute + link (``link``:
        :meth:`_link` of ``a`` where known) (+ the dispatching worker's decision load)."""
        W = cost.shape[1]
        n = np.bincount(a.numpy(), minlength=W)
        link = self._link(cost, a, aux) if link is None else link
        return np.where(n > 0, n / self.rates + self._fixed(W), self._idle_s(W)) + link

    def _idle_s(self, W: int) -> np.ndarray:
        """``[W]`` seconds of a worker without samples (before the rows it pushes)."""
        return self._idle if self._idle.size == W else np.zeros(W)

    def _bounds(self, base: np.ndarray, cost: torch.Tensor):
        B = int(base.sum())
        least = 0 if self.bound >= 1 else 1  # bound 1: a worker may get no sample
        lo = np.where(base > 0, np.maximum(least, np.floor(base * (1 - self.bound))), 0).astype(np.int64)
        hi = np.where(base > 0, np.minimum(B, np.ceil(base * (1 + self.bound))), 0).astype(np.int64)
        finite = torch.isfinite(cost).all(0).numpy()
        hi = np.where(finite, hi, np.minimum(hi, base))  # an unreachable worker never gets more
        return np.minimum(lo, hi), hi

    def _observe(self, cost, a: torch.Tensor, link: np.ndarray) -> None:
        n = np.bincount(a.numpy(), minlength=cost.shape[1])
        per = link / np.maximum(n, 1)
        if (n == 0).any() and cost.shape[0]:
            # a worker without samples: its mean additive price per sample of this batch (no
            # sharing counted, so on the cautious side), so that it can come back when its link does
            per = np.where(n == 0, cost.detach().cpu().double().mean(0).numpy(), per)
        if self._link_per_sample is None or self._link_per_sample.size != per.size:
            self._link_per_sample = np.where(np.isfinite(per), per, 0.0)
        else:
            keep = ~np.isfinite(per)  # an unreachable worker: no news
            new = (1 - self.ema) * self._link_per_sample + self.ema * per
            self._link_per_sample = np.where(keep, self._link_per_sample, new)

    def assign(self, cost: torch.Tensor, shares: Sequence[int], aux=None) -> DispatchResult:
        check_problem(cost, shares)
        W = cost.shape[1]
        if self.rates.size != W:
            raise DispatchError(f"{self.rates.size} compute rates for {W} workers")
        t0 = time.perf_counter()
        base = np.asarray([int(s) for s in shares], dtype=np.int64)
        B = int(base.sum())
        lo, hi = self._bounds(base, cost)
        if self.online:
            if self._link_per_sample is None or self._link_per_sample.size != W:
                now = base
            else:
                now = fill_with_idle(1.0 / self.rates + self._link_per_sample, B, lo, hi, self._fixed(W),
                                     self._idle_s(W))
            if self._inner_budget_s is not None and self.decision_share is not None and self._predicted_iter_s > 0:
                share_s = self.decision_share * self._predicted_iter_s - self._rest_s
                self.inner.time_budget_s = min(self._inner_budget_s, max(MIN_INNER_BUDGET_S, share_s))
            t_inner = time.perf_counter()
            best_a = self.inner.assign(cost, now.tolist(), aux=aux).assignment
            t_inner = time.perf_counter() - t_inner
            link = self._link(cost, best_a, aux)  # once: the estimate and the prediction
            self._observe(cost, best_a, link)
            best_t, base_t, tried = float(self.predicted_s(cost, best_a, aux, link).max()), float("nan"), 1
            self._predicted_iter_s = best_t
            self._rest_s = max(0.0, time.perf_counter() - t0 - t_inner)
        else:
            best_a, best_t, base_t, tried = self._rounds(cost, base, lo, hi, aux, t0)
        dt = time.perf_counter() - t0
        self._decision_s = dt if self._decision_s == 0.0 else (1 - self.ema) * self._decision_s + self.ema * dt
        counts = np.bincount(best_a.numpy(), minlength=W)
        info = {"predicted_iter_s": best_t, "decisions": float(tried),
                **{f"share_{w}": float(c) for w, c in enumerate(counts)}}
        if not self.online:
            info["base_predicted_iter_s"] = base_t
        return DispatchResult(
            assignment=best_a,
            objective=self.objective_value(cost.detach().cpu().double(), best_a),
            solver=f"shares:{self.inner_name}",
            decision_s=dt,
            info=info,
        )

    def _rounds(self, cost, base, lo, hi, aux, t0):
        """Offline mode: the base shares' decision, then water-filling rounds
        from the current answer; the best predicted one."""
        W, B = cost.shape[1], int(base.sum())
        r = self.inner.assign(cost, base.tolist(), aux=aux)
        best_a, best_t = r.assignment, float(self.predicted_s(cost, r.assignment, aux).max())
        base_t, cur, tried = best_t, base, 1
        a = r.assignment
        for _ in range(self.rounds):
            if time.perf_counter() - t0 > self.budget_s:
                break
            n = np.bincount(a.numpy(), minlength=W)
            per_sample = 1.0 / self.rates + self._link(cost, a, aux) / np.maximum(n, 1)
            nxt = fill_with_idle(per_sample, B, lo, hi, self._fixed(W), self._idle_s(W))
            if np.array_equal(nxt, cur):
                break
            a = self.inner.assign(cost, nxt.tolist(), aux=aux).assignment
            tried += 1
            t = float(self.predicted_s(cost, a, aux).max())
            if t < best_t:
                best_a, best_t = a, t
            cur = nxt
        return best_a, best_t, base_t, tried
