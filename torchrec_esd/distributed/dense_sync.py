"""Bandwidth-aware all-reduce of the dense (data-parallel) gradients.

``DistributedModelParallel`` wraps the dense part of the model in
``DistributedDataParallel``, whose default all-reduce on gloo is a ring: every
worker's link carries ``2 (W - 1) / W`` times the gradient bucket in each
direction, the slowest link included.  On heterogeneous links a *star* through
the fastest worker (the hub) is cheaper for every other worker: it sends its
bucket to the hub once and receives the sum once (``1x`` each way, the least
any all-reduce can give it); the hub's own fast link carries ``W - 1`` times
the bucket each way.

:func:`star_allreduce_hook` is a DDP communication hook with that exchange.
Like DDP's default hook it returns the mean over the workers (the sum divided
by ``W``); the hub adds the buckets in worker order, so only the float
summation order differs from the ring.  :func:`register_dense_sync` installs it
on every DDP module of a DMP-wrapped model (before the first backward).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from torchrec_esd.config import EsdConfigError

logger = logging.getLogger(__name__)

DENSE_SYNCS = ("ring", "star")
STAR_CHUNK_BYTES = 4096  # the star's smallest piece of a bucket
STAR_MAX_CHUNKS = 16


def fastest_worker(bandwidths_mbps: Sequence[float]) -> int:
    """The hub of the star: the worker with the highest bandwidth (lowest index on ties)."""
    if not bandwidths_mbps:
        raise EsdConfigError("no workers to choose a dense-sync hub from")
    return max(range(len(bandwidths_mbps)), key=lambda w: (bandwidths_mbps[w], -w))


def link_bytes_per_step(mode: str, bandwidths_mbps: Sequence[float], dense_bytes: int) -> List[float]:
    """Bytes of the dense all-reduce on every worker's link per step and
    direction: ``"ring"`` ``2 (W - 1) / W`` of the gradients on every link,
    ``"star"`` once on every link but the hub's, ``W - 1`` times on the hub's."""
    if mode not in DENSE_SYNCS:
        raise EsdConfigError(f"dense_sync must be one of {DENSE_SYNCS}, got {mode!r}")
    W = len(bandwidths_mbps)
    if mode == "star":
        hub = fastest_worker(bandwidths_mbps)
        return [float((W - 1 if w == hub else 1) * dense_bytes) for w in range(W)]
    return [2 * (W - 1) / W * dense_bytes] * W


def sync_seconds(link_bytes: Sequence[float], bytes_per_s: Sequence[float], chunks: int = 1) -> List[float]:
    """Seconds of every worker's step in the dense all-reduce: its
    ``link_bytes`` (:func:`link_bytes_per_step`) one way and then the other at
    its link's ``bytes_per_s``: the mean of a piece comes back only once
    every worker's piece is in, so with the bucket in ``chunks`` pieces
    (:func:`star_chunks`) the two directions overlap but for one piece,
    ``(1 + 1/chunks)`` times the bytes' time (twice it in one piece)."""
    if len(link_bytes) != len(bytes_per_s) or any(not r > 0 for r in bytes_per_s):
        raise EsdConfigError(f"{len(link_bytes)} dense-sync byte counts need as many positive link rates,"
                             f" got {list(bytes_per_s)}")
    if not (isinstance(chunks, int) and chunks >= 1):
        raise EsdConfigError(f"chunks must be an integer >= 1, got {chunks!r}")
    return [(1.0 + 1.0 / chunks) * float(b) / float(r) for b, r in zip(link_bytes, bytes_per_s)]


def dense_gradient_bytes(model: nn.Module) -> int:
    """Bytes of the gradients the dense all-reduce moves per step: every
    parameter that needs a gradient in the ``DistributedDataParallel`` parts
    of ``model`` (0 without any)."""
    ddps = [m for m in model.modules() if isinstance(m, DistributedDataParallel)]
    return sum(p.numel() * p.element_size() for m in ddps for p in m.parameters() if p.requires_grad)


