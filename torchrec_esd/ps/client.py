"""Worker side of the PS protocol: every worker calls the same phases.

Each phase is one *exchange*: a request to every PS (frame + payload, see
:mod:`torchrec_esd.ps.protocol`) and, where the phase has one, a reply from
every PS.  The client records what each exchange really moved in
:attr:`PsClient.last_traffic` (wire bytes and messages from the transport's
meter, payload sections as packed), which the runtime's transmission meter
reads.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from torchrec_esd.config import EsdConfigError
from torchrec_esd.layout import KeySpace
from torchrec_esd.optim import SparseOptimizer
from torchrec_esd.ps.des_route import DesRequest, DesRoute
from torchrec_esd.ps.protocol import (
    DEFAULT_MAX_DES_PAIRS,
    EsdPeerLostError,
    REPLY_MARKER_BYTES,
    Frame,
    GatherFrame,
    GatherReply,
    GradsRequest,
    Parts,
    PrefetchRequest,
    PushPullFrame,
    PrePushRequest,
    ProtocolLimits,
    PushPullReply,
    PushPullRequest,
    RowFormat,
    Section,
    StopFrame,
    ValuesFrame,
    abort_parts,
    add_sections,
    check_reply_marker,
    encode_frame,
    own_part_bytes,
    own_updated,
    pack,
    read_only,
)
from torchrec_esd.ps.transport import LinkStats, Pending, Traffic, Transport

_NO_KEYS = torch.empty(0, dtype=torch.int64)


@dataclass
class PendingPrefetch:
    """A posted :meth:`PsClient.post_prefetch`: its requests and replies in
    flight (completed by :meth:`PsClient.finish_prefetch`)."""

    keys: torch.Tensor  # [n] the keys, in the order the rows come back
    order: Optional[torch.Tensor]  # keys[order] are grouped by PS (None: one PS, as given)
    frames: list
    sends: List[Pending]
    recvs: List[Pending]
    replies: List[torch.Tensor]
    sections: Dict


@dataclass
class PendingPushPull:
    """A posted :meth:`PsClient.post_push_pull`: its requests and replies in
    flight (completed by :meth:`PsClient.finish_push_pull`)."""

    order: Optional[torch.Tensor]  # the pull keys grouped by PS (None: one PS, as given)
    frames: list
    earlier: List[Pending]  # sends of the exchange before it (the gradients), waited with it
    sends: List[Pending]
    recvs: List[Pending]
    replies: List[torch.Tensor]
    sections: Dict
    markers: List[Tuple[int, Pending]] = field(default_factory=list)  # (reply, marker) of timed replies
    clock: Optional["ReplyClock"] = None  # times the timed replies (None: untimed)
    # a split reply (post_grads_push_pull): replies are two per PS, [rows the worker sent no gradient
    # for, the rest]; own[i] marks the second part's keys among PS i's pull keys; clock_b times the second parts
    own: Optional[List[torch.Tensor]] = None
    clock_b: Optional["ReplyClock"] = None
    tail: Optional["SplitTail"] = None  # a split exchange whose values are not sent yet (send_split_tail)
    # with gradient sums (GradsFrame.sums): per PS, (the second part's keys, the index of each among that PS's
    # gradient keys) (the head), then per PS (their gradients, the rows + states those were computed on) (the tail)
    own_at: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None
    own_inputs: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None


@dataclass
class SplitTail:
    """What :meth:`PsClient.send_split_tail` needs of a posted split head."""

    grad_keys: torch.Tensor  # in the order of the gradients to come
    push_keys: torch.Tensor  # in the order of the pushed rows to come
    sends: List[Pending]  # the head's gradient frames and keys
    sections: Dict


class ReplyClock:
    """Times the replies of a posted exchange while the worker computes.

    A posted exchange (:meth:`PsClient.post_push_pull`) completes in gloo's
    own thread while the training thread runs the backward, the dense
    all-reduce and the optimizer, so the training thread cannot see when its
    reply arrived.  A waiter that is not the training thread waits for the
    markers of the timed replies (:data:`REPLY_MARKER_BYTES`), reads the
    clock, waits for the replies and reads it again: the seconds from the
    last marker to the last reply byte, as :meth:`PsClient._exchange`
    measures a synchronous timed exchange.  It is the only waiter of those
    receives (a gloo receive is waited for once); :meth:`join` hands its
    answer, or its error, to the training thread.  Every wait has the
    transport's timeout, so the waiter always ends.

    The waiter is native where the transport offers one
    (:meth:`Transport.native_clock`, gloo): a C++ thread that reads the clock
    without the GIL, right when each receive completes.  Otherwise a Python
    thread reads it when it holds the GIL again after a receive completes:
    while the training thread runs Python code that can be milliseconds late
    (the interpreter's switch interval), long enough for a short reply to be
    complete before its marker is seen, so it reads near-instant (measured in
    session 10: a 1000 Mbit/s link estimated at 24.6 Gbit/s, a 10 Mbit/s one
    drifting to ~15 Mbit/s)."""

    def __init__(self, transport: Transport, markers: List[Pending], recvs: List[Pending],
                 native: Optional[Any] = None) -> None:
        """``native``: the transport's native waiter of these receives
        (:meth:`Transport.native_clock`), or ``None`` for a Python thread."""
        self._transport = transport
        self._markers, self._recvs = markers, recvs
        self.error: Optional[BaseException] = None
        self.first = self.end = 0.0
        self._native = native
        self.native = native is not None
        if self.native:
            return
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="esd-reply-clock", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._transport.wait(self._markers)
            self.first = time.perf_counter()
            self._transport.wait(self._recvs)
            self.end = time.perf_counter()
        except BaseException as e:  # raised in the training thread, by join
            self.error = e
        finally:
            self._done.set()

    def _join_native(self) -> float:
        first, end, failed, message = self._native.join()
        waited = self._markers + self._recvs
        if failed >= 0:
            raise self._transport.failure(waited[failed], message)
        for p in waited:
            self._transport.completed(p)
        self.first, self.end = first, end
        return end - first

    def join(self) -> float:
        """Wait for the replies; the seconds from the last marker to the
        last reply byte.  Raises what the waits raised."""
        if self.native:
            return self._join_native()
        bound = self._transport.timeout_s * (len(self._markers) + len(self._recvs)) + 10.0
        if not self._done.wait(bound):  # cannot happen: every wait of the thread is bounded
            raise EsdPeerLostError(f"the replies of a posted push/pull did not complete in {bound:.0f} s")
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.end - self.first


class PsClient:
    """One worker's connection to every PS (``transport.ps_ranks``, in PS order)."""

    def __init__(
        self,
        routing: KeySpace,
        optimizer: SparseOptimizer,
        transport: Transport,
        des: bool = False,
        max_des_pairs: int = DEFAULT_MAX_DES_PAIRS,
        timed_replies: bool = False,
    ) -> None:
        """``timed_replies``: push/pull replies come after a marker and
        :attr:`last_traffic` times their transfer (``Traffic.transfer_seconds``;
        what the online link estimates need, ``EsdConfig.online_links``)."""
        if len(transport.ps_ranks) != routing.num_ps:
            raise EsdConfigError(
                f"the transport has {len(transport.ps_ranks)} PS ranks, the routing {routing.num_ps} PS"
            )
        self.routing = routing
        self.optimizer = optimizer
        self.transport = transport
        self.des = des
        self.timed_replies = bool(timed_replies)
        self.fmt = RowFormat(routing.wire_dim, state_dim=optimizer.state_dim)
        self.limits = [ProtocolLimits(int(n), max_des_pairs) for n in routing.ps_rows.tolist()]
        # sends of a request that expects no reply (gradients): waited for at the
        # next request, so that the worker goes on while the PS still collects
        self._unsent: List[Pending] = []
        self.last_traffic = Traffic()
        self._open_tail: Optional[SplitTail] = None  # a split exchange whose values are not sent yet

    # ------------------------------------------------------------ exchange
    def _exchange(
        self,
        frames: Sequence[Frame],
        parts: Sequence[Parts],
        reply_bytes: Optional[Sequence[int]] = None,
        wait: bool = True,
    ) -> List[torch.Tensor]:
        """Send every PS ``i`` the frame ``frames[i]`` and the payload
        ``parts[i]``; returns the replies (``reply_bytes[i]`` bytes from PS
        ``i``, nothing where 0).  With ``wait=False`` (no reply) it returns
        before its sends complete, without waiting for earlier ones either
        (a pre-push may still be crossing a slow uplink when the gradients
        go); all are waited for, in order, at the next exchange that waits,
        and an error surfaces there.  Sets :attr:`last_traffic` (with the
        exchange's wall seconds where it waits for its sends and replies).
        A timed request's non-empty reply (``PushPullFrame.timed``) comes after
        a marker holding its size (checked); the seconds from the markers'
        arrival to the last reply byte are the replies' transfer
        (``Traffic.transfer_seconds``)."""
        t = self.transport
        no_reply = not wait and reply_bytes is None
        if not no_reply:
            t.wait(self._unsent)
            self._unsent = []
        before = t.meter.total()
        start = time.perf_counter()
        sends, recvs, replies, sections, markers = self._post(
            frames, parts, reply_bytes if reply_bytes is not None else [0] * len(t.ps_ranks))
        seconds, transfer_s, transfer_b = 0.0, 0.0, 0
        if no_reply:
            # waited for at the next exchange that waits: a request with no reply does not wait
            # for the previous one's sends (a pre-push may still cross a slow uplink)
            self._unsent += sends
        else:
            mk = [m for _, m in markers]
            native = t.native_clock(mk, recvs) if markers else None
            if native is not None:  # the replies' clock read without the GIL (ReplyClock)
                transfer_s = ReplyClock(t, mk, recvs, native).join()
                t.wait(sends)
                seconds = time.perf_counter() - start
            else:
                # the markers first: a send may be reported complete only after the reply is in
                t.wait(mk)
                first = time.perf_counter()
                t.wait(sends + recvs)
                seconds = time.perf_counter() - start
                if markers:
                    transfer_s = seconds - (first - start)
            transfer_b = self._timed_reply_bytes(markers, replies)
        self.last_traffic = Traffic(t.meter.total() - before, sections, seconds, transfer_b, transfer_s)
        return replies

    def _split_by_ps(self, keys: torch.Tensor, *rows: torch.Tensor):
        """``keys`` (and the matching ``rows``) grouped by the PS that owns
        them: ``(order, [keys per PS], [rows per PS]...)``, where
        ``keys[order]`` is the grouped sequence.  With one PS the tensors go
        as given (``order`` None: no grouping, no copy)."""
        if self.routing.num_ps == 1:
            return (None, (keys,), *((r,) for r in rows))
        p, _ = self.routing.locate(keys)
        order = torch.argsort(p, stable=True)
        per = torch.bincount(p, minlength=self.routing.num_ps).tolist()
        return (order, *(torch.split(t[order], per) for t in (keys, *rows)))

    def _in_key_order(self, order: Optional[torch.Tensor], parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The rows of ``parts`` (one per PS, grouped as :meth:`_split_by_ps`
        grouped their keys) back in the keys' order."""
        if order is None:
            return parts[0]  # a view of the fresh reply buffer
        out = torch.empty(order.numel(), self.routing.wire_dim + self.optimizer.state_dim)
        out[order] = torch.cat(list(parts))
        return out

    def _send_requests(self, frames: Sequence[Frame], parts: Sequence[Parts]) -> Tuple[List[Pending], Dict]:
        """Post frame ``frames[i]`` and payload ``parts[i]`` to every PS ``i``
        (checked as the PS would): (the sends, the payload sections)."""
        t = self.transport
        sections: Dict = {}
        sends: List[Pending] = []
        for i, dst in enumerate(t.ps_ranks):
            frames[i].check(self.limits[i], f"worker request to PS {i}")  # what the PS would reject
            add_sections(sections, parts[i])
            sends += t.send_frame(dst, frames[i], pack(parts[i]))
        return sends, sections

    def _post(self, frames: Sequence[Frame], parts: Sequence[Parts], reply_bytes: Sequence[int]):
        """Post a request to every PS and the receives of its replies, without
        waiting: (sends, receives, reply buffers, payload sections, markers:
        ``(PS, receive)`` of the marker before each non-empty timed reply,
        posted before that reply's receive)."""
        sends, sections = self._send_requests(frames, parts)
        recvs, replies, markers = [], [], []
        for i, src in enumerate(self.transport.ps_ranks):
            # (a timed frame: the PS sends a marker before a non-empty reply)
            self._recv_reply(src, int(reply_bytes[i]), getattr(frames[i], "timed", False), recvs, replies, markers)
        return sends, recvs, replies, sections, markers

    def _recv_reply(self, src: int, nbytes: int, timed: bool, recvs: List[Pending], replies: List[torch.Tensor],
                    markers: List[Tuple[int, Pending]]) -> Optional[Pending]:
        """Post the receive of a reply of ``nbytes`` from ``src`` (after the
        receive of its marker where ``timed``; nothing where empty) and
        append it: its buffer to ``replies``, its receive to ``recvs``, its
        marker to ``markers`` as ``(reply index, receive)``.  Returns the
        marker's receive or None."""
        buf = torch.empty(nbytes, dtype=torch.uint8)
        marker = None
        if nbytes:
            if timed:
                marker = self.transport.recv(src, torch.empty(REPLY_MARKER_BYTES // 8, dtype=torch.int64))
                markers.append((len(replies), marker))
            recvs.append(self.transport.recv(src, buf))
        replies.append(buf)
        return marker

    @staticmethod
    def _timed_reply_bytes(markers: List[Tuple[int, Pending]], replies: List[torch.Tensor]) -> int:
        """Check every received marker against its reply's size; the bytes of
        the timed replies."""
        for i, m in markers:
            check_reply_marker(m.buf, replies[i].numel(), f"PS {i}")
        return sum(replies[i].numel() for i, _ in markers)

    @staticmethod
    def _own_traffic(sends: List[Pending], recvs: List[Pending], sections: Dict, transfer_bytes: int = 0,
                     transfer_seconds: float = 0.0) -> Traffic:
        """What a posted exchange's own messages moved (other exchanges may
        have run between its posting and its end; no wall seconds)."""
        nbytes = [m.buf.numel() * m.buf.element_size() for m in sends + recvs]
        link = LinkStats(sum(nbytes[: len(sends)]), sum(nbytes[len(sends):]), len(sends), len(recvs))
        return Traffic(link, sections, 0.0, transfer_bytes, transfer_seconds)

    # ------------------------------------------------------------ phases
    def _push_pull_requests(self, push_keys, push_vals, pull_keys, des, batch_fingerprint, probe_bytes=0):
        """(pull keys' PS order, DES route, one PushPullRequest per PS);
        ``probe_bytes`` of padding asked of PS 0's reply (timed replies only)."""
        if des is not None and not self.des:
            raise EsdConfigError("a DES request on a PS client built without des_misses")
        route: Optional[DesRoute] = None
        if self.des:
            route = DesRoute.build(self.routing, des if des is not None else DesRequest.empty())
        _, pk, pv = self._split_by_ps(push_keys, push_vals.to(torch.float32))
        qo, qk = self._split_by_ps(pull_keys)
        reqs = []
        for i in range(self.routing.num_ps):
            probe = int(probe_bytes) if i == 0 and self.timed_replies else 0
            if route is None:
                reqs.append(PushPullRequest(pk[i], qk[i], pv[i], _NO_KEYS, fingerprint=batch_fingerprint,
                                            timed=self.timed_replies, probe=probe))
            else:
                w = route.weights[i] if route.weighted[i] else None
                reqs.append(PushPullRequest(pk[i], qk[i], pv[i], route.packed[i], int(route.bags_per_ps[i]), w,
                                            batch_fingerprint, self.timed_replies, probe))
        return qo, route, reqs

    def push_pull(
        self,
        push_keys: torch.Tensor,
        push_vals: torch.Tensor,
        pull_keys: torch.Tensor,
        des: Optional[DesRequest] = None,
        batch_fingerprint: int = 0,
        probe_bytes: int = 0,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[DesRoute]]:
        """Store ``push_vals`` [n, D+S] at ``push_keys``, then return the rows
        (value + state) of ``pull_keys`` in their order, and (with DES) the
        pooled partial sums ``[des.num_bags, D]`` of the DES request plus the
        route that :meth:`push_grads` needs for the bags' gradients.  One
        request to and one reply from each PS; ``batch_fingerprint`` (of the
        global batch, or 0) goes in its frame and must match every worker's.
        ``probe_bytes``: with timed replies, padding asked of the reply so
        that it is large enough to measure the link on (PS 0 adds it)."""
        dim = self.routing.wire_dim
        qo, route, reqs = self._push_pull_requests(push_keys, push_vals, pull_keys, des, batch_fingerprint,
                                                   probe_bytes)
        frames = [q.frame() for q in reqs]
        got = self._exchange(frames, [q.parts() for q in reqs], [f.reply_bytes(self.fmt) for f in frames])
        replies = [PushPullReply.decode(f, buf, self.fmt) for f, buf in zip(frames, got)]
        for r in replies:
            add_sections(self.last_traffic.sections, r.parts())
        out = self._in_key_order(qo, [r.rows for r in replies])
        partial = torch.empty(0, dim)
        if route is not None:
            # every PS summed the rows it owns; the bag's partial sum is the sum over PS
            partial = torch.zeros(route.num_bags, dim).index_add_(
                0, torch.cat(route.ps_bags), torch.cat([r.partials for r in replies])
            )
        return out, partial, route

    def post_push_pull(self, push_keys: torch.Tensor, push_vals: torch.Tensor, pull_keys: torch.Tensor,
                       batch_fingerprint: int = 0, probe_bytes: int = 0) -> PendingPushPull:
        """:meth:`push_pull` (no DES) posted without waiting,
        not even for the previous exchange's sends (the gradients: messages
        to one PS arrive in the order they were posted, so the PS reads this
        request after them, and answers it after their phase): the request
        and its reply move while the worker computes (gloo progresses them in
        its own thread).  With timed replies a :class:`ReplyClock` times them
        meanwhile.  :meth:`finish_push_pull` waits for it; no other
        exchange may come between."""
        if self.des:
            raise EsdConfigError("a posted push/pull has no DES request (the DES request needs the batch)")
        qo, _, reqs = self._push_pull_requests(push_keys, push_vals, pull_keys, None, batch_fingerprint,
                                               probe_bytes)
        frames = [q.frame() for q in reqs]
        sends, recvs, replies, sections, markers = self._post(
            frames, [q.parts() for q in reqs], [f.reply_bytes(self.fmt) for f in frames])
        earlier, self._unsent = self._unsent, []
        clock = None
        if markers:
            mk = [m for _, m in markers]
            clock = ReplyClock(self.transport, mk, recvs, self.transport.native_clock(mk, recvs))
        return PendingPushPull(qo, frames, earlier, sends, recvs, replies, sections, markers, clock)

    def post_split_head(self, grad_keys: torch.Tensor, push_keys: torch.Tensor, pull_keys: torch.Tensor,
                        batch_fingerprint: int = 0, sums: bool = False, probe_bytes: int = 0) -> PendingPushPull:
        """The first half of a *split* exchange (``EsdConfig.split_reply``;
        no DES): to every PS the frame and keys of this iteration's
        gradients, then the frame and keys of the next iteration's push/pull,
        and the receives of its reply, posted.  The keys are known from the
        plans, so this may go before the backward computes the gradients;
        :meth:`send_split_tail` sends their values and the pushed rows (no
        other request to the PS may come between), :meth:`finish_push_pull`
        waits for the reply.  The PS answers the pulled rows this worker
        sends no gradient for as soon as the other workers' gradients and
        pushes of them are in, while this worker's values may still be on
        the uplink, and the rest after
        (:func:`~torchrec_esd.ps.protocol.own_updated`), each part in pull
        order.  ``sums`` (``EsdConfig.split_sums``; only the worker the PS
        sums last): the rest comes as the other workers' summed gradients,
        which :meth:`finish_push_pull` turns into the rows with this worker's
        own gradients and the rows they were computed on
        (:meth:`send_split_tail`'s ``old_rows``)."""
        if self.des:
            raise EsdConfigError("a split gradient phase has no DES bag gradients (it comes with the early pull)")
        t = self.transport
        width = self.fmt.dim + self.fmt.state_dim
        _, gk = self._split_by_ps(grad_keys)
        greqs = [GradsRequest(gk[i], None, torch.empty(0, self.routing.wire_dim), split=True, sums=sums)
                 for i in range(self.routing.num_ps)]
        # (the pushed rows are read after the backward: the tail sends them)
        qo, _, reqs = self._push_pull_requests(push_keys, torch.empty(push_keys.numel(), width), pull_keys, None,
                                               batch_fingerprint, probe_bytes)
        gsends, gsections = self._send_requests([q.frame() for q in greqs], [q.parts() for q in greqs])
        frames = [q.frame() for q in reqs]
        sends, sections = self._send_requests(frames, [q.parts(rows_apart=True) for q in reqs])
        own = [own_updated(reqs[i].pull_keys, gk[i]) for i in range(self.routing.num_ps)]
        recvs: List[Pending] = []
        replies: List[torch.Tensor] = []
        markers: List[Tuple[int, Pending]] = []
        timed: List[List[Pending]] = [[], [], [], []]  # markers and receives of the first parts, of the second
        for i, src in enumerate(t.ps_ranks):
            for part, mask in enumerate((~own[i], own[i])):
                # (the first part carries the padding: PushPullFrame.probe)
                n = own_part_bytes(int(mask.sum()), self.fmt, sums and part == 1) if part else \
                    int(mask.sum()) * self.fmt.row_bytes + frames[i].probe
                m = self._recv_reply(src, n, self.timed_replies, recvs, replies, markers)
                if m is not None:
                    timed[2 * part].append(m)
                    timed[2 * part + 1].append(recvs[-1])
        earlier, self._unsent = self._unsent + gsends, []
        clocks = [ReplyClock(t, mk, rv, t.native_clock(mk, rv)) if mk else None
                  for mk, rv in ((timed[0], timed[1]), (timed[2], timed[3]))]
        self._open_tail = SplitTail(grad_keys, push_keys, gsends, gsections)
        own_at = None
        if sums:  # where each key of the second parts sits among the gradients (keys distinct per PS)
            own_at = []
            for i in range(self.routing.num_ps):
                ordered, perm = torch.sort(gk[i])
                keys = reqs[i].pull_keys[own[i]]
                own_at.append((keys, perm[torch.searchsorted(ordered, keys)]))
        return PendingPushPull(qo, frames, earlier, sends, recvs, replies, sections, markers, clocks[0], own,
                               clocks[1], self._open_tail, own_at)

    def send_split_tail(self, p: PendingPushPull, grads: torch.Tensor, push_vals: torch.Tensor,
                        old_rows: Optional[torch.Tensor] = None) -> Traffic:
        """The second half of :meth:`post_split_head`'s exchange: to every PS
        a VALUES frame, the gradient values ``grads`` [len(grad keys), D],
        then the pushed rows ``push_vals`` [len(push keys), D+S] (each where
        not empty); returns before the sends complete.  With gradient sums,
        ``old_rows`` [len(grad keys), D+S]: the rows (value + optimizer
        state) the gradients were computed on, as the PS holds them.  What
        the gradients moved (head and tail; their sends complete at
        :meth:`finish_push_pull`)."""
        tail = p.tail
        if tail is None:
            raise EsdConfigError("the values of this split exchange were sent already (or it is not split)")
        if grads.shape[0] != tail.grad_keys.numel() or push_vals.shape[0] != tail.push_keys.numel():
            raise EsdConfigError(
                f"a split exchange announced {tail.grad_keys.numel()} gradients and {tail.push_keys.numel()} pushed "
                f"rows, then got {grads.shape[0]} and {push_vals.shape[0]}")
        if p.own_at is not None and (old_rows is None or tuple(old_rows.shape) != (
                tail.grad_keys.numel(), self.fmt.dim + self.fmt.state_dim)):
            raise EsdConfigError(
                f"a split exchange with gradient sums needs the {tail.grad_keys.numel()} rows its gradients were "
                f"computed on (value + state), got {None if old_rows is None else tuple(old_rows.shape)}")
        p.tail = self._open_tail = None
        t = self.transport
        old = [] if p.own_at is None else [old_rows.to(torch.float32)]  # type: ignore[union-attr]
        _, gk, gv, *ov = self._split_by_ps(tail.grad_keys, grads.to(torch.float32), *old)
        if p.own_at is not None:
            p.own_inputs = [(g[a], o[a]) for g, o, (_, a) in zip(gv, ov[0], p.own_at)]
        _, pk, pv = self._split_by_ps(tail.push_keys, push_vals.to(torch.float32))
        sends: List[Pending] = []
        sections = dict(tail.sections)
        for i, dst in enumerate(t.ps_ranks):
            frame = ValuesFrame(gk[i].numel(), pk[i].numel())
            frame.check(self.limits[i], f"worker request to PS {i}")
            sends.append(t.send(dst, encode_frame(frame, frame.payload_bytes(self.fmt))))
            if gk[i].numel():  # the values first: the reply's second part waits for them
                part = [(Section.ROW_GRADS, gv[i])]
                sends.append(t.send(dst, pack(part)))
                add_sections(sections, part)
            if pk[i].numel():  # the pushed rows last: only other workers' pulls wait for them
                part = [(Section.PUSH_ROWS, pv[i])]
                p.sends.append(t.send(dst, pack(part)))
                add_sections(p.sections, part)
        p.earlier += sends
        return self._own_traffic(tail.sends + sends, [], sections)

    def post_grads_push_pull(
        self, grad_keys: torch.Tensor, grads: torch.Tensor, push_keys: torch.Tensor, push_vals: torch.Tensor,
        pull_keys: torch.Tensor, batch_fingerprint: int = 0, old_rows: Optional[torch.Tensor] = None,
        probe_bytes: int = 0,
    ) -> Tuple[PendingPushPull, Traffic]:
        """:meth:`post_split_head` and :meth:`send_split_tail` at once:
        :meth:`push_grads` (no DES) then :meth:`post_push_pull`, with a split
        reply (with gradient sums where ``old_rows`` is given)."""
        p = self.post_split_head(grad_keys, push_keys, pull_keys, batch_fingerprint, sums=old_rows is not None,
                                 probe_bytes=probe_bytes)
        return p, self.send_split_tail(p, grads, push_vals, old_rows)

    def _split_rows(self, p: PendingPushPull, sections: Dict) -> List[PushPullReply]:
        """The replies of a split push/pull, each PS's two parts back in its
        pull order (the second from gradient sums where asked for:
        :meth:`_rows_from_sums`); their sections as received go to ``sections``."""
        assert p.own is not None
        out = []
        width = self.fmt.dim + self.fmt.state_dim
        for i, (f, own) in enumerate(zip(p.frames, p.own)):
            first_frame = PushPullFrame(0, int((~own).sum()), timed=f.timed, probe=f.probe)  # (it carries the padding)
            first = PushPullReply.decode(first_frame, p.replies[2 * i], self.fmt)
            n = int(own.sum())
            if p.own_at is None:
                second = PushPullReply.decode(PushPullFrame(0, n), p.replies[2 * i + 1], self.fmt).rows
                received = second
            else:
                received = read_only(p.replies[2 * i + 1], n, torch.float32, (self.fmt.dim,))
                second = self._rows_from_sums(p.own_at[i][0], received, *p.own_inputs[i])  # type: ignore[index]
            add_sections(sections, first.parts() + [(Section.PULL_ROWS, received)])
            rows = torch.empty(f.pulls, width)
            rows[~own], rows[own] = first.rows, second
            out.append(PushPullReply(rows, torch.empty(0, self.fmt.dim)))
        return out

    def _rows_from_sums(self, keys: torch.Tensor, sums: torch.Tensor, grads: torch.Tensor,
                        old: torch.Tensor) -> torch.Tensor:
        """The PS's new rows (value + state) of ``keys``, whose reply part
        came as the other workers' gradient sums ``sums``: the PS's running
        sum of each row plus this worker's gradient ``grads`` (the last it
        adds), then the optimizer step on the row and state ``old`` the
        gradient was computed on.  The PS's own operations on the same
        values, so the same bits (``torch.equal``, tested)."""
        d = self.fmt.dim
        total = sums + grads
        rows, state = old[:, :d].clone(), old[:, d:].clone()
        self.optimizer.apply_(rows, state, total, self.routing.row_dims(keys))
        return torch.cat([rows, state], dim=1)

    def finish_push_pull(self, p: PendingPushPull) -> torch.Tensor:
        """Wait for ``p``'s replies: the pulled rows in the order of its pull
        keys; :attr:`last_traffic`: its own messages (no wall seconds; with
        timed replies their bytes and transfer seconds: with a split reply,
        the two parts' transfers added)."""
        if p.tail is not None:
            raise EsdConfigError("a split exchange's values were never sent (PsClient.send_split_tail)")
        t = self.transport
        transfer_s, transfer_b = 0.0, 0
        if p.clock is None and p.clock_b is None:
            t.wait(p.earlier + p.sends + p.recvs)
        else:
            t.wait(p.earlier + p.sends)
            for clock in (p.clock, p.clock_b):
                transfer_s += clock.join() if clock is not None else 0.0
            transfer_b = self._timed_reply_bytes(p.markers, p.replies)
        sections = dict(p.sections)
        if p.own is not None:
            replies = self._split_rows(p, sections)
        else:
            replies = [PushPullReply.decode(f, buf, self.fmt) for f, buf in zip(p.frames, p.replies)]
            for r in replies:
                add_sections(sections, r.parts())
        self.last_traffic = self._own_traffic(p.sends, [m for _, m in p.markers] + p.recvs, sections,
                                              transfer_b, transfer_s)
        return self._in_key_order(p.order, [r.rows for r in replies])

    def post_prefetch(self, keys: torch.Tensor) -> PendingPrefetch:
        """Ask every PS for the rows (value + state) of ``keys`` as they are
        now, without waiting: the requests and the replies move while the
        worker computes (gloo progresses them in its own thread).  Every
        worker posts one at the same point of its phases (a lockstep phase;
        ``keys`` may be empty).  Replies to one PS are matched in the order
        their receives were posted, so later exchanges may run before
        :meth:`finish_prefetch`."""
        order, ks = self._split_by_ps(keys)
        reqs = [PrefetchRequest(ks[i]) for i in range(self.routing.num_ps)]
        frames = [q.frame() for q in reqs]
        sends, recvs, replies, sections, _ = self._post(frames, [q.parts() for q in reqs],
                                                     [f.reply_bytes(self.fmt) for f in frames])
        return PendingPrefetch(keys, order, frames, sends, recvs, replies, sections)

    def finish_prefetch(self, p: PendingPrefetch) -> Tuple[torch.Tensor, Traffic]:
        """Wait for ``p``'s replies: the rows ``[len(p.keys), D+S]`` in the
        order of ``p.keys``, and what it moved (its own messages: other
        exchanges may run between its posting and this call)."""
        t = self.transport
        t.wait(p.sends + p.recvs)
        rows = [PrefetchRequest.decode_reply(f, buf, self.fmt) for f, buf in zip(p.frames, p.replies)]
        sections = dict(p.sections)
        out = self._in_key_order(p.order, rows)
        add_sections(sections, [(Section.PULL_ROWS, r) for r in rows])
        return out, self._own_traffic(p.sends, p.recvs, sections)

    def push_grads(
        self, keys: torch.Tensor, grads: torch.Tensor, des_route: Optional[DesRoute] = None,
        des_grads: Optional[torch.Tensor] = None,
    ) -> None:
        """Send row gradients ``grads`` [n, D] of ``keys`` and (with DES) the
        gradients ``des_grads`` [num_bags, D] of the bags served in the forward
        (one request to each PS, no reply)."""
        dim = self.routing.wire_dim
        if self.des and des_route is None:
            des_route = DesRoute.build(self.routing, DesRequest.empty())
        send_bags: List[torch.Tensor] = [torch.empty(0, dim)] * self.routing.num_ps
        if self.des:
            assert des_route is not None
            if des_grads is None:
                des_grads = torch.zeros(des_route.num_bags, dim)
            if tuple(des_grads.shape) != (des_route.num_bags, dim):
                raise EsdConfigError(
                    f"DES bag gradients of shape {tuple(des_grads.shape)}, expected ({des_route.num_bags}, {dim})"
                )
            send_bags = [des_grads[b] for b in des_route.ps_bags]
        _, ks, gs = self._split_by_ps(keys, grads.to(torch.float32))  # the request's pack copies them
        reqs = [GradsRequest(ks[i], gs[i], send_bags[i]) for i in range(self.routing.num_ps)]
        self._exchange([q.frame() for q in reqs], [q.parts() for q in reqs], wait=False)  # the worker goes on

    def pre_push(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Send ``rows`` [n, D+S] (value + state) of ``keys`` to be stored
        now (``EsdConfig.pre_push``: between a push/pull and its gradients;
        one request to each PS, also where empty, no reply); returns before
        the sends complete, as :meth:`push_grads`."""
        _, ks, rs = self._split_by_ps(keys, rows.to(torch.float32))
        reqs = [PrePushRequest(ks[i], rs[i]) for i in range(self.routing.num_ps)]
        self._exchange([q.frame() for q in reqs], [q.parts() for q in reqs], wait=False)

    def gather_tables(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Full tables and optimizer states, assembled from every PS's storage
        (every worker calls it; each PS replies to each worker)."""
        r = self.routing
        n = r.num_ps
        ps_rows = [int(x) for x in r.ps_rows.tolist()]
        got = self._exchange([GatherFrame()] * n, [[] for _ in range(n)],
                             [GatherReply.reply_bytes(ps_rows[i], self.fmt) for i in range(n)])
        parts = [GatherReply.decode(ps_rows[i], got[i], self.fmt) for i in range(n)]
        for g in parts:
            add_sections(self.last_traffic.sections, g.parts())
        weights, states = {}, {}
        for t, name in enumerate(r.names):
            keys = r.keys(t, torch.arange(int(r.rows[t])))
            p, local = r.locate(keys)
            dim = r.formats[t].dim  # stored rows are wire_dim wide (zero-padded)
            weights[name] = torch.empty(int(r.rows[t]), dim)
            states[name] = torch.empty(int(r.rows[t]), self.optimizer.state_dim)
            for i in range(n):
                m = p == i
                weights[name][m] = parts[i].weights[local[m], :dim]
                states[name][m] = parts[i].state[local[m]]
        return weights, states

    def stop(self) -> None:
        n = self.routing.num_ps
        self._exchange([StopFrame()] * n, [[] for _ in range(n)])

    def abort(self, msg: str) -> None:
        """Make the PS ranks fail with ``msg``.  Every worker calls it (it is a
        collective); the message of worker 0 is the one the PS ranks raise.
        Where a split exchange's values are still to come
        (:meth:`post_split_head`), the ABORT takes the VALUES frame's place
        and its message fills the messages the PS posted for the values and
        pushed rows (cut to their size, zero-padded)."""
        tail = self._open_tail
        if tail is None:
            frame, parts = abort_parts(msg, self.limits[0])
            self._exchange([frame] * self.routing.num_ps, [parts] * self.routing.num_ps)
            return
        self._open_tail = None
        t = self.transport
        _, gk = self._split_by_ps(tail.grad_keys)
        _, pk = self._split_by_ps(tail.push_keys)
        sends: List[Pending] = []
        for i, dst in enumerate(t.ps_ranks):
            frame, ((_, data),) = abort_parts(msg, self.limits[i])
            sizes = ValuesFrame(gk[i].numel(), pk[i].numel()).message_bytes(self.fmt)
            room = torch.zeros(sum(sizes), dtype=torch.uint8)
            n = frame.message_bytes
            k = min(n, room.numel())
            room[:k] = data[:k]
            sends.append(t.send(dst, encode_frame(frame, n)))
            sends += [t.send(dst, part) for part in room.split(list(sizes)) if part.numel()]
            if n > k:  # what did not fit, as a message of its own
                sends.append(t.send(dst, data[k:n].clone()))
        t.wait(self._unsent + sends)
        self._unsent = []
