"""Grouped (two-level) dispatch: samples to worker groups, then an inner
dispatcher inside each group.

The ``W`` workers (those with a positive share) are ordered by their mean cost
column (a proxy for link speed: a slow link has a large mean cost) and cut into
``G = ceil(W / group_size)`` contiguous groups of similar links (consecutive
workers in that order; the last group may be smaller).  Deterministic: ties
keep the worker index order.  (Dealing them round-robin, so every group mixes
fast and slow links, gave up to 2.7x worse totals with stage 1's min
pricing on a random 2368 x 64 instance.)

1. Samples to groups: ``C[s, g] = min over w in g of c[s, w]`` (the sample on
   its best worker of the group), group capacity = the group's summed shares;
   this ``[B, G]`` problem is solved by the regret heuristic
   (:class:`~torchrec_esd.dispatch.heuristic.HeuristicDispatcher`) with the
   same objective.
2. Inside each group the inner dispatcher (``heuristic``, ``hybrid``,
   ``optimal``, ``laia``, ``random`` ... by name) solves the group's samples on
   the group's workers only, at their exact shares.  Every worker therefore
   gets exactly its share (the :class:`Dispatcher` contract).

With one group (``W <= group_size``) the answer is the inner dispatcher's.

Two entry points:

* :meth:`GroupedDispatcher.assign` on a full ``[B, W]`` matrix (the
  :class:`Dispatcher` contract): workers ordered by their mean cost column,
  stage 1 on ``C[s, g] = min_{w in g} c[s, w]``.  ``O(B W)`` to form ``C``,
  plus the heuristic on ``[B, G]``, plus ``G`` inner solves on ``[B/G,
  group_size]`` problems (for the regret heuristic ``O(B group_size log
  group_size)`` in all).
* :meth:`GroupedDispatcher.decide` from the cost model, without any ``[B,
  W]`` matrix (:class:`~torchrec_esd.cost.group_inputs.GroupInputs`):
  workers ordered by link speed, stage 1 on the ``[B, G]`` group price
  (:meth:`GroupInputs.group_matrix`), then per group the exact slice of the
  inner dispatcher's matrix for the group's samples and workers only
  (:meth:`GroupInputs.sub_matrix`).  Cost (``N`` batch values, ``U``
  distinct keys, ``H`` cached (worker, key) pairs of them): the batch read,
  ``O(N log N)`` plus ``O(U + H)`` in the directory's holder index
  (:mod:`~torchrec_esd.cache.holders`: nothing per (key, worker) pair that is
  not cached); ``O(H + U G + N G)`` for stage 1's input; per group ``g``
  ``O(N_g log N_g + H_g + U_g |g|)`` for its slice, all groups ``O(N log N +
  H + U group_size)``; and the solves as above: no term in ``B W`` or
  ``U W``, only ``U G`` and ``N G`` with ``G = W / group_size``.  The
  groups' slices and inner solves are independent of each other
  (``info["group_s_max"]`` is the slowest: the decision's critical path if
  each ran on a rank of its own).
  No lower bound is reported (stage 1's is not one of the full problem).  With DES-served
  misses, or a single group, it is :meth:`Dispatcher.decide` (full inputs).

With ``stage1_slices = k > 1``, :meth:`decide` never reads the whole batch: stage 1
runs on ``k`` sample slices of it, each read on its own, and every group reads only
its own samples (:meth:`GroupedDispatcher._decide_split`; its critical path is the
slowest slice plus the slowest group).

Limits (not hidden): inner dispatchers that need a per-batch model in ``aux``
(``esd`` / ``dedup_search``) are refused.  Stage 1 prices a group by its best
worker (or, in :meth:`decide`, by its best cached copy and fastest link),
which ignores how many samples that worker can take.  ``decide``'s groups are
cut by link speed, ``assign``'s by mean cost, so the two may differ.
"""

from __future__ import annotations

import time
from typing import List, Optional, Sequence

import torch