def star_chunks(numel: int, element_size: int = 4) -> int:
    """How many pieces the star cuts a bucket of ``numel`` elements into: pieces
    of at least :data:`STAR_CHUNK_BYTES` (4 KiB), at most :data:`STAR_MAX_CHUNKS`
    (so a bucket's mean starts back down a link while the rest of it is still
    going up; a small bucket stays whole)."""
    nbytes = int(numel) * int(element_size)
    return max(1, min(STAR_MAX_CHUNKS, nbytes // STAR_CHUNK_BYTES, int(numel)))


def star_allreduce_hook(hub: int, group=None, on_blocked: Optional[Callable[[float], None]] = None,
                        senders: Optional[Callable[[], Optional[Sequence[bool]]]] = None):
    """DDP comm hook: mean of the gradient bucket over ``group`` through ``hub``
    (a rank of ``group``), by point-to-point sends; see the module docstring.
    The bucket moves in :func:`star_chunks` pieces, all posted at once: the hub
    sums piece ``k`` (in worker order, so the same bits as one piece) as soon
    as every worker's piece ``k`` is in and sends it back at once, so piece
    ``k``'s mean comes down each link while its later pieces still go up (a
    link's two directions overlap; about ``(1 + 1/K)`` bucket times instead of
    2).  ``on_blocked(seconds)``: told how long each call blocked (waiting for
    the other workers; :mod:`~torchrec_esd.distributed.compute_estimates`
    takes it out of the worker's compute time).

    ``senders()``: which ranks have a gradient this step (None: all), the same
    on every rank (ESD: the workers with samples in the iteration,
    ``EsdWorkerRuntime.dense_senders``).  The others send nothing and only
    receive the mean (the sum over the senders, divided by the group size as
    always): a worker without samples has an all-zero gradient, and leaving a
    zero out of a sum changes no parameter.  A rank told it sends nothing but
    holding a non-zero gradient raises (its part would be lost)."""
    world = dist.get_world_size(group)
    if not 0 <= hub < world:
        raise EsdConfigError(f"dense-sync hub {hub} is not a rank of a group of {world}")

    def hook(state, bucket):  # no annotations: DDP checks them literally
        t0 = time.perf_counter()
        buf = bucket.buffer()
        me = dist.get_rank(group)
        if world > 1:
            given = senders() if senders is not None else None
            sends_ = [True] * world if given is None else [bool(x) for x in given]
            if len(sends_) != world or not any(sends_):
                raise EsdConfigError(f"dense sync: senders {given} for a group of {world} (at least one sends)")
            if not sends_[me] and bool(buf.any()):
                raise EsdConfigError(
                    f"dense sync: rank {me} has no samples this step but a non-zero dense gradient (a backward "
                    "outside the dispatched iterations?); its part would be lost"
                )
            k = star_chunks(buf.numel(), buf.element_size())
            mine = buf.tensor_split(k)  # k views of the flat bucket
            if me == hub:
                others = [r for r in range(world) if r != hub]
                # every sender's pieces, in worker order (the hub's own: its bucket)
                pieces = {r: mine if r == hub else torch.empty_like(buf).tensor_split(k)
                          for r in range(world) if sends_[r]}
                recvs = {r: [dist.irecv(c, group=group, group_src=r, tag=i) for i, c in enumerate(p)]
                         for r, p in pieces.items() if r != hub}
                total = torch.empty_like(buf)
                sums = total.tensor_split(k)
                sends = []
                for i in range(k):
                    for waiting in recvs.values():
                        waiting[i].wait()
                    first, *rest = (p[i] for p in pieces.values())
                    sums[i].copy_(first)
                    for p in rest:
                        sums[i].add_(p)
                    sends += [dist.isend(sums[i], group=group, group_dst=r, tag=i) for r in others]
                for s in sends:
                    s.wait()  # type: ignore[union-attr]
                buf.copy_(total)
            else:
                mean = torch.empty_like(buf)
                recvs = [dist.irecv(c, group=group, group_src=hub, tag=i) for i, c in enumerate(mean.tensor_split(k))]
                sends = [dist.isend(c, group=group, group_dst=hub, tag=i) for i, c in enumerate(mine)] if sends_[me] else []
                for w in sends + recvs:
                    w.wait()  # type: ignore[union-attr]
                buf.copy_(mean)
        buf.div_(world)
        if on_blocked is not None:
            on_blocked(time.perf_counter() - t0)
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(buf)
        return fut

    return hook


def register_dense_sync(model: nn.Module, mode: str, bandwidths_mbps: Sequence[float], group=None,
                        on_blocked: Optional[Callable[[float], None]] = None,
                        senders: Optional[Callable[[], Optional[Sequence[bool]]]] = None) -> int:
    """Install the ``mode`` all-reduce (``"ring"``: DDP's own, nothing to do;
    ``"star"``: :func:`star_allreduce_hook` through the fastest worker, with
    its ``on_blocked`` and ``senders``) on every ``DistributedDataParallel`` inside ``model``;
    returns how many DDP modules got the hook."""
    if mode not in DENSE_SYNCS:
        raise EsdConfigError(f"dense_sync must be one of {DENSE_SYNCS}, got {mode!r}")
    if mode == "ring":
        return 0
    if dist.get_world_size(group) != len(bandwidths_mbps):
        raise EsdConfigError(
            f"dense sync: {len(bandwidths_mbps)} worker bandwidths for a group of {dist.get_world_size(group)}"
        )
    ddps = [m for m in model.modules() if isinstance(m, DistributedDataParallel)]
    hub = fastest_worker(list(bandwidths_mbps))
    hook = star_allreduce_hook(hub, group, on_blocked, senders)
    for m in ddps:
        m.register_comm_hook(None, hook)
    logger.info("dense gradients: star all-reduce through worker %d on %d DDP module(s)", hub, len(ddps))
    return len(ddps)
