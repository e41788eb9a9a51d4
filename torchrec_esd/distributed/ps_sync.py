"""A worker's side of the PS phases for its sharded module, metered.

Per iteration the sharded module runs two exchanges with every PS through the
runtime's :class:`~torchrec_esd.ps.PsClient`: before the forward, the push of
dirty rows (value + optimizer state) and the pull of the rows the plan says
to pull (with DES-served misses, also the bags' pooled partial sums); after
the backward, the push of the gradients of rows this worker does not update
locally.  Rows per transmission kind come from the plan, bytes and messages
from what the transport really moved (:class:`~torchrec_esd.metrics.TransmissionMeter`);
with ``EsdConfig.online_links`` the push/pull's bytes and wall time also feed
the runtime's link estimates (:mod:`torchrec_esd.distributed.link_estimates`).
Everything crossing here is on the CPU (the transport's side); the module
moves rows to and from its device.

With ``EsdConfig.prefetch_depth`` a third exchange follows every push/pull
(:meth:`PsSync.prefetch`): a pull-only request for the rows the next
iterations' plans pull that nothing changes before they read them
(:func:`~torchrec_esd.cache.prefetch_keys`), posted without waiting, so it
moves while the batch computes; the push/pull of those iterations pulls only
the rest.  Its bytes are metered with the push/pull of the iteration they
serve (the rows per kind still add up to the plan's).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from torchrec_esd.cache import IterationPlan, WorkerPlan, prefetch_keys
from torchrec_esd.config import EsdConfigError
from torchrec_esd.distributed.link_estimates import PROBE_REPLY_BYTES
from torchrec_esd.ps import DesRequest, DesRoute
from torchrec_esd.ps.client import PendingPrefetch, PendingPushPull
from torchrec_esd.ps.protocol import PrePushFrame, Section, SectionSize
from torchrec_esd.ps.server import arrival_order
from torchrec_esd.ps.transport import LinkStats, Traffic

_NO_KEYS = torch.empty(0, dtype=torch.int64)
# EsdConfig.pre_push: a worker sends its rows early only when its link is among the slowest (within
# PRE_PUSH_SLOWEST of the slowest worker's; the estimates with online_links, else the configured rates) and
# the rows would take at least PRE_PUSH_MIN_S on it; otherwise its request is empty.  On the hetero mix the
# faster workers' early rows cost CPU and saved nothing: with every worker sending, the planner's shares ran
# 75 -> 80 ms, with only the 10 Mbit/s worker 79 -> 81 ms, and equal shares kept their gain (154 -> 148 ms)
# (benchmarks/results/s11_pre_push.md)
PRE_PUSH_MIN_S = 0.002
PRE_PUSH_SLOWEST = 1.25
# EsdConfig.split_reply: a worker splits its exchange only where its gradient values and pushed rows would take at
# least SPLIT_MIN_S on its link (the estimate with online_links, else the configured rate): a split phase costs the
# PS more CPU, which only a slow link pays back.  On 4 x 1000 Mbit/s, every worker splitting made the CPU-bound
# step 56 -> 76 ms (benchmarks/results/s16_split_reply.md)
SPLIT_MIN_S = 0.002
# EsdConfig.online_links: every PROBE_EVERY-th push/pull reply of a worker is padded to PROBE_REPLY_BYTES where it
# is smaller (PsSync._probe); a much faster reading is held until the next padded one confirms it
PROBE_EVERY = 2


def _with(traffic: Traffic, more: List[Traffic]) -> Traffic:
    """``traffic`` with the bytes of ``more`` added (its own seconds and timed reply)."""
    for t in more:
        traffic = traffic.merged(t)
    return traffic


class PsSync:
    """The PS phases of one worker (``runtime``: an ``EsdWorkerRuntime``)."""

    def __init__(self, runtime) -> None:
        self._client = runtime.client
        self._meter = runtime.meter
        self._link = runtime.link
        self._estimates = runtime.link_estimates  # None without EsdConfig.online_links
        self._estimates_group = runtime.estimates_group
        self._plans = runtime.plans
        self._worker = runtime.worker_index
        self._depth = runtime.config.prefetch_depth
        # posted prefetches (oldest first), each with (iteration, rows) of its keys in order
        self._posted: List[Tuple[PendingPrefetch, List[Tuple[int, int]]]] = []
        # prefetched rows by iteration: (keys, rows, traffic to meter with that iteration)
        self._ready: Dict[int, List[Tuple[torch.Tensor, torch.Tensor, Traffic]]] = {}
        self._deferred: Optional[IterationPlan] = None  # a prefetch to post before the gradients
        self._wait_s = runtime.config.collective_timeout_s  # bound on waiting for the next plan there
        # the push/pull of the next iteration, posted after this one's gradients (post_next):
        # (iteration, exchange, mask of the plan's pull keys it asked for, prefetched keys left out,
        # the pre-push's traffic to meter with it)
        self._next: Optional[Tuple[int, PendingPushPull, Optional[torch.Tensor], int, List[Traffic]]] = None
        self._no_partials = torch.empty(0, runtime.client.routing.wire_dim)
        self._post_next = runtime.config.early_pull and not runtime.config.des_misses
        self._split = self._post_next and runtime.config.split_reply
        cfg = runtime.config
        # EsdConfig.split_sums: only the worker the PS sums last, and only at staleness 0 (the rows it read
        # are the PS's then)
        self.sums = self._split and cfg.split_sums and cfg.staleness == 0 and \
            arrival_order([w.bytes_per_second for w in cfg.workers])[-1] == self._worker
        # the keys of a split exchange sent in the forward (post_head), until the backward sends the values:
        # (iteration, exchange, the next pushes' cache slots, pull mask, prefetched keys left out, pre-push traffic)
        self._head = None
        self._pre_push = runtime.config.pre_push
        self._workers = runtime.config.workers  # their configured links (pre_push without online_links)
        # rows of the next iteration's pushes sent early (pre_push): (iteration, keys, traffic)
        self._prepushed: Optional[Tuple[int, torch.Tensor, Traffic]] = None
        self._pre_deferred = None  # (plan, store) of a pre-push waiting for the next plan (push_grads)
        self._exchanges = 0  # push/pulls asked for (every PROBE_EVERY-th small reply is padded: _probe)

    def push_pull(
        self, wp: WorkerPlan, push_values: Optional[torch.Tensor], des: Optional[DesRequest] = None,
        iteration: Optional[int] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[DesRoute]]:
        """Push ``push_values`` ``[len(wp.push_keys), wire_dim + state_dim]``,
        pull ``wp.pull_keys``: (pulled rows, DES partial sums, DES route).
        The rows prefetched for ``iteration`` (the plan's) are not pulled again;
        where :meth:`post_next` posted this exchange already (:meth:`posted`),
        it waits for that one (``push_values`` unused, may be None)."""
        if self._next is not None:
            return self._take_next(wp, iteration), self._no_partials, None
        pull_keys = wp.pull_keys
        have, have_rows, extra = self._take_prefetched(iteration)
        rest = ~torch.isin(pull_keys, have) if have.numel() else None
        push_keys, push_values = wp.push_keys, push_values.cpu()
        unsent, pre = self._not_prepushed(wp, iteration)
        if unsent is not None:
            push_keys, push_values = push_keys[unsent], push_values[unsent]
        asked = pull_keys if rest is None else pull_keys[rest]
        got, partial, route = self._client.push_pull(
            push_keys, push_values, asked, des, batch_fingerprint=wp.global_fingerprint,
            **self._probe(asked.numel(), des.num_bags if des is not None else 0))
        traffic = self._client.last_traffic
        # the one synchronous exchange, its reply timed; its bytes with the pre-push's (the link carried both)
        self._observe_link(_with(traffic, pre), wp.num_samples)
        return self._merged(wp, got, rest, have, have_rows, traffic, extra + pre), partial, route

    def _probe(self, rows: int, bags: int = 0) -> Dict[str, int]:
        """With online links, on every :data:`PROBE_EVERY`-th push/pull: the
        padding to ask of its reply of ``rows`` pulled rows (and ``bags`` DES
        partial sums) so that it is
        :data:`~torchrec_esd.distributed.link_estimates.PROBE_REPLY_BYTES`
        long, as keyword arguments of the client's push/pull (none where the
        reply is that long already).  A worker given one sample after its
        link slowed down gets replies of a few kB, which move its estimate
        only a little (a token bucket's burst can carry them at line rate), so
        without padding it was seen again 6 to more than 20 steps after its
        link came back; padding every reply brought it back in 4-7 steps but
        made the slow phase 14-15 % slower, the padding crossing the slow
        link on every step (``benchmarks/results/s17_split_sums.md``)."""
        if self._estimates is None:
            return {}
        self._exchanges += 1
        if self._exchanges % PROBE_EVERY:
            return {}
        fmt = self._client.fmt
        pad = PROBE_REPLY_BYTES - rows * fmt.row_bytes - bags * fmt.value_bytes
        return {"probe_bytes": pad} if pad > 0 else {}

    def _observe_link(self, traffic: Traffic, samples: int) -> None:
        """With online links: record this push/pull (a posted one only where
        its reply was timed: it has no wall seconds of its own) and publish
        the observations, once per push/pull on every worker."""
        if self._estimates is None:
            return
        if traffic.seconds > 0 or traffic.transfer_bytes:
            self._estimates.record(traffic.wire_bytes, traffic.seconds, samples,
                                   traffic.transfer_bytes, traffic.transfer_seconds)
        self._estimates.publish(self._estimates_group)

    def _merged(self, wp: WorkerPlan, got: torch.Tensor, rest: Optional[torch.Tensor], have: torch.Tensor,
                have_rows, traffic: Traffic, extra: List[Traffic]) -> torch.Tensor:
        """The rows of ``wp.pull_keys``: ``got`` (those of ``rest``; all where
        None) and the prefetched ``have``; meters the push/pull."""
        if rest is not None:
            rows = torch.empty(wp.pull_keys.numel(), got.shape[1])
            rows[rest] = got
            pos = torch.searchsorted(wp.pull_keys, have)  # pull_keys are sorted (used_keys order)
            rows[pos] = have_rows
            got = rows
        for t in extra:
            traffic = traffic.merged(t)
        self._meter.record_push_pull(wp.rows, traffic, self._link)
        self._meter.flushed_rows += wp.flushed_rows
        return got

    # ------------------------------------------------------------ the next pushes, early
    def pre_push(self, current: IterationPlan, store) -> None:
        """Right after the push/pull of ``current`` (``EsdConfig.pre_push``):
        send the rows the next iteration's push/pull would push (value +
        state, read from ``store``) except those this worker uses in
        ``current``, when the next plan is dispatched already; returns before
        the sends complete, so they cross the uplink while ``current``
        computes.  Every worker calls it once per push/pull (a lockstep PS
        phase between the push/pull and the gradients), with or without rows.
        When the dispatch thread has not planned the next batch yet, the
        request moves to just before the gradients and waits there for that
        plan (as :meth:`prefetch` does), so what is sent early does not
        depend on thread timing; the values are the same then (this batch's
        local updates do not touch those rows).
        Only a worker whose link is among the slowest
        (:data:`PRE_PUSH_SLOWEST`) sends rows, and only rows that would take
        at least :data:`PRE_PUSH_MIN_S` on it: elsewhere the request is empty
        and the next push/pull pushes them.
        Exact at staleness 0 (``EsdConfig.pre_push``): a row in the next push
        set is dirty here, so no other worker used it in ``current`` (it
        would have been pushed for that, and only a local update dirties it
        again), and this worker does not use it: no gradient of ``current``
        touches it, and its value is final now."""
        if not self._pre_push:
            return
        if self._plans.peek(current.iteration + 1) is None:
            self._pre_deferred = (current, store)  # sent before the gradients (push_grads)
            return
        self._send_pre_push(current, store)

    def _send_pre_push(self, current: IterationPlan, store, wait_s: float = 0.0) -> None:
        self._pre_deferred = None
        it = current.iteration + 1
        fmt = self._client.fmt
        keys, rows = _NO_KEYS, torch.empty(0, fmt.dim + fmt.state_dim)
        nxt = self._plans.peek(it, wait_s)
        mine, slowest = self._uplinks_bytes_per_s()
        if nxt is not None and nxt.workers[self._worker].push_keys.numel() and mine <= PRE_PUSH_SLOWEST * slowest:
            wn = nxt.workers[self._worker]
            early = ~torch.isin(wn.push_keys, current.workers[self._worker].used_keys)
            if PrePushFrame(int(early.sum())).payload_bytes(fmt) >= PRE_PUSH_MIN_S * mine:
                keys = wn.push_keys[early]
                rows = store.read(wn.push_slots[early]).cpu()
        self._client.pre_push(keys, rows)
        self._prepushed = (it, keys, self._client.last_traffic)
        self._meter.pre_pushed_rows += int(keys.numel())

    def _uplinks_bytes_per_s(self) -> Tuple[float, float]:
        """(this worker's link, the slowest worker's): the current estimates
        with online links, else the configured rates."""
        if self._estimates is not None:
            rates = [float(r) for r in self._estimates.bytes_per_second()]
        else:
            rates = [float(w.bytes_per_second) for w in self._workers]
        return rates[self._worker], min(rates)

    def _not_prepushed(self, wp: WorkerPlan, iteration: Optional[int]) -> Tuple[Optional[torch.Tensor], List[Traffic]]:
        """(mask of ``wp.push_keys`` not sent by :meth:`pre_push` or None for
        all, the pre-push's traffic to meter with this push/pull)."""
        if self._prepushed is None or iteration is None or self._prepushed[0] != iteration:
            return None, []
        _, keys, traffic = self._prepushed
        self._prepushed = None
        return (~torch.isin(wp.push_keys, keys) if keys.numel() else None), [traffic]

    # ------------------------------------------------------------ the next push/pull, early
    def post_next(self, iteration: int, store) -> None:
        """After the gradients of ``iteration``: post the push/pull of
        ``iteration + 1`` when its plan is dispatched already (returns at
        once): its request follows the gradients to the PS, which answers it
        as soon as every worker's gradients of ``iteration`` are applied, so
        its reply comes down while this worker still runs its backward, the
        dense all-reduce and the optimizer step.  Exact: the request is what
        the forward of ``iteration + 1`` would send (the rows it pushes are
        read from ``store`` after this iteration's local updates, and nothing
        writes them before that forward), and the PS serves it in the same
        phase.  With timed replies (``EsdConfig.online_links``) the client
        times the reply off the training thread (``ReplyClock``).  Not with
        DES-served misses (the DES request needs the batch), nor when
        ``EsdConfig.early_pull`` is off."""
        nxt = self._next_request(iteration)
        if nxt is None:
            return
        wp, push_keys, push_slots, pull_keys, rest, n_have, pre = nxt
        pending = self._client.post_push_pull(push_keys, store.read(push_slots).cpu(), pull_keys,
                                              batch_fingerprint=wp.global_fingerprint, **self._probe(pull_keys.numel()))
        self._next = (iteration + 1, pending, rest, n_have, pre)
        self._meter.early_pulls += 1

    def _next_request(self, iteration: int):
        """The push/pull of ``iteration + 1`` to post now (:meth:`post_next`),
        or None (early pull off, posted already, or its plan not there yet):
        (its plan, push keys, their cache slots, pull keys, mask of the plan's
        pull keys asked for or None, prefetched keys left out, pre-push traffic)."""
        if not self._post_next or self._next is not None:
            return None
        plan = self._plans.peek(iteration + 1)
        if plan is None:
            return None
        wp = plan.workers[self._worker]
        have = self._prefetched_keys(iteration + 1)
        rest = ~torch.isin(wp.pull_keys, have) if have.numel() else None
        push_keys, push_slots = wp.push_keys, wp.push_slots
        unsent, pre = self._not_prepushed(wp, iteration + 1)
        if unsent is not None:
            push_keys, push_slots = push_keys[unsent], push_slots[unsent]
        pull_keys = wp.pull_keys if rest is None else wp.pull_keys[rest]
        return wp, push_keys, push_slots, pull_keys, rest, int(have.numel()), pre

    def post_head(self, current: IterationPlan) -> None:
        """With ``EsdConfig.split_reply``, right after the push/pull of
        ``current`` (and its prefetch and pre-push), when the next plan is
        there: send the PS the keys of ``current``'s gradients and of the
        next iteration's push/pull (both known from the plans:
        :meth:`~torchrec_esd.ps.PsClient.post_split_head`), so that they
        cross the uplink while ``current`` computes; :meth:`push_grads_and_next`
        sends the values after the backward.  The PS can then answer the
        rows this worker sends no gradient for as soon as the other workers'
        values are in.  Without the next plan (or with a prefetch or
        pre-push still waiting for it) nothing goes now."""
        if not self._split or self._head is not None or self._deferred is not None \
                or self._pre_deferred is not None:
            return
        wp = current.workers[self._worker]
        if not self._worth_splitting(current.iteration, wp.grad_pos.numel()):
            return
        nxt = self._next_request(current.iteration)
        if nxt is None:
            return
        wp_next, push_keys, push_slots, pull_keys, rest, n_have, pre = nxt
        pending = self._client.post_split_head(wp.used_keys[wp.grad_pos], push_keys, pull_keys,
                                               batch_fingerprint=wp_next.global_fingerprint, sums=self.sums,
                                               **self._probe(pull_keys.numel()))
        self._head = (current.iteration, pending, push_slots, rest, n_have, pre)

    def push_grads_and_next(self, keys: torch.Tensor, grads: torch.Tensor, route: Optional[DesRoute],
                            bag_grads: torch.Tensor, iteration: int, store,
                            old_rows: Optional[torch.Tensor] = None) -> None:
        """:meth:`push_grads` then :meth:`post_next`; with
        ``EsdConfig.split_reply``, where the push/pull of ``iteration + 1``
        is posted, both go as one split exchange
        (:meth:`~torchrec_esd.ps.PsClient.post_grads_push_pull`): the PS
        answers the rows this worker sent no gradient for while its gradient
        values still cross the uplink.  The PS takes split and whole gradient
        frames in one phase, so workers whose next plan is not there yet send
        theirs whole.  ``old_rows`` (where :attr:`sums`): the rows (value +
        state) ``grads`` were computed on, from which this worker makes the
        PS's new rows out of the others' gradient sums."""
        if self.sums and old_rows is None:
            raise EsdConfigError("EsdConfig.split_sums: the gradients of this worker go without the rows they were "
                                 "computed on")
        old = old_rows.cpu() if self.sums else None  # type: ignore[union-attr]
        if self._head is not None:  # the keys went in the forward (post_head): now the values
            it, pending, push_slots, rest, n_have, pre = self._head
            self._head = None
            if it != iteration:
                raise EsdConfigError(f"the keys of iteration {it}'s gradients went to the PS, but the backward is "
                                     f"iteration {iteration}'s: train batches in dispatch order")
            traffic = self._client.send_split_tail(pending, grads.detach().cpu(), store.read(push_slots).cpu(), old)
        else:
            nxt = None
            if self._split and route is None:
                self._post_deferred()
                nxt = self._next_request(iteration) if self._worth_splitting(iteration, keys.numel()) else None
            if nxt is None:  # whole gradients, then (where the next plan is there) the early push/pull
                self.push_grads(keys, grads, route, bag_grads)
                self.post_next(iteration, store)
                return
            wp, push_keys, push_slots, pull_keys, rest, n_have, pre = nxt
            pending, traffic = self._client.post_grads_push_pull(
                keys, grads.detach().cpu(), push_keys, store.read(push_slots).cpu(), pull_keys,
                batch_fingerprint=wp.global_fingerprint, old_rows=old, **self._probe(pull_keys.numel()))
        self._meter.record_grads(traffic, self._link)
        self._next = (iteration + 1, pending, rest, n_have, pre)
        self._meter.early_pulls += 1
        self._meter.split_replies += 1
        if self.sums:  # (the head went with sums=self.sums)
            self._meter.sum_replies += 1

    def _worth_splitting(self, iteration: int, grads: int) -> bool:
        """Whether the ``grads`` gradient values of ``iteration`` and the
        rows the next iteration pushes (when its plan is there) take at least
        :data:`SPLIT_MIN_S` on this worker's link."""
        plan = self._plans.peek(iteration + 1)
        if plan is None:
            return False
        fmt = self._client.fmt
        nbytes = grads * fmt.value_bytes + plan.workers[self._worker].push_keys.numel() * fmt.row_bytes
        return nbytes >= SPLIT_MIN_S * self._uplinks_bytes_per_s()[0]

    def posted(self, iteration: int) -> bool:
        """Whether the push/pull of ``iteration`` is posted already (:meth:`post_next`)."""
        return self._next is not None and self._next[0] == iteration

    def _take_next(self, wp: WorkerPlan, iteration: Optional[int]) -> torch.Tensor:
        it, pending, rest, n_have, pre = self._next  # type: ignore[misc]
        self._next = None
        if iteration != it:
            raise EsdConfigError(f"the push/pull of iteration {it} was posted after the previous gradients, but "
                                 f"the module computes iteration {iteration}: train batches in dispatch order")
        got = self._client.finish_push_pull(pending)
        traffic = self._client.last_traffic
        self._observe_link(_with(traffic, pre), wp.num_samples)  # its reply timed while this worker computed
        have, have_rows, extra = self._take_prefetched(iteration)
        if have.numel() != n_have:
            raise EsdConfigError(f"iteration {it}: {have.numel()} rows prefetched, {n_have} when its push/pull "
                                 "was posted")
        return self._merged(wp, got, rest, have, have_rows, traffic, extra + pre)

    def _prefetched_keys(self, iteration: int) -> torch.Tensor:
        """Keys prefetched (ready or posted) for ``iteration``, without waiting."""
        keys = [k for k, _, _ in self._ready.get(iteration, [])]
        for handle, parts in self._posted:
            start = 0
            for j, count in parts:
                if j == iteration:
                    keys.append(handle.keys[start : start + count])
                start += count
        return torch.cat(keys) if keys else _NO_KEYS

    # ------------------------------------------------------------ prefetch
    def prefetch(self, current: IterationPlan) -> None:
        """After the push/pull of ``current``: post the pull of what the next
        ``prefetch_depth`` iterations' plans (those dispatched already) pull
        and may pull now; returns at once.  Every worker calls it once per
        push/pull (a lockstep PS phase, between the push/pull and the
        gradients), with or without rows to ask for.  When the dispatch thread
        has not planned the next batch yet, the post waits for the gradient
        push (:meth:`push_grads` posts it first, waiting for that plan while
        the dispatch thread runs: the next batch needs it anyway)."""
        if self._plans.peek(current.iteration + 1) is None:
            self._deferred = current
            return
        self._post(current)

    def _post(self, current: IterationPlan, wait_s: float = 0.0) -> None:
        self._deferred = None
        ahead = []
        for j in range(current.iteration + 1, current.iteration + self._depth + 1):
            plan = self._plans.peek(j, wait_s if j == current.iteration + 1 else 0.0)
            if plan is None:
                break
            ahead.append(plan)
        if self._posted:  # (the push/pull before this call finished them already)
            self._finish_posted()
        done = {j: torch.cat([k for k, _, _ in got]) for j, got in self._ready.items()}
        want = prefetch_keys(self._worker, current, ahead, done) if ahead else {}
        keys = torch.cat(list(want.values())) if want else _NO_KEYS
        handle = self._client.post_prefetch(keys)
        self._posted.append((handle, [(j, int(k.numel())) for j, k in want.items()]))
        self._meter.prefetched_rows += int(keys.numel())

    def _finish_posted(self) -> None:
        for handle, parts in self._posted:
            rows, traffic = self._client.finish_prefetch(handle)
            row_bytes = rows.shape[1] * rows.element_size()
            start = 0
            for n, (j, count) in enumerate(parts):
                k, r = handle.keys[start : start + count], rows[start : start + count]
                start += count
                # the post's messages and request go with its first iteration, each
                # iteration's reply rows with that iteration
                size = SectionSize(count, count * row_bytes)
                if n == 0:
                    later = sum(c for _, c in parts[1:]) * row_bytes
                    sections = dict(traffic.sections)
                    sections[Section.PULL_ROWS] = size
                    link = traffic.link - LinkStats(bytes_received=later)
                else:
                    sections = {Section.PULL_ROWS: size}
                    link = LinkStats(bytes_received=count * row_bytes)
                self._ready.setdefault(j, []).append((k, r, Traffic(link, sections, 0.0)))
        self._posted = []

    def _take_prefetched(self, iteration: Optional[int]):
        """(keys, rows, traffic list) prefetched for ``iteration`` (waits for
        the posted prefetches: they moved while the previous batches computed)."""
        if self._posted:
            self._finish_posted()
        got = self._ready.pop(iteration, []) if iteration is not None else []
        if not got:
            return _NO_KEYS, None, []
        return torch.cat([k for k, _, _ in got]), torch.cat([r for _, r, _ in got]), [t for _, _, t in got]

    def _post_deferred(self) -> None:
        """Post a prefetch deferred by :meth:`prefetch`, or a pre-push deferred
        by :meth:`pre_push` (their phases come before the gradients')."""
        if self._deferred is not None:
            self._post(self._deferred, self._wait_s)
        if self._pre_deferred is not None:
            self._send_pre_push(*self._pre_deferred, wait_s=self._wait_s)

    def push_grads(self, keys: torch.Tensor, grads: torch.Tensor, route: Optional[DesRoute],
                   bag_grads: torch.Tensor) -> None:
        """Gradients of ``keys`` (and of the DES bags of ``route``) to the PS;
        returns before the sends complete (the next exchange waits for them).
        A prefetch deferred by :meth:`prefetch`, or a pre-push deferred by
        :meth:`pre_push`, is posted first (its phase comes before the
        gradients')."""
        self._post_deferred()
        self._client.push_grads(keys, grads.detach().cpu(), route, bag_grads.detach().cpu())
        self._meter.record_grads(self._client.last_traffic, self._link)


def require_dispatch_ahead(runtime, depth: int) -> None:
    """Fail every rank (``runtime.fail``) when batches are dispatched ``depth``
    ahead (0: batch by batch) but ``EsdConfig.prefetch_depth`` is deeper: the
    plans it prefetches for would never be known in time."""
    want = runtime.config.prefetch_depth
    if want and depth == 0:
        runtime.fail(
            f"EsdConfig.prefetch_depth={want} prefetches the rows of batches dispatched ahead: iterate "
            "EsdInputDist.dispatch_ahead(batches, depth >= prefetch_depth) instead of calling the input "
            "dist batch by batch"
        )
    if depth < want:
        runtime.fail(
            f"EsdConfig.prefetch_depth={want} prefetches that many batches ahead, but "
            f"dispatch_ahead(depth={depth}) plans only {depth} ahead: use depth >= prefetch_depth"
        )
