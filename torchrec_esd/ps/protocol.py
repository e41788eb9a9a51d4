"""The worker <-> parameter-server protocol: typed frames and payloads.

A *request* is a frame of :data:`FRAME_WORDS` int64 words
``(command, payload bytes, counts...)`` followed by its payload (tensors
packed as bytes, in a fixed order); a *reply* (push/pull, gather) is a bare
payload whose size both sides derive from the request's counts.  A *timed*
push/pull (``PushPullFrame.timed``) gets its non-empty reply after a marker of
:data:`REPLY_MARKER_BYTES` holding the reply's size: the worker times the
reply's transfer from the marker's arrival, without the time its request
waited at the PS for the other workers' (:mod:`torchrec_esd.distributed.link_estimates`).

Invariants a receiver relies on (checked by :func:`decode_frame` before any
buffer is allocated, so that a malformed or hostile frame costs 80 bytes, not
gigabytes):

* the command is a :class:`Command`, every word is ``>= 0``, unused words are 0;
* every count is bounded by :class:`ProtocolLimits` (rows a PS owns, a stated
  maximum of DES pairs, the abort-message size) and consistent with the others
  (a DES bag has at least one pair, pairs are distinct ``(row, bag)``);
* the payload size is exactly what the counts imply.

A violation raises :class:`EsdProtocolError` naming the field, its value and
the bound.  Values are float32 (:class:`RowFormat`), keys int64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from enum import Enum, IntEnum
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple, Union

import torch

from torchrec_esd.layout import RowFormat

FRAME_WORDS = 10  # command, payload bytes, up to 8 counts
FRAME_BYTES = FRAME_WORDS * 8
KEY_BYTES = 8  # int64 row key / packed DES pair
VALUE_BYTES = 4  # float32 value, optimizer state, gradient, DES weight
MAX_ABORT_BYTES = 4096
REPLY_MARKER_BYTES = 8  # before a timed reply: its byte count (int64)
# the most padding a timed push/pull may ask its reply to carry (PushPullFrame.probe)
MAX_PROBE_BYTES = 256 * 1024
FLAG_FIELDS = ("weighted", "timed", "split", "sums")  # frame fields that are 0 or 1
# per request and PS: 4 Mi DES (row, bag) pairs, 48 MB with their weights: what one
# malformed or hostile frame can make a PS allocate beyond its own storage's size
DEFAULT_MAX_DES_PAIRS = 1 << 22


class EsdRemoteError(RuntimeError):
    """Another rank of the ESD job failed; this rank stops too."""


class EsdPeerLostError(EsdRemoteError):
    """A message to or from a peer rank failed (it died, its link broke, or it
    was silent past the timeout); the transport names the peer."""


class EsdProtocolError(EsdRemoteError):
    """A frame or payload that breaks the protocol (bounds, sizes, commands)."""


class Command(IntEnum):
    """Request commands (the first frame word)."""

    PUSH_PULL = 1  # push dirty rows, pull rows (+ DES partial sums); one reply
    GRADS = 2  # row and DES bag gradients; no reply
    GATHER = 3  # every PS replies its whole storage (tests, checkpoints)
    PREFETCH = 4  # pull rows of a later iteration early (EsdConfig.prefetch_depth); one reply
    PRE_PUSH = 5  # dirty rows the next iteration pushes, sent while this one computes (EsdConfig.pre_push); no reply
    VALUES = 6  # the gradient values and pushed rows of a split exchange (GradsFrame.split); not a phase of its own
    STOP = 8
    ABORT = 9  # payload: the reason, UTF-8


class Section(Enum):
    """What a part of a payload carries (for metering: ``is_payload`` parts are
    row data, the others address or control it)."""

    KEYS = "keys"
    DES_PAIRS = "des_pairs"
    DES_WEIGHTS = "des_weights"
    MESSAGE = "message"
    PUSH_ROWS = "push_rows"
    PULL_ROWS = "pull_rows"
    DES_PARTIALS = "des_partials"
    ROW_GRADS = "row_grads"
    BAG_GRADS = "bag_grads"
    TABLE_ROWS = "table_rows"
    PROBE = "probe"  # padding of a timed reply, so that the link is measured on enough bytes

    @property
    def is_payload(self) -> bool:
        return self in _PAYLOAD_SECTIONS


_PAYLOAD_SECTIONS = frozenset(
    {Section.PUSH_ROWS, Section.PULL_ROWS, Section.DES_PARTIALS, Section.ROW_GRADS,
     Section.BAG_GRADS, Section.TABLE_ROWS}
)


@dataclass(frozen=True)
class ProtocolLimits:
    """Bounds on one PS's request counts.

    ``rows``: rows the PS owns; a request names each row at most once, so no
    count of keys or gradient rows exceeds it (a request's allocation is then
    at most about the PS's own storage).  ``max_des_pairs``: stated maximum of
    DES ``(row, bag)`` pairs in one request (the batch's ids bound it; the PS
    cannot know the batch size).  ``max_abort_bytes``: abort-message size.
    """

    rows: int
    max_des_pairs: int = DEFAULT_MAX_DES_PAIRS
    max_abort_bytes: int = MAX_ABORT_BYTES


def _bound(where: str, frame: str, name: str, value: int, bound: int, why: str) -> None:
    if value > bound:
        raise EsdProtocolError(
            f"{where}: {frame} frame field {name!r} = {value} exceeds its bound {bound} ({why})"
        )


# ---------------------------------------------------------------- frames
@dataclass(frozen=True)
class PushPullFrame:
    COMMAND: ClassVar[Command] = Command.PUSH_PULL
    pushes: int
    pulls: int
    des_pairs: int = 0
    des_bags: int = 0
    weighted: bool = False  # DES pair weights are sent (some weight is not 1)
    # of the global batch (EsdInputDist mode "global"; 0: none): equal on every worker
    fingerprint: int = 0
    # a timed reply: a non-empty reply is preceded by REPLY_MARKER_BYTES (its byte count, int64), so
    # that the worker can time the reply's transfer alone (EsdConfig.online_links)
    timed: bool = False
    # bytes of padding at the end of the reply (a timed one only): a worker given few samples gets
    # replies too small to measure its link on, so it asks for a reply of a measurable size
    # (torchrec_esd.distributed.link_estimates.PROBE_REPLY_BYTES)
    probe: int = 0

    def check(self, limits: ProtocolLimits, where: str) -> None:
        rows = "rows the PS owns"
        _bound(where, "PUSH_PULL", "probe", self.probe, MAX_PROBE_BYTES if self.timed else 0,
               "padding of a timed reply: MAX_PROBE_BYTES, 0 when not timed")
        _bound(where, "PUSH_PULL", "pushes", self.pushes, limits.rows, rows)
        _bound(where, "PUSH_PULL", "pulls", self.pulls, limits.rows, rows)
        _bound(where, "PUSH_PULL", "des_pairs", self.des_pairs, limits.max_des_pairs,
               "ProtocolLimits.max_des_pairs")
        _bound(where, "PUSH_PULL", "des_bags", self.des_bags, self.des_pairs, "a DES bag has at least one pair")
        _bound(where, "PUSH_PULL", "des_pairs", self.des_pairs, self.des_bags * limits.rows,
               "distinct (row, bag) pairs: des_bags x rows the PS owns")

    def payload_bytes(self, fmt: RowFormat, rows_apart: bool = False) -> int:
        """``rows_apart``: the request of a split exchange, whose pushed rows
        are a message of their own after the gradient values (:class:`GradsFrame`)."""
        keys = (self.pushes + self.pulls + self.des_pairs) * KEY_BYTES
        rows = 0 if rows_apart else self.pushes * fmt.row_bytes
        return keys + rows + (self.des_pairs * VALUE_BYTES if self.weighted else 0)

    def reply_bytes(self, fmt: RowFormat) -> int:
        return self.pulls * fmt.row_bytes + self.des_bags * fmt.value_bytes + self.probe


@dataclass(frozen=True)
class GradsFrame:
    """Row (and DES bag) gradients.  A *split* frame (``EsdConfig.split_reply``)
    carries only the keys.  The same worker's next request is then a
    push/pull whose payload is its keys alone, and a :class:`ValuesFrame`
    follows it with the gradient values, then the pushed rows, as messages
    of their own.  So the PS knows every key before the first value (the
    keys may even go before the backward that computes the values), and
    can answer what waits for no value of this worker while those still
    cross its uplink (:mod:`torchrec_esd.ps.server`).

    ``sums`` (a split frame of the worker whose gradients the PS sums last,
    ``EsdConfig.split_sums``): the second part of the reply to its next
    push/pull carries, for the rows it sent gradients for, the other
    workers' summed gradients ``[n, D]`` instead of the rows
    (:func:`own_part_bytes`); the worker adds its own gradient and applies
    the optimizer to the row and state it read, which gives the PS's bits,
    so that part no longer waits for its upload."""

    COMMAND: ClassVar[Command] = Command.GRADS
    rows: int
    bags: int = 0
    split: bool = False
    sums: bool = False

    def check(self, limits: ProtocolLimits, where: str) -> None:
        _bound(where, "GRADS", "rows", self.rows, limits.rows, "rows the PS owns")
        _bound(where, "GRADS", "bags", self.bags, limits.max_des_pairs, "ProtocolLimits.max_des_pairs")
        if self.split:
            _bound(where, "GRADS", "bags", self.bags, 0, "a split gradient frame carries no DES bag gradients")
        else:
            _bound(where, "GRADS", "sums", int(self.sums), 0, "gradient sums answer only a split frame")

    def payload_bytes(self, fmt: RowFormat) -> int:
        if self.split:
            return self.rows * KEY_BYTES
        return self.rows * (KEY_BYTES + fmt.value_bytes) + self.bags * fmt.value_bytes


@dataclass(frozen=True)
class PrefetchFrame:
    """Pull-only request: the rows (value + state) of ``pulls`` keys, answered
    from the PS's current storage (no push, no DES, no state change)."""

    COMMAND: ClassVar[Command] = Command.PREFETCH
    pulls: int

    def check(self, limits: ProtocolLimits, where: str) -> None:
        _bound(where, "PREFETCH", "pulls", self.pulls, limits.rows, "rows the PS owns")

    def payload_bytes(self, fmt: RowFormat) -> int:
        return self.pulls * KEY_BYTES

    def reply_bytes(self, fmt: RowFormat) -> int:
        return self.pulls * fmt.row_bytes


@dataclass(frozen=True)
class PrePushFrame:
    """Push-only request between a push/pull and its gradients: rows (value +
    state) that the next iteration's push/pull would push, stored at once
    (``EsdConfig.pre_push``); no reply."""

    COMMAND: ClassVar[Command] = Command.PRE_PUSH
    pushes: int

    def check(self, limits: ProtocolLimits, where: str) -> None:
        _bound(where, "PRE_PUSH", "pushes", self.pushes, limits.rows, "rows the PS owns")

    def payload_bytes(self, fmt: RowFormat) -> int:
        return self.pushes * (KEY_BYTES + fmt.row_bytes)


@dataclass(frozen=True)
class ValuesFrame:
    """The second half of a split exchange: after it, ``rows`` gradient
    values ``[rows, D]`` as one message, then ``pushes`` pushed rows
    ``[pushes, D+S]`` as another (each only where not empty).  Both counts
    must be those of the worker's split gradients and push/pull before it.
    Framed, so that a worker that fails between the keys and the values
    sends an ABORT in its place and the PS raises its message."""

    COMMAND: ClassVar[Command] = Command.VALUES
    rows: int
    pushes: int

    def check(self, limits: ProtocolLimits, where: str) -> None:
        _bound(where, "VALUES", "rows", self.rows, limits.rows, "rows the PS owns")
        _bound(where, "VALUES", "pushes", self.pushes, limits.rows, "rows the PS owns")

    def message_bytes(self, fmt: RowFormat) -> Tuple[int, int]:
        """(bytes of the values message, of the pushed-rows message)."""
        return self.rows * fmt.value_bytes, self.pushes * fmt.row_bytes

    def payload_bytes(self, fmt: RowFormat) -> int:
        return sum(self.message_bytes(fmt))


@dataclass(frozen=True)
class GatherFrame:
    COMMAND: ClassVar[Command] = Command.GATHER

    def check(self, limits: ProtocolLimits, where: str) -> None:
        pass

    def payload_bytes(self, fmt: RowFormat) -> int:
        return 0


@dataclass(frozen=True)
class StopFrame:
    COMMAND: ClassVar[Command] = Command.STOP

    def check(self, limits: ProtocolLimits, where: str) -> None:
        pass

    def payload_bytes(self, fmt: RowFormat) -> int:
        return 0


@dataclass(frozen=True)
class AbortFrame:
    COMMAND: ClassVar[Command] = Command.ABORT
    message_bytes: int

    def check(self, limits: ProtocolLimits, where: str) -> None:
        _bound(where, "ABORT", "message_bytes", self.message_bytes, limits.max_abort_bytes,
               "ProtocolLimits.max_abort_bytes")

    def payload_bytes(self, fmt: RowFormat) -> int:
        return self.message_bytes


Frame = Union[PushPullFrame, GradsFrame, PrefetchFrame, PrePushFrame, ValuesFrame, GatherFrame, StopFrame,
              AbortFrame]
FRAME_TYPES = {t.COMMAND: t for t in (PushPullFrame, GradsFrame, PrefetchFrame, PrePushFrame, ValuesFrame, GatherFrame,
                                      StopFrame, AbortFrame)}


def encode_frame(frame: Frame, payload_bytes: int) -> torch.Tensor:
    """The frame's int64 words: command, payload bytes, counts (in field order)."""
    counts = [int(getattr(frame, f.name)) for f in fields(frame)]
    words = torch.zeros(FRAME_WORDS, dtype=torch.int64)
    words[0], words[1] = int(frame.COMMAND), int(payload_bytes)
    words[2 : 2 + len(counts)] = torch.tensor(counts, dtype=torch.int64)
    return words


# per command: its frame type, the type's field names, and the indices of its flag fields
_FRAME_FIELDS = {
    int(c): (t, tuple(f.name for f in fields(t)),
             tuple(i for i, f in enumerate(fields(t)) if f.name in FLAG_FIELDS))
    for c, t in FRAME_TYPES.items()
}


def payload_bytes(frame: Frame, fmt: RowFormat, rows_apart: bool = False) -> int:
    """The payload size ``frame`` implies; ``rows_apart``: its sender split
    its gradients before, so a push/pull's payload is its keys alone."""
    if rows_apart and isinstance(frame, PushPullFrame):
        return frame.payload_bytes(fmt, True)
    return frame.payload_bytes(fmt)


def decode_frame(words: torch.Tensor, limits: ProtocolLimits, fmt: RowFormat, where: str,
                 rows_apart: bool = False) -> Frame:
    """The typed frame of ``words``, every field bounded (see the module
    docstring); ``where`` names the receiver and sender in errors.  O(1):
    one pass over the 8 words (the field names are looked up once per
    command type, at import).  ``rows_apart``: the sender split its
    gradients before (:class:`GradsFrame`), so a push/pull's payload is its
    keys alone."""
    if words.dtype != torch.int64 or words.numel() != FRAME_WORDS:
        raise EsdProtocolError(
            f"{where}: a frame is {FRAME_WORDS} int64 words, got {words.numel()} {words.dtype}"
        )
    w = words.tolist()
    known = _FRAME_FIELDS.get(w[0])
    if known is None:
        raise EsdProtocolError(f"{where}: frame field 'command' = {w[0]} is not a command of {[c.name for c in Command]}")
    typ, names, flags = known
    n = len(names)
    if min(w) < 0 or any(w[2 + n :]):  # name the first bad word
        label = Command(w[0]).name
        for i, v in enumerate(w[1:], start=1):
            name = "payload_bytes" if i == 1 else (names[i - 2] if i - 2 < n else f"word {i}")
            if v < 0:
                raise EsdProtocolError(f"{where}: {label} frame field {name!r} = {v} is negative")
            if i - 2 >= n and v != 0:
                raise EsdProtocolError(f"{where}: {label} frame field {name!r} = {v} is unused and must be 0")
    label = typ.COMMAND.name
    counts = w[2 : 2 + n]
    for i in flags:
        _bound(where, label, names[i], counts[i], 1, "a flag: 0 or 1")
        counts[i] = bool(counts[i])
    frame = typ(*counts)
    frame.check(limits, where)
    expected = payload_bytes(frame, fmt, rows_apart)
    if w[1] != expected:
        raise EsdProtocolError(
            f"{where}: {label} frame field 'payload_bytes' = {w[1]} but its counts imply {expected} bytes"
        )
    return frame


# ---------------------------------------------------------------- payloads
@dataclass(frozen=True)
class SectionSize:
    """Rows (first dimension) and bytes of a payload section, as packed."""

    rows: int = 0
    bytes: int = 0

    def __add__(self, other: "SectionSize") -> "SectionSize":
        return SectionSize(self.rows + other.rows, self.bytes + other.bytes)


Parts = List[Tuple[Section, torch.Tensor]]


def add_sections(into: Dict[Section, SectionSize], parts: Parts) -> None:
    for section, t in parts:
        size = SectionSize(int(t.shape[0]) if t.dim() else 1, t.numel() * t.element_size())
        into[section] = into.get(section, SectionSize()) + size


def pack(parts: Parts) -> torch.Tensor:
    """``parts`` as one byte buffer, in order (what :class:`PayloadReader` takes apart)."""
    data = [t.detach().contiguous().view(-1).view(torch.uint8) for _, t in parts if t.numel()]
    return torch.cat(data) if data else torch.empty(0, dtype=torch.uint8)


class PayloadReader:
    """Typed slices of one received payload, in the order they were packed."""

    def __init__(self, buf: torch.Tensor) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int, dtype: torch.dtype, row: Sequence[int] = ()) -> torch.Tensor:
        width = math.prod(row) if row else 1
        nbytes = n * width * dtype.itemsize
        part = self.buf[self.pos : self.pos + nbytes]
        if part.numel() != nbytes:
            raise EsdProtocolError(f"a payload of {self.buf.numel()} bytes is shorter than its counts say")
        self.pos += nbytes
        # a typed view needs an aligned start: copy only a misaligned part (the
        # sections are packed widest-first, so in a fresh buffer none is)
        if part.data_ptr() % dtype.itemsize:
            part = part.clone()
        return part.view(dtype).view((n,) + tuple(row))

    def done(self) -> None:
        if self.pos != self.buf.numel():
            raise EsdProtocolError(f"a payload of {self.buf.numel()} bytes is longer than its counts say")