from torchrec_esd.cache.holders import HolderIndex
from torchrec_esd.cost.group_inputs import (
    GroupInputs, group_index, group_matrix_from_bits, link_groups, sample_segments,
)
from torchrec_esd.dispatch.base import (
    Dispatcher, DispatchError, DispatchResult, check_assignment, check_cost_input, objective_value,
)
from torchrec_esd.dispatch.clock import DecisionClock
from torchrec_esd.dispatch.heuristic import HeuristicDispatcher


def worker_groups(cost: torch.Tensor, group_size: int) -> List[List[int]]:
    """Columns of ``cost`` ordered by mean cost, cut into ``ceil(W / group_size)``
    contiguous groups of at most ``group_size`` (each group sorted)."""
    w = cost.shape[1]
    means = cost.mean(0).tolist()
    order = sorted(range(w), key=lambda j: (means[j], j))
    return [sorted(order[i:i + group_size]) for i in range(0, w, group_size)]


class GroupedDispatcher(Dispatcher):
    """Two-level dispatch; see the module docstring.

    ``inner``: name of the dispatcher run inside each group (keyword arguments
    in ``inner_kw``); ``group_size``: workers per group (>= 1); ``objective``
    goes to stage 1 and to the inner dispatcher; ``cost_input`` (``"additive"``
    or ``"expected"``, default: the inner dispatcher's own) is the cost matrix
    :meth:`inputs` builds (the expected one costs several times more to build
    at large ``W``)."""

    name = "grouped"

    def __init__(self, inner: str = "heuristic", group_size: int = 16, objective: str = "total",
                 inner_kw: Optional[dict] = None, cost_input: Optional[str] = None,
                 stage1_slices: int = 1) -> None:
        from torchrec_esd.dispatch import make_dispatcher

        if not isinstance(group_size, int) or group_size < 1:
            raise DispatchError(f"group_size must be an integer >= 1, got {group_size!r}")
        if not isinstance(stage1_slices, int) or stage1_slices < 1:
            raise DispatchError(f"stage1_slices must be an integer >= 1, got {stage1_slices!r}")
        self.stage1_slices = stage1_slices
        if inner == "grouped":
            raise DispatchError("inner dispatcher of 'grouped' cannot be 'grouped'")
        kw = dict(inner_kw or {})
        kw.setdefault("objective", objective)
        if cost_input is not None:
            kw["cost_input"] = check_cost_input(cost_input)
        self.inner = make_dispatcher(inner, **kw)
        if getattr(self.inner, "needs_dedup", False) or getattr(self.inner, "varies_shares", False):
            raise DispatchError(
                f"inner dispatcher {inner!r} needs a per-batch model or decides its own shares;"
                " 'grouped' supports dispatchers on [B, W] matrices only"
            )
        self.stage1 = HeuristicDispatcher(objective=objective)
        self.objective = self.stage1.objective
        self.group_size = group_size
        # read the inputs the inner dispatcher reads
        self.needs_cost = self.inner.needs_cost
        self.cost_input = self.inner.cost_input
        self.needs_hits = self.inner.needs_hits

    def _solve(self, cost: torch.Tensor, shares: Sequence[int], **aux):
        groups = worker_groups(cost, self.group_size)
        if len(groups) == 1:
            return self.inner._solve(cost, shares, **aux)
        b = cost.shape[0]
        gcost = torch.stack([cost[:, g].min(1).values for g in groups], 1).contiguous()
        gshares = [sum(shares[w] for w in g) for g in groups]
        to_group, _ = self.stage1._solve(gcost, gshares)
        to_group = torch.as_tensor(to_group, dtype=torch.int64).view(-1)
        out = torch.empty(b, dtype=torch.int64)
        for gi, g in enumerate(groups):
            rows = (to_group == gi).nonzero().view(-1)
            if rows.numel() == 0:
                continue
            cols = torch.tensor(g, dtype=torch.int64)
            sub = cost[rows][:, cols].contiguous()
            sub_aux = {k: m[rows][:, cols].contiguous() for k, m in aux.items()}
            a, _ = self.inner._solve(sub, [shares[w] for w in g], **sub_aux)
            out[rows] = cols[torch.as_tensor(a, dtype=torch.int64).view(-1)]
        return out, {"groups": float(len(groups))}

    def decide(self, cost_model, kjt, views, shares: Sequence[int]) -> DispatchResult:
        """Decide from the cost model without a ``[B, W]`` matrix (module
        docstring).  ``decision_s`` is the solves' time (stage 1 and the
        inner ones); ``info`` has ``inputs_s`` (the batch read and every
        input built), ``groups``, ``stage1_s`` and ``group_s_sum`` /
        ``group_s_max`` (one group's slice and inner solve: independent of the
        other groups', so ranks of their own could run them in parallel), and the
        whole decision's wall time, CPU and wait for a core (:meth:`DecisionClock.info`).
        ``objective`` is the
        objective of the inner dispatcher's matrix (summed over groups for
        ``"total"``, the largest group's for ``"makespan"``), equal to
        :meth:`objective_value` of the full matrix for the same assignment."""
        clock = DecisionClock()
        result = self._decide_grouped(cost_model, kjt, views, shares)
        result.info.update(clock.info())
        return result

    def _decide_grouped(self, cost_model, kjt, views, shares: Sequence[int]) -> DispatchResult:
        shares = [int(s) for s in shares]
        b = kjt.stride()
        if len(shares) != cost_model.num_workers or any(s < 0 for s in shares) or sum(shares) != b:
            raise DispatchError(f"shares {shares} do not split a batch of {b} samples over"
                                f" {cost_model.num_workers} workers")
        active = [w for w, s in enumerate(shares) if s > 0]
        if cost_model.config.des_misses or len(active) <= self.group_size:
            return super().decide(cost_model, kjt, views, shares)
        if self.stage1_slices > 1:
            return self._decide_split(cost_model, kjt, views() if callable(views) else views, shares, active)
        t_all = time.perf_counter()
        gi = GroupInputs(cost_model, kjt, views() if callable(views) else views)
        groups = link_groups(cost_model.bytes_per_second, active, self.group_size)
        gcost = gi.group_matrix(groups, shares)
        gi.prepare_groups()  # what every group's slice shares (the hits by worker), built once
        t_in = time.perf_counter() - t_all
        t0 = time.perf_counter()
        to_group, _ = self.stage1._solve(gcost, [sum(shares[w] for w in g) for g in groups])
        to_group = torch.as_tensor(to_group, dtype=torch.int64).view(-1)
        t_solve = stage1_s = time.perf_counter() - t0
        kind = self.cost_input if self.needs_cost else "none"

        def group_slice(gi_: int, g: List[int]):
            rows = (to_group == gi_).nonzero().view(-1)
            return (rows,) + gi.sub_matrix(rows, g, kind, hits=self.needs_hits)

        out = torch.empty(b, dtype=torch.int64)
        values, group_s, g_in, g_solve = self._solve_groups(groups, shares, out, group_slice)
        t_in, t_solve = t_in + g_in, t_solve + g_solve
        check_assignment(out, shares)
        obj = sum(values) if self.objective == "total" else max(values)
        return DispatchResult(assignment=out, objective=float(obj), solver=self.name, decision_s=t_solve,
                              info={"groups": float(len(groups)), "inputs_s": t_in, "stage1_s": stage1_s,
                                    "group_s_sum": sum(group_s), "group_s_max": max(group_s)})

    def _solve_groups(self, groups: List[List[int]], shares: List[int], out: torch.Tensor, group_slice):
        """Per group ``g``: ``group_slice(index, g)`` gives its samples and its slice of the
        inner dispatcher's inputs ``(rows, cost, hits)``; the inner dispatcher solves it at
        the group's workers' shares and ``out[rows]`` gets their workers.  Returns the
        groups' objective values, their wall seconds (slice and solve), and the inputs'
        and solves' seconds in all."""
        values, group_s, t_in, t_solve = [], [], 0.0, 0.0
        for gi_, g in enumerate(groups):
            t0 = time.perf_counter()
            rows, sub, hits = group_slice(gi_, g)
            t1 = time.perf_counter()
            r = self.inner.assign(sub, [shares[w] for w in g], aux={"hits": hits} if hits is not None else None)
            t2 = time.perf_counter()
            t_in, t_solve = t_in + t1 - t0, t_solve + t2 - t1
            group_s.append(t2 - t0)
            out[rows] = torch.tensor(g, dtype=torch.int64)[r.assignment]
            values.append(objective_value(sub, r.assignment, self.objective))
        return values, group_s, t_in, t_solve

    def _decide_split(self, cost_model, kjt, views, shares: List[int], active: List[int]) -> DispatchResult:
        """:meth:`decide` with no step that reads the whole batch (``stage1_slices = k``):

        1. the batch's samples are cut into ``k`` contiguous slices; each slice is priced on
           the groups and put on them by stage 1 with the slice's part of every group's
           capacity (:func:`slice_capacities`: the parts add up to the groups' shares).  A
           live directory's cache state gives which groups hold each key (fresh) in one
           probe per key (:func:`~torchrec_esd.cost.group_inputs.group_matrix_from_bits`:
           ``O(N_j log N_j + U_j G)`` for a slice of ``N_j`` values, nothing per cached
           copy); other cache states are read copy by copy (:class:`GroupInputs` of the
           slice, ``O(N_j log N_j + U_j + H_j)``), the same matrix;
        2. each group reads only its samples (:class:`GroupInputs` of them) and solves its
           slice of the inner dispatcher's matrix at its workers' exact shares.

        The slices' stage 1 are independent of each other, and so are the groups: on ranks
        of their own (a slice and a group per rank) the decision takes the slowest slice
        plus the slowest group, ``info["critical_s"]`` (moving sample indices and the slices'
        decoded row keys between the ranks not counted; joining those keys into one array
        is).  From a live directory each slice reads the group bits and each group its
        workers' holder lists and the keys' dirty owners: a real deployment would keep the
        bits on every slice rank and a group's lists on its rank (other cache states are
        read copy by copy, by slices and groups alike).  What a group reads is its
        own samples': the expected matrix amortises shared rows over the group's samples at
        its workers' shares, and the batch is never read whole, so the answer is not
        :meth:`decide`'s with one slice (``benchmarks/scale.py`` ``grouped-split`` reports
        both)."""
        from torchrec_esd.batch_select import select_kjt_range, select_kjt_samples

        b = kjt.stride()
        groups = link_groups(cost_model.bytes_per_second, active, self.group_size)
        caps = slice_capacities([sum(shares[w] for w in g) for g in groups], self.stage1_slices)
        bounds = [0]
        for c in caps:
            bounds.append(bounds[-1] + sum(c))
        to_group = torch.empty(b, dtype=torch.int64)
        t_in = t_solve = 0.0
        slice_s = []
        decoded = []  # with bits: the slices' row keys, which the groups then take theirs from
        # a live directory keeps per key the groups holding it (HolderIndex.group_bits)
        bits = (hasattr(views, "group_bits") and hasattr(views, "group_view") and not cost_model.config.des_misses
                and len(groups) <= HolderIndex.MAX_GROUPS)
        for j, cap in enumerate(caps):
            t0 = time.perf_counter()
            idx = torch.arange(bounds[j], bounds[j + 1], dtype=torch.int64)
            if idx.numel() == 0:
                continue
            part = select_kjt_range(kjt, bounds[j], bounds[j + 1])
            # the slice's per-worker shares: the batch's, scaled (stage 1's amortisation only)
            part_shares = cost_model.config.batch_shares(idx.numel())
            if bits:  # which groups hold each key (fresh), one probe per key: no cached copy read
                decoded.append(cost_model.row_keys(part))
                gcost = group_matrix_from_bits(cost_model, None, views, groups, part_shares, row_keys=decoded[-1])
            else:
                gcost = GroupInputs(cost_model, part, views).group_matrix(groups, part_shares)
            t1 = time.perf_counter()
            tg, _ = self.stage1._solve(gcost, cap)
            to_group[idx] = torch.as_tensor(tg, dtype=torch.int64).view(-1)
            t2 = time.perf_counter()
            t_in, t_solve = t_in + t1 - t0, t_solve + t2 - t1
            slice_s.append(t2 - t0)
        kind = self.cost_input if self.needs_cost else "none"

        t_join = time.perf_counter()
        group_of = group_index(groups, len(shares))
        if decoded:  # the batch's sample-major row keys, slice after slice (the slices are in order)
            all_keys = torch.cat([k for k, _ in decoded])
            lengths = torch.cat([o[1:] - o[:-1] for _, o in decoded])
            all_off = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
            torch.cumsum(lengths, 0, out=all_off[1:])
        t_join = time.perf_counter() - t_join  # on the critical path (counted there)
        t_in += t_join

        def own_samples(gi_: int, g: List[int]):
            # the group reads only its samples, amortised over its workers' shares, and (from a
            # live directory) only its workers' cached copies and the keys' dirty owners
            rows = (to_group == gi_).nonzero().view(-1)
            mine = [shares[w] if w in g else 0 for w in range(len(shares))]
            if bits:  # its samples' row keys from the slices' decode, its workers' copies alone
                pos, sub_off = sample_segments(all_off, rows)
                sub_in = GroupInputs(cost_model, None, views.group_view(group_of, gi_), shares=mine,
                                     row_keys=(all_keys.index_select(0, pos), sub_off))
            else:
                sub_in = GroupInputs(cost_model, select_kjt_samples(kjt, rows), views, shares=mine)
            return (rows,) + sub_in.sub_matrix(torch.arange(rows.numel()), g, kind, hits=self.needs_hits)

        out = torch.empty(b, dtype=torch.int64)
        values, group_s, g_in, g_solve = self._solve_groups(groups, shares, out, own_samples)
        t_in, t_solve = t_in + g_in, t_solve + g_solve
        check_assignment(out, shares)
        obj = sum(values) if self.objective == "total" else max(values)
        return DispatchResult(assignment=out, objective=float(obj), solver=self.name, decision_s=t_solve,
                              info={"groups": float(len(groups)), "inputs_s": t_in, "slices": float(len(slice_s)),
                                    "stage1_s_max": max(slice_s), "group_s_sum": sum(group_s),
                                    "group_s_max": max(group_s), "join_s": t_join,
                                    "critical_s": max(slice_s) + t_join + max(group_s)})


