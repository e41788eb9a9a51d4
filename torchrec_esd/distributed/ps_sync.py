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
from torchrec_esd.ps import DesRequest, DesRoute
from torchrec_esd.ps.client import PendingPrefetch
from torchrec_esd.ps.protocol import Section, SectionSize
from torchrec_esd.ps.transport import LinkStats, Traffic

_NO_KEYS = torch.empty(0, dtype=torch.int64)


class PsSync:
    """The PS phases of one worker (``runtime``: an ``EsdWorkerRuntime``)."""

    def __init__(self, runtime) -> None:
        self._client = runtime.client
        self._meter = runtime.meter
        self._link = runtime.link
        self._estimates = runtime.link_estimates  # None without EsdConfig.online_links
        self._plans = runtime.plans
        self._worker = runtime.worker_index
        self._depth = runtime.config.prefetch_depth
        # posted prefetches (oldest first), each with (iteration, rows) of its keys in order
        self._posted: List[Tuple[PendingPrefetch, List[Tuple[int, int]]]] = []
        # prefetched rows by iteration: (keys, rows, traffic to meter with that iteration)
        self._ready: Dict[int, List[Tuple[torch.Tensor, torch.Tensor, Traffic]]] = {}
        self._deferred: Optional[IterationPlan] = None  # a prefetch to post before the gradients
        self._wait_s = runtime.config.collective_timeout_s  # bound on waiting for the next plan there

    def push_pull(
        self, wp: WorkerPlan, push_values: torch.Tensor, des: Optional[DesRequest] = None,
        iteration: Optional[int] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[DesRoute]]:
        """Push ``push_values`` ``[len(wp.push_keys), wire_dim + state_dim]``,
        pull ``wp.pull_keys``: (pulled rows, DES partial sums, DES route).
        The rows prefetched for ``iteration`` (the plan's) are not pulled again."""
        pull_keys = wp.pull_keys
        have, have_rows, extra = self._take_prefetched(iteration)
        rest = ~torch.isin(pull_keys, have) if have.numel() else None
        got, partial, route = self._client.push_pull(
            wp.push_keys, push_values.cpu(), pull_keys if rest is None else pull_keys[rest], des,
            batch_fingerprint=wp.global_fingerprint)
        traffic = self._client.last_traffic
        if rest is not None:
            rows = torch.empty(pull_keys.numel(), got.shape[1])
            rows[rest] = got
            pos = torch.searchsorted(pull_keys, have)  # pull_keys are sorted (used_keys order)
            rows[pos] = have_rows
            got = rows
        if self._estimates is not None:  # the one synchronous exchange, its reply timed
            self._estimates.record(traffic.wire_bytes, traffic.seconds, wp.num_samples,
                                   traffic.transfer_bytes, traffic.transfer_seconds)
        for t in extra:
            traffic = traffic.merged(t)
        self._meter.record_push_pull(wp.rows, traffic, self._link)
        return got, partial, route

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

    def push_grads(self, keys: torch.Tensor, grads: torch.Tensor, route: Optional[DesRoute],
                   bag_grads: torch.Tensor) -> None:
        """Gradients of ``keys`` (and of the DES bags of ``route``) to the PS;
        returns before the sends complete (the next exchange waits for them).
        A prefetch deferred by :meth:`prefetch` is posted first (its phase
        comes before the gradients')."""
        if self._deferred is not None:
            self._post(self._deferred, self._wait_s)
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
