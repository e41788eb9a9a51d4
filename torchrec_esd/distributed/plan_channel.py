"""The channel that carries iteration plans from dispatch to the sharded module.

:class:`~torchrec_esd.input_dist.EsdInputDist` plans iteration ``i`` (the cache
directory numbers iterations 1, 2, ... in dispatch order) and puts the plan
here; the worker's sharded embedding module takes the plan of the iteration it
is computing.  Plans are produced in order and consumed in order; the channel
checks both, so a batch that skipped the input dist, a batch trained twice or
a plan taken by another batch is an error that names both iterations instead
of a silently different model.

Thread safety: the dispatch-ahead thread puts while the training thread takes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional

import torch

from torchrec_esd.cache import IterationPlan
from torchrec_esd.config import EsdConfigError


def batch_fingerprint(keys: torch.Tensor) -> int:
    """An order-free fingerprint of a multiset of int64 row keys (count, and
    a wrapping sum of a non-linearly mixed key, so equal key sums do not
    collide): the plan carries the fingerprint of the local batch it was made
    for, the module compares the batch it got."""
    if keys.numel() == 0:
        return 0
    x = keys.to(torch.int64) * -0x61C8864680B583EB  # splitmix64's steps, wrapping in int64
    x = x ^ (x >> 31)
    x = x * -0x40A7B892E31B1A47
    mixed = x ^ (x >> 29)
    return (int(mixed.sum()) * 1000003 + keys.numel()) & 0x7FFFFFFFFFFFFFFF


class PlanChannel:
    """Ordered, iteration-keyed hand-over of :class:`IterationPlan` s."""

    def __init__(self) -> None:
        self._plans: "OrderedDict[int, IterationPlan]" = OrderedDict()
        self._lock = threading.Lock()
        self._last_put = 0  # iteration of the last plan put
        self._last_taken = 0  # iteration of the last plan taken

    def put(self, plan: IterationPlan) -> None:
        with self._lock:
            if plan.iteration != self._last_put + 1:
                raise EsdConfigError(
                    f"plan of iteration {plan.iteration} put after iteration {self._last_put}: "
                    "plans must come from one cache directory, in dispatch order"
                )
            self._plans[plan.iteration] = plan
            self._last_put = plan.iteration

    def take(self, iteration: Optional[int] = None) -> IterationPlan:
        """The plan of ``iteration`` (default: the one after the last taken)."""
        want = self._last_taken + 1 if iteration is None else int(iteration)
        with self._lock:
            if want != self._last_taken + 1:
                raise EsdConfigError(
                    f"the ESD embedding module asked for the plan of iteration {want} but iteration "
                    f"{self._last_taken + 1} is next: train every dispatched batch once, in dispatch order"
                )
            plan = self._plans.pop(want, None)
            if plan is None:
                raise EsdConfigError(
                    f"no dispatch plan for iteration {want} (the last dispatched is {self._last_put}): "
                    "the ESD embedding module got a batch that did not go through EsdInputDist; "
                    "pass every training batch through EsdInputDist"
                )
            self._last_taken = want
            return plan

    @property
    def pending(self) -> int:
        """Plans put but not taken (batches dispatched but not trained yet)."""
        with self._lock:
            return len(self._plans)

    @property
    def last_taken(self) -> int:
        return self._last_taken