def read_only(buf: torch.Tensor, n: int, dtype: torch.dtype, row: Sequence[int] = ()) -> torch.Tensor:
    """A payload that is one section of ``n`` rows of ``row`` (checked to be exactly that)."""
    rd = PayloadReader(buf)
    out = rd.take(n, dtype, row)
    rd.done()
    return out


@dataclass
class PushPullRequest:
    """Wire order: keys (pushes, pulls, DES pairs), pushed rows, DES weights."""

    push_keys: torch.Tensor  # [a] int64
    pull_keys: torch.Tensor  # [b] int64
    push_rows: torch.Tensor  # [a, D+S] float32: value + optimizer state
    des_packed: torch.Tensor  # [c] int64: key * des_bags + bag
    des_bags: int = 0
    des_weights: Optional[torch.Tensor] = None  # [c] float32; None: all 1, not sent
    fingerprint: int = 0  # of the global batch (frame only)
    timed: bool = False  # the reply comes after a marker (frame only; PushPullFrame.timed)
    probe: int = 0  # bytes of padding the reply ends with (frame only; PushPullFrame.probe)

    def frame(self) -> PushPullFrame:
        return PushPullFrame(self.push_keys.numel(), self.pull_keys.numel(), self.des_packed.numel(),
                             self.des_bags, self.des_weights is not None, self.fingerprint, self.timed,
                             self.probe)

    def parts(self, rows_apart: bool = False) -> Parts:
        """The payload; ``rows_apart``: without the pushed rows (:meth:`row_parts`, sent after)."""
        out = [(Section.KEYS, self.push_keys), (Section.KEYS, self.pull_keys), (Section.DES_PAIRS, self.des_packed)]
        if not rows_apart:
            out += self.row_parts()
        if self.des_weights is not None:
            out.append((Section.DES_WEIGHTS, self.des_weights.to(torch.float32)))
        return out

    def row_parts(self) -> Parts:
        return [(Section.PUSH_ROWS, self.push_rows.to(torch.float32))]

    @staticmethod
    def decode_rows(frame: PushPullFrame, buf: torch.Tensor, fmt: RowFormat) -> torch.Tensor:
        """The pushed rows ``[pushes, D+S]`` of a request sent with its rows apart."""
        return read_only(buf, frame.pushes, torch.float32, (fmt.dim + fmt.state_dim,))

    @staticmethod
    def decode(frame: PushPullFrame, buf: torch.Tensor, fmt: RowFormat, rows_apart: bool = False) -> "PushPullRequest":
        """``rows_apart``: ``buf`` holds the keys only; ``push_rows`` is then
        empty until :meth:`decode_rows` of the message that follows."""
        rd = PayloadReader(buf)
        a, b, c = frame.pushes, frame.pulls, frame.des_pairs
        keys = rd.take(a + b + c, torch.int64)
        rows = torch.empty(0, fmt.dim + fmt.state_dim) if rows_apart else \
            rd.take(a, torch.float32, (fmt.dim + fmt.state_dim,))
        weights = rd.take(c, torch.float32) if frame.weighted else None
        rd.done()
        return PushPullRequest(keys[:a], keys[a : a + b], rows, keys[a + b :], frame.des_bags, weights,
                               frame.fingerprint, frame.timed, frame.probe)


