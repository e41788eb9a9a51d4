"""Online estimates of every worker's link, measured on the PS exchanges.

With ``EsdConfig.online_links`` each worker times its PS push/pull (the one
before each forward, or the one posted early after the previous gradients,
``EsdConfig.early_pull``: then a thread of the PS client times its reply,
``torchrec_esd.ps.client.ReplyClock``) and counts the bytes the transport
really moved in it (``Traffic.link``).  :class:`LinkEstimator` turns
``(bytes, seconds)`` pairs into a bandwidth and a latency per link; the
configured ``WorkerSpec.bandwidth_mbps`` / ``latency_ms`` are the prior.

How every worker gets the same estimates: after each push/pull the training
thread starts an all-gather of its observations on a group of its own
(:meth:`LinkEstimates.publish`); the decision of batch ``j`` feeds the
estimators from the publications of the exchanges before ``j - lag``
(:meth:`LinkEstimates.take`; ``lag`` = the batches dispatched ahead), the
same ones on every worker.  The gather thus moves while the workers compute.
A gather at each decision (how it was done before; :meth:`LinkEstimates.share`
still does it in one call) was a barrier of every worker in front of the decision that waited
behind the slowest link's queued traffic: on 4 x 100 Mbit/s the next plan
came too late for the early pull at 50-57 of 116 steps
(``benchmarks/results/s10_online_overhead.md``).

What is timed: the PS answers a push/pull only when every worker's request
is in (synchronous training), so the exchange's wall time (``Traffic.seconds``)
of a fast worker includes waiting for the slowest worker's gradients and
request: with one link at 10 Mbit/s, three 100 Mbit/s links measured 40-50
Mbit/s that way (``benchmarks/results/rate_change_v2.md``), and the dispatcher
then kept too many samples on the slow link.  The runtime therefore asks for
*timed replies* (``PushPullFrame.timed``): the PS sends a small marker before
each non-empty reply, and the worker times the reply from the marker's
arrival to its last byte (``Traffic.transfer_seconds`` over
``transfer_bytes``): the link's own rate, with no latency and no waiting in
it.  Those observations (``exchanges = 0``) set the bandwidth; the latency
stays at its prior (they carry none; whole-exchange observations, ``n >=
1``, still fit it).  The rate is measured on the download and applied to
both directions (the cost model has one bandwidth per link).  A reply below
``full_weight_bytes`` counts in proportion to its size and cannot move the
estimate more than ``outlier_factor`` in one step: a token bucket's burst
carries the first bytes of a transfer at line rate, so a slow worker given
few samples could otherwise look hundreds of times faster than it is.
:class:`LinkEstimates` uses 32 KiB (:class:`LinkEstimator`'s default is 256
KiB).  On every other push/pull a worker whose reply would be smaller asks
the PS to pad it to that size (``PushPullFrame.probe``, :data:`PROBE_REPLY_BYTES`,
``torchrec_esd.distributed.ps_sync.PROBE_EVERY``): cut to one sample after a
drop, the slow worker otherwise moved a few kB per reply, and its estimate
climbed back so slowly after its link recovered that it stayed at one sample
for 6 to more than 20 steps; with the padding it was back in 7
(``benchmarks/results/s17_split_sums.md``).  The
benchmarks' links used to be HTB classes that let whole 64 kB GSO
packets through at line rate (60 kB replies at "10 Mbit/s" in 0.03 ms); on
their TBF links (``benchmarks/netns.py``) a 10 Mbit/s link has a 4 kB burst
and 37-59 kB replies read 7.9-11.1 Mbit/s.  With 256 KiB a slow worker cut
to one sample (~30 kB replies) took 20 steps to be seen back at 100 Mbit/s
(``benchmarks/results/rate_change_v7.md``).  Where the timing thread waits
for the GIL the marker is seen late and a reply reads too fast (7 of 240
readings over 300 Mbit/s on 100 Mbit/s links in that run): the outlier rule
holds a lone one.

The estimator (per link), stated:

* model: ``seconds = latency + bytes * seconds_per_byte``;
* ``seconds_per_byte``: an exponentially weighted mean (weight ``alpha`` on
  the newest) of each observation's ``(seconds - n * latency) / bytes``;
* outliers: an observation more than ``outlier_factor`` times off the
  estimate (either way) is held back; the next observation that is off the
  same way confirms it (the link changed: the estimate restarts at their
  mean), one that is not drops it (a lone outlier: a scheduling hiccup) and
  the estimate is what it was before; with ``provisional_slowdowns`` (what
  :class:`LinkEstimates` uses) a held *slower* observation is the estimate
  until the next one confirms or drops it: a slow link holds up every
  worker's step, so reacting one exchange earlier saves a slow step per
  change, while a lone slow exchange costs one dispatch at shares set for a
  slower link and is then forgotten;
* latency: the least-squares fit of ``seconds = n a + bytes s`` over the last
  ``window`` accepted observations when their bytes per exchange spread
  enough (max / min >= 1.5 over >= 6 observations, or ``window``), the fit
  is sane (``s > 0``, ``a >= 0``) and precise (the standard error of ``a``
  within 10 % of the mean exchange's time: with timing noise a fit over a
  narrow spread of sizes can put most of the time into ``a``, and the
  bandwidth would then follow the noise), else the last one; a confirmed
  change resets it to the prior (the old fit described the old link) and
  prices both confirming observations with it.

So a rate change is followed within two observations (a slowdown within one
with ``provisional_slowdowns``), and a single outlier moves the estimate for
at most one observation.

Write-back after a slowdown (``EsdConfig.flush_on_slowdown``, off by default):
when a worker's estimate falls below half of the previous dispatch's
(:meth:`LinkEstimates.slowed_down`), the next iteration's plan has that worker
push every dirty row of its cache (``CacheDirectory.plan(flush=...)``).
Those rows are the only up-to-date copies; the others would otherwise pull
them through its now slow link one iteration at a time as they come to need
them (after a 100 -> 10 Mbit/s drop that drain kept the step 10-60 % above
its level for 7-8 steps, ``benchmarks/results/rate_change_v10_v11.md``).
Measured with factor 2 (v12 there): the slow worker's step after the drop took
1.9 s, pushing every dirty row, most of which nobody else needed soon (they
would have gone up only when evicted), so in all it cost more than the drain
it replaced; hence off by default.  Writing back only the rows the next
batches need elsewhere is the version that would pay.

Every worker must hold the *same* estimates where the dispatcher or the share
rule reads them: worker 0 decides the assignment for everybody and every
worker checks the loss scaling against the shares.  :class:`LinkEstimates`
therefore never feeds a worker's own measurement straight into its
estimators: each dispatch, every worker contributes the observations it made
since the last dispatch to one all-gather on the dispatch group
(:meth:`LinkEstimates.share`, ``[W, 6]`` float64: exchanges, wire bytes,
seconds, samples, timed transfer bytes and seconds), and every worker updates
all ``W`` estimators from that gathered tensor in worker order: identical
inputs in identical order, identical estimates on every worker.  Which exchanges a dispatch includes depends on
timing (dispatching ahead), never on the rank.

Share rule (``EsdConfig.compute_s_per_sample`` set): the shares equalise the
predicted step time ``n_w c / share_w + B_w(n_w) s_w + a_w`` (compute per
sample ``c`` scaled by the worker's compute weight ``WorkerSpec.share``, the
bytes ``B_w(n)`` a worker moves for ``n`` samples over the estimated seconds
per byte ``s_w``, latency ``a_w``), rounded to integers summing to the batch;
every worker trains at least one sample.  Without it,
``EsdConfig.batch_shares`` stands.

``B_w(n)`` (:class:`BytesModel`): a worker's bytes grow less than linearly
with its samples (rows shared by its samples are moved once; its cache holds
what its recent samples used), so the last measured bytes per sample, taken
as a constant, over-prices a worker whose share is cut: after a 100 -> 10
Mbit/s drop, shares set from the bytes per sample measured at ~125 samples
gave 27, then 12, then 8 samples, one correction per dispatch
(``benchmarks/results/rate_change_v5.md``).  So ``B_w(n) = B_last (n /
n_last)^beta_w``: through the last measurement, with ``beta_w`` the slope of
a least-squares line through ``(log n, log bytes)`` of the worker's last
``window`` exchanges where their sample counts spread (max/min >= 1.5), held
within ``[0.5, 1]``.  Without that spread (a steady share) the exponent is
the cautious one on each side: 0.5 below ``n_last`` (a cut share still moves
many bytes) and 1 above it (a grown share moves proportionally more); the
bytes can grow at most linearly with the samples, and v5's slow worker moved
~420 kB at 125 samples and ~100 kB at 9 (exponent ~0.55).
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections import deque
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from torchrec_esd.config import EsdConfig, EsdConfigError

# the share rule moves samples only for a predicted step this much shorter (LinkEstimates.shares)
SHARE_HYSTERESIS = 0.05
# a timed reply from this size on moves a link's estimate with full weight (LinkEstimates); on every other
# push/pull a worker whose reply would be smaller asks the PS to pad it to this size (PushPullFrame.probe,
# ps_sync.PROBE_EVERY), so that a worker cut to a few samples after its link slowed down still measures its
# link and is seen when the link comes back
PROBE_REPLY_BYTES = 32 * 1024


class LinkEstimator:
    """Bandwidth and latency of one link from ``(bytes, seconds)`` observations
    (see the module docstring).  ``observe`` is O(1); the latency fit is
    O(``window``)."""

    def __init__(self, prior_bytes_per_s: float, prior_latency_s: float, alpha: float = 0.5,
                 outlier_factor: float = 4.0, window: int = 8, provisional_slowdowns: bool = False,
                 full_weight_bytes: float = 256 * 1024) -> None:
        if not (prior_bytes_per_s > 0 and prior_latency_s >= 0):
            raise EsdConfigError(f"link prior must have bandwidth > 0 and latency >= 0, got "
                                 f"{prior_bytes_per_s!r} B/s, {prior_latency_s!r} s")
        if not (0 < alpha <= 1 and outlier_factor > 1 and window >= 2):
            raise EsdConfigError(f"LinkEstimator needs 0 < alpha <= 1, outlier_factor > 1, window >= 2; got "
                                 f"{alpha}, {outlier_factor}, {window}")
        if not full_weight_bytes > 0:
            raise EsdConfigError(f"LinkEstimator needs full_weight_bytes > 0, got {full_weight_bytes!r}")
        self.full_weight_bytes = float(full_weight_bytes)
        self.prior_latency_s = float(prior_latency_s)
        self.provisional_slowdowns = bool(provisional_slowdowns)
        self.seconds_per_byte = 1.0 / float(prior_bytes_per_s)
        self.latency_s = float(prior_latency_s)
        self.alpha, self.outlier_factor = float(alpha), float(outlier_factor)
        # (per byte, n, bytes, seconds, the estimate before it)
        self._held: Optional[Tuple[float, int, float, float, float]] = None
        self._recent: "deque[Tuple[int, float, float]]" = deque(maxlen=int(window))
        self.observations = 0
        self.dropped = 0

    @property
    def bytes_per_second(self) -> float:
        return 1.0 / self.seconds_per_byte

    def observe(self, nbytes: float, seconds: float, exchanges: int = 1) -> None:
        """``exchanges`` exchanges moved ``nbytes`` in ``seconds`` (summed);
        ``exchanges=0``: a transfer timed from its first byte (a timed reply),
        which has no latency in it and does not enter the latency fit."""
        n = int(exchanges)
        if n < 0 or nbytes <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        self.observations += 1
        per_byte = self._per_byte(n, nbytes, seconds)
        if n == 0 and nbytes < self.full_weight_bytes:
            self._observe_small(per_byte, nbytes)
            return
        held = self._held
        base = self.seconds_per_byte if held is None else held[4]  # the estimate before a held one
        ratio = per_byte / base
        off = 1 if ratio > self.outlier_factor else (-1 if ratio < 1.0 / self.outlier_factor else 0)
        if off:
            if held is not None and (held[0] > base) == (off > 0):
                # two in a row, off the same way: the link changed
                self._held = None
                self._recent.clear()
                self._recent.append(held[1:4])
                self._recent.append((n, float(nbytes), float(seconds)))
                # the old latency fit described the old link: back to the prior, and both
                # observations priced with it
                self.latency_s = self.prior_latency_s
                self.seconds_per_byte = 0.5 * sum(self._per_byte(*o) for o in self._recent)
                return
            if held is not None:  # the held one was a lone outlier, the other way
                self.dropped += 1
                self.seconds_per_byte = base
            self._held = (per_byte, n, float(nbytes), float(seconds), self.seconds_per_byte)
            if off > 0 and self.provisional_slowdowns:
                self.seconds_per_byte = per_byte  # believed until the next observation says otherwise
            return
        if held is not None:  # the held one was a lone outlier
            self.dropped += 1
            self.seconds_per_byte = base
            self._held = None
        self.seconds_per_byte += self.alpha * (per_byte - self.seconds_per_byte)
        self._recent.append((n, float(nbytes), float(seconds)))
        self._fit_latency()

    def _observe_small(self, per_byte: float, nbytes: float) -> None:
        """A timed transfer below ``full_weight_bytes``: a token bucket's
        burst (tens of kB on some shapers) or the path's buffers may carry all of it
        at line rate, so it may read arbitrarily fast; it moves the estimate
        with weight ``alpha * nbytes / full_weight_bytes``, towards at most
        ``outlier_factor`` times off, and never holds or confirms a change.
        (Weighting faster readings by the square of that share kept a 10
        Mbit/s link's estimate at 11-14 Mbit/s instead of drifting to ~20, but
        brought it back from 10 to 100 Mbit/s so slowly that the recovered
        phase stayed 1.09-1.25x slower: ``benchmarks/results/rate_change_v3.md``.)"""
        if self._held is not None:  # a held large one is neither confirmed nor dropped by it
            return
        f = self.outlier_factor
        target = min(max(per_byte, self.seconds_per_byte / f), self.seconds_per_byte * f)
        self.seconds_per_byte += self.alpha * (nbytes / self.full_weight_bytes) * (target - self.seconds_per_byte)

    def _per_byte(self, n: int, nbytes: float, seconds: float) -> float:
        return max(seconds - n * self.latency_s, 0.05 * seconds) / nbytes

    def _fit_latency(self) -> None:
        obs = [o for o in self._recent if o[0] > 0]  # transfers (n = 0) say nothing of the latency
        if len(obs) < min(6, self._recent.maxlen):
            return
        by = [b / n for n, b, _ in obs]
        if max(by) < 1.5 * min(by):
            return
        # least squares of s_i = n_i a + b_i p over the window (2 unknowns)
        snn = sum(n * n for n, _, _ in obs)
        snb = sum(n * b for n, b, _ in obs)
        sbb = sum(b * b for _, b, _ in obs)
        sns = sum(n * s for n, _, s in obs)
        sbs = sum(b * s for _, b, s in obs)
        det = snn * sbb - snb * snb
        if det <= 0:
            return
        a = (sns * sbb - snb * sbs) / det
        p = (snn * sbs - snb * sns) / det
        if not (p > 0 and a >= 0):
            return
        # and precise: its standard error within 10 % of the mean exchange's time
        k = len(obs)
        if k > 2:
            rss = sum((s - n * a - b * p) ** 2 for n, b, s in obs)
            if math.sqrt(rss / (k - 2) * sbb / det) > 0.1 * sum(s / n for n, _, s in obs) / k:
                return
        self.latency_s = a

    def __repr__(self) -> str:
        return (f"LinkEstimator({self.bytes_per_second * 8 / 1e6:.3f} Mbit/s, {self.latency_s * 1e3:.2f} ms, "
                f"{self.observations} observations, {self.dropped} dropped)")


class LinkEstimates:
    """Every worker's :class:`LinkEstimator`, identical on every worker (see
    the module docstring): this worker :meth:`record` s its exchanges and
    :meth:`publish` es them after each; each dispatch :meth:`take` s the
    publications it may read."""

    def __init__(self, config: EsdConfig, me: int, share_hysteresis: float = SHARE_HYSTERESIS,
                 **estimator_kwargs) -> None:
        if not 0.0 <= share_hysteresis < 1.0:
            raise EsdConfigError(f"share_hysteresis must be in [0, 1), got {share_hysteresis!r}")
        self.config = config
        self.me = int(me)
        self.share_hysteresis = float(share_hysteresis)
        self._last_counts: Optional[List[int]] = None  # the share rule's last counts (the same on every worker)
        self._before: Optional[List[float]] = None  # the bandwidths at the last slowed_down()
        # 32 KiB: see the module docstring (small replies)
        kw = {"provisional_slowdowns": True, "full_weight_bytes": PROBE_REPLY_BYTES, **estimator_kwargs}
        self.links = [LinkEstimator(w.bytes_per_second, w.latency_s, **kw) for w in config.workers]
        self.bytes_models = [BytesModel() for _ in config.workers]
        self._lock = threading.Lock()  # the training thread records, the dispatch thread shares
        # exchanges, wire bytes, seconds, samples, timed transfer bytes, transfer seconds
        self._pending = [0.0] * 6
        # all-gathers started by publish() and not yet taken (oldest first), how many were started
        # and how many taken; the condition wakes a take() waiting for a publication
        self._published: "deque[tuple]" = deque()
        self._started = 0
        self._taken = 0
        self._publication = threading.Condition()
        self.history: "deque[List[List[float]]]" = deque(maxlen=4096)  # every gathered [W, 6], oldest first

    def record(self, nbytes: int, seconds: float, samples: int, transfer_bytes: int = 0,
               transfer_seconds: float = 0.0) -> None:
        """One synchronous PS exchange of this worker (training thread):
        ``nbytes`` on the wire in ``seconds``, for ``samples`` samples; of it,
        a timed reply of ``transfer_bytes`` that took ``transfer_seconds``
        (``Traffic.transfer_*``; 0: not timed, the exchange's own time is used)."""
        with self._lock:
            p = self._pending
            p[0] += 1
            p[1] += float(nbytes)
            p[2] += float(seconds)
            p[3] += float(samples)
            p[4] += float(transfer_bytes)
            p[5] += float(transfer_seconds)

    def publish(self, group, device: Optional[torch.device] = None) -> None:
        """Start the all-gather of this worker's observations since its last
        publication (a collective on ``group``, the runtime's estimates group,
        which nothing else uses; returns at once).  The training thread calls
        it after every PS push/pull, so every worker publishes once per
        exchange, in the same order; :meth:`take` feeds the estimators from
        them.  The gather then moves while the worker computes, instead of
        being a barrier of every worker in front of the decision (a blocking
        all-gather at each dispatch waited behind the queued traffic of the
        slowest link, and the next plan came too late for the early pull)."""
        started = start_gather_pending(self._lock, self._pending, self.config.num_workers, group, device)
        with self._publication:
            self._published.append(started)
            self._started += 1
            self._publication.notify_all()

    @property
    def published(self) -> int:
        """How many publications this worker has started."""
        with self._publication:
            return self._started

    def take(self, upto: int, timeout_s: float, stop: Optional[Callable[[], bool]] = None) -> int:
        """Feed every estimator, in worker order, from the publications
        ``taken .. upto - 1`` (the first ``upto`` of the job; waiting, at most
        ``timeout_s``, for those not started yet on this worker).  Every
        worker takes the same publications at the same dispatch, so the
        estimates stay identical everywhere.  Returns how many it took.
        ``stop()`` true ends a wait with :class:`EsdConfigError` (the
        consumer of the batches is gone).  ``O(W)`` per publication."""
        return len(self._take(upto, timeout_s, stop))

    def _take(self, upto: int, timeout_s: float, stop: Optional[Callable[[], bool]]) -> List[torch.Tensor]:
        """:meth:`take`; the gathered ``[W, 6]`` of each publication taken."""
        upto = int(upto)
        deadline = time.monotonic() + float(timeout_s)
        with self._publication:
            while self._started < upto:
                if stop is not None and stop():
                    raise EsdConfigError("the dispatch stopped while waiting for link observations")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise EsdConfigError(
                        f"waited {timeout_s:.0f} s for the link observations of PS exchange {upto - 1} of this "
                        f"worker ({self._started} published): the batches dispatched ahead must be trained in "
                        "dispatch order")
                self._publication.wait(min(left, 0.05))
            items = [self._published.popleft() for _ in range(max(0, upto - self._taken))]
            self._taken = max(self._taken, upto)
        out = []
        for started in items:
            out.append(gathered_pending(started))
            self.update(out[-1])
        return out

    def share(self, group, device: Optional[torch.device] = None) -> torch.Tensor:
        """:meth:`publish` and :meth:`take` at once, waiting for the gather:
        every worker calls it at the same point; takes any earlier
        publication too and returns the gathered ``[W, 6]`` of this one (for
        a loop that decides in its own thread, and the tests)."""
        self.publish(group, device)
        return self._take(self.published, 0.0, None)[-1]

    def update(self, gathered: torch.Tensor) -> None:
        """Feed ``[W, 6]`` observations (exchanges, wire bytes, seconds,
        samples, timed transfer bytes and seconds; ``[W, 4]``: no timed
        transfers).  A worker's timed transfers, where it has any, set its
        bandwidth; otherwise its whole exchanges do."""
        if gathered.dim() != 2 or gathered.shape[0] != len(self.links) or gathered.shape[1] not in (4, 6):
            raise EsdConfigError(f"link observations must be [{len(self.links)}, 4 or 6], got {list(gathered.shape)}")
        self.history.append(gathered.tolist())
        for w, row in enumerate(gathered.tolist()):
            n, nbytes, seconds, samples = row[:4]
            tb, ts = row[4:] if len(row) == 6 else (0.0, 0.0)
            if n > 0:
                if tb > 0:
                    self.links[w].observe(tb, ts, 0)
                else:
                    self.links[w].observe(nbytes, seconds, int(n))
                if samples > 0:
                    self.bytes_models[w].observe(samples / n, nbytes / n)

    @property
    def bytes_per_sample(self) -> List[float]:
        """Every worker's wire bytes per sample in its last measured exchange
        (0 before any)."""
        return [m.last[1] / m.last[0] if m.last is not None else 0.0 for m in self.bytes_models]

    def bytes_per_second(self) -> List[float]:
        return [e.bytes_per_second for e in self.links]

    def slowed_down(self, factor: float) -> List[int]:
        """The workers whose estimated bandwidth is now below ``1 / factor``
        of what it was at the previous call (none at the first); call it
        once per dispatch, after :meth:`share`, on every worker (the same
        answer everywhere: the estimates are)."""
        now = self.bytes_per_second()
        before, self._before = self._before, now
        if before is None:
            return []
        return [w for w, (a, b) in enumerate(zip(before, now)) if b * factor < a]

    def latency_s(self) -> List[float]:
        return [e.latency_s for e in self.links]

    def shares(self, global_batch: int, compute_s_per_sample: Optional[float],
               extra_fixed_s: Optional[Sequence[float]] = None) -> List[int]:
        """Per-worker sample counts of a batch (the share rule of the module
        docstring; ``config.batch_shares`` without a compute time);
        ``extra_fixed_s``: seconds of every worker's step whatever its samples
        besides its latency (the dense all-reduce on its link).

        Hysteresis: the last counts stay while the new ones would not cut the
        predicted step (the largest ``t_w``, both priced with the current
        estimates) by more than ``share_hysteresis`` (5 %): on steady links
        the estimates' noise (+-10-20 % per reading) would otherwise move a few
        samples back and forth every step, and the worker that just got more
        makes the step slower; a real change (a link 2x slower) moves them at
        once.  Every worker calls this once per dispatch with the same
        estimates, so every worker keeps the same counts."""
        if compute_s_per_sample is None or not any(self.bytes_per_sample):
            return self.config.batch_shares(global_batch)
        weights = [w.share for w in self.config.workers]
        compute = [compute_s_per_sample / wt if wt > 0 else math.inf for wt in weights]
        curves = [(m.last[0], m.last[1] * e.seconds_per_byte, *m.exponents()) if m.last is not None
                  else (1.0, 0.0, 1.0, 1.0) for m, e in zip(self.bytes_models, self.links)]
        fixed = self.latency_s()
        if extra_fixed_s is not None:
            if len(extra_fixed_s) != len(fixed):
                raise EsdConfigError(f"{len(extra_fixed_s)} fixed times for {len(fixed)} workers")
            fixed = [a + float(x) for a, x in zip(fixed, extra_fixed_s)]
        counts = equal_time_counts_concave(global_batch, compute, curves, fixed)
        last = self._last_counts
        if last is not None and len(last) == len(counts) and sum(last) == global_batch and last != counts:
            if predicted_step_s(counts, compute, curves, fixed) \
                    > (1.0 - self.share_hysteresis) * predicted_step_s(last, compute, curves, fixed):
                counts = list(last)
        self._last_counts = list(counts)
        return counts


def start_gather_pending(lock: threading.Lock, pending: List[float], num_workers: int, group,
                         device: Optional[torch.device] = None):
    """Start the all-gather of every worker's ``pending`` sums (a collective
    on ``group``; this worker's are read and zeroed in place under ``lock``,
    which guards them against the recording thread): ``(work, tensors)``,
    read by :func:`gathered_pending`."""
    with lock:
        mine = torch.tensor(pending, dtype=torch.float64, device=device)
        pending[:] = [0.0] * len(pending)
    every = [torch.zeros_like(mine) for _ in range(num_workers)]
    return dist.all_gather(every, mine, group=group, async_op=True), every


def gathered_pending(started) -> torch.Tensor:
    """Wait for a :func:`start_gather_pending`: ``[num_workers, len(pending)]``
    float64 on the CPU, in worker order."""
    work, every = started
    work.wait()
    return torch.stack(every).cpu()


class BytesModel:
    """Bytes a worker moves per exchange as a function of its samples,
    ``bytes(n) = bytes_last (n / n_last)^beta`` (module docstring); O(window)
    per observation and per :meth:`exponents`."""

    def __init__(self, window: int = 8, min_beta: float = 0.5) -> None:
        self._recent: "deque[Tuple[float, float]]" = deque(maxlen=int(window))
        self.min_beta = float(min_beta)
        self.last: Optional[Tuple[float, float]] = None  # (samples, bytes) of the last exchange

    def observe(self, samples: float, nbytes: float) -> None:
        if samples > 0 and nbytes > 0 and math.isfinite(samples) and math.isfinite(nbytes):
            self.last = (float(samples), float(nbytes))
            self._recent.append(self.last)

    def exponents(self) -> Tuple[float, float]:
        """``(below, above)``: the exponent for fewer and for more samples
        than the last exchange's: the fitted one on both sides, or without a
        spread of sample counts in the window ``(min_beta, 1)``."""
        fit = self.beta()
        return (self.min_beta, 1.0) if fit is None else (fit, fit)

    def beta(self) -> Optional[float]:
        """The fitted exponent in ``[min_beta, 1]``; None without a spread of
        sample counts in the window."""
        obs = list(self._recent)
        if len(obs) < 2 or max(n for n, _ in obs) < 1.5 * min(n for n, _ in obs):
            return None
        xs = [math.log(n) for n, _ in obs]
        ys = [math.log(b) for _, b in obs]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
        return min(1.0, max(self.min_beta, slope))

    def __call__(self, n: float) -> float:
        n_last, b_last = self.last  # type: ignore[misc]
        below, above = self.exponents()
        return b_last * (float(n) / n_last) ** (below if n < n_last else above)


def _time_at(compute_s: float, curve: Tuple[float, float, float, float], fixed_s: float, n: int) -> float:
    """A worker's predicted step with ``n`` samples (:func:`equal_time_counts_concave`'s ``t_w``)."""
    m, lk, below, above = curve
    return n * compute_s + lk * (n / m) ** (below if n < m else above) + fixed_s


def predicted_step_s(counts: Sequence[int], compute_s: Sequence[float],
                     curves: Sequence[Tuple[float, float, float, float]], fixed_s: Sequence[float]) -> float:
    """The largest predicted ``t_w(n_w)`` of ``counts`` (a worker with
    ``c_w = inf`` counts at its link and fixed time only: it trains one
    sample)."""
    return max(_time_at(c if math.isfinite(c) else 0.0, cv, f, n)
               for c, cv, f, n in zip(compute_s, curves, fixed_s, counts))


def equal_time_counts_concave(batch: int, compute_s: Sequence[float],
                              curves: Sequence[Tuple[float, float, float, float]],
                              fixed_s: Sequence[float]) -> List[int]:
    """Integer counts ``n_w >= 1`` summing to ``batch`` that minimise the
    largest ``t_w(n_w) = n_w c_w + L_w (n_w / m_w)^e_w + f_w``, where
    ``curves[w] = (m_w, L_w, below_w, above_w)``: the link time ``L_w`` at
    ``m_w`` samples and the exponent ``e_w`` below and above ``m_w`` (``0 <
    e <= 1``; ``c_w = inf``: one sample).  Every ``t_w`` grows with ``n``, so
    giving each next sample to the worker whose time after it is the smallest
    (ties: the lower index) is optimal: O(batch log W) with a heap, in plain
    Python floats (0.19 ms at B = 512, W = 4).  It runs in the dispatch thread
    of every worker: a first version, a bisection in small torch operations,
    held the GIL for tens of milliseconds per dispatch, and the training
    thread's timed replies then read 10-100x too fast (``rate_change_v6``).
    With exponents 1 it is :func:`equal_time_counts` up to rounding (one
    sample)."""
    W = len(compute_s)
    if batch < W:
        raise EsdConfigError(f"a batch of {batch} samples cannot give each of {W} workers one")

    def time_at(w: int, n: int) -> float:
        return _time_at(compute_s[w], curves[w], fixed_s[w], n)

    counts = [1] * W
    heap = [(time_at(w, 2), w) for w in range(W) if math.isfinite(compute_s[w])]
    if not heap:
        return equal_time_counts(batch, list(compute_s), list(fixed_s))
    heapq.heapify(heap)
    for _ in range(batch - W):
        _, w = heapq.heappop(heap)
        counts[w] += 1
        heapq.heappush(heap, (time_at(w, counts[w] + 1), w))
    return counts


def equal_time_counts(batch: int, per_sample_s: Sequence[float], fixed_s: Sequence[float]) -> List[int]:
    """Integer counts ``n_w >= 1`` summing to ``batch`` with ``n_w a_w + f_w``
    as equal as rounding allows (a worker with ``a_w = inf`` gets one sample;
    largest remainders, ties to the lower index).  O(W^2) worst case."""
    W = len(per_sample_s)
    if batch < W:
        raise EsdConfigError(f"a batch of {batch} samples cannot give each of {W} workers one")
    active = [w for w in range(W) if math.isfinite(per_sample_s[w])]
    exact = [1.0] * W
    while active:
        left = batch - (W - len(active))
        t = (left + sum(fixed_s[w] / per_sample_s[w] for w in active)) / sum(1.0 / per_sample_s[w] for w in active)
        n = {w: (t - fixed_s[w]) / per_sample_s[w] for w in active}
        low = [w for w in active if n[w] < 1.0]
        if not low or len(low) == len(active):
            for w in active:
                exact[w] = max(n[w], 1.0)
            break
        active = [w for w in active if w not in low]
    return _round_counts(batch, exact)


def _round_counts(batch: int, exact: List[float]) -> List[int]:
    """``exact`` (>= 1 each) scaled to sum to ``batch`` and rounded: counts
    >= 1 summing to ``batch``, largest remainders, ties to the lower index."""
    W = len(exact)
    scale = batch / sum(exact)
    exact = [x * scale for x in exact]
    counts = [max(1, int(math.floor(x))) for x in exact]
    rest = batch - sum(counts)
    order = sorted(range(W), key=lambda i: (counts[i] - exact[i], i))
    i = 0
    while rest > 0:
        counts[order[i % W]] += 1
        rest -= 1
        i += 1
    while rest < 0:  # the floor of one pushed the sum over: take from the largest
        j = max(range(W), key=lambda k: (counts[k], -k))
        counts[j] -= 1
        rest += 1
    return counts
