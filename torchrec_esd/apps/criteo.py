"""DLRM workload read from a Criteo-format TSV file (display-ads ``train.txt``).

Each line of the file is one sample, tab separated, no header::

    label <TAB> I1 ... I13 <TAB> C1 ... C26

* ``label``: ``0`` or ``1`` (any number in ``[0, 1]`` is accepted).
* ``I1..I13``: integer dense features; may be empty (missing) or negative.
  Transformed to ``log(1 + max(x, 0))``; a missing value becomes ``0``.
* ``C1..C26``: categorical features as hex strings (8 hex digits in the
  Criteo Kaggle / Terabyte data sets, up to 16 accepted); may be empty.
  Feature ``f`` with a table of ``N_f`` rows maps a present value ``h`` to the
  id ``1 + int(h, 16) % (N_f - 1)`` and a missing value to the reserved id
  ``0`` (a table of one row maps everything to ``0``).  Every sample has
  exactly one id per feature (one-hot bags, like the synthetic workload).

:class:`CriteoTsvWorkload` has the interface of
:class:`~torchrec_esd.apps.workload.SyntheticWorkload` that the trainer, the
example and the benchmarks use (``config.num_dense``, ``config.cardinalities``,
``config.feature_names``, ``table_configs``, ``global_batch``, ``local_batch``),
with the same feature and table names (``cat_<i>`` / ``t_cat_<i>``), so any
method (vanilla, esd, des) trains on it unchanged: put a
:class:`CriteoTsvConfig` into ``JobConfig.workload``.

Global batch ``k`` of size ``B`` is rows ``k*B .. (k+1)*B - 1`` of the file (the
first ``max_rows`` rows if set), read modulo the number of rows ``R``: when the
file is exhausted the batches wrap around to its start (a batch may end with
the last rows and go on with the first ones).  Batches are therefore a
function of ``(file, step, B)`` only: every rank sees the same global batches.

The file is streamed in chunks of :data:`CHUNK_ROWS` rows; a few parsed chunks
are kept in memory and the byte offset of every chunk start is remembered, so
that memory does not grow with the file and any step can be read again.  A
line is parsed (and checked) when a batch first needs it: the first chunk is
read when the workload is built, a malformed line further down raises when
training reaches it.  Blank lines are skipped (errors still name the line
number in the file).
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd.config import EsdConfigError
from torchrec_esd.apps.workload import feature_table_configs, resolve_cardinalities, slice_batch

CHUNK_ROWS = 4096  # rows parsed at a time (and the granularity of the offset index)
MISSING_ID = 0  # id of a missing categorical value in every table

_INT_RE = re.compile(r"-?[0-9]+")
_HEX_RE = re.compile(r"[0-9a-fA-F]{1,16}")
_MAX_INT_DIGITS = 38  # float32 holds integers up to ~3.4e38


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise EsdConfigError(msg)


@dataclass
class CriteoTsvConfig:
    """Where the TSV file is and how its features become tables.

    Args:
        path: the TSV file (Criteo ``train.txt`` format, see the module doc).
        max_rows: use only the first ``max_rows`` rows (``None``: the whole file).
        num_dense: integer columns after the label (Criteo: 13).
        num_sparse: categorical columns after them (Criteo: 26).
        cardinalities: rows of each feature's table (ids are hashed into it);
            default Criteo Kaggle's, capped at ``max_cardinality`` (the same
            tables as :class:`~torchrec_esd.apps.workload.SyntheticWorkloadConfig`).
        max_cardinality: cap applied to the default cardinalities.
        wrap: read batches past the end of the file from its start again; with
            ``False`` such a batch raises.
        feature_prefix: sparse feature ``i`` is named ``f"{prefix}{i}"``.
    """

    path: str
    max_rows: Optional[int] = None
    num_dense: int = 13
    num_sparse: int = 26
    cardinalities: Optional[Sequence[int]] = None
    max_cardinality: int = 100_000
    wrap: bool = True
    feature_prefix: str = "cat_"

    def __post_init__(self) -> None:
        _require(
            isinstance(self.path, (str, os.PathLike)),
            f"path must be a file path, got {self.path!r}",
        )
        self.path = os.fspath(self.path)
        _require(os.path.exists(self.path), f"Criteo TSV file {self.path!r} does not exist")
        _require(os.path.isfile(self.path), f"Criteo TSV path {self.path!r} is not a file")
        _require(
            self.max_rows is None
            or (isinstance(self.max_rows, int) and not isinstance(self.max_rows, bool) and self.max_rows > 0),
            f"max_rows must be a positive int or None, got {self.max_rows!r}",
        )
        _require(
            isinstance(self.num_dense, int) and self.num_dense >= 0,
            f"num_dense must be an int >= 0, got {self.num_dense!r}",
        )
        _require(
            isinstance(self.num_sparse, int) and self.num_sparse > 0,
            f"num_sparse must be an int > 0, got {self.num_sparse!r}",
        )
        _require(
            isinstance(self.max_cardinality, int) and self.max_cardinality > 0,
            f"max_cardinality must be a positive int, got {self.max_cardinality!r}",
        )
        self.cardinalities = resolve_cardinalities(self.cardinalities, self.num_sparse, self.max_cardinality)

    @property
    def feature_names(self) -> List[str]:
        return [f"{self.feature_prefix}{i}" for i in range(self.num_sparse)]

    @property
    def num_columns(self) -> int:
        return 1 + self.num_dense + self.num_sparse

    def make_workload(self) -> "CriteoTsvWorkload":
        """The workload (the trainer builds it from ``JobConfig.workload``)."""
        return CriteoTsvWorkload(self)


class _Chunk:
    __slots__ = ("dense", "ids", "labels")

    def __init__(self, dense: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.dense = dense  # (n, num_dense) float32, log-transformed
        self.ids = ids  # (n, num_sparse) int64, hashed ids
        self.labels = labels  # (n,) float32


class CriteoTsvWorkload:
    """Global batches ``step -> Batch`` read from a Criteo-format TSV file.

    Batch ``k`` of size ``B`` holds rows ``k*B .. (k+1)*B - 1`` modulo the
    number of rows (wrapping around to the start of the file when it is
    exhausted, unless ``config.wrap`` is ``False``); see the module doc.
    """

    def __init__(self, config: CriteoTsvConfig, cache_chunks: int = 4) -> None:
        if not isinstance(config, CriteoTsvConfig):
            raise EsdConfigError(f"CriteoTsvWorkload needs a CriteoTsvConfig, got {type(config).__name__}")
        self.config = config
        self._cache_chunks = max(2, int(cache_chunks))
        self._fh = None
        # (byte offset, 1-based line number) of the first line of chunk c
        self._starts: List[Tuple[int, int]] = [(0, 1)]
        self._num_rows: Optional[int] = None  # known once the end was reached
        self._cache: "OrderedDict[int, _Chunk]" = OrderedDict()
        self._chunk(0)  # fail fast: unreadable / empty file, malformed first lines

    # ------------------------------------------------------------------ tables
    def table_configs(
        self, embedding_dim: int, pooling: PoolingType = PoolingType.SUM
    ) -> List[EmbeddingBagConfig]:
        """One table per sparse feature, named ``t_<feature>``."""
        return feature_table_configs(self.config.feature_names, self.config.cardinalities, embedding_dim, pooling)

    # ------------------------------------------------------------------ file
    @property
    def num_rows(self) -> int:
        """Rows used (the file's data lines, at most ``max_rows``); reads up to
        the end of the file the first time if it was not reached yet."""
        c = len(self._starts) - 1
        while self._num_rows is None:
            self._chunk(c)
            c += 1
        return self._num_rows

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "CriteoTsvWorkload":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fh"] = None
        return state

    def _file(self):
        if self._fh is None:
            try:
                self._fh = open(self.config.path, "rb")
            except OSError as e:
                raise EsdConfigError(f"cannot read Criteo TSV file {self.config.path!r}: {e}") from e
        return self._fh

    def _chunk(self, c: int) -> Optional[_Chunk]:
        """Chunk ``c`` (``None`` past the end), reading the chunks before it
        first if their offsets are not known yet."""
        if c in self._cache:
            self._cache.move_to_end(c)
            return self._cache[c]
        while len(self._starts) <= c:  # offset of chunk c unknown: read on
            if self._num_rows is not None:
                return None
            self._chunk(len(self._starts) - 1)
        if self._num_rows is not None and c * CHUNK_ROWS >= self._num_rows:
            return None
        chunk = self._read_chunk(c)
        if chunk is None:
            return None
        self._cache[c] = chunk
        while len(self._cache) > self._cache_chunks:
            self._cache.popitem(last=False)
        return chunk

    def _read_chunk(self, c: int) -> Optional[_Chunk]:
        cfg = self.config
        offset, line_no = self._starts[c]
        want = CHUNK_ROWS
        if cfg.max_rows is not None:
            want = min(want, cfg.max_rows - c * CHUNK_ROWS)
        fh = self._file()
        fh.seek(offset)
        nd, ns = cfg.num_dense, cfg.num_sparse
        mods = [n - 1 for n in cfg.cardinalities]
        labels: List[float] = []
        dense: List[float] = []
        ids: List[int] = []
        eof = False
        while len(labels) < want:
            raw = fh.readline()
            if not raw:
                eof = True
                break
            this_line = line_no
            line_no += 1
            try:
                text = raw.decode("ascii").rstrip("\r\n")
            except UnicodeDecodeError:
                raise EsdConfigError(f"{cfg.path}:{this_line}: not an ASCII line") from None
            if not text.strip():
                continue  # blank line
            parts = text.split("\t")
            if len(parts) != cfg.num_columns:
                raise EsdConfigError(
                    f"{cfg.path}:{this_line}: expected {cfg.num_columns} tab-separated columns"
                    f" (label, {nd} integer, {ns} categorical), found {len(parts)}"
                )
            labels.append(self._label(parts[0], this_line))
            for j in range(nd):
                s = parts[1 + j]
                if s == "":
                    dense.append(0.0)
                elif _INT_RE.fullmatch(s) and len(s) <= _MAX_INT_DIGITS:
                    dense.append(float(int(s)))
                elif _INT_RE.fullmatch(s):  # float(int(s)) would raise a bare OverflowError
                    raise EsdConfigError(
                        f"{cfg.path}:{this_line}: dense feature I{j + 1} is an integer of {len(s)} digits "
                        f"({s[:12]}...), more than a float32 feature holds"
                    )
                else:
                    raise EsdConfigError(
                        f"{cfg.path}:{this_line}: dense feature I{j + 1} is {s!r}, not an integer"
                    )
            for j in range(ns):
                s = parts[1 + nd + j]
                if s == "":
                    ids.append(MISSING_ID)
                elif _HEX_RE.fullmatch(s):
                    m = mods[j]
                    ids.append(1 + int(s, 16) % m if m > 0 else 0)
                else:
                    raise EsdConfigError(
                        f"{cfg.path}:{this_line}: categorical feature C{j + 1} is {s!r},"
                        f" not a hex string of 1 to 16 digits"
                    )
        n = len(labels)
        first_row = c * CHUNK_ROWS
        if eof or n < CHUNK_ROWS or (cfg.max_rows is not None and first_row + n >= cfg.max_rows):
            self._num_rows = first_row + n
        elif len(self._starts) == c + 1:
            self._starts.append((fh.tell(), line_no))
        if self._num_rows == 0:
            raise EsdConfigError(f"Criteo TSV file {cfg.path!r} has no data lines")
        if n == 0:
            return None
        dense_t = torch.tensor(dense, dtype=torch.float64).view(n, nd)
        return _Chunk(
            dense=dense_t.clamp_min(0).log1p().to(torch.float32),
            ids=torch.tensor(ids, dtype=torch.int64).view(n, ns),
            labels=torch.tensor(labels, dtype=torch.float32),
        )

    def _label(self, s: str, line: int) -> float:
        if s == "0":
            return 0.0
        if s == "1":
            return 1.0
        try:
            v = float(s)
        except ValueError:
            v = math.nan
        if not (0.0 <= v <= 1.0):
            raise EsdConfigError(
                f"{self.config.path}:{line}: label is {s!r}, expected 0 or 1 (a number in [0, 1])"
            )
        return v

    # ------------------------------------------------------------------ rows
    def rows(self, start: int, count: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dense (count, num_dense), ids (count, num_sparse), labels (count,))``
        of rows ``start .. start + count - 1`` modulo the number of rows."""
        last = start + count - 1
        # keep every chunk of one batch (+ the next) in memory
        self._cache_chunks = max(self._cache_chunks, count // CHUNK_ROWS + 3)
        # make sure the end is known if the rows may run past it
        if self._num_rows is None:
            self._chunk(last // CHUNK_ROWS)
        R = self._num_rows
        if R is not None:
            if count > R:
                raise EsdConfigError(
                    f"batch of {count} samples is larger than the {R} rows of {self.config.path!r}"
                    + (f" (max_rows={self.config.max_rows})" if self.config.max_rows is not None else "")
                    + "; a batch cannot hold a row twice"
                )
            if last >= R and not self.config.wrap:
                raise EsdConfigError(
                    f"rows {start}..{last} are past the end of {self.config.path!r} ({R} rows)"
                    f" and wrap=False; with batches of {count} the file lasts {R // count} steps"
                )
            idx = torch.arange(start, start + count, dtype=torch.int64) % R
        else:
            idx = torch.arange(start, start + count, dtype=torch.int64)
        cfg = self.config
        dense = torch.empty(count, cfg.num_dense)
        ids = torch.empty(count, cfg.num_sparse, dtype=torch.int64)
        labels = torch.empty(count)
        # consecutive runs of rows within one chunk (the order of the batch)
        pos = 0
        while pos < count:
            r = int(idx[pos])
            c, within = divmod(r, CHUNK_ROWS)
            chunk = self._chunk(c)
            assert chunk is not None, f"row {r} missing"  # R bounds idx
            n = min(count - pos, chunk.labels.numel() - within)
            dense[pos : pos + n] = chunk.dense[within : within + n]
            ids[pos : pos + n] = chunk.ids[within : within + n]
            labels[pos : pos + n] = chunk.labels[within : within + n]
            pos += n
        return dense, ids, labels

    # ------------------------------------------------------------------ batches
    def global_batch(self, step: int, batch_size: int) -> Batch:
        """The global batch of iteration ``step``: rows ``step * batch_size ..
        (step + 1) * batch_size - 1``, wrapping around at the end of the file."""
        if not isinstance(step, int) or step < 0:
            raise EsdConfigError(f"step must be an int >= 0, got {step!r}")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise EsdConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        dense, ids, labels = self.rows(step * batch_size, batch_size)
        cfg = self.config
        kjt = KeyedJaggedTensor(
            keys=cfg.feature_names,
            values=ids.t().reshape(-1),  # feature-major
            lengths=torch.ones(cfg.num_sparse * batch_size, dtype=torch.int32),
        )
        return Batch(dense_features=dense, sparse_features=kjt, labels=labels)

    def local_batch(self, step: int, batch_size: int, rank: int, world_size: int) -> Batch:
        """Rank ``rank``'s contiguous slice of the global batch."""
        if batch_size % world_size != 0:
            raise EsdConfigError(
                f"global batch {batch_size} is not divisible by {world_size} ranks"
            )
        per = batch_size // world_size
        return slice_batch(self.global_batch(step, batch_size), rank * per, (rank + 1) * per)


def write_criteo_tsv(path, labels, dense, categorical) -> None:
    """Write rows in the Criteo TSV format (tests, examples): ``dense`` and
    ``categorical`` are per-row sequences whose ``None`` entries are written
    as missing (empty) values; categorical values are ints written as 8 hex
    digits, or strings written as given."""
    with open(path, "w") as f:
        for y, xs, cs in zip(labels, dense, categorical):
            cols = [str(int(y))]
            cols += ["" if x is None else str(int(x)) for x in xs]
            cols += ["" if v is None else (v if isinstance(v, str) else f"{v:08x}") for v in cs]
            f.write("\t".join(cols) + "\n")
