"""Selecting samples and features of TorchRec batches (``Batch``, ``KeyedJaggedTensor``)."""

from __future__ import annotations

from typing import Sequence

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd.config import EsdConfigError


def select_samples(batch: Batch, index: torch.Tensor) -> Batch:
    """The samples ``index`` (any order, no repeats needed) of ``batch``."""
    kjt = batch.sparse_features
    return Batch(
        dense_features=batch.dense_features.index_select(0, index),
        sparse_features=select_kjt_samples(kjt, index),
        labels=batch.labels.index_select(0, index),
    )


def select_kjt_samples(kjt: KeyedJaggedTensor, index: torch.Tensor) -> KeyedJaggedTensor:
    """Rows ``index`` of every key of a KJT (values, lengths and weights)."""
    num_keys = len(kjt.keys())
    stride = kjt.stride()
    index = index.to(torch.int64)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= stride):
        raise IndexError(f"sample index out of range for a batch of {stride} samples")
    lengths = kjt.lengths().view(num_keys, stride).to(torch.int64)
    # the KJT keeps its offsets once computed: a batch cut into many selections sums once
    offsets = kjt.offsets().to(torch.int64)
    sel_len = lengths[:, index]  # (F, b)
    starts = offsets[:-1].view(num_keys, stride)[:, index].reshape(-1)
    flat_len = sel_len.reshape(-1)
    total = int(flat_len.sum())
    # gather positions: start_j + (0..len_j-1) for every selected bag j, in order
    bag = torch.repeat_interleave(torch.arange(flat_len.numel()), flat_len)
    within = torch.arange(total) - torch.repeat_interleave(
        torch.cumsum(flat_len, 0) - flat_len, flat_len
    )
    pos = starts[bag] + within
    weights = kjt.weights_or_none()
    return KeyedJaggedTensor(
        keys=kjt.keys(),
        values=kjt.values().index_select(0, pos),
        lengths=flat_len.to(kjt.lengths().dtype),
        weights=weights.index_select(0, pos) if weights is not None else None,
        stride=int(index.numel()),
    )


def select_kjt_range(kjt: KeyedJaggedTensor, start: int, stop: int) -> KeyedJaggedTensor:
    """Samples ``[start, stop)`` of every key of a KJT: :func:`select_kjt_samples` of
    ``arange(start, stop)``, as one slice of the values (and weights) per key."""
    num_keys = len(kjt.keys())
    stride = kjt.stride()
    if not 0 <= start <= stop <= stride:
        raise IndexError(f"sample range [{start}, {stop}) out of range for a batch of {stride} samples")
    offsets = kjt.offsets().to(torch.int64)
    first = torch.arange(num_keys, dtype=torch.int64) * stride
    lo, hi = offsets[first + start].tolist(), offsets[first + stop].tolist()
    lengths = kjt.lengths().view(num_keys, stride)[:, start:stop].reshape(-1)
    values, weights = kjt.values(), kjt.weights_or_none()
    return KeyedJaggedTensor(
        keys=kjt.keys(),
        values=torch.cat([values[a:b] for a, b in zip(lo, hi)]),
        lengths=lengths.clone(),
        weights=torch.cat([weights[a:b] for a, b in zip(lo, hi)]) if weights is not None else None,
        stride=stop - start,
    )


def select_kjt_keys(kjt: KeyedJaggedTensor, keep: Sequence[str]) -> KeyedJaggedTensor:
    """The features ``keep`` of ``kjt`` (in ``kjt``'s order); all must exist."""
    keys = kjt.keys()
    missing = [k for k in keep if k not in keys]
    if missing:
        raise EsdConfigError(f"batch has no feature(s) {missing}")
    wanted = set(keep)
    b = kjt.stride()
    lengths = kjt.lengths().view(len(keys), b)
    per_key = lengths.sum(1).tolist()
    vals = torch.split(kjt.values(), per_key)
    w = kjt.weights_or_none()
    wts = torch.split(w, per_key) if w is not None else None
    idx = [i for i, k in enumerate(keys) if k in wanted]
    return KeyedJaggedTensor(
        keys=[keys[i] for i in idx],
        values=torch.cat([vals[i] for i in idx]) if idx else kjt.values()[:0],
        lengths=lengths[idx].reshape(-1),
        weights=torch.cat([wts[i] for i in idx]) if wts is not None and idx else None,
        stride=b,
    )