@dataclass
class PushPullReply:
    """Wire order: pulled rows, DES partial sums, then ``probe`` bytes of
    padding (:attr:`PushPullFrame.probe`; zeros, read and dropped)."""

    rows: torch.Tensor  # [pulls, D+S] float32
    partials: torch.Tensor  # [des_bags, D] float32: pooled partial sum per bag
    probe: int = 0

    def parts(self) -> Parts:
        out = [(Section.PULL_ROWS, self.rows), (Section.DES_PARTIALS, self.partials)]
        return out + probe_parts(self.probe)

    @staticmethod
    def decode(frame: PushPullFrame, buf: torch.Tensor, fmt: RowFormat) -> "PushPullReply":
        rd = PayloadReader(buf)
        rows = rd.take(frame.pulls, torch.float32, (fmt.dim + fmt.state_dim,))
        partials = rd.take(frame.des_bags, torch.float32, (fmt.dim,))
        rd.take(frame.probe, torch.uint8)
        rd.done()
        return PushPullReply(rows, partials, frame.probe)


def probe_parts(nbytes: int) -> Parts:
    """The padding of a reply that asked for ``nbytes`` (none for 0)."""
    return [(Section.PROBE, torch.zeros(int(nbytes), dtype=torch.uint8))] if nbytes else []


