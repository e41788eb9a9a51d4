"""The per-worker summary of one iteration that lets a worker plan its own
cache without the global batch (:meth:`CacheDirectory.plan_from_summary`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepSummary:
    """What one worker needs from the rest of the job to plan one iteration of
    its own cache (:meth:`CacheDirectory.plan_from_summary`), exactly.

    ``keys``: the distinct row keys its samples use (ascending); ``user_keys``
    (ascending) and ``user_counts``: those keys plus the rows of its cache that
    other workers use this iteration, each with its number of user workers;
    ``num_samples``: its samples.  Size O(U_w + |its cached rows others use|):
    it does not grow with the number of workers for a fixed per-worker batch
    and cache."""

    worker: int
    keys: torch.Tensor
    user_keys: torch.Tensor
    user_counts: torch.Tensor
    num_samples: int

    def nbytes(self) -> int:
        return 8 * (self.keys.numel() + self.user_keys.numel() + self.user_counts.numel())
