"""The records of one batch on its way through :class:`~torchrec_esd.distributed.input_dist.EsdInputDist`:
as read and checked (:class:`ReadBatch`), and as dispatched to this worker (:class:`DispatchedBatch`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd.config import EsdConfigError
from torchrec_esd.dispatch import DispatchResult


@dataclass
class DispatchedBatch:
    """One dispatched batch: this worker's samples and what produced them."""

    local: Batch
    result: Optional[DispatchResult]
    mine: torch.Tensor
    loss_scale: float
    shares: Optional[List[int]] = None
    link_bytes_per_s: Optional[List[float]] = None  # the estimates it was decided with (online_links)
    compute_samples_per_s: Optional[List[float]] = None  # the compute rates it was decided with (measured)


@dataclass
class ReadBatch:
    """One batch as read (the ids gathered in local mode) and checked:
    ``esd`` is its ESD-managed features (what the directory plans); ``bad``
    the failed id check, ``failure`` any other error, both raised at its turn."""

    batch: Optional[Batch]  # None: the loader failed before yielding it
    global_kjt: Optional[KeyedJaggedTensor] = None
    strides: Optional[List[int]] = None
    esd: Optional[KeyedJaggedTensor] = None
    bad: Optional["BadBatch"] = None
    failure: Optional[BaseException] = None


def readable(r: ReadBatch) -> bool:
    """Neither the id check nor the read failed."""
    return r.bad is None and r.failure is None


class BadBatch(Exception):
    """A batch failed the id checks (every worker sees the same global ids)."""

    def __init__(self, error: EsdConfigError) -> None:
        super().__init__(str(error))
        self.error = error