@dataclass
class PrefetchRequest:
    """Wire order: the keys; the reply is their rows ``[pulls, D+S]`` in order."""

    keys: torch.Tensor  # [n] int64

    def frame(self) -> PrefetchFrame:
        return PrefetchFrame(self.keys.numel())

    def parts(self) -> Parts:
        return [(Section.KEYS, self.keys)]

    @staticmethod
    def decode(frame: PrefetchFrame, buf: torch.Tensor, fmt: RowFormat) -> "PrefetchRequest":
        rd = PayloadReader(buf)
        req = PrefetchRequest(rd.take(frame.pulls, torch.int64))
        rd.done()
        return req

    @staticmethod
    def decode_reply(frame: PrefetchFrame, buf: torch.Tensor, fmt: RowFormat) -> torch.Tensor:
        return read_only(buf, frame.pulls, torch.float32, (fmt.dim + fmt.state_dim,))


@dataclass
class PrePushRequest:
    """Wire order: the keys, then their rows ``[pushes, D+S]`` (value + state)."""

    keys: torch.Tensor  # [n] int64
    rows: torch.Tensor  # [n, D+S] float32

    def frame(self) -> PrePushFrame:
        return PrePushFrame(self.keys.numel())

    def parts(self) -> Parts:
        return [(Section.KEYS, self.keys), (Section.PUSH_ROWS, self.rows.to(torch.float32))]

    @staticmethod
    def decode(frame: PrePushFrame, buf: torch.Tensor, fmt: RowFormat) -> "PrePushRequest":
        rd = PayloadReader(buf)
        req = PrePushRequest(rd.take(frame.pushes, torch.int64), rd.take(frame.pushes, torch.float32,
                                                                            (fmt.dim + fmt.state_dim,)))
        rd.done()
        return req


