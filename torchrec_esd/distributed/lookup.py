"""Lookup (pooling) backends of the ESD embedding module, chosen by ``compute_kernel``.

A backend turns a batch's *working set* (the rows the batch uses, gathered by
the module from its row store and the PS replies) into TorchRec's pooled
``KeyedTensor``.  The working set is ``[R, max_dim]``: a row of a narrower
table is zero-padded, and each feature's output keeps its table's dim, so
tables of different embedding dims share one working set.  Padded columns get
zero gradients, so no update ever touches them.

Backends register under the ``compute_kernel`` name the sharding plan names
(:func:`lookup_backend`); the CPU/GPU-generic ``F.embedding_bag`` backend is
``esd_cache``.  A device-specific kernel is a new class registered here, not
an edit of the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Type

import torch
import torch.nn.functional as F
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedTensor

from torchrec_esd.config import EsdConfigError

ESD_COMPUTE_KERNEL = "esd_cache"


@dataclass
class BatchLayout:
    """Where every value of one local batch reads its row.

    ``pos`` indexes the working set for every value (KJT order); with
    DES-served rows, ``des_val`` marks the values whose row the PS pooled
    (their bags read a partial sum at ``des_base + i`` for bag ``des_bags[i]``).
    """

    features: List[str]  # the KJT's keys, in its order
    lengths: torch.Tensor  # (F, B) int64
    pos: torch.Tensor  # (N,) working-set row of every value
    weights: Optional[torch.Tensor]  # (N,) per-sample weights (weighted EBCs), else None
    esd_val: Optional[torch.Tensor] = None  # (N,) bool, CPU: value of an ESD table (None: all are)
    value_bag: Optional[torch.Tensor] = None  # (N,) bag (feature * B + sample) of every value
    des_val: Optional[torch.Tensor] = None  # (N,) bool: value served by a DES partial sum
    des_bags: Optional[torch.Tensor] = None  # distinct bags with a partial sum
    des_base: int = 0  # working-set row of the first partial sum


class PooledLookup:
    """``F.embedding_bag`` pooling (SUM / MEAN) over the working set; any device."""

    def __init__(self, tables: Sequence[EmbeddingBagConfig], embedding_names: Sequence[str]) -> None:
        self._mode: Dict[str, str] = {}
        self._dim: Dict[str, int] = {}
        for t in tables:
            if t.pooling not in (PoolingType.SUM, PoolingType.MEAN):
                raise EsdConfigError(
                    f"table {t.name!r} (features {t.feature_names}): ESD supports SUM and "
                    f"MEAN pooling, got {t.pooling}"
                )
            for f in t.feature_names:
                self._mode[f] = "sum" if t.pooling == PoolingType.SUM else "mean"
                self._dim[f] = t.embedding_dim
        self.embedding_names = list(embedding_names)
        self.dims = [self._dim[f] for f in self.embedding_names]
        self.max_dim = max(self.dims) if self.dims else 0
        self._uniform = len(set(self.dims)) <= 1
        self._modes = sorted({self._mode[f] for f in self.embedding_names})

    def __call__(self, layout: BatchLayout, working_set: torch.Tensor) -> KeyedTensor:
        keys, lengths, pos = layout.features, layout.lengths, layout.pos
        b = int(lengths.shape[1])
        device = working_set.device
        offs = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=device)
        offs[1:] = torch.cumsum(lengths.reshape(-1), 0)
        psw = layout.weights.to(working_set.dtype) if layout.weights is not None else None
        if layout.des_bags is not None and layout.des_bags.numel():
            per_key = self._pool_with_partials(layout, working_set, psw)
        elif len(self._modes) == 1:
            out = F.embedding_bag(pos, working_set, offs, mode=self._modes[0], per_sample_weights=psw,
                                  include_last_offset=True)
            per_key = out.view(len(keys), b, working_set.shape[1])
        else:  # tables with different poolings: pool feature by feature
            per = []
            for i, k in enumerate(keys):
                lo, hi = int(offs[i * b]), int(offs[(i + 1) * b])
                per.append(F.embedding_bag(
                    pos[lo:hi], working_set, offs[i * b : (i + 1) * b + 1] - lo, mode=self._mode.get(k, "sum"),
                    per_sample_weights=None if psw is None else psw[lo:hi], include_last_offset=True))
            per_key = torch.stack(per)
        index = {k: i for i, k in enumerate(keys)}
        order = [index[f] for f in self.embedding_names]
        if self._uniform and per_key.shape[2] == self.max_dim:
            pooled = per_key[order].permute(1, 0, 2).reshape(b, len(order) * self.max_dim)
        else:  # each feature keeps its table's dim
            pooled = torch.cat([per_key[i, :, :d] for i, d in zip(order, self.dims)], dim=1)
        return KeyedTensor(keys=list(self.embedding_names), length_per_key=list(self.dims), values=pooled)

    def _pool_with_partials(self, layout: BatchLayout, working_set: torch.Tensor, psw) -> torch.Tensor:
        """Each bag sums its other rows (weighted) plus its partial sum from
        the PS; MEAN divides by the bag's length."""
        keys, lengths, pos = layout.features, layout.lengths, layout.pos
        b, nbags = int(lengths.shape[1]), lengths.numel()
        device = working_set.device
        keep = ~layout.des_val
        w = psw if psw is not None else torch.ones(pos.numel(), dtype=working_set.dtype, device=device)
        nb = layout.des_bags.numel()
        bag2 = torch.cat([layout.value_bag[keep], layout.des_bags])
        pos2 = torch.cat([pos[keep], layout.des_base + torch.arange(nb, device=device)])
        w2 = torch.cat([w[keep], torch.ones(nb, dtype=working_set.dtype, device=device)])
        order = torch.argsort(bag2, stable=True)
        offs2 = torch.zeros(nbags + 1, dtype=torch.int64, device=device)
        offs2[1:] = torch.cumsum(torch.bincount(bag2, minlength=nbags), 0)
        out = F.embedding_bag(pos2[order], working_set, offs2, mode="sum", per_sample_weights=w2[order],
                              include_last_offset=True)
        mean_key = torch.tensor([self._mode.get(k, "sum") == "mean" for k in keys], device=device)
        if bool(mean_key.any()):
            flat = lengths.reshape(-1)
            denom = torch.where(mean_key.repeat_interleave(b), flat.clamp(min=1), torch.ones_like(flat))
            out = out / denom.to(out.dtype).view(-1, 1)
        return out.view(len(keys), b, working_set.shape[1])


_BACKENDS: Dict[str, Type[PooledLookup]] = {ESD_COMPUTE_KERNEL: PooledLookup}


def register_lookup_backend(compute_kernel: str, backend: Type[PooledLookup]) -> None:
    """Make ``compute_kernel`` (a name a sharding plan may give) build ``backend``."""
    _BACKENDS[compute_kernel] = backend


def lookup_backends() -> List[str]:
    return sorted(_BACKENDS)


def lookup_backend(compute_kernel: str, tables: Sequence[EmbeddingBagConfig],
                   embedding_names: Sequence[str]) -> PooledLookup:
    """The backend a plan's ``compute_kernel`` names; an unknown name is an error."""
    if compute_kernel not in _BACKENDS:
        raise EsdConfigError(
            f"compute_kernel {compute_kernel!r} has no ESD lookup backend (known: {lookup_backends()})"
        )
    return _BACKENDS[compute_kernel](tables, embedding_names)
