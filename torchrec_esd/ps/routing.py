"""Placement of global row keys over the parameter-server ranks.

Self-contained on purpose: the key-space owner (a later ``layout`` module) may
build it, but nothing here depends on that module.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_esd.config import EsdConfigError


class RowRouting:
    """Global row keys and their placement over PS ranks.

    A row of table ``t`` with id ``i`` has the global key
    ``table_offset[t] + i``; PS ``p`` owns ids ``[p * block_t, (p+1) * block_t)``
    of every table and stores them contiguously, table after table.

    Invariants: ``offsets[-1]`` is the number of rows of all tables (keys are
    ``0 .. offsets[-1]-1``); ``ps_rows[p]`` rows live on PS ``p`` and
    ``ps_rows.sum() == offsets[-1]``.
    """

    def __init__(self, tables: Sequence[EmbeddingBagConfig], num_ps: int) -> None:
        if not tables:
            raise EsdConfigError("no embedding tables for the parameter servers")
        dims = {t.embedding_dim for t in tables}
        if len(dims) != 1:
            raise EsdConfigError(
                f"ESD tables must share one embedding_dim, got {sorted(dims)} "
                f"({[(t.name, t.embedding_dim) for t in tables]})"
            )
        self.dim = dims.pop()
        self.num_ps = num_ps
        self.names = [t.name for t in tables]
        self.rows = torch.tensor([t.num_embeddings for t in tables], dtype=torch.int64)
        self.offsets = torch.zeros(len(tables) + 1, dtype=torch.int64)
        self.offsets[1:] = torch.cumsum(self.rows, 0)
        self.block = (self.rows + num_ps - 1) // num_ps
        # rows of each table on each PS, and where each table starts on each PS
        owned = torch.stack(
            [
                (self.rows - p * self.block).clamp(min=0).minimum(self.block)
                for p in range(num_ps)
            ]
        )  # [P, T]
        self.owned = owned
        self.ps_table_base = torch.zeros(num_ps, len(tables), dtype=torch.int64)
        self.ps_table_base[:, 1:] = torch.cumsum(owned, 1)[:, :-1]
        self.ps_rows = owned.sum(1)  # [P]

    @property
    def total_rows(self) -> int:
        return int(self.offsets[-1])

    def table_index(self, name: str) -> int:
        return self.names.index(name)

    def keys(self, table: int, ids: torch.Tensor) -> torch.Tensor:
        return ids + self.offsets[table]

    def locate(self, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(PS index, row index inside that PS's storage) of each key; keys
        must be in ``[0, total_rows)``."""
        t = torch.searchsorted(self.offsets, keys, right=True) - 1
        ids = keys - self.offsets[t]
        p = ids // self.block[t]
        local = self.ps_table_base[p, t] + ids - p * self.block[t]
        return p, local