@dataclass
class GradsRequest:
    """Wire order: keys, row gradients, DES bag gradients.  ``split``: the
    frame's payload is the keys alone; the values follow a
    :class:`ValuesFrame` (:class:`GradsFrame`)."""

    keys: torch.Tensor  # [n] int64
    grads: Optional[torch.Tensor]  # [n, D] float32 (None: a split request's values, not received yet)
    bag_grads: torch.Tensor  # [nb, D] float32: gradient of each DES bag this PS served
    split: bool = False
    sums: bool = False  # (split only) answer its rows as the other workers' gradient sums (GradsFrame.sums)

    def frame(self) -> GradsFrame:
        return GradsFrame(self.keys.numel(), int(self.bag_grads.shape[0]), self.split, self.sums)

    def parts(self) -> Parts:
        if self.split:
            return [(Section.KEYS, self.keys)]
        assert self.grads is not None
        return [(Section.KEYS, self.keys), (Section.ROW_GRADS, self.grads.to(torch.float32)),
                (Section.BAG_GRADS, self.bag_grads.to(torch.float32))]

    @staticmethod
    def decode(frame: GradsFrame, buf: torch.Tensor, fmt: RowFormat) -> "GradsRequest":
        rd = PayloadReader(buf)
        keys = rd.take(frame.rows, torch.int64)
        grads = None if frame.split else rd.take(frame.rows, torch.float32, (fmt.dim,))
        req = GradsRequest(keys, grads, rd.take(frame.bags, torch.float32, (fmt.dim,)), frame.split, frame.sums)
        rd.done()
        return req

    @staticmethod
    def decode_values(frame: GradsFrame, buf: torch.Tensor, fmt: RowFormat) -> torch.Tensor:
        """The row gradients ``[rows, D]`` of a split frame's values message."""
        return read_only(buf, frame.rows, torch.float32, (fmt.dim,))


