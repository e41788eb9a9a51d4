"""Which rows a worker may pull ahead of time (``EsdConfig.prefetch_depth``).

After the push/pull phase of iteration ``i`` and before its gradient phase,
a worker may ask the PS for rows it must pull at a later iteration
``j`` (``i < j <= i + depth``), so that the transfer runs while iteration
``i`` computes.  Such a row is read at ``i`` instead of at ``j``; the read is
exact (the value and optimizer state ``j`` would pull) iff nothing changes the
row on the PS in between.  Between the prefetch (served after ``i``'s pushes)
and ``j``'s pull (served after ``j``'s pushes) the PS changes:

* the rows of the gradient phases ``i .. j-1``: a subset of the keys the
  global batches ``i .. j-1`` use (every worker's ``used_keys``);
* the rows pushed at ``i+1 .. j`` (every worker's ``push_keys``: dirty rows
  evicted or used by another worker).

Nothing else writes the PS during training (a checkpoint's flush or load
needs every dispatched batch trained, so no prefetch is outstanding then).
So the rule is: ``pull_keys(w, j)`` minus those keys (and minus rows already
prefetched for ``j``).  It needs every worker's pushes of ``i+1 .. j``: a
directory that tracks every worker (the runtime's, on every worker, when
prefetch is on) has them.  (Gathering the pushes over the dispatch group
instead costs a collective per step on every link: measured 17 ms per step
on a 10 Mbit/s worker.)  It holds at any staleness (a prefetched row is bit-for-bit the row the
pull at ``j`` would have read).

Time: O(K log K) for the K used and pushed keys of the window's plans.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch

from torchrec_esd.cache.plans import IterationPlan
from torchrec_esd.config import EsdConfigError


def _all(plan: IterationPlan, field: str) -> torch.Tensor:
    """Every worker's ``field`` in ``plan``: ``used_keys`` (the global batch's
    keys, :attr:`IterationPlan.batch_keys` where set) or ``push_keys``."""
    if field == "used_keys" and plan.batch_keys is not None:
        return plan.batch_keys
    if any(p is None for p in plan.workers):
        raise EsdConfigError(
            f"prefetch needs every worker's {field} of iteration {plan.iteration}: a directory that tracks "
            "every worker (the runtime's does when EsdConfig.prefetch_depth is set)"
        )
    return torch.cat([getattr(p, field) for p in plan.workers])  # type: ignore[union-attr]


def prefetch_keys(
    worker: int,
    current: IterationPlan,
    ahead: Sequence[IterationPlan],
    done: Optional[Mapping[int, torch.Tensor]] = None,
) -> Dict[int, torch.Tensor]:
    """Per iteration ``j`` of ``ahead`` (the plans of ``current.iteration + 1,
    + 2, ...``, consecutive), the rows ``worker`` may pull now, after the
    push/pull phase of ``current`` and before its gradient phase, that it
    would pull at ``j`` (sorted keys; ``done[j]``: already prefetched)."""
    done = done or {}
    changed = [_all(current, "used_keys")]  # the gradient phase of `current`
    out: Dict[int, torch.Tensor] = {}
    expect = current.iteration + 1
    for plan in ahead:
        if plan.iteration != expect:
            raise EsdConfigError(f"prefetch window: the plan of iteration {plan.iteration} where {expect} is next")
        expect += 1
        changed.append(_all(plan, "push_keys"))  # pushed before j's pulls
        wp = plan.workers[worker]
        cand = wp.pull_keys  # type: ignore[union-attr]
        safe = ~torch.isin(cand, torch.cat(changed))
        if plan.iteration in done:
            safe &= ~torch.isin(cand, done[plan.iteration])
        out[plan.iteration] = cand[safe]
        changed.append(_all(plan, "used_keys"))  # the gradient phase of j, before j+1's pulls
    return out


__all__ = ["prefetch_keys"]
