"""The sparse optimizer that parameter servers and workers apply to rows."""

from __future__ import annotations

import math
from dataclasses import dataclass

from typing import Optional

import torch

from torchrec_esd.config import EsdConfigError


@dataclass(frozen=True)
class SparseOptimizer:
    """Row-sparse optimizer with FBGEMM's fused-optimizer semantics.

    * ``"sgd"``: ``w -= lr * g``
    * ``"rowwise_adagrad"`` (FBGEMM ``EXACT_ROWWISE_ADAGRAD``):
      ``m += mean(g * g)``; ``w -= lr * g / (sqrt(m) + eps)``

    ``g`` is the row's gradient summed over the whole global batch.
    """

    name: str = "sgd"
    lr: float = 0.01
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "rowwise_adagrad"):
            raise EsdConfigError(
                f"sparse optimizer must be 'sgd' or 'rowwise_adagrad', got {self.name!r}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise EsdConfigError(f"sparse optimizer lr must be > 0, got {self.lr!r}")

    @property
    def state_dim(self) -> int:
        return 1 if self.name == "rowwise_adagrad" else 0

    def apply_(self, rows: torch.Tensor, state: torch.Tensor, grad: torch.Tensor,
               dims: Optional[torch.Tensor] = None) -> None:
        """Update ``rows`` [n, D] and ``state`` [n, S] in place with ``grad``.

        ``dims`` (n,): each row's own embedding dim when rows are zero-padded
        to ``D`` (tables of different dims, :mod:`torchrec_esd.layout`); the
        row-wise mean then runs over the row's own values (padding has zero
        gradient, so the sum is the same)."""
        if self.name == "sgd":
            rows.add_(grad, alpha=-self.lr)
        else:
            if dims is None:
                state[:, 0].add_(grad.pow(2).mean(dim=1))
            else:
                state[:, 0].add_(grad.pow(2).sum(dim=1) / dims.to(grad.dtype))
            rows.addcdiv_(grad, state[:, 0:1].sqrt() + self.eps, value=-self.lr)
