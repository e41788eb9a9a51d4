"""What the cache directory decides for one iteration: per-worker plans."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Dict, List, Optional, Tuple

import torch

from torchrec_esd.config import EsdConfigError


class TransmissionKind(str, Enum):
    """The four kinds of embedding-row transmission (DESIGN.md).  Members are
    strings equal to their value, so they key the plans' ``rows`` dicts and
    print (and serialise) as the plain name."""

    MISS_PULL = "miss_pull"  # a row not cached is pulled from the PS
    MISS_PUSH = "miss_push"  # an evicted dirty row is pushed first
    UPDATE_PULL = "update_pull"  # a cached copy too far behind is refreshed
    UPDATE_PUSH = "update_push"  # a dirty row another worker uses, or a gradient, goes up

    __str__ = str.__str__
    __format__ = str.__format__
    __repr__ = str.__repr__


KINDS = tuple(TransmissionKind)
DES_ROWS = "des_rows"  # rows the PS serves as pooled partial sums (EsdConfig.des_misses)
EMPTY = torch.empty(0, dtype=torch.int64)


def _empty() -> torch.Tensor:
    return EMPTY


@dataclass
class WorkerPlan:
    """What one worker does in one iteration (rows by global key)."""

    used_keys: torch.Tensor  # (U,) sorted distinct row keys this worker's samples use
    used_slot: torch.Tensor  # (U,) cache slot of each used row, -1 = transient
    push_keys: torch.Tensor  # rows whose value (+ optimizer state) is pushed first
    push_slots: torch.Tensor  # their slots (read before any pull overwrites them)
    pull_pos: torch.Tensor  # positions in used_keys pulled from the PS
    local_pos: torch.Tensor  # positions whose update is applied locally
    grad_pos: torch.Tensor  # positions whose gradient is pushed to the PS
    rows: Dict[str, int] = field(default_factory=dict)  # rows per TransmissionKind (+ DES_ROWS)
    num_samples: int = 0
    # positions in used_keys the PS serves as pooled partial sums (EsdConfig.des_misses):
    # never cached, never pulled, their gradient goes up per bag
    des_pos: torch.Tensor = field(default_factory=_empty)
    # fingerprint of the row keys of the local batch this plan was made for
    # (set by the input dist for its own worker; the sharded module checks it)
    fingerprint: Optional[int] = None
    # fingerprint of the whole global batch (EsdInputDist mode "global", else 0):
    # sent with this worker's PS requests, the PS checks that all workers agree
    global_fingerprint: int = 0
    # of push_keys, the dirty rows written back because the link slowed down (EsdConfig.flush_on_slowdown)
    flushed_rows: int = 0

    @property
    def pull_keys(self) -> torch.Tensor:
        return self.used_keys[self.pull_pos]


def row_counts(miss_pull: int, update_pull: int, miss_push: int, update_push: int, des_rows: int = 0) -> Dict[str, int]:
    """A plan's ``rows``: rows per transmission kind, and the DES-served rows."""
    return {
        TransmissionKind.MISS_PULL: int(miss_pull),
        TransmissionKind.UPDATE_PULL: int(update_pull),
        TransmissionKind.MISS_PUSH: int(miss_push),
        TransmissionKind.UPDATE_PUSH: int(update_push),
        DES_ROWS: int(des_rows),
    }


@dataclass
class IterationPlan:
    """Plans of all workers for one iteration (every worker rank holds it)."""

    iteration: int
    workers: List[Optional[WorkerPlan]]  # None for workers the directory does not track
    # sorted distinct row keys of the whole global batch (every worker's used_keys;
    # None where the plan was made from a summary): what its gradient phase may change
    batch_keys: Optional[torch.Tensor] = None
    # every worker's samples in this iteration (from the dispatch's assignment, the same on
    # every worker; None where unknown): a worker without samples sends no dense gradients
    sample_counts: Optional[Tuple[int, ...]] = None

    def rows(self, worker: int) -> Dict[str, int]:
        p = self.workers[worker]
        if p is None:
            raise EsdConfigError(f"worker {worker} is not tracked by this directory")
        return dict(p.rows)