def own_updated(pull_keys: torch.Tensor, grad_keys: torch.Tensor) -> torch.Tensor:
    """Mask of the ``pull_keys`` a worker sent gradients for in the split
    gradient phase before (``grad_keys``): the second part of its split
    push/pull reply, the rest the first (each part in pull order).  Worker
    and PS compute it from the same two key lists."""
    if grad_keys.numel() == 0 or pull_keys.numel() == 0:
        return torch.zeros(pull_keys.numel(), dtype=torch.bool)
    return torch.isin(pull_keys, grad_keys)


def own_part_bytes(rows: int, fmt: RowFormat, sums: bool) -> int:
    """Bytes of the second part of a split push/pull reply, ``rows`` keys:
    their rows (value + state), or with :attr:`GradsFrame.sums` the other
    workers' summed gradients ``[rows, D]``."""
    return rows * (fmt.value_bytes if sums else fmt.row_bytes)


@dataclass
class GatherReply:
    weights: torch.Tensor  # [rows of the PS, D]
    state: torch.Tensor  # [rows of the PS, S]

    def parts(self) -> Parts:
        return [(Section.TABLE_ROWS, self.weights), (Section.TABLE_ROWS, self.state)]

    @staticmethod
    def reply_bytes(rows: int, fmt: RowFormat) -> int:
        return rows * fmt.row_bytes

    @staticmethod
    def decode(rows: int, buf: torch.Tensor, fmt: RowFormat) -> "GatherReply":
        rd = PayloadReader(buf)
        reply = GatherReply(rd.take(rows, torch.float32, (fmt.dim,)), rd.take(rows, torch.float32, (fmt.state_dim,)))
        rd.done()
        return reply


def reply_marker(nbytes: int) -> torch.Tensor:
    """The :data:`REPLY_MARKER_BYTES` sent before a timed reply of ``nbytes`` bytes."""
    return torch.tensor([int(nbytes)], dtype=torch.int64)


def check_reply_marker(marker: torch.Tensor, nbytes: int, where: str) -> None:
    """Raise unless a received marker announces the ``nbytes`` its request implies."""
    if int(marker[0]) != nbytes:
        raise EsdProtocolError(f"{where}'s reply marker announces {int(marker[0])} bytes, the request implies {nbytes}")


def abort_parts(msg: str, limits: ProtocolLimits = ProtocolLimits(rows=0)) -> Tuple[AbortFrame, Parts]:
    """An abort request carrying ``msg`` (UTF-8, cut to the abort-message bound)."""
    data = torch.tensor(list(msg.encode()[: limits.max_abort_bytes]), dtype=torch.uint8)
    return AbortFrame(data.numel()), [(Section.MESSAGE, data)]


def abort_message(buf: torch.Tensor) -> str:
    return bytes(buf.tolist()).decode(errors="replace")