def slice_capacities(group_caps: Sequence[int], k: int) -> List[List[int]]:
    """Integer ``[k][G]`` capacities of ``k`` stage-1 slices: slice ``j`` takes the seats
    ``[j B / k, (j + 1) B / k)`` (``B = sum(group_caps)``) of a sequence that deals every
    group's seats evenly over the batch (seat ``i`` of group ``g`` at ``(i + 1/2) / cap_g``,
    ties by group): the slices' sizes differ by at most one, every group's parts add up
    to its capacity, and a slice gets each group's seats in about the proportion of its
    size (within 2 seats of it in 2000 random cases of up to 20 groups and slices).
    ``O(B log B)``."""
    caps = [int(c) for c in group_caps]
    if k < 1 or any(c < 0 for c in caps):
        raise DispatchError(f"slice_capacities: k = {k}, capacities {caps}")
    B = sum(caps)
    G = len(caps)
    if B == 0:
        return [[0] * G for _ in range(k)]
    g_of = torch.repeat_interleave(torch.arange(G), torch.tensor(caps, dtype=torch.int64))
    starts = torch.zeros(G + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(caps, dtype=torch.int64), 0, out=starts[1:])
    i = torch.arange(B) - starts[g_of]
    pos = (i.double() + 0.5) / torch.tensor(caps, dtype=torch.float64).clamp(min=1)[g_of]
    order = torch.argsort(pos, stable=True)  # the seats are in group order: ties by group
    seq = g_of[order]
    cut = [j * B // k for j in range(k + 1)]
    return [torch.bincount(seq[cut[j]:cut[j + 1]], minlength=G).tolist() for j in range(k)]
