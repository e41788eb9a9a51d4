"""The stake rule: do not spend more time deciding than the link time at stake.

A dispatch decision cannot save more link time than the iteration's slowest
link takes without it.  A dispatcher with :class:`StakeRule` measures every
full decision it makes through :meth:`~StakeRule.decide` (reading its inputs
from the caches + solving, what :class:`~torchrec_esd.distributed.EsdInputDist`
runs on the dispatching worker), in CPU seconds of the deciding thread (the
CPU the decision takes from training; its wall time in a background thread
grows with the machine's load, its CPU time does not), and the *stake*: the
predicted slowest link (largest per-worker sum of its own cost matrix) of
the plain split, the first
``shares[0]`` samples to worker 0, the next ``shares[1]`` to worker 1, ...
(vanilla TorchRec's data-parallel slices of the global batch).  When the stake
is below ``stake_ratio`` times the decision's CPU time (``benchmarks/stake.py``,
batch 512, 4 workers, idle machine: on 4 x 1000 Mbit/s a stake of 0.7-1.5 ms
against 2.9-6.2 ms of deciding, stake / CPU 0.13-0.33; on 1000/100/50/10
Mbit/s with the planner's shares 13.6-30.1 ms against 4.1-6.3 ms, 3.2-4.8),
the next ``probe_every - 1`` batches take the plain split without reading the
caches (solver ``"<name>:split"``, O(B)), and the next batch decides in full
and measures again, so a link that slows down is priced again within
``probe_every`` batches.  The first full decision also pays one-time costs,
so a split verdict on it is confirmed by timing the same decision once more.
Any assignment trains the same model at staleness
0; only the traffic changes.  ``stake_ratio=0`` turns the rule off, and
:meth:`~torchrec_esd.dispatch.base.Dispatcher.assign` never skips (the rule
lives in ``decide``: benchmarks that time a dispatcher on given inputs are
not affected).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from torchrec_esd.dispatch.base import DispatchError, DispatchResult, objective_value
from torchrec_esd.dispatch.clock import DecisionClock
from torchrec_esd.dispatch.baselines import contiguous_slices as plain_split  # vanilla's slices


def split_makespan(cost: torch.Tensor, shares: Sequence[int]) -> float:
    """Predicted slowest link of the plain split on ``cost``: its
    :func:`~torchrec_esd.dispatch.base.objective_value` for ``"makespan"``
    (0 for an empty batch; only the split's own entries are read, so a worker
    with a share of 0 may have non-finite costs)."""
    return objective_value(cost.detach().to(device="cpu", dtype=torch.float64), plain_split(shares), "makespan")


class StakeRule:
    """Mixin for a :class:`~torchrec_esd.dispatch.base.Dispatcher` (listed
    before it): :meth:`decide` with the stake rule of the module docstring.
    The dispatcher calls :meth:`init_stake` in its ``__init__``."""

    stake_ratio: float = 0.0
    probe_every: int = 1
    _split_left: int = 0
    _full_decisions: int = 0

    def init_stake(self, stake_ratio: float, probe_every: int) -> None:
        if not stake_ratio >= 0:
            raise DispatchError(f"stake_ratio must be >= 0, got {stake_ratio}")
        if int(probe_every) != probe_every or probe_every < 1:
            raise DispatchError(f"probe_every must be an int >= 1, got {probe_every}")
        self.stake_ratio = float(stake_ratio)
        self.probe_every = int(probe_every)
        self._split_left = 0  # batches still to take the plain split before the next full decision
        self._full_decisions = 0

    def stake_s(self, cost: torch.Tensor, aux, shares: Sequence[int]) -> float:
        """The link time at stake: the plain split's predicted slowest link on
        the inputs the dispatcher read (by default its cost matrix)."""
        return split_makespan(cost, shares)

    def decide(self, cost_model, kjt, views, shares: Sequence[int]) -> DispatchResult:
        """Decide in full (``inputs`` + ``assign``; its ``info`` gains
        ``stake_s``, ``inputs_s``, ``full_decision_s`` (wall) and ``full_decision_cpu_s``),
        or take the plain split while the last full decision took more CPU
        time than the link time at stake."""
        if self.stake_ratio > 0 and self._split_left > 0:
            self._split_left -= 1
            t0 = time.perf_counter()
            split = plain_split(shares)
            return DispatchResult(split, objective=float("nan"), solver=f"{self.name}:split",
                                  decision_s=time.perf_counter() - t0)
        clock = DecisionClock()
        t0 = time.perf_counter()
        cost, aux = self.inputs(cost_model, kjt, views)
        inputs_s = time.perf_counter() - t0
        result = self.assign(cost, shares, aux=aux)
        clocked = clock.info()
        cpu = clocked["full_decision_cpu_s"]
        stake = self.stake_s(cost, aux, shares)
        self._full_decisions += 1
        if stake < self.stake_ratio * cpu and self._full_decisions == 1:
            # the first decision also pays one-time costs (lazy initialisation, first
            # calls: 12-25 ms of CPU against 4-6 ms later on the hetero mix, above a
            # stake of 13-17 ms on the session workload): a split verdict on it is
            # confirmed by timing the same decision again (its answer is not used)
            result.info["first_decision_cpu_s"] = cpu
            c1 = time.thread_time()
            again, again_aux = self.inputs(cost_model, kjt, views)
            self.assign(again, shares, aux=again_aux)
            cpu = time.thread_time() - c1
        result.info["stake_s"] = stake
        result.info["inputs_s"] = inputs_s
        # wall, CPU and wait of this decision; the CPU timed again on a first decision
        result.info.update(clocked, full_decision_cpu_s=cpu)
        if stake < self.stake_ratio * cpu:
            self._split_left = self.probe_every - 1
        return result
