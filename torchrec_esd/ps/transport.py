"""The transport seam: point-to-point byte messages between the ranks of a job.

:class:`Transport` is the public interface the PS client and server talk
through.  An implementation provides three primitives (start a send, start a
receive into a buffer of known size, wait with a timeout); the base class
adds framing (a request is a frame then its payload) and meters every byte
and message per peer rank in its :class:`LinkMeter`, so the numbers are what
really went over the links.  :class:`GlooP2PTransport` is the first
implementation: gloo ``isend`` / ``irecv`` on the group spanning all ranks.

Ordering invariant every implementation keeps: messages between one pair of
ranks arrive in the order they were sent, and receives posted for one peer
are matched in the order they were posted.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Any, Dict, Iterable, List, Sequence

import torch
import torch.distributed as dist

from torchrec_esd import ops
from torchrec_esd.ps.protocol import FRAME_WORDS, EsdPeerLostError, Frame, Section, SectionSize, encode_frame


@dataclass
class LinkStats:
    """Traffic of one link (this rank <-> one peer), or a sum/difference of them.

    A *message* is one point-to-point transfer: a request's frame and its
    payload are two, a reply is one; an empty payload is not sent."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0

    def __add__(self, o: "LinkStats") -> "LinkStats":
        return LinkStats(self.bytes_sent + o.bytes_sent, self.bytes_received + o.bytes_received,
                         self.messages_sent + o.messages_sent, self.messages_received + o.messages_received)

    def __sub__(self, o: "LinkStats") -> "LinkStats":
        return LinkStats(self.bytes_sent - o.bytes_sent, self.bytes_received - o.bytes_received,
                         self.messages_sent - o.messages_sent, self.messages_received - o.messages_received)

    def as_dict(self) -> Dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class LinkMeter:
    """Bytes and messages this rank sent to / received from each peer rank.

    Sends count when they are posted (the bytes are committed to the link),
    receives when they complete."""

    def __init__(self) -> None:
        self._links: Dict[int, LinkStats] = {}
        self._total = LinkStats()  # kept in step with _links (read once per exchange)

    def _link(self, peer: int) -> LinkStats:
        return self._links.setdefault(int(peer), LinkStats())

    def on_send(self, peer: int, nbytes: int) -> None:
        s, n = self._link(peer), int(nbytes)
        s.bytes_sent += n
        s.messages_sent += 1
        self._total.bytes_sent += n
        self._total.messages_sent += 1

    def on_receive(self, peer: int, nbytes: int) -> None:
        s, n = self._link(peer), int(nbytes)
        s.bytes_received += n
        s.messages_received += 1
        self._total.bytes_received += n
        self._total.messages_received += 1

    def link(self, peer: int) -> LinkStats:
        return LinkStats() + self._links.get(int(peer), LinkStats())

    def per_link(self) -> Dict[int, LinkStats]:
        return {p: LinkStats() + s for p, s in sorted(self._links.items())}

    def total(self) -> LinkStats:
        return LinkStats() + self._total

    def as_dict(self) -> Dict[int, Dict[str, int]]:
        return {p: s.as_dict() for p, s in self.per_link().items()}


@dataclass
class Traffic:
    """What one exchange (a request to every PS and the replies) moved on this
    rank's links: ``link`` from the transport's meter, ``sections`` the
    payload parts as packed / unpacked (rows and bytes per :class:`Section`),
    ``seconds`` how long it took."""

    link: LinkStats = field(default_factory=LinkStats)
    sections: Dict[Section, SectionSize] = field(default_factory=dict)
    # wall seconds from posting the requests to the last reply (0.0 for an
    # exchange that returns before its sends complete)
    seconds: float = 0.0
    # a timed reply (PushPullFrame.timed): its bytes and the seconds from the
    # arrival of its marker (with several PS: the last marker) to its last
    # byte, i.e. the download alone, without waiting at the PS (0: not timed)
    transfer_bytes: int = 0
    transfer_seconds: float = 0.0

    def section(self, s: Section) -> SectionSize:
        return self.sections.get(s, SectionSize())

    def merged(self, other: "Traffic") -> "Traffic":
        """This exchange and ``other`` counted as one (this one's seconds and transfer)."""
        sections = dict(self.sections)
        for k, v in other.sections.items():
            sections[k] = sections.get(k, SectionSize()) + v
        return Traffic(self.link + other.link, sections, self.seconds, self.transfer_bytes, self.transfer_seconds)

    @property
    def wire_bytes(self) -> int:
        return self.link.bytes_sent + self.link.bytes_received

    @property
    def payload_bytes(self) -> int:
        """Bytes of row data (values, state, partial sums, gradients)."""
        return sum(v.bytes for k, v in self.sections.items() if k.is_payload)

    @property
    def messages(self) -> int:
        return self.link.messages_sent + self.link.messages_received


@dataclass
class Pending:
    """A posted send or receive; ``buf`` stays referenced until it completes."""

    peer: int
    buf: torch.Tensor
    work: Any
    receive: bool
    done: bool = False


