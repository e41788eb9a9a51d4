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
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from torchrec_esd.cache import WorkerPlan
from torchrec_esd.ps import DesRequest, DesRoute


class PsSync:
    """The PS phases of one worker (``runtime``: an ``EsdWorkerRuntime``)."""

    def __init__(self, runtime) -> None:
        self._client = runtime.client
        self._meter = runtime.meter
        self._link = runtime.link
        self._estimates = runtime.link_estimates  # None without EsdConfig.online_links

    def push_pull(
        self, wp: WorkerPlan, push_values: torch.Tensor, des: Optional[DesRequest] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[DesRoute]]:
        """Push ``push_values`` ``[len(wp.push_keys), wire_dim + state_dim]``,
        pull ``wp.pull_keys``: (pulled rows, DES partial sums, DES route)."""
        got, partial, route = self._client.push_pull(wp.push_keys, push_values.cpu(), wp.pull_keys, des,
                                                      batch_fingerprint=wp.global_fingerprint)
        traffic = self._client.last_traffic
        self._meter.record_push_pull(wp.rows, traffic, self._link)
        if self._estimates is not None:  # the one synchronous exchange: its time is the link's
            self._estimates.record(traffic.wire_bytes, traffic.seconds, wp.num_samples)
        return got, partial, route

    def push_grads(self, keys: torch.Tensor, grads: torch.Tensor, route: Optional[DesRoute],
                   bag_grads: torch.Tensor) -> None:
        """Gradients of ``keys`` (and of the DES bags of ``route``) to the PS;
        returns before the sends complete (the next exchange waits for them)."""
        self._client.push_grads(keys, grads.detach().cpu(), route, bag_grads.detach().cpu())
        self._meter.record_grads(self._client.last_traffic, self._link)
