"""One parameter-server rank: its blocks of every table, optimizer state, serve loop.

The PS follows the workers' program phase by phase: each phase every worker
sends it one request (:mod:`torchrec_esd.ps.protocol`), the PS checks that
they all sent the same command and answers where the phase has a reply:

* ``PUSH_PULL``: store the pushed rows (value + state), then answer the pulls
  and, with DES-served misses, one pooled partial sum per requested bag over
  the rows this PS owns (see :mod:`torchrec_esd.des.served_misses`); a timed
  request's reply comes after a marker (``PushPullFrame.timed``);
* ``GRADS``: scatter DES bag gradients to the bags' rows, sum all workers'
  gradients per row, in :attr:`ParameterServer.arrival_order` (the fastest
  configured link first: :func:`arrival_order`), and apply the optimizer once
  per row (synchronous);
  where a worker's frame is *split* (``EsdConfig.split_reply``) only its
  keys came, and the phase ends in the next push/pull, below;
* ``PUSH_PULL`` after split gradients: a split worker's push/pull request
  is its keys; its gradient values, then its pushed rows, follow.  The PS
  takes them one worker after the other, fastest configured link first
  (their receives posted behind the request's), applies every row whose
  gradients are all in (summed in worker order, as above, so the rows are
  the same bits), stores every pushed row once it is in, and answers each
  split worker in two parts as soon as their rows are final: first the rows
  it sent no gradient for (those wait only for the OTHER workers, so on a
  slow link they come down while its own values still go up), then the
  rest (:func:`~torchrec_esd.ps.protocol.own_updated`); a worker that did
  not split gets its one reply once its rows are final.  The worker summed
  last (the last of ``arrival_order``) may ask for the rest as the other
  workers' summed gradients (``GradsFrame.sums``): each row's partial sum
  before its own gradient, sent as soon as the others' values are in, so
  its download does not wait for its upload at all;
* ``PREFETCH`` (``EsdConfig.prefetch_depth``): answer the pulls of a later
  iteration from the storage as it is now (the workers ask only for rows
  that nothing changes before that iteration reads them,
  :mod:`torchrec_esd.cache.prefetch`); no state changes;
* ``PRE_PUSH`` (``EsdConfig.pre_push``): store pushed rows (value + state)
  that the next push/pull would push; it comes between a push/pull and its
  gradients, and the workers send only rows that no gradient of that phase
  touches (:meth:`torchrec_esd.distributed.ps_sync.PsSync.pre_push`); no
  reply;
* ``GATHER``: send every worker this PS's storage; ``STOP``; ``ABORT``.

Every frame is bounded (:func:`~torchrec_esd.ps.protocol.decode_frame`) and
checked against the PS's state before its payload buffer is allocated.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from torchrec_esd import ops
from torchrec_esd.config import EsdConfigError
from torchrec_esd.layout import KeySpace
from torchrec_esd.optim import SparseOptimizer
from torchrec_esd.ps.protocol import (
    DEFAULT_MAX_DES_PAIRS,
    AbortFrame,
    Command,
    EsdProtocolError,
    EsdRemoteError,
    Frame,
    GatherReply,
    GradsFrame,
    GradsRequest,
    PrefetchRequest,
    PrePushFrame,
    PrePushRequest,
    ProtocolLimits,
    PushPullFrame,
    PushPullReply,
    PushPullRequest,
    RowFormat,
    Section,
    ValuesFrame,
    abort_message,
    decode_frame,
    own_updated,
    pack,
    payload_bytes,
    probe_parts,
    reply_marker,
)
from torchrec_esd.ps.row_storage import DenseRowStorage, PsRowStorage
from torchrec_esd.ps.transport import Pending, Transport


def arrival_order(bytes_per_second: Sequence[float]) -> List[int]:
    """The workers, fastest configured link first (ties in worker order):
    the order a PS sums each row's gradients in and takes split workers'
    values in (:class:`ParameterServer`); every rank derives it from the
    same config, so a worker knows whether its gradients are summed last
    (``EsdConfig.split_sums``)."""
    return sorted(range(len(bytes_per_second)), key=lambda w: -float(bytes_per_second[w]))


class ParameterServer:
    """One PS rank (``ps_index`` in ``0..P-1``) serving ``transport``'s workers."""

    def __init__(
        self,
        ps_index: int,
        routing: KeySpace,
        optimizer: SparseOptimizer,
        transport: Transport,
        initial_weights: Optional[Dict[str, torch.Tensor]] = None,
        des: bool = False,
        max_des_pairs: int = DEFAULT_MAX_DES_PAIRS,
        storage: Optional[PsRowStorage] = None,
        arrival_order: Optional[Sequence[int]] = None,
    ) -> None:
        """Rows live in ``storage`` (:mod:`torchrec_esd.ps.row_storage`, e.g.
        a :class:`~torchrec_esd.ps.row_storage.LazyRowStorage`), or, without
        one, in a dense storage filled from ``initial_weights``.
        ``arrival_order``: the workers, the one whose values are expected
        first (the fastest link) first (:func:`arrival_order`); every row's
        gradients are summed in that order, and a split exchange waits for
        the workers' values in it (default: worker order)."""
        self.ps_index = ps_index
        self.des = des
        # DES requests of the last push/pull phase, until their bag gradients arrive:
        # (storage rows, bag of each pair (global over senders), pair weights, bags per sender)
        self._des_pending: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[int]]] = None
        self.routing = routing
        self.optimizer = optimizer
        self.transport = transport
        self.fmt = RowFormat(routing.wire_dim, state_dim=optimizer.state_dim)
        self.limits = ProtocolLimits(rows=int(routing.ps_rows[ps_index]), max_des_pairs=max_des_pairs)
        if storage is None:
            if initial_weights is None:
                raise EsdConfigError("ParameterServer needs initial_weights or a row storage")
            storage = DenseRowStorage(routing, ps_index, optimizer.state_dim, initial_weights)
        elif storage.ps_index != ps_index or storage.state_dim != optimizer.state_dim:
            raise EsdConfigError(f"PS {ps_index}: a row storage of PS {storage.ps_index} with"
                                 f" {storage.state_dim} state values (the optimizer keeps {optimizer.state_dim})")
        self.storage = storage
        self.iterations = 0
        W = len(transport.worker_ranks)
        order = list(range(W)) if arrival_order is None else [int(r) for r in arrival_order]
        if sorted(order) != list(range(W)):
            raise EsdConfigError(f"PS {ps_index}: arrival_order {order} is not an order of the {W} workers")
        self.arrival_order = order
        # a gradient phase with split frames, until the push/pull that brings their values:
        # per worker (its frame, its local row keys, its gradients or None while they are to come)
        self._held: Optional[List[Tuple[GradsFrame, torch.Tensor, Optional[torch.Tensor]]]] = None
        # the posted receives of each split worker's VALUES frame, values and pushed rows (_post_tail)
        self._tails: Dict[int, Tuple[Pending, Optional[Pending], Optional[Pending]]] = {}

    def serve(self) -> None:
        """Follow the workers' phases until STOP (or raise on ABORT)."""
        while True:
            cmd, frames, payloads = self._receive()
            if self._held is not None and cmd not in (Command.PUSH_PULL, Command.ABORT):
                raise EsdProtocolError(
                    f"PS {self.ps_index}: split gradients of iteration {self.iterations} must be followed by a "
                    f"push/pull (their values come after it), got a {cmd.name} phase")
            if cmd is Command.PUSH_PULL and self._held is not None:
                self._push_pull_split(frames, payloads)
            elif cmd is Command.PUSH_PULL:
                self._push_pull(frames, payloads)
            elif cmd is Command.GRADS:
                self._grads(frames, payloads)
                self.iterations += 1
            elif cmd is Command.PREFETCH:
                self._prefetch(frames, payloads)
            elif cmd is Command.PRE_PUSH:
                self._pre_push(frames, payloads)
            elif cmd is Command.GATHER:
                self._gather()
            elif cmd is Command.STOP:
                return
            elif cmd is Command.VALUES:
                raise EsdProtocolError(f"PS {self.ps_index}: a VALUES frame outside a split exchange")
            else:  # ABORT: every worker sends the message; the first non-empty one is raised
                msg = next((abort_message(p) for f, p in zip(frames, payloads)
                            if isinstance(f, AbortFrame) and p.numel()), "")
                raise EsdRemoteError(f"ESD job aborted by the workers: {msg}")

    # ------------------------------------------------------------ receiving
    def _receive(self) -> Tuple[Command, List[Frame], List[torch.Tensor]]:
        """(command, frame and payload of each worker) of the next request;
        raises if the workers are not in the same phase."""
        t = self.transport
        posted = [t.recv_frame(src) for src in t.worker_ranks]
        frames: List[Frame] = []
        payloads, pending = [], []
        for r, (src, p) in enumerate(zip(t.worker_ranks, posted)):
            t.wait([p])  # each payload is taken as soon as its frame is in
            # after its split gradients a worker's push/pull payload is its keys (the rows follow its values)
            apart = self._held is not None and self._held[r][0].split
            frame = decode_frame(p.buf, self.limits, self.fmt, f"PS {self.ps_index}: request from rank {src}", apart)
            self._check_state(r, frame)
            # bounded by decode_frame and _check_state: safe to allocate
            buf = torch.empty(payload_bytes(frame, self.fmt, apart), dtype=torch.uint8)
            if buf.numel():
                pending.append(t.recv(src, buf))
            if apart and isinstance(frame, PushPullFrame):
                self._post_tail(r, frame)
            frames.append(frame)
            payloads.append(buf)
        t.wait(pending)
        cmds = [f.COMMAND for f in frames]
        if Command.ABORT in cmds:
            return Command.ABORT, frames, payloads
        if len(set(cmds)) != 1:
            raise EsdRemoteError(f"the workers are in different protocol phases (commands {[c.name for c in cmds]})")
        if cmds[0] is Command.PUSH_PULL:
            self._check_same_batch(frames)  # type: ignore[arg-type]
        return cmds[0], frames, payloads

    def _post_tail(self, r: int, frame: PushPullFrame) -> None:
        """Post the receives of split worker ``r``'s VALUES frame, gradient
        values and pushed rows right behind its push/pull request's: gloo
        sends a message only once its receive is posted, and the notice that
        it is would otherwise cross the worker's (slow, busy) downlink after
        the VALUES frame is in.  Their sizes follow from the frames, which
        are bounded."""
        assert self._held is not None
        t, src = self.transport, self.transport.worker_ranks[r]
        sizes = ValuesFrame(self._held[r][0].rows, frame.pushes).message_bytes(self.fmt)
        head = t.recv_frame(src)  # (receives from one peer are matched in the order they are posted)
        bufs = [t.recv(src, torch.empty(n, dtype=torch.uint8)) if n else None for n in sizes]
        self._tails[r] = (head, bufs[0], bufs[1])

    def _check_same_batch(self, frames: List[PushPullFrame]) -> None:
        """Workers of ``EsdInputDist(mode="global")`` must all be handed the same
        global batch (their replicated cache directories drift apart otherwise)."""
        prints = [f.fingerprint for f in frames]
        if len(set(prints)) != 1:
            odd = [r for r, p in enumerate(prints) if p != prints[0]]
            raise EsdRemoteError(
                f"PS {self.ps_index}: the workers were handed different global batches at iteration "
                f"{self.iterations + 1} (batch fingerprints {prints}; workers {odd} differ from worker 0): "
                "with EsdInputDist(mode='global') every worker must pass the same global batch, in the "
                "same order (use mode='local' for per-worker batches)"
            )

    def _check_state(self, worker: int, frame: Frame) -> None:
        """Checks of a frame against this PS's state (DES or not, the bags it served)."""
        where = f"PS {self.ps_index}: request from worker {worker}"
        if isinstance(frame, PushPullFrame) and not self.des and (frame.des_pairs or frame.des_bags):
            raise EsdProtocolError(f"{where}: a DES request (des_pairs = {frame.des_pairs}) to a PS without DES")
        if isinstance(frame, PrePushFrame) and self.des:
            raise EsdProtocolError(f"{where}: a PRE_PUSH request to a PS with DES (EsdConfig.pre_push is not "
                                   "combined with des_misses)")
        if isinstance(frame, GradsFrame):
            if self.des and frame.split:
                raise EsdProtocolError(f"{where}: a split GRADS frame to a PS with DES (EsdConfig.split_reply "
                                       "comes with the early pull, which DES-served misses do not use)")
            if frame.sums and worker != self.arrival_order[-1]:
                raise EsdProtocolError(
                    f"{where}: a GRADS frame asking for gradient sums, but this PS sums worker "
                    f"{self.arrival_order[-1]}'s gradients last (arrival_order {self.arrival_order}), not this "
                    "worker's: its sums would not give the PS's rows")
            if not self.des and frame.bags:
                raise EsdProtocolError(f"{where}: DES bag gradients (bags = {frame.bags}) sent to a PS without DES")
            served = self._des_pending[3][worker] if self._des_pending is not None else 0
            if self.des and frame.bags != served:
                raise EsdProtocolError(
                    f"{where}: GRADS frame field 'bags' = {frame.bags} but this PS served {served} DES bags "
                    "to that worker in the forward"
                )

    # ------------------------------------------------------------ phases
    def _push_pull(self, frames: List[Frame], payloads: List[torch.Tensor]) -> None:
        dim = self.routing.wire_dim
        if self._des_pending is not None and sum(self._des_pending[3]):
            raise EsdRemoteError(
                f"PS {self.ps_index}: a new push/pull phase began before the gradients of the "
                "previous DES partial sums arrived (their updates would be lost)"
            )
        reqs = [PushPullRequest.decode(f, p, self.fmt) for f, p in zip(frames, payloads)]  # type: ignore[arg-type]
        des_keys, des_bags, des_w, bags_per_sender = [], [], [], []
        bag_base = 0
        for r, q in enumerate(reqs):
            if self.des:
                nb, packed = q.des_bags, q.des_packed
                if packed.numel() and int(packed.min()) < 0:
                    raise EsdProtocolError(f"PS {self.ps_index}: worker {r} sent a negative DES pair")
                des_keys.append(packed // max(nb, 1))
                des_bags.append(packed % max(nb, 1) + bag_base)
                des_w.append(q.des_weights if q.des_weights is not None else torch.ones(packed.numel()))
                bag_base += nb
                bags_per_sender.append(nb)
        self._store_rows([q.push_keys for q in reqs], [q.push_rows for q in reqs])
        local = self._local(torch.cat([q.pull_keys for q in reqs]))
        pulled = torch.cat([self.storage.rows(local), self.storage.state(local)], dim=1)
        rows = torch.split(pulled, [q.pull_keys.numel() for q in reqs])
        partials = [torch.empty(0, dim)] * len(reqs)
        if self.des:
            # pooled partial sums, after the pushes above are stored
            dl = self._local(torch.cat(des_keys))
            db = torch.cat(des_bags)
            pair_w = torch.cat(des_w)
            partial = torch.zeros(bag_base, dim).index_add_(0, db, self.storage.rows(dl) * pair_w.view(-1, 1))
            partials = list(torch.split(partial, bags_per_sender))
            self._des_pending = (dl, db, pair_w, bags_per_sender)
        self._reply([PushPullReply(q, s, f.probe).parts() for q, s, f in zip(rows, partials, frames)],
                    [f.timed for f in frames])

    def _grads(self, frames: List[Frame], payloads: List[torch.Tensor]) -> None:
        reqs = [GradsRequest.decode(f, p, self.fmt) for f, p in zip(frames, payloads)]  # type: ignore[arg-type]
        if any(q.split for q in reqs):  # values come after the next push/pull (_push_pull_split)
            self._held = [(f, self._local(q.keys), q.grads) for f, q in zip(frames, reqs)]  # type: ignore[misc]
            return
        order = self.arrival_order  # (each row's gradients are summed in this order)
        local = self._local(torch.cat([reqs[r].keys for r in order]))
        grads = torch.cat([reqs[r].grads for r in order])  # type: ignore[misc]
        if self.des:
            dl, db, pair_w, _ = self._des_pending or (None, None, None, None)
            self._des_pending = None  # bag counts were checked per frame (_check_state)
            if dl is not None and dl.numel():
                # d(sum_i w_i row_i)/d row_i = w_i: each pair's row gets w_i x its bag's gradient
                local = torch.cat([local, dl])
                bag_grads = torch.cat([q.bag_grads for q in reqs])
                grads = torch.cat([grads, bag_grads[db] * pair_w.view(-1, 1)])
        if local.numel() == 0:
            return
        uniq, inv = ops.sorted_distinct_inverse(local)
        self._apply(uniq, inv, grads)

    def _apply(self, uniq: torch.Tensor, inv: torch.Tensor, grads: torch.Tensor) -> None:
        """Sum ``grads`` into the rows ``uniq[inv]`` (in the order given) and
        apply the optimizer once per row of ``uniq``."""
        total = torch.zeros(uniq.numel(), self.routing.wire_dim).index_add_(0, inv, grads)
        rows, state = self.storage.rows(uniq), self.storage.state(uniq)
        self.optimizer.apply_(rows, state, total, self.storage.row_dims(uniq))
        self.storage.write(uniq, rows, state)

    def _push_pull_split(self, frames: List[Frame], payloads: List[torch.Tensor]) -> None:
        """The push/pull after a gradient phase with split frames: take the
        split workers' gradient values and pushed rows one worker after the
        other (:attr:`arrival_order`: the fastest configured link first), apply
        each row once all its gradients are in and store each pushed row once
        it is in, answer every reply part once its rows are final (see the
        module docstring).  The same rows as :meth:`_grads` then
        :meth:`_push_pull`: each row's gradients are summed in
        :attr:`arrival_order`, and a row with gradients and a push gets the
        push after them.  A worker that asked for sums (``GradsFrame.sums``,
        the last of :attr:`arrival_order`) gets the second part once every
        other worker's values are in: per row, the sum of the others'
        gradients in that order, which is the PS's running sum right before
        this worker's gradient is added."""
        held, self._held = self._held, None
        assert held is not None
        t, dim = self.transport, self.routing.wire_dim
        apart = [f.split for f, _, _ in held]
        reqs = [PushPullRequest.decode(f, p, self.fmt, a)  # type: ignore[arg-type]
                for f, p, a in zip(frames, payloads, apart)]
        W, order = len(reqs), self.arrival_order
        # an entry each: every gradient (workers in arrival order: the order a row's gradients are
        # summed in), then every pushed row (worker order); entry range of worker r's gradients: at[r]
        at = {r: i for i, r in enumerate(order)}
        sizes = [int(held[r][1].numel()) for r in order] + [int(q.push_keys.numel()) for q in reqs]
        starts = torch.tensor([0] + sizes).cumsum(0).tolist()
        n_grads = starts[W]
        keys = torch.cat([held[r][1] for r in order] + [self._local(q.push_keys) for q in reqs])
        values = torch.empty(starts[-1], dim + self.fmt.state_dim)  # gradients use the first dim columns
        # what is still to come (per entry): the split workers' values and pushed rows (after a VALUES frame each)
        pending = torch.zeros(starts[-1], dtype=torch.bool)
        for r, (f, _, g) in enumerate(held):
            for rng, have in ((at[r], g), (W + r, reqs[r].push_rows)):
                lo, hi = starts[rng], starts[rng + 1]
                if apart[r]:
                    pending[lo:hi] = True
                elif hi > lo:
                    values[lo:hi, : have.shape[1]] = have
        uniq, inv = ops.sorted_distinct_inverse(keys)
        missing = torch.zeros(uniq.numel(), dtype=torch.int64).index_add_(0, inv, pending.long())  # per row
        done = torch.zeros(uniq.numel(), dtype=torch.bool)
        is_grad = torch.arange(starts[-1]) < n_grads
        # each worker's reply parts, sent in order: (local pull keys, their rows' index in uniq or -1, None),
        # or for a worker's gradient sums (local keys, the entries they sum, in summing order, their key's index)
        parts: List[List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]] = []
        for r, q in enumerate(reqs):
            local = self._local(q.pull_keys)
            pos = torch.searchsorted(uniq, local).clamp_(max=max(uniq.numel() - 1, 0))
            dep = torch.where(uniq[pos] == local, pos, -1) if uniq.numel() else torch.full_like(local, -1)
            if not apart[r]:
                parts.append([(local, dep, None)])
                continue
            own = own_updated(local, held[r][1])  # (local keys of this PS: the same mask as the worker's)
            second = (local[own], dep[own], None)
            if held[r][0].sums:
                second = self._sums_part(r, local[own], keys, is_grad, starts[at[r]], starts[at[r] + 1])
            parts.append([(local[~own], dep[~own], None), second])
        sends: List[Pending] = []
        first = [True] * W  # each worker's first reply part carries its padding (PushPullFrame.probe)

        def step() -> None:
            """Finish the rows now complete; send every part whose rows (or summed gradients) are final."""
            now = (missing == 0) & ~done
            if bool(now.any()):
                sel = now[inv]
                g = (sel & is_grad).nonzero().view(-1)  # their gradients, in arrival order
                if g.numel():
                    pos = torch.cumsum(now, 0) - 1
                    self._apply(uniq[now], pos[inv[g]], values[g, :dim])
                p = (sel & ~is_grad).nonzero().view(-1)  # then their pushed rows
                if p.numel():
                    self.storage.write(keys[p], values[p, :dim], values[p, dim:])
                done.logical_or_(now)
            for r, todo in enumerate(parts):
                while todo:
                    local, dep, into = todo[0]
                    if into is not None:  # gradient sums: every entry they add up is in
                        if bool(pending[dep].any()):
                            break
                        todo.pop(0)
                        sums = torch.zeros(local.numel(), dim).index_add_(0, into, values[dep, :dim])
                        sends.extend(self._send(r, sums, frames[r].timed))  # type: ignore[union-attr]
                        continue
                    d = dep[dep >= 0]
                    if d.numel() and not bool(done[d].all()):
                        break
                    todo.pop(0)
                    pad = frames[r].probe if first[r] else 0  # type: ignore[union-attr]
                    first[r] = False
                    sends.extend(self._send_rows(r, local, frames[r].timed, pad))  # type: ignore[union-attr]

        step()
        # the split workers' VALUES frames and what they announce, taken one worker after the other,
        # the fastest link first (arrival_order): each wait costs no thread, and the slow workers' come
        # last, by when the others' values are applied and their first reply parts are on the way
        for r in order:
            if not apart[r]:
                continue
            head, *bufs = self._tails.pop(r)
            t.wait([head])
            self._values_frame(r, head.buf, int(held[r][1].numel()), int(reqs[r].push_keys.numel()), bufs)
            for rng, got in zip((at[r], W + r), bufs):
                if got is None:
                    continue
                t.wait([got])
                lo, hi = starts[rng], starts[rng + 1]
                if rng < W:
                    values[lo:hi, :dim] = GradsRequest.decode_values(held[r][0], got.buf, self.fmt)
                else:
                    values[lo:hi] = PushPullRequest.decode_rows(frames[r], got.buf, self.fmt)  # type: ignore[arg-type]
                pending[lo:hi] = False
                missing.index_add_(0, inv[lo:hi], torch.full((hi - lo,), -1, dtype=torch.int64))
                step()
        if not bool(done.all()) or any(parts):  # every value is in: cannot happen
            raise EsdRemoteError(f"PS {self.ps_index}: a split push/pull left rows unapplied or replies unsent")
        t.wait(sends)

    def _sums_part(self, r: int, own: torch.Tensor, keys: torch.Tensor, is_grad: torch.Tensor, lo: int,
                   hi: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reply part of worker ``r``'s gradient sums (``GradsFrame.sums``)
        for its rows ``own`` (local keys): (``own``, the gradient entries of
        the other workers on them, in summing order, each entry's index in
        ``own``).  Worker ``r``'s own entries are ``lo:hi``, the last of every
        row's (it is the last of :attr:`arrival_order`, checked on its frame).
        A row of ``own`` that a worker also pushes in this phase would end as
        the pushed row, not as the optimizer's step: at staleness 0 no row is
        both (a pushed row is dirty on its holder, so no other worker used it),
        and if one were, this raises instead of answering a wrong row."""
        in_own = torch.isin(keys, own)
        if bool((in_own & ~is_grad).any()):
            raise EsdRemoteError(f"PS {self.ps_index}: worker {r} asked for gradient sums of rows that a worker "
                                 "also pushes in this phase (their value is the pushed row)")
        others = in_own & is_grad
        others[lo:hi] = False
        entries = others.nonzero().view(-1)  # ascending: the summing order
        sorted_own, perm = torch.sort(own)
        into = perm[torch.searchsorted(sorted_own, keys[entries])]
        return own, entries, into

    def _send(self, r: int, data: torch.Tensor, timed: bool) -> List[Pending]:
        """Post worker ``r`` ``data`` as one message (after a marker with its
        size where ``timed``); nothing when empty."""
        if data.numel() == 0:
            return []
        data = data.contiguous().view(-1).view(torch.uint8)
        t, dst = self.transport, self.transport.worker_ranks[r]
        out = [t.send(dst, reply_marker(data.numel()))] if timed else []
        return out + [t.send(dst, data)]

    def _values_frame(self, r: int, words: torch.Tensor, rows: int, pushes: int,
                      bufs: List[Optional[Pending]]) -> None:
        """Check a split worker's VALUES frame against its keys.  An ABORT in
        its place raises its message, which the worker sends in the messages
        the values and pushed rows would have filled
        (:meth:`~torchrec_esd.ps.PsClient.abort`)."""
        t, src = self.transport, self.transport.worker_ranks[r]
        frame = decode_frame(words, self.limits, self.fmt, f"PS {self.ps_index}: values from rank {src}")
        if isinstance(frame, AbortFrame):
            posted = [p for p in bufs if p is not None]
            t.wait(posted)
            data = torch.cat([p.buf for p in posted]) if posted else torch.empty(0, dtype=torch.uint8)
            if frame.message_bytes > data.numel():  # the rest of the message (bounded by decode_frame)
                rest = t.recv(src, torch.empty(frame.message_bytes - data.numel(), dtype=torch.uint8))
                t.wait([rest])
                data = torch.cat([data, rest.buf])
            raise EsdRemoteError(f"ESD job aborted by the workers: {abort_message(data[: frame.message_bytes])}")
        if not isinstance(frame, ValuesFrame) or (frame.rows, frame.pushes) != (rows, pushes):
            raise EsdProtocolError(
                f"PS {self.ps_index}: worker {r} split its gradients ({rows} rows) and push/pull ({pushes} "
                f"pushes), then sent {frame} instead of their values")

    def _send_rows(self, r: int, local: torch.Tensor, timed: bool, pad: int = 0) -> List[Pending]:
        """Post worker ``r`` the rows (value + state) of ``local`` and ``pad``
        bytes of padding as one message (after a marker with its size where
        ``timed``); nothing when empty."""
        if local.numel() == 0 and not pad:
            return []
        rows = torch.cat([self.storage.rows(local), self.storage.state(local)], dim=1)
        if pad:
            return self._send(r, pack([(Section.PULL_ROWS, rows)] + probe_parts(pad)), timed)
        return self._send(r, rows, timed)

    def _pre_push(self, frames: List[Frame], payloads: List[torch.Tensor]) -> None:
        reqs = [PrePushRequest.decode(f, p, self.fmt) for f, p in zip(frames, payloads)]  # type: ignore[arg-type]
        self._store_rows([q.keys for q in reqs], [q.rows for q in reqs])

    def _store_rows(self, keys: List[torch.Tensor], rows: List[torch.Tensor]) -> None:
        """Store every sender's pushed rows (value + state) at their keys."""
        k = torch.cat(keys)
        if k.numel():
            dim = self.routing.wire_dim
            vals = torch.cat(rows)
            self.storage.write(self._local(k), vals[:, :dim], vals[:, dim:])

    def _prefetch(self, frames: List[Frame], payloads: List[torch.Tensor]) -> None:
        reqs = [PrefetchRequest.decode(f, p, self.fmt) for f, p in zip(frames, payloads)]  # type: ignore[arg-type]
        local = self._local(torch.cat([q.keys for q in reqs]))
        rows = torch.cat([self.storage.rows(local), self.storage.state(local)], dim=1)
        self._reply([[(Section.PULL_ROWS, r)] for r in torch.split(rows, [q.keys.numel() for q in reqs])])

    @property
    def weights(self) -> torch.Tensor:
        """Every owned row's values ``[rows, wire_dim]`` (materialised: O(rows))."""
        return self.storage.full()[0]

    @property
    def state(self) -> torch.Tensor:
        """Every owned row's optimizer state ``[rows, state_dim]`` (O(rows))."""
        return self.storage.full()[1]

    def _gather(self) -> None:
        reply = GatherReply(*self.storage.full()).parts()
        self._reply([reply] * len(self.transport.worker_ranks))

    def _reply(self, parts_per_worker, timed: Optional[List[bool]] = None) -> None:
        """Send worker ``r`` its reply ``parts_per_worker[r]`` (nothing if
        empty), after a marker with its byte count where ``timed[r]``."""
        sends = []
        for r, parts in enumerate(parts_per_worker):
            full = [x for _, x in parts if x.numel()]
            # one part (pulled rows without DES partial sums): sent as it is, not
            # copied by pack; it is a fresh tensor, and the sends are waited below
            data = full[0] if len(full) == 1 else pack(parts)
            sends += self._send(r, data, timed is not None and timed[r])
        self.transport.wait(sends)

    def _local(self, keys: torch.Tensor) -> torch.Tensor:
        if keys.numel() and (int(keys.min()) < 0 or int(keys.max()) >= self.routing.total_rows):
            raise EsdProtocolError(
                f"PS {self.ps_index} received row keys outside [0, {self.routing.total_rows}) "
                f"(min {int(keys.min())}, max {int(keys.max())})"
            )
        p, local = self.routing.locate(keys)
        if self.routing.num_ps > 1 and keys.numel() and bool((p != self.ps_index).any()):
            raise EsdProtocolError(f"PS {self.ps_index} received keys it does not own")
        return local
