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

from torchrec_esd import ops, reference_ops
from torchrec_esd.cache import IterationPlan
from torchrec_esd.config import EsdConfigError


def batch_fingerprint(keys: torch.Tensor) -> int:
    """An order-free fingerprint of a multiset of int64 row keys (count, and
    a wrapping sum of a non-linearly mixed key, so equal key sums do not
    collide): the plan carries the fingerprint of the local batch it was made
    for, the module compares the batch it got."""
    if keys.numel() == 0:
        return 0
    mixed = reference_ops.fingerprint_mix(keys.to(torch.int64))
    return (int(mixed.sum()) * 1000003 + keys.numel()) & 0x7FFFFFFFFFFFFFFF


def global_batch_fingerprint(keys: torch.Tensor, lengths: torch.Tensor, *tensors: torch.Tensor) -> int:
    """A fingerprint of a whole global batch: its row keys (KJT order) and
    bag lengths, and the bytes of ``tensors`` (dense features, labels, KJT
    weights), each tied to its position.  Every worker of
    ``EsdInputDist(mode="global")`` computes it and sends it with its PS
    requests; the PS fails every rank when the workers' values differ (they
    were handed different global batches).  O(values + dense bytes) per batch.
    The same value as :func:`batch_fingerprint` of every part's int64 values tied to
    their positions (``v * C + i * P + salt``) and concatenated
    (``tests/test_distributed_seams.py`` checks it), summed part by part
    by :func:`torchrec_esd.ops.positioned_mix_sum`: one C++ pass per part on the CPU,
    0.8 ms of PyTorch ops per batch and rank before (a 512-sample batch of 26 features)."""
    parts = [(keys, 1), (lengths, 2)] + [(_words(t), 3 + i) for i, t in enumerate(tensors)
                                         if t is not None and t.numel()]
    n = sum(int(t.numel()) for t, _ in parts)
    if n == 0:
        return 0
    # the parts' int64 sums, added as Python ints: they differ from the wrapping int64 sum by
    # a multiple of 2^64, which the mask below (mod 2^63, times 1000003) takes out
    total = sum(int(ops.positioned_mix_sum(t, salt)) for t, salt in parts)
    return (total * 1000003 + n) & 0x7FFFFFFFFFFFFFFF


_WORD = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _words(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` as integers of its element size (a float32 tensor
    as int32 words: the same bits, a quarter of the values that a per-byte
    view would mix; dtype and shape are not part of the bits)."""
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(_WORD.get(flat.element_size(), torch.uint8))


class PlanChannel:
    """Ordered, iteration-keyed hand-over of :class:`IterationPlan` s."""

    def __init__(self) -> None:
        self._plans: "OrderedDict[int, IterationPlan]" = OrderedDict()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._producing = 0  # dispatch-ahead threads that may still put plans
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
            self._changed.notify_all()

    def producing(self, on: bool) -> None:
        """A dispatch-ahead thread starts (``True``) or stops putting plans
        (end of its batches, an error, or its consumer stopped)."""
        with self._lock:
            self._producing += 1 if on else -1
            self._changed.notify_all()

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

    def peek(self, iteration: int, wait_s: float = 0.0) -> Optional[IterationPlan]:
        """The plan of ``iteration`` if it was put and not taken yet, without
        taking it (the prefetch reads the plans ahead).  With ``wait_s``, waits
        up to that long for it while a dispatch-ahead thread runs (None at
        once when none does: no plan is coming)."""
        iteration = int(iteration)
        with self._lock:
            self._changed.wait_for(
                lambda: iteration in self._plans or self._producing <= 0 or self._last_put >= iteration,
                timeout=wait_s if wait_s > 0 else 0.0,
            )
            return self._plans.get(iteration)

    @property
    def pending(self) -> int:
        """Plans put but not taken (batches dispatched but not trained yet)."""
        with self._lock:
            return len(self._plans)

    @property
    def last_taken(self) -> int:
        return self._last_taken
