"""Where a parameter server keeps its rows: the storage interface the server
reads and writes through, a dense storage (every owned row materialised up
front) and a lazy one (rows created on first touch), and the deterministic
per-(table, row) initialiser the lazy storage draws from.

A PS addresses its rows by *local row index* (:meth:`KeySpace.locate`: the
tables' blocks it owns, table after table).  A row is ``wire_dim`` fp32 values
(a narrower table's columns past its dim stay zero) plus ``state_dim`` fp32
optimizer-state values (zero initially).

:class:`HashedUniformInit` gives every (table, id) its initial values from a
hash of (seed, table, id, column) alone: the same values on every rank and
run, whatever the order rows are touched in, so vanilla TorchRec can be given
the very same initial tables (:meth:`HashedUniformInit.table_weights`).
"""

from __future__ import annotations

import math
import zlib
from typing import Dict, Optional, Sequence

import torch

from torchrec_esd import ops
from torchrec_esd.config import EsdConfigError
from torchrec_esd.layout import KeySpace

_MANTISSA = (1 << 53) - 1


class HashedUniformInit:
    """Initial row values uniform in ``[-bound_t, bound_t)``, drawn per
    (table name, id, column) from a stable 64-bit hash (``ops.hash_ids``),
    so a table's values do not depend on which other tables are listed.

    ``bound_t`` defaults to TorchRec's default EmbeddingBagConfig init,
    ``sqrt(1 / num_embeddings)``.  O(n dim) per call for n rows; no state."""

    def __init__(self, tables: Sequence, seed: int = 0, bounds: Optional[Dict[str, float]] = None) -> None:
        self.names = [t.name for t in tables]
        self.dims = [t.embedding_dim for t in tables]
        self.rows = [t.num_embeddings for t in tables]
        self.seed = int(seed)
        if self.seed < 0:
            raise EsdConfigError(f"HashedUniformInit seed must be >= 0, got {seed}")
        bounds = bounds or {}
        self.bounds = [float(bounds.get(t.name, math.sqrt(1.0 / t.num_embeddings))) for t in tables]

    def rows_of(self, table: int, ids: torch.Tensor) -> torch.Tensor:
        """``[n, dim_t]`` float32 initial values of ``ids`` of table index ``table``."""
        dim = self.dims[table]
        ids = ids.to(torch.int64).view(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.rows[table]):
            raise EsdConfigError(f"table {self.names[table]!r}: ids outside [0, {self.rows[table]})")
        cells = (ids.view(-1, 1) * dim + torch.arange(dim, device=ids.device)).view(-1)
        # the salt names the table (not its position) and the seed (hash_ids needs salt >= 0)
        salt = (self.seed << 32) + zlib.crc32(self.names[table].encode())
        h = ops.hash_ids(cells, salt, 0)
        u = ((h >> 11) & _MANTISSA).to(torch.float64) * (1.0 / (1 << 53))
        b = self.bounds[table]
        return ((u * 2.0 - 1.0) * b).to(torch.float32).view(ids.numel(), dim)

    def table_weights(self, name: str) -> torch.Tensor:
        """The whole initial table ``[rows, dim]`` (for vanilla TorchRec and
        small tables: O(rows dim) memory)."""
        t = self.names.index(name)
        return self.rows_of(t, torch.arange(self.rows[t]))

    def init_collection(self, ebc) -> None:
        """Copy the initial tables into an EmbeddingBagCollection's weights (in place)."""
        with torch.no_grad():
            for name, bag in ebc.embedding_bags.items():
                if name in self.names:
                    bag.weight.copy_(self.table_weights(name).to(bag.weight.device, bag.weight.dtype))


