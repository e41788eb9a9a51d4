"""DES-served rows of one forward, and their split over the PS ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from torchrec_esd.config import EsdConfigError
from torchrec_esd.layout import KeySpace


@dataclass
class DesRequest:
    """A worker's DES-served rows for one forward: distinct ``(row key, bag)``
    pairs with their pooling weights; bags are numbered ``0..num_bags-1``."""

    keys: torch.Tensor  # [N] int64 global row keys
    bags: torch.Tensor  # [N] int64 bag of each pair
    weights: torch.Tensor  # [N] float32 pooling weight of each pair
    num_bags: int

    @staticmethod
    def empty() -> "DesRequest":
        e = torch.empty(0, dtype=torch.int64)
        return DesRequest(e, e, torch.empty(0), 0)


@dataclass
class DesRoute:
    """A :class:`DesRequest` split over the PS ranks: per PS, its pairs packed
    as ``key * bags + bag`` with bag indices local to that PS, their weights
    (sent only if some weight is not 1), and which request bag each of that
    PS's bags is (``ps_bags``).

    Invariant: every bag of a PS has at least one of that PS's pairs
    (``bags_per_ps <= pairs_per_ps``), and ``key * bags + bag`` fits int64."""

    packed: List[torch.Tensor]
    weights: List[torch.Tensor]
    weighted: List[bool]
    ps_bags: List[torch.Tensor]
    pairs_per_ps: torch.Tensor
    bags_per_ps: torch.Tensor
    num_bags: int

    @staticmethod
    def build(routing: KeySpace, req: DesRequest) -> "DesRoute":
        p, _ = routing.locate(req.keys)
        total_rows = routing.total_rows
        packed, weights, weighted, ps_bags = [], [], [], []
        for i in range(routing.num_ps):
            m = p == i
            bags, inv = torch.unique(req.bags[m], return_inverse=True)
            nb = bags.numel()
            if total_rows * max(nb, 1) >= 2**63:
                raise EsdConfigError(
                    f"DES request of {nb} bags over tables of {total_rows} rows does not fit the int64 "
                    "(row key, bag) packing; use smaller batches or disable EsdConfig.des_misses"
                )
            packed.append(req.keys[m] * nb + inv.view(-1))
            w = req.weights[m].to(torch.float32)
            weights.append(w)
            weighted.append(bool((w != 1).any()))
            ps_bags.append(bags)
        return DesRoute(
            packed, weights, weighted, ps_bags,
            torch.tensor([k.numel() for k in packed], dtype=torch.int64),
            torch.tensor([b.numel() for b in ps_bags], dtype=torch.int64),
            req.num_bags,
        )
