"""The loss that trains vanilla TorchRec's model when batch shares are uneven.

Vanilla TorchRec trains every rank on ``B / W`` samples of a global batch of
``B`` and averages the gradients over the ``W`` ranks (DDP for the dense part,
TorchRec's gradient division for the embeddings), so each rank's loss is the
mean over its local batch.  ESD gives worker ``w`` a share of ``B_w`` samples.
When the shares are uneven a local mean weights a sample by ``1 / B_w`` instead
of ``1 / B``, and the model differs from vanilla's without any error.  The loss
that trains the same model is ``sum(per-sample losses) * W / B``
(:meth:`EsdInputDist.loss <torchrec_esd.distributed.input_dist.EsdInputDist.loss>`).

The scaling cannot be applied behind the user's back: the loss reduction is the
user's code, a gradient cannot tell a local mean from the right loss, and the
dense gradients are reduced by the DDP that DMP builds.  So the contract is
explicit and checked instead: under uneven shares every training batch's loss
must go through ``EsdInputDist.loss``, which takes the per-sample losses (it
checks their number against the batch, so a loss already reduced over the
batch cannot slip through).  A training batch whose loss did not is an error
at the next training forward or at the flush, on every worker (they all run
the same loop), and the workers abort the parameter servers with it.  Under
equal shares a local mean is what vanilla TorchRec computes, so it stays
allowed.
"""

from __future__ import annotations

import threading
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from torchrec_esd.config import EsdConfig, EsdConfigError


class LossScaling:
    """Per worker: the global batch of every dispatched iteration, the batch
    the model trained last, and whether its loss still has to be scaled."""

    def __init__(self, config: EsdConfig) -> None:
        self._config = config
        self._lock = threading.Lock()  # dispatch-ahead records from its own thread
        self._global_batch: Dict[int, int] = {}  # iteration -> B, dispatched, not yet computed
        self._shares: Dict[int, List[int]] = {}  # iteration -> the shares it was dispatched at
        self._trained: Optional[Tuple[int, int, int]] = None  # (iteration, local samples, B)
        self._trained_shares: Optional[List[int]] = None
        self._owed: Optional[int] = None  # iteration whose loss must still be scaled
        self.variable_shares = False  # a dispatcher decides the shares per batch (uneven in general)

    def uneven(self, global_batch: int, shares: Optional[Sequence[int]] = None) -> bool:
        if self.variable_shares:
            return True
        return len(set(shares if shares is not None else self._config.batch_shares(global_batch))) > 1

    def dispatched(self, iteration: int, global_batch: int, shares: Optional[Sequence[int]] = None) -> None:
        """``iteration`` was dispatched with ``shares`` (default: the config's)."""
        with self._lock:
            self._global_batch[iteration] = int(global_batch)
            self._shares[iteration] = list(shares) if shares is not None else self._config.batch_shares(global_batch)

    def forward(self, iteration: int, local_samples: int, training: bool) -> Optional[str]:
        """The ESD module computes ``iteration``'s batch; returns the error of
        an earlier training batch whose loss was not scaled (or ``None``)."""
        problem = self.unscaled()
        with self._lock:
            b = self._global_batch.pop(iteration, None)
            shares = self._shares.pop(iteration, None)
        if training and b is not None:
            self._trained = (iteration, int(local_samples), b)
            self._trained_shares = shares
            self._owed = iteration if self.uneven(b, shares) else None
        return problem

    def unscaled(self) -> Optional[str]:
        """The error for a trained batch whose loss never went through
        ``EsdInputDist.loss`` under uneven shares (reported once)."""
        if self._owed is None or self._trained is None:
            return None
        iteration, b = self._owed, self._trained[2]
        self._owed = None
        if self.variable_shares:
            what, weights = "decided per batch by the dispatcher", "1/(local batch)"
        else:
            shares = self._trained_shares if self._trained_shares is not None else self._config.batch_shares(b)
            what, weights = str(shares), f"1/{min(shares)} .. 1/{max(shares)}"
        return (
            f"the loss of iteration {iteration} was not scaled by EsdInputDist.loss: the batch shares "
            f"{what} of the global batch of {b} are uneven, so a local mean weights samples by "
            f"{weights} instead of vanilla TorchRec's 1/{b} and trains another "
            "model; compute loss = esd_dist.loss(per_sample_losses) (e.g. "
            "binary_cross_entropy_with_logits(logits, labels, reduction='none'))"
        )

    def scale(self, per_sample: torch.Tensor) -> torch.Tensor:
        """``per_sample.sum() * W / B`` for the batch the model trained last."""
        if self._trained is None:
            raise EsdConfigError(
                "EsdInputDist.loss() scales the loss of the batch the model just computed; "
                "run the model's forward on a dispatched batch first"
            )
        iteration, n, b = self._trained
        if not isinstance(per_sample, torch.Tensor) or per_sample.dim() == 0 or per_sample.shape[0] != n:
            got = tuple(per_sample.shape) if isinstance(per_sample, torch.Tensor) else type(per_sample).__name__
            raise EsdConfigError(
                f"EsdInputDist.loss() takes this worker's {n} per-sample losses of iteration {iteration} "
                f"(reduction='none', first dimension {n}), got {got}; a loss already reduced over the "
                "batch cannot be weighted like vanilla TorchRec's"
            )
        if per_sample.requires_grad and self._owed == iteration:
            self._owed = None
        return per_sample.sum() * (self._config.num_workers / b)
