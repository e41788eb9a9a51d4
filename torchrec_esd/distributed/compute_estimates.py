"""Online estimates of every worker's compute time per sample.

A dispatcher that decides the shares per batch
(:class:`~torchrec_esd.dispatch.shares.PerBatchShares`) prices a worker's
compute with its seconds per sample.  A configured rate is a guess (the
planner's, or a benchmark's flag); the workers measure their own instead, and
the configured rate is the prior.

What a worker measures, per training step (:class:`ComputeEstimates`, the
clock part, called by the ESD sharded module and the dense-sync hook):

* the window runs from the end of the forward's PS exchange (the push/pull:
  its time is the link's, :mod:`~torchrec_esd.distributed.link_estimates`) to
  the moment the embedding gradients reach the sharded module (the end of the
  model's backward): the rest of the forward, the loss and the backward, i.e.
  the worker's own compute on its samples;
* time blocked in the star all-reduce of the dense gradients
  (:mod:`~torchrec_esd.distributed.dense_sync`), where a fast worker waits for
  a slow one, is subtracted (:meth:`ComputeEstimates.exclude`);
* the step's observation is ``(seconds, samples)``.  Not included: the dense
  optimizer step after the backward (one pass over the small dense weights;
  the sparse optimizer runs on the parameter servers).

The estimator (per worker, :class:`ComputeEstimator`) is the links' one
(:class:`~torchrec_esd.distributed.link_estimates.LinkEstimator`) with samples
for bytes and steps for exchanges: ``seconds = steps * fixed + samples *
per_sample``.  ``per_sample``: an exponentially weighted mean (weight
``alpha`` on the newest) starting at the prior; an observation more than
``outlier_factor`` times off is held back and the next one off the same way
confirms it (the worker's speed changed), one that is not drops it (a lone
hiccup, e.g. a first step's lazy initialisation).  ``fixed`` (per-step work
whatever the samples, which is otherwise charged to the samples of a worker
that trains few): 0 by default; with ``fit_fixed=True`` the least-squares fit
over the last ``window`` observations once their samples per step spread
(max / min >= 1.5 over >= 4 observations).  The fit is off by default: on the
shared 2-core machine, wall-clock windows of a few milliseconds were too noisy
for it (in one benchmark run it put the rates of the workers between 4e4 and
8.5e5 samples / s, so the per-batch shares followed noise), while the plain
per-sample mean stayed within about 2x across workers.  O(1) per observation,
O(``window``) per fit.

Every worker must hold the same estimates (worker 0 decides with them, and the
share rule must not depend on who computes it): as in
:class:`~torchrec_esd.distributed.link_estimates.LinkEstimates`, each dispatch
all-gathers every worker's observations since the last dispatch
(:meth:`ComputeEstimates.share`, ``[W, 3]`` float64: steps, seconds, samples)
and every worker feeds all ``W`` estimators from that tensor in worker order.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import List, Optional, Sequence, Tuple

import torch

from torchrec_esd.config import EsdConfigError
from torchrec_esd.distributed.link_estimates import LinkEstimator, gathered_pending, start_gather_pending


class ComputeEstimator(LinkEstimator):
    """Compute time of one worker, ``seconds = steps * fixed_s + samples *
    seconds_per_sample``, from ``(seconds, samples, steps)`` observations:
    the link estimator's model and rules with samples for bytes and steps for
    exchanges (see the module docstring).  ``observe`` is O(1), the fit of
    the fixed part O(``window``)."""

    def __init__(self, prior_s_per_sample: float, alpha: float = 0.5, outlier_factor: float = 4.0,
                 window: int = 8, fit_fixed: bool = False) -> None:
        if not (math.isfinite(prior_s_per_sample) and prior_s_per_sample > 0):
            raise EsdConfigError(f"compute prior must be a finite time per sample > 0, got {prior_s_per_sample!r}")
        super().__init__(1.0 / prior_s_per_sample, 0.0, alpha=alpha, outlier_factor=outlier_factor, window=window)
        self.fit_fixed = bool(fit_fixed)

    def _fit_latency(self) -> None:
        if self.fit_fixed:
            super()._fit_latency()

    def observe(self, seconds: float, samples: float, steps: int = 1) -> None:  # type: ignore[override]
        """``steps`` steps took ``seconds`` of compute on ``samples`` samples (summed)."""
        if not (samples > 0 and math.isfinite(seconds) and seconds > 0):
            return
        super().observe(samples, seconds, steps)

    @property
    def seconds_per_sample(self) -> float:
        return self.seconds_per_byte

    @property
    def samples_per_second(self) -> float:
        return 1.0 / self.seconds_per_byte

    @property
    def fixed_s(self) -> float:
        """Seconds per step whatever the samples (0 until the fit has spread)."""
        return self.latency_s

    def __repr__(self) -> str:
        return (f"ComputeEstimator({self.seconds_per_sample * 1e3:.4f} ms/sample + {self.fixed_s * 1e3:.2f} ms/step, "
                f"{self.observations} observations, {self.dropped} dropped)")


class ComputeEstimates:
    """Every worker's :class:`ComputeEstimator`, identical on every worker,
    and this worker's step clock (see the module docstring).

    Args:
        prior_samples_per_s: every worker's prior compute rate (samples / s).
        me: this worker's index.
    """

    def __init__(self, prior_samples_per_s: Sequence[float], me: int, **estimator_kwargs) -> None:
        rates = [float(r) for r in prior_samples_per_s]
        if not rates or any(not (math.isfinite(r) and r > 0) for r in rates):
            raise EsdConfigError(f"compute priors must be finite rates > 0, got {list(prior_samples_per_s)}")
        if not 0 <= int(me) < len(rates):
            raise EsdConfigError(f"worker {me} is not one of the {len(rates)} workers")
        self.me = int(me)
        self.workers = [ComputeEstimator(1.0 / r, **estimator_kwargs) for r in rates]
        self._lock = threading.Lock()  # the training thread records, the dispatch thread shares
        self._pending = [0.0, 0.0, 0.0]  # steps, seconds, samples
        self._started: Optional[float] = None
        self._excluded = 0.0
        self.history: "deque[List[List[float]]]" = deque(maxlen=4096)  # every gathered [W, 3]
        self._inflight = None  # (work, tensors) of the all-gather the last share started

    # ------------------------------------------------------------ the clock (training thread)
    def start(self) -> None:
        """The forward's PS exchange is done: this step's compute starts."""
        self._started = time.perf_counter()
        self._excluded = 0.0

    def exclude(self, seconds: float) -> None:
        """``seconds`` of the running window were spent waiting for other workers."""
        if self._started is not None:
            self._excluded += float(seconds)

    def stop(self, samples: int) -> None:
        """The embedding gradients arrived: the step's compute on ``samples`` ends."""
        if self._started is None:
            return
        seconds = time.perf_counter() - self._started - self._excluded
        self._started = None
        self.record(seconds, samples)

    def record(self, seconds: float, samples: int) -> None:
        """One step of this worker: ``seconds`` of compute on ``samples`` samples."""
        if samples <= 0 or not seconds > 0:
            return
        with self._lock:
            p = self._pending
            p[0] += 1
            p[1] += float(seconds)
            p[2] += float(samples)

    # ------------------------------------------------------------ at dispatch
    def share(self, group, device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
        """Start the all-gather of every worker's observations since its last
        share (a collective on ``group``, every worker at the same dispatch)
        and feed every estimator, in worker order, from the one the previous
        share started; returns that ``[W, 3]`` (None at the first share).  The
        estimates are one dispatch older than a blocking gather's, and the
        dispatch does not wait for the slowest link's queue (on a slow link
        the observations queue behind the step's gradients, and the next
        plan, which the early pull needs at the gradient phase, came late)."""
        previous = self._inflight
        self._inflight = start_gather_pending(self._lock, self._pending, len(self.workers), group, device)
        if previous is None:
            return None
        gathered = gathered_pending(previous)
        self.update(gathered)
        return gathered

    def update(self, gathered: torch.Tensor) -> None:
        """Feed ``[W, 3]`` observations (steps, seconds, samples)."""
        rows = gathered.tolist()
        if len(rows) != len(self.workers):
            raise EsdConfigError(f"{len(rows)} workers' compute observations for {len(self.workers)} workers")
        self.history.append(rows)
        for est, (steps, seconds, samples) in zip(self.workers, rows):
            if steps > 0:
                est.observe(seconds, samples, int(steps))

    def samples_per_s(self) -> List[float]:
        """Every worker's estimated compute rate (samples / s)."""
        return [e.samples_per_second for e in self.workers]

    def seconds_per_sample(self) -> Tuple[float, ...]:
        return tuple(e.seconds_per_sample for e in self.workers)

    def fixed_s(self) -> List[float]:
        """Every worker's estimated compute seconds per step whatever its samples."""
        return [e.fixed_s for e in self.workers]
