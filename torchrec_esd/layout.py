"""The ESD key space: the one owner of tables, row keys, PS blocks and row formats.

Every ESD row is named by a *global row key*: id ``i`` of table ``t`` (tables in
the order the :class:`KeySpace` was given them) has key ``offsets[t] + i``.  The
cache directory, the cost model, the PS routing, the planner and the sharded
module all name rows this way, and all of them read the key space from one
:class:`KeySpace` instead of rebuilding offsets and feature maps of their own.

A global batch is decoded once (:meth:`KeySpace.decode`): the result,
:class:`BatchKeys`, holds the global key of every KJT value in KJT order, the
sample of every value, and (computed on first use) the sample-major order the
cost model reads.  ``decode`` remembers the last KJT it decoded, so consumers
handed the same KJT object in one iteration share one decode.

PS placement (TorchRec's row-wise rule): PS ``p`` owns ids
``[p * block_t, (p + 1) * block_t)`` of every table, ``block_t = ceil(N_t / P)``,
stored contiguously table after table (:meth:`KeySpace.locate`).

Row format: a row of table ``t`` is ``dim_t`` values of ``dtype`` (fp32) plus
``state_dim`` optimizer-state values (fp32).  Tables of different dims share
one key space: rows are stored and sent :attr:`KeySpace.wire_dim` (the widest
table's dim) wide, a narrower table's row zero-padded, and the optimizer
normalises by each row's own dim (:meth:`KeySpace.dim_of`), so padding never
changes a value.  A pulled or pushed row really moves ``wire_dim`` values plus
its optimizer state (the cost model prices rows so).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd.config import EsdConfigError

KEY_DTYPE = torch.int64
STATE_DTYPE = torch.float32  # optimizer state is kept in fp32 whatever the row dtype


class EsdIdError(EsdConfigError):
    """A batch id the key space cannot place: out of its table, a feature no
    table reads, or ids of a non-integer dtype.  The one exception type for a
    bad id, raised by every consumer of :meth:`KeySpace.decode`."""


@dataclass(frozen=True)
class RowFormat:
    """What one row of a table is, in memory and on the wire."""

    dim: int
    dtype: torch.dtype = torch.float32
    state_dim: int = 0  # optimizer-state values per row (fp32)

    @property
    def value_bytes(self) -> int:
        return self.dim * self.dtype.itemsize

    @property
    def state_bytes(self) -> int:
        return self.state_dim * STATE_DTYPE.itemsize

    @property
    def row_bytes(self) -> int:
        """Bytes of one row with its optimizer state (a pull or a value push)."""
        return self.value_bytes + self.state_bytes


def table_feature_map(tables: Sequence[EmbeddingBagConfig]) -> Dict[str, int]:
    """feature name -> index of the table that reads it; a feature read by two
    tables is an error (TorchRec's EmbeddingBagCollection rejects it too)."""
    out: Dict[str, int] = {}
    for ti, t in enumerate(tables):
        for f in t.feature_names:
            if f in out:
                raise EsdConfigError(
                    f"feature {f!r} is mapped to two tables ({tables[out[f]].name!r} and {t.name!r})"
                )
            out[f] = ti
    return out


def table_fingerprint(table: EmbeddingBagConfig) -> List:
    """What two ranks must agree on for one table (name, rows, dim, features, pooling)."""
    return [table.name, table.num_embeddings, table.embedding_dim, list(table.feature_names), str(table.pooling)]


@dataclass
class BatchKeys:
    """One batch decoded into global row keys (see the module docstring)."""

    features: List[str]  # the KJT's keys, in its order
    lengths: torch.Tensor  # (F, B) int64 bag lengths
    keys: torch.Tensor  # (N,) global row key of every value, KJT order
    table: torch.Tensor  # (F,) table index of every feature
    _sample: Optional[torch.Tensor] = field(default=None, repr=False)
    _sample_major: Optional[Tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False)
    _distinct: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def num_samples(self) -> int:
        return int(self.lengths.shape[1])

    @property
    def sample(self) -> torch.Tensor:
        """(N,) sample index of every value, KJT order."""
        if self._sample is None:
            b = self.num_samples
            s = torch.arange(b).repeat(len(self.features))
            self._sample = torch.repeat_interleave(s, self.lengths.reshape(-1))
        return self._sample

    def sample_major(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(keys, offsets): ``keys[offsets[s]:offsets[s+1]]`` are sample ``s``'s
        keys, feature by feature in KJT order."""
        if self._sample_major is None:
            self._sample_major = _to_sample_major(self.keys, self.lengths)
        return self._sample_major

    def distinct(self) -> torch.Tensor:
        """The batch's distinct keys, ascending."""
        if self._distinct is None:
            self._distinct = torch.unique(self.keys)
        return self._distinct


def _to_sample_major(keys: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    nf, b = lengths.shape
    if keys.numel() == 0:
        return keys.new_zeros(0), torch.zeros(b + 1, dtype=torch.int64)
    l0 = int(lengths[0, 0])
    if bool((lengths == l0).all()):  # fixed bag size (e.g. one-hot): a reshape, no gather
        out = keys.view(nf, b, l0).permute(1, 0, 2).reshape(-1)
        return out, torch.arange(0, (b + 1) * nf * l0, nf * l0, dtype=torch.int64)
    # feature-major bags (f, s) -> sample-major bags (s, f), without a sort
    flat_fm = lengths.reshape(-1)
    start_fm = torch.cumsum(flat_fm, 0) - flat_fm
    flat_sm = lengths.t().reshape(-1)
    start_sm = (torch.cumsum(flat_sm, 0) - flat_sm).view(b, nf).t().reshape(-1)
    bag = torch.repeat_interleave(torch.arange(nf * b), flat_fm)
    dest = start_sm[bag] + (torch.arange(keys.numel()) - start_fm[bag])
    out = torch.empty_like(keys)
    out[dest] = keys
    offsets = torch.zeros(b + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths.sum(0), 0)
    return out, offsets


class KeySpace:
    """Tables, feature -> table, row keys, PS blocks and row formats of the
    ESD-managed tables of one job.

    Args:
        tables: the ESD tables, in key order.
        num_ps: parameter servers the rows are split over (blocks, :meth:`locate`).
        state_dim: optimizer-state values per row (the PS optimizer's).
        dtype: row value dtype.
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        num_ps: int = 1,
        state_dim: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not tables:
            raise EsdConfigError("no ESD embedding tables: the key space is empty")
        if num_ps < 1:
            raise EsdConfigError(f"num_ps must be >= 1, got {num_ps}")
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise EsdConfigError(f"two ESD tables have the same name: {names}")
        self.tables: List[EmbeddingBagConfig] = list(tables)
        self.names: List[str] = names
        self.num_tables = len(self.tables)
        self.num_ps = num_ps
        self.state_dim = state_dim
        self.feature_table = table_feature_map(self.tables)
        self.formats: List[RowFormat] = [RowFormat(t.embedding_dim, dtype, state_dim) for t in self.tables]
        self.rows = torch.tensor([t.num_embeddings for t in self.tables], dtype=torch.int64)
        self.offsets = torch.zeros(self.num_tables + 1, dtype=torch.int64)
        self.offsets[1:] = torch.cumsum(self.rows, 0)
        self.total_rows = int(self.offsets[-1])
        self.dims = torch.tensor([f.dim for f in self.formats], dtype=torch.int64)
        self._max_dim = max(f.dim for f in self.formats)
        self._uniform_dim = self._max_dim if all(f.dim == self._max_dim for f in self.formats) else None
        # PS blocks: rows of table t on PS p, and where table t starts on PS p
        self.block = (self.rows + num_ps - 1) // num_ps
        self.owned = torch.stack(
            [(self.rows - p * self.block).clamp(min=0).minimum(self.block) for p in range(num_ps)]
        )  # [P, T]
        self.ps_table_base = torch.zeros(num_ps, self.num_tables, dtype=torch.int64)
        self.ps_table_base[:, 1:] = torch.cumsum(self.owned, 1)[:, :-1]
        self.ps_rows = self.owned.sum(1)  # [P]
        self._last: Optional[Tuple[KeyedJaggedTensor, BatchKeys]] = None

    # ------------------------------------------------------------ tables
    @property
    def uniform_dim(self) -> Optional[int]:
        """The embedding dim shared by every table, None when they differ."""
        return self._uniform_dim

    @property
    def max_dim(self) -> int:
        return self._max_dim

    @property
    def wire_dim(self) -> int:
        """Values per row as stored on the PS and in worker caches and as sent
        (the widest table's dim; narrower rows are zero-padded)."""
        return self.max_dim

    def row_dims(self, keys: torch.Tensor) -> Optional[torch.Tensor]:
        """Each key's table dim, or ``None`` when every table has the wire
        dim (the optimizer's per-row normaliser; ``None`` keeps the fast path)."""
        return None if self.uniform_dim is not None else self.dim_of(keys)

    def table_index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise EsdConfigError(f"no ESD table {name!r} (tables: {self.names})") from None

    def keys(self, table: int, ids: torch.Tensor) -> torch.Tensor:
        """Global keys of ``ids`` of table index ``table``."""
        return ids.to(KEY_DTYPE) + self.offsets[table]

    def table_of(self, keys: torch.Tensor) -> torch.Tensor:
        """Table index of each global key."""
        return torch.searchsorted(self.offsets, keys, right=True) - 1

    def ids_of(self, keys: torch.Tensor) -> torch.Tensor:
        """Id inside its table of each global key."""
        return keys - self.offsets[self.table_of(keys)]

    def dim_of(self, keys: torch.Tensor) -> torch.Tensor:
        """Embedding dim of each global key's table."""
        return self.dims[self.table_of(keys)]

    def fingerprint(self) -> List:
        """What two ranks must agree on (tables, PS count, optimizer-state width)."""
        return [table_fingerprint(t) for t in self.tables] + [["num_ps", self.num_ps], ["state_dim", self.state_dim]]

    # ------------------------------------------------------------ PS blocks
    def locate(self, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(PS index, row index inside that PS's storage) of each key (keys
        in ``[0, total_rows)``).  With one PS its storage is the key space
        itself: the local rows are ``keys`` (the same tensor, not a copy)."""
        if self.num_ps == 1:
            return torch.zeros_like(keys), keys
        t = self.table_of(keys)
        ids = keys - self.offsets[t]
        p = ids // self.block[t]
        local = self.ps_table_base[p, t] + ids - p * self.block[t]
        return p, local

    # ------------------------------------------------------------ batches
    def decode(self, kjt: KeyedJaggedTensor) -> BatchKeys:
        """The batch's global row keys (see :class:`BatchKeys`); raises
        :class:`EsdIdError` naming the feature, id and table for a bad id.  The
        last KJT decoded is remembered: asking again for the same object
        returns the same :class:`BatchKeys`."""
        last = self._last
        if last is not None and last[0] is kjt:
            return last[1]
        out = self._decode(kjt)
        self._last = (kjt, out)
        return out

    def _decode(self, kjt: KeyedJaggedTensor) -> BatchKeys:
        values = kjt.values()
        if values.dtype not in (torch.int32, torch.int64):
            raise EsdIdError(f"KJT values must be int32/int64 ids, got {values.dtype}")
        feats = list(kjt.keys())
        nf, b = len(feats), kjt.stride()
        tix = []
        for f in feats:
            if f not in self.feature_table:
                raise EsdIdError(
                    f"batch feature {f!r} has no embedding table among the ESD tables (they read {sorted(self.feature_table)})"
                )
            tix.append(self.feature_table[f])
        table = torch.tensor(tix, dtype=torch.int64)
        lengths = kjt.lengths().view(nf, b).to(torch.int64) if nf else torch.zeros(0, b, dtype=torch.int64)
        values = values.to(KEY_DTYPE)
        per_feat = lengths.sum(1)
        if values.numel() == 0:
            return BatchKeys(feats, lengths, values, table)
        t_of = torch.repeat_interleave(table, per_feat)
        bad = (values < 0) | (values >= self.rows[t_of])
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            f = feats[int(torch.searchsorted(torch.cumsum(per_feat, 0), torch.tensor(i), right=True))]
            t = self.tables[int(t_of[i])]
            raise EsdIdError(f"feature {f!r}: id {int(values[i])} is outside table {t.name!r} of {t.num_embeddings} rows")
        return BatchKeys(feats, lengths, values + self.offsets[t_of], table)
