"""Who plans which cache, each iteration (called by
:class:`~torchrec_esd.distributed.input_dist.EsdInputDist` once the
assignment is known).

Worker 0 is the dispatcher: its directory tracks every worker's cache, so it
builds each worker's :class:`~torchrec_esd.cache.StepSummary` (O(N + H) for a
global batch of N values and the H cached copies of its rows), scatters them
over the dispatch group, and only then plans every cache (O(N log N +
sum_w (U_w + S_w))), so that the others plan theirs meanwhile; every other
worker plans its own cache from its summary alone, in O(U_w log U_s + S_w + U_s) (its U_w keys, S_w slots, a summary of
U_s keys), which does not grow with the number of workers at a fixed
per-worker batch.  With DES-served misses (they need the batch's bags) or an
eviction policy that reads the upcoming batches, or with prefetch (whose
rule reads every worker's pushes: every worker's directory then tracks every
cache, see ``EsdWorkerRuntime``), every worker plans from the global batch
instead, and so does every worker below
:data:`SUMMARY_MIN_WORKERS` workers unless ``EsdConfig.plan_from_summaries``
says otherwise: there, planning in parallel from the global batch is cheaper
than waiting for worker 0's summaries (measured on 4 equal 1000 Mbit/s
workers: 46 vs 37 ms per iteration with summaries, and 20 MB more traffic in
40 steps).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd.cache import IterationPlan, StepSummary
from torchrec_esd.config import EsdConfigError
from torchrec_esd.distributed.runtime import EsdRuntime

# from this many workers on, workers plan from worker 0's summaries by default
SUMMARY_MIN_WORKERS = 16


def uses_summaries(config) -> bool:
    """Do the workers plan from worker 0's summaries (``EsdConfig.plan_from_summaries``,
    by default from :data:`SUMMARY_MIN_WORKERS` workers on)?"""
    if config.plan_from_summaries is not None:
        return config.plan_from_summaries
    return config.num_workers >= SUMMARY_MIN_WORKERS


def plan_iteration(rt: EsdRuntime, kjt: KeyedJaggedTensor, assignment: torch.Tensor, group,
               upcoming: Sequence[KeyedJaggedTensor] = (), flush: Sequence[int] = ()) -> IterationPlan:
    """This iteration's plan.  Worker 0 (the dispatcher: its directory
    tracks every cache) sends each other worker its
    :class:`~torchrec_esd.cache.StepSummary`, then plans every cache; a worker
    plans its own
    cache from that summary alone, in O(its keys + its cached rows that
    others use) instead of O(global batch) (the same plan: see
    ``CacheDirectory.plan_from_summary``).  With DES-served misses every
    worker plans from the global batch (they need its bags), and so does
    every worker under a policy that reads the upcoming batches.  ``flush``:
    the workers that write back their dirty rows this iteration
    (``CacheDirectory.plan``), the same on every worker."""
    directory = rt.directory
    assert directory is not None
    W = rt.config.num_workers
    if (rt.config.des_misses or W == 1 or directory.policy.reads_upcoming or rt.config.prefetch_depth
            or not uses_summaries(rt.config)):
        return directory.plan(kjt, assignment, upcoming, flush=flush)
    me = rt.worker_index
    got: List[Optional[StepSummary]] = [None]
    if me == 0:
        summaries = directory.step_summaries(kjt, assignment)
        # the others get their summaries first and plan while worker 0 steps every cache
        dist.scatter_object_list(got, [None] + list(summaries[1:]), src=0, group=group)
        return directory.plan(kjt, assignment, flush=flush)
    dist.scatter_object_list(got, None, src=0, group=group)
    summary = got[0]
    if not isinstance(summary, StepSummary) or summary.worker != me:
        raise EsdConfigError(f"worker {me} received no step summary of its own from worker 0")
    mine = directory.plan_from_summary(summary, flush=me in flush)
    return IterationPlan(directory.iteration, [mine if w == me else None for w in range(W)])