class Transport(ABC):
    """Point-to-point messages between this rank and the job's other ranks.

    Args:
        ps_ranks: ranks of the parameter servers, in PS order.
        worker_ranks: ranks of the workers, in worker order.
        timeout_s: every wait fails after this long (a failed rank makes
            the others fail instead of hang).
    """

    def __init__(self, ps_ranks: Sequence[int], worker_ranks: Sequence[int], timeout_s: float) -> None:
        self.ps_ranks = list(ps_ranks)
        self.worker_ranks = list(worker_ranks)
        self.timeout_s = float(timeout_s)
        self.meter = LinkMeter()

    # ---- what an implementation provides
    @abstractmethod
    def _isend(self, buf: torch.Tensor, peer: int) -> Any:
        """Start sending the contiguous ``buf`` to ``peer``; a handle for :meth:`_wait`."""

    @abstractmethod
    def _irecv(self, buf: torch.Tensor, peer: int) -> Any:
        """Start receiving the next message of ``peer`` (exactly ``buf``'s size) into ``buf``."""

    @abstractmethod
    def _wait(self, work: Any, timeout_s: float) -> None:
        """Block until ``work`` completes; raise if that takes over ``timeout_s``."""

    # ---- metered operations
    def send(self, peer: int, buf: torch.Tensor) -> Pending:
        """Post one message (``buf`` must not be empty)."""
        if buf.numel() == 0:
            raise ValueError("empty messages are not sent (the receiver could not tell them apart)")
        buf = buf.contiguous()
        work = self._isend(buf, peer)
        self.meter.on_send(peer, buf.numel() * buf.element_size())
        return Pending(peer, buf, work, receive=False)

    def recv(self, peer: int, buf: torch.Tensor) -> Pending:
        """Post the receive of ``peer``'s next message into ``buf`` (not empty)."""
        if buf.numel() == 0 or not buf.is_contiguous():
            raise ValueError("a receive needs a non-empty contiguous buffer")
        return Pending(peer, buf, self._irecv(buf, peer), receive=True)

    def wait(self, pending: Iterable[Pending]) -> None:
        """Wait for each, in order (each wait has the transport's timeout)."""
        for p in pending:
            if p.done:
                continue
            try:
                self._wait(p.work, self.timeout_s)
            except RuntimeError as e:  # the peer died, or went silent past the timeout
                raise self.failure(p, str(e) or type(e).__name__) from e
            self.completed(p)

    def completed(self, p: Pending) -> None:
        """Record that ``p`` completed (its bytes metered once): what
        :meth:`wait` does after each wait, for a receive waited elsewhere
        (:meth:`native_clock`)."""
        if p.done:
            return
        p.done = True
        if p.receive:
            self.meter.on_receive(p.peer, p.buf.numel() * p.buf.element_size())

    def native_clock(self, markers: Sequence[Pending], replies: Sequence[Pending]):
        """A native waiter of posted receives that reads the clock without the
        GIL (:func:`torchrec_esd.ops.native_reply_clock`), or ``None`` where
        the transport's handles are not c10d works (the caller then waits in
        a Python thread).  The receives are then waited for by it only: mark
        each :meth:`completed` after its ``join``."""
        return None

    def failure(self, p: Pending, message: str) -> EsdPeerLostError:
        """The error of a failed wait for ``p`` (the peer named)."""
        what = "receiving from" if p.receive else "sending to"
        first = message.strip().splitlines()[0] if message.strip() else "unknown error"
        return EsdPeerLostError(f"{what} {self.peer_name(p.peer)} failed: {first}")

    def peer_name(self, rank: int) -> str:
        """``"PS j (rank r)"`` or ``"worker i (rank r)"``."""
        if rank in self.ps_ranks:
            return f"PS {self.ps_ranks.index(rank)} (rank {rank})"
        if rank in self.worker_ranks:
            return f"worker {self.worker_ranks.index(rank)} (rank {rank})"
        return f"rank {rank}"

    # ---- framed requests
    def send_frame(self, peer: int, frame: Frame, payload: torch.Tensor) -> List[Pending]:
        """Post a request: the frame, then the payload (if not empty)."""
        out = [self.send(peer, encode_frame(frame, payload.numel()))]
        if payload.numel():
            out.append(self.send(peer, payload))
        return out

    def recv_frame(self, peer: int) -> Pending:
        """Post the receive of ``peer``'s next frame (decode ``.buf`` once waited)."""
        return self.recv(peer, torch.empty(FRAME_WORDS, dtype=torch.int64))


class GlooP2PTransport(Transport):
    """gloo point-to-point messages on ``group`` (spanning all ranks; peers are
    global ranks): ranks ``ps_ranks`` are PS, every other rank of
    ``range(world_size)`` a worker."""

    def __init__(self, group, world_size: int, ps_ranks: Sequence[int], timeout_s: float = 120.0) -> None:
        ps = list(ps_ranks)
        super().__init__(ps, [r for r in range(world_size) if r not in ps], timeout_s)
        self.group = group
        # what dist.isend / dist.irecv resolve on every call, resolved once: the
        # process group and each peer's rank in it (the group spans all ranks);
        # messages then go straight to the group's send / recv (same tag 0)
        self._pg = group if group is not None else dist.distributed_c10d._get_default_group()
        self._group_rank = {r: dist.get_group_rank(self._pg, r) for r in range(world_size)}

    def _isend(self, buf: torch.Tensor, peer: int) -> Any:
        return self._pg.send([buf], self._group_rank[peer], 0)

    def _irecv(self, buf: torch.Tensor, peer: int) -> Any:
        return self._pg.recv([buf], self._group_rank[peer], 0)

    def _wait(self, work: Any, timeout_s: float) -> None:
        work.wait(timedelta(seconds=timeout_s))

    def native_clock(self, markers: Sequence[Pending], replies: Sequence[Pending]):
        return ops.native_reply_clock([p.work for p in markers], [p.work for p in replies], self.timeout_s)