class PsRowStorage:
    """The rows of one PS (see the module docstring).  ``rows`` / ``state``
    read local rows, :meth:`write` stores them, :meth:`touched` lists the
    local rows materialised, :meth:`full` returns every owned row."""

    def __init__(self, routing: KeySpace, ps_index: int, state_dim: int) -> None:
        self.routing = routing
        self.ps_index = ps_index
        self.state_dim = state_dim
        self.num_rows = int(routing.ps_rows[ps_index])
        self.wire_dim = routing.wire_dim
        base = routing.ps_table_base[ps_index]
        self._base = base  # [T] first local row of each table
        self._first_id = ps_index * routing.block  # [T] first id of each table this PS owns

    def table_of(self, local: torch.Tensor) -> torch.Tensor:
        """Table index of each local row."""
        # a table with no rows here shares its base with the next one: the last table
        # whose base is <= the row is the one that holds it
        return torch.searchsorted(self._base, local, right=True) - 1

    def row_dims(self, local: torch.Tensor) -> Optional[torch.Tensor]:
        """Each local row's table dim, None when all tables have the wire dim."""
        if self.routing.uniform_dim is not None:
            return None
        return self.routing.dims[self.table_of(local)]

    def rows(self, local: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state(self, local: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def write(self, local: torch.Tensor, weights: torch.Tensor, state: torch.Tensor) -> None:
        raise NotImplementedError

    def touched(self) -> torch.Tensor:
        raise NotImplementedError

    def full(self):
        """(weights ``[num_rows, wire_dim]``, state ``[num_rows, state_dim]``) of every owned row."""
        every = torch.arange(self.num_rows)
        return self.rows(every), self.state(every)

    def nbytes(self) -> int:
        raise NotImplementedError


class DenseRowStorage(PsRowStorage):
    """Every owned row materialised from ``initial_weights`` (name -> ``[rows, dim]``):
    O(owned rows) memory."""

    def __init__(self, routing: KeySpace, ps_index: int, state_dim: int,
                 initial_weights: Dict[str, torch.Tensor]) -> None:
        super().__init__(routing, ps_index, state_dim)
        n = self.num_rows
        self.weights = torch.zeros(n, routing.wire_dim)
        self._state = torch.zeros(n, state_dim)
        for t, name in enumerate(routing.names):
            if name not in initial_weights:
                raise EsdConfigError(f"parameter server got no initial weights for table {name!r}")
            w = initial_weights[name]
            dim = routing.formats[t].dim
            if tuple(w.shape) != (int(routing.rows[t]), dim):
                raise EsdConfigError(
                    f"table {name!r}: initial weights of shape {tuple(w.shape)}, expected "
                    f"({int(routing.rows[t])}, {dim})"
                )
            lo, cnt, base = int(self._first_id[t]), int(routing.owned[ps_index, t]), int(self._base[t])
            self.weights[base: base + cnt, :dim] = w[lo: lo + cnt].detach().float()

    # index_select / index_copy_: the same rows as advanced indexing, without its
    # per-call index preparation (a PS reads and writes every step)
    def rows(self, local):
        return self.weights.index_select(0, local)

    def state(self, local):
        return self._state.index_select(0, local)

    def write(self, local, weights, state):
        self.weights.index_copy_(0, local, weights)
        self._state.index_copy_(0, local, state)

    def touched(self):
        return torch.arange(self.num_rows)

    def full(self):
        return self.weights, self._state

    def nbytes(self):
        return (self.weights.numel() + self._state.numel()) * 4


class LazyRowStorage(PsRowStorage):
    """Rows created on first touch (a read or a write) from ``init``
    (:class:`HashedUniformInit`): memory O(rows touched) -- an id table of
    16-32 B per touched row plus the rows themselves, grown by doubling.
    A read or write of n rows is O(n) expected (hash lookups, appends)."""

    def __init__(self, routing: KeySpace, ps_index: int, state_dim: int, init: HashedUniformInit) -> None:
        super().__init__(routing, ps_index, state_dim)
        missing = [n for n in routing.names if n not in init.names]
        if missing:
            raise EsdConfigError(f"the initialiser has no table {missing[0]!r} (it has {init.names})")
        self._init_of = [init.names.index(n) for n in routing.names]  # key-space table -> initialiser's
        for t, i in enumerate(self._init_of):
            if init.dims[i] != routing.formats[t].dim or init.rows[i] != int(routing.rows[t]):
                raise EsdConfigError(f"table {routing.names[t]!r}: the initialiser's shape differs from the key space's")
        self.init = init
        self._count = 0
        self._index = torch.full((ops.id_table_capacity(0), 2), -1, dtype=torch.int64)  # local row -> position
        self._locals = torch.zeros(0, dtype=torch.int64)  # local row of every position
        self._weights = torch.zeros(0, routing.wire_dim)
        self._state = torch.zeros(0, state_dim)

    def _grow(self, need: int) -> None:
        cap = self._weights.shape[0]
        if need > cap:
            new = max(need, 2 * cap, 16)
            self._weights = torch.cat([self._weights, torch.zeros(new - cap, self.wire_dim)])
            self._state = torch.cat([self._state, torch.zeros(new - cap, self.state_dim)])
            self._locals = torch.cat([self._locals, torch.full((new - cap,), -1, dtype=torch.int64)])
        if 2 * need > self._index.shape[0]:  # keep the id table at most half full: rebuild it larger
            bigger = torch.full((ops.id_table_capacity(2 * need), 2), -1, dtype=torch.int64)
            ops.id_table_assign(bigger, torch.zeros(0, dtype=torch.int64), self._locals[: self._count],
                                torch.arange(self._count))
            self._index = bigger

    def _positions(self, local: torch.Tensor) -> torch.Tensor:
        """Position of every local row, creating the untouched ones."""
        local = local.to(torch.int64).view(-1)
        if local.numel() and (int(local.min()) < 0 or int(local.max()) >= self.num_rows):
            raise EsdConfigError(f"PS {self.ps_index}: local rows outside [0, {self.num_rows})")
        if local.numel() == 0:
            return local
        pos = ops.id_table_lookup(self._index, local)
        miss = pos < 0
        if bool(miss.any()):
            new = torch.unique(local[miss])
            n0 = self._count
            self._grow(n0 + new.numel())
            at = torch.arange(n0, n0 + new.numel())
            t_of = self.table_of(new)
            for t in torch.unique(t_of).tolist():
                m = t_of == t
                ids = self._first_id[t] + new[m] - self._base[t]
                self._weights[at[m], : self.init.dims[self._init_of[t]]] = self.init.rows_of(self._init_of[t], ids)
            self._locals[at] = new
            self._count = n0 + new.numel()
            ops.id_table_assign(self._index, torch.zeros(0, dtype=torch.int64), new, at)
            pos = ops.id_table_lookup(self._index, local)
        return pos

    def rows(self, local):
        pos = self._positions(local)  # first: it may grow the buffers
        return self._weights[pos]

    def state(self, local):
        pos = self._positions(local)
        return self._state[pos]

    def write(self, local, weights, state):
        pos = self._positions(local)
        self._weights[pos] = weights
        self._state[pos] = state

    def touched(self):
        return self._locals[: self._count].sort().values

    def full(self):
        """Every owned row: the touched ones as stored, the others as
        initialised (not stored: this does not touch them).  O(owned rows)."""
        every = torch.arange(self.num_rows)
        w = torch.zeros(self.num_rows, self.wire_dim)
        t_of = self.table_of(every)
        for t, i in enumerate(self._init_of):
            m = (t_of == t).nonzero().view(-1)
            if m.numel():
                w[m, : self.init.dims[i]] = self.init.rows_of(i, self._first_id[t] + m - self._base[t])
        s = torch.zeros(self.num_rows, self.state_dim)
        done = self._locals[: self._count]
        w[done] = self._weights[: self._count]
        s[done] = self._state[: self._count]
        return w, s

    def nbytes(self):
        return (self._weights.numel() + self._state.numel()) * 4 + (self._index.numel() + self._locals.numel()) * 8
