"""Small operations on ascending key tensors shared by the cache directory."""

from __future__ import annotations

from typing import Tuple

import torch


def group_rank(groups: torch.Tensor, num_groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """For values sorted by group: rank of each inside its group, and group starts."""
    counts = torch.bincount(groups, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(groups.numel()) - starts[groups], starts


def sorted_member(sorted_keys: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``keys`` in ``sorted_keys`` (ascending), as a bool mask."""
    if sorted_keys.numel() == 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    pos = torch.searchsorted(sorted_keys, keys).clamp_(max=sorted_keys.numel() - 1)
    return sorted_keys[pos] == keys


def count_of(keys: torch.Tensor, user_keys: torch.Tensor, user_counts: torch.Tensor) -> torch.Tensor:
    """``user_counts`` of each key in ``user_keys`` (ascending), 0 for a key absent from it."""
    if user_keys.numel() == 0:
        return torch.zeros_like(keys)
    pos = torch.searchsorted(user_keys, keys).clamp_(max=user_keys.numel() - 1)
    return torch.where(user_keys[pos] == keys, user_counts[pos], torch.zeros_like(keys))
