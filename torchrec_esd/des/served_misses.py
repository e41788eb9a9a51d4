"""DES-served cache misses: the wire format's sizes and the per-worker choice.

With ``EsdConfig(des_misses=True)`` a worker may have the parameter servers
serve some of its missing rows DES-style (arXiv 1909.04823) instead of pulling
them: it sends, per distinct ``(row, bag)`` pair, one int64 that packs the row
key and the bag's index (``key * bags + bag``) and, only when some pair's
pooling weight is not 1 (weighted features, an id twice in a bag), the pair
weights; every PS answers one pooled partial sum per bag over the rows it
owns; after the backward the worker sends one gradient vector per bag, which
the PS scatters to the rows (times their weights) and adds to the other
workers' gradients of those rows before it applies the optimizer once, so the
update is exactly the synchronous one.

A pulled row is priced at its key up and ``row_bytes`` down.  Its update is
not charged: a pulled row fills the cache, and a cached row's updates are
applied locally and written back at most once per stay in the cache, shared by
all its later hits -- the (unknown) value of the cache fill is credited this way,
so a lone missing row is pulled and cached, and DES takes bags with several
cold rows.  A DES bag moves its ``dim``-vector down and its gradient up, plus
:func:`pair_bytes` per ``(row, bag)`` pair.  :func:`choose_des_rows`
picks, per worker, the bags for which DES is cheaper, with each candidate
row's pull cost shared among the bags that use it on that worker; a row is
served by DES only if *every* bag of that worker using it is a DES bag
(otherwise it is pulled anyway, and all its bags read the pulled copy).
"""

from __future__ import annotations

import torch

KEY_BYTES = 8  # int64 row key
PAIR_BYTES = 8  # int64 packing a row key and a bag index
WEIGHT_BYTES = 4  # float32 pooling weight of a pair, sent only for weighted requests


def pair_bytes(weighted: bool) -> int:
    """Bytes per DES pair on the wire (weights only when they are not all 1)."""
    return PAIR_BYTES + (WEIGHT_BYTES if weighted else 0)


def des_bag_bytes(num_pairs: torch.Tensor, dim, value_bytes: int = 4, weighted: bool = False) -> torch.Tensor:
    """Bytes a DES bag costs: ``num_pairs`` request pairs up, the partial sum
    down and the bag gradient up (nothing for a bag without pairs); ``dim``
    may be a tensor broadcasting against ``num_pairs``."""
    vec = 2 * dim * value_bytes
    return (num_pairs > 0).to(torch.float64) * vec + num_pairs.to(torch.float64) * pair_bytes(weighted)


def row_pull_bytes(row_bytes: int) -> int:
    """Bytes a pulled row is priced at: its key up, the row (+ optimizer state) down."""
    return KEY_BYTES + row_bytes


def choose_des_rows(
    pair_pos: torch.Tensor,
    pair_bag: torch.Tensor,
    candidate: torch.Tensor,
    row_bytes: int,
    dim: int,
    value_bytes: int = 4,
    weighted: bool = False,
) -> torch.Tensor:
    """Which of a worker's used rows the PS serves as partial sums.

    Args:
        pair_pos: ``[N]`` position (in the worker's used rows) of every
            distinct ``(row, bag)`` pair of the worker's samples.
        pair_bag: ``[N]`` the pair's bag (any integer id, one per bag).
        candidate: ``[U]`` bool, rows the worker would have to pull (missing,
            or cached but outdated beyond the staleness bound).
        row_bytes: bytes of one pulled row (values + optimizer state).
        dim: embedding dimension.
        weighted: the batch has per-sample weights (pairs carry weights).

    Returns ``[U]`` bool: rows served by DES (a subset of ``candidate``).
    """
    U = candidate.numel()
    out = torch.zeros(U, dtype=torch.bool)
    if pair_pos.numel() == 0 or not bool(candidate.any()):
        return out
    bags, bag_of_pair = torch.unique(pair_bag, return_inverse=True)
    nb = bags.numel()
    cand_pair = candidate[pair_pos]
    n_bags_of_row = torch.bincount(pair_pos, minlength=U).clamp(min=1).to(torch.float64)
    share = row_pull_bytes(row_bytes) / n_bags_of_row[pair_pos]
    pull = torch.zeros(nb, dtype=torch.float64).index_add_(
        0, bag_of_pair, torch.where(cand_pair, share, torch.zeros_like(share))
    )
    pairs = torch.bincount(bag_of_pair, weights=cand_pair.to(torch.float64), minlength=nb)
    des_bag = des_bag_bytes(pairs, dim, value_bytes, weighted) < pull
    # a candidate row is DES-served iff none of its bags on this worker pulls it
    pulled_somewhere = torch.bincount(pair_pos[~des_bag[bag_of_pair]], minlength=U) > 0
    return candidate & ~pulled_somewhere


def des_pairs(kjt, keys: torch.Tensor, owner: torch.Tensor, workers) -> dict:
    """Per worker of ``workers``: the distinct (row key, bag) pairs of its
    samples (``keys`` every KJT value's global row key, ``owner`` its worker),
    as ``(row keys, bags, weighted)``."""
    b = kjt.stride()
    nbags = max(len(kjt.keys()) * b, 1)
    bag = torch.repeat_interleave(torch.arange(len(kjt.keys()) * b), kjt.lengths().to(torch.int64))
    out = {}
    for w in workers:
        m = owner == w
        pair = torch.unique(keys[m] * nbags + bag[m])
        out[w] = (pair // nbags, pair % nbags, kjt.weights_or_none() is not None)
    return out
