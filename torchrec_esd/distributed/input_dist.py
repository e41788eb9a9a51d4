"""EsdInputDist: dispatch the samples of a global batch to the workers.

Drop-in in front of a TorchRec model: it takes a :class:`torchrec.datasets.utils.Batch`
and returns the Batch of the samples this worker trains this iteration.  Each
iteration, worker 0 builds the cost matrix from the replicated cache directory,
runs the dispatcher and broadcasts the assignment; worker 0 then plans every
cache and sends each other worker its step summary, from which that worker
plans its own cache (the plan is queued for the ESD embedding module), and
every worker keeps its samples.

Two input modes:

* ``"global"``: every worker passes the same global batch (e.g. all read one
  stream); no sample moves over the network.
* ``"local"``: every worker passes its own local batch, as in vanilla TorchRec
  data-parallel loading; the sparse ids are all-gathered (the dispatcher needs
  them), dense features and labels move with one uneven all-to-all.

Dispatching ahead: :meth:`EsdInputDist.dispatch_ahead` wraps a batch
iterator and dispatches up to ``depth`` batches ahead in a background thread,
over the runtime's own dispatch process group, so worker 0's decision and every
worker's directory plan for batch ``t + 1`` run while batch ``t`` trains (they
depend only on the directory state after batch ``t``'s plan, which is known
before ``t`` trains).  When batch ``t`` is taken, batch ``t + depth + 1``
may be decided; with online links (and no prefetch) its decision first
waits for this worker's exchange of step ``t`` and reads the link estimates
of every exchange up to it.  With the measured compute alone (no online
links, no prefetch), batch ``t + depth`` is decided when batch ``t`` is
taken.  The
assignments, plans and trained model are the same as calling the module
batch by batch.  With an eviction policy that reads the upcoming batches
(``"lookahead"``), the thread reads ``EsdConfig.cache_lookahead`` batches
beyond the one it dispatches and hands their ids to the directory's plan
(:mod:`torchrec_esd.cache.lookahead`); batch by batch, the window is empty.

Losses: ``loss = esd_dist.loss(per_sample_losses)`` (``sum * W / B``, where
:attr:`loss_scale` is ``W / B``) makes the gradients those of vanilla synchronous
training on the same global batch.  With equal shares this equals each worker's
mean loss; with uneven shares a mean trains another model, so a training batch
whose loss did not go through :meth:`EsdInputDist.loss` is an error on every
rank (:mod:`torchrec_esd.distributed.loss_scaling`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd.batch_select import select_kjt_samples, select_samples
from torchrec_esd.config import EsdConfigError
from torchrec_esd.cost import CostModel
from torchrec_esd.dispatch import DispatchError, DispatchResult, Dispatcher, make_dispatcher
from torchrec_esd.distributed.compute_estimates import ComputeEstimates
from torchrec_esd.distributed.dispatched_batch import BadBatch, DispatchedBatch, ReadBatch, readable
from torchrec_esd.distributed.plan_channel import batch_fingerprint, global_batch_fingerprint
from torchrec_esd.distributed.ps_sync import require_dispatch_ahead
from torchrec_esd.distributed.runtime import EsdRuntime
from torchrec_esd.distributed.worker_plans import plan_iteration
from torchrec_esd.layout import EsdIdError

MODES = ("global", "local")
_END = object()


class EsdInputDist(nn.Module):
    """Dispatches each global batch over the workers (see the module docstring).

    Args:
        runtime: this worker's ``EsdRuntime``.
        dispatcher: a dispatcher name (``make_dispatcher``'s) or a
            :class:`~torchrec_esd.dispatch.Dispatcher`.  The objective it
            optimises is ``EsdConfig.objective``: a name is built with it, and
            a dispatcher built with another objective is an error.
        mode: ``"global"`` or ``"local"`` batches.
        device: where this worker's dense features and labels go.
        dispatcher_kwargs: options of a dispatcher given by name.
    """

    def __init__(
        self,
        runtime: EsdRuntime,
        dispatcher: Union[str, Dispatcher],
        mode: str = "global",
        device: Optional[torch.device] = None,
        dispatcher_kwargs: Optional[Mapping] = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise EsdConfigError(f"EsdInputDist mode must be one of {MODES}, got {mode!r}")
        if not runtime.is_worker:
            raise EsdConfigError("EsdInputDist runs on worker ranks only")
        self.runtime = runtime
        self.dispatcher = self._dispatcher(dispatcher, dict(dispatcher_kwargs or {}), runtime.config.objective)
        if getattr(self.dispatcher, "varies_shares", False) and getattr(runtime, "loss_scaling", None) is not None:
            # shares decided per batch (dispatch.shares): uneven whatever the config says
            runtime.loss_scaling.variable_shares = True
        if getattr(self.dispatcher, "reads_compute_rates", False):
            # the dispatcher prices compute with every worker's measured time per sample,
            # its configured rates the prior (torchrec_esd.distributed.compute_estimates)
            prior = list(self.dispatcher.prior_samples_per_s)
            if len(prior) != runtime.config.num_workers:
                raise EsdConfigError(f"the dispatcher has {len(prior)} compute rates for "
                                     f"{runtime.config.num_workers} workers")
            runtime.compute_estimates = ComputeEstimates(prior, runtime.worker_index)
        self.mode = mode
        self.device = device or torch.device("cpu")
        self.last_result: Optional[DispatchResult] = None
        self.loss_scale: float = 1.0
        self.last_mine = torch.empty(0, dtype=torch.int64)
        self.last_shares: Optional[List[int]] = None  # samples per worker of the current batch
        # every worker's estimated link (bytes/s) the current batch was dispatched with (online_links)
        self.last_link_estimates: Optional[List[float]] = None
        # every worker's measured compute rate (samples/s) it was dispatched with (a dispatcher reading them)
        self.last_compute_estimates: Optional[List[float]] = None
        # dispatch_ahead: how long the consumer (the training thread) waited for the current
        # batch's dispatch, the part of the decision on its critical path (None: dispatched inline)
        self.last_wait_s: Optional[float] = None
        self._cost_model = None
        # online links: decisions so far, and how many decisions a batch's own PS exchange may lag
        # behind (dispatch_ahead's slots; None: decided in the training thread, which has
        # published every exchange before it)
        self._decisions = 0
        self._estimate_lag: Optional[int] = None
        self._dispatch_stop: Optional[Callable[[], bool]] = None

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _dispatcher(dispatcher: Union[str, Dispatcher], kwargs: Dict, objective: str) -> Dispatcher:
        """The dispatcher, optimising the config's objective (its one home)."""
        if "objective" in kwargs:
            raise EsdConfigError(
                "the dispatch objective comes from EsdConfig.objective; do not pass it to the dispatcher"
            )
        if isinstance(dispatcher, str):
            try:
                return make_dispatcher(dispatcher, objective=objective, **kwargs)
            except DispatchError as e:
                raise EsdConfigError(str(e)) from None
            except TypeError as e:  # an option the dispatcher does not have
                raise EsdConfigError(f"dispatcher {dispatcher!r}: {e}") from None
        if kwargs:
            raise EsdConfigError("dispatcher_kwargs are for a dispatcher given by name")
        theirs = getattr(dispatcher, "objective", objective)
        if theirs != objective:
            raise EsdConfigError(
                f"the dispatcher optimises objective {theirs!r} but EsdConfig.objective is {objective!r}: "
                "the objective has one home, the config; build the dispatcher with "
                "make_dispatcher(name, objective=config.objective) or pass its name to EsdInputDist"
            )
        return dispatcher

    @property
    def cost_model(self) -> CostModel:
        """The dispatcher's cost model, on the runtime's key space (one decode
        of a batch serves the cost model and the cache directory)."""
        if self._cost_model is None:
            rt = self.runtime
            self._cost_model = CostModel(
                rt.config, rt.tables, optimizer_state_bytes_per_row=rt.keyspace.formats[0].state_bytes,
                keyspace=rt.keyspace,
            )
        return self._cost_model

    def _decide(self, kjt: KeyedJaggedTensor, group, device: torch.device) -> tuple:
        rt = self.runtime
        b = kjt.stride()
        est = rt.link_estimates
        flush: List[int] = []
        if est is None:
            shares = rt.config.batch_shares(b)
            dense, idle = rt.dense_sync_seconds(), rt.dense_sync_seconds(idle=True)
        else:
            # every worker's measured links: the same publications (all-gathers the training
            # threads started after their PS exchanges) at the same decision on every worker, so
            # the same estimates (and the same shares) everywhere: decision j takes those of the
            # exchanges before j - lag (dispatch_ahead's lag), waiting for any not published yet
            upto = est.published if self._estimate_lag is None else max(0, self._decisions - self._estimate_lag)
            est.take(upto, rt.config.collective_timeout_s, self._dispatch_stop)
            # fixed per step whatever the share: the dense all-reduce on each link
            bps = est.bytes_per_second()
            dense, idle = rt.dense_sync_seconds(bps), rt.dense_sync_seconds(bps, idle=True)
            shares = est.shares(b, rt.config.compute_s_per_sample, extra_fixed_s=dense)
            # a link that just became much slower writes back its dirty rows at once
            if rt.config.flush_on_slowdown is not None:  # (EsdConfig: only without prefetch)
                flush = est.slowed_down(rt.config.flush_on_slowdown)
        self._decisions += 1
        compute = rt.compute_estimates
        if compute is not None:  # every worker's measured compute, gathered like the links
            compute.share(group, device)
        assignment = torch.empty(b, dtype=torch.int64)
        result = None
        if rt.worker_index == 0:
            if est is not None:
                self.cost_model.set_links(est.bytes_per_second())
            if compute is not None:
                # fixed per step: the measured compute and the dense all-reduce; a
                # worker without samples (idle) only receives the dense mean
                fixed = compute.fixed_s()
                self.dispatcher.set_rates(compute.samples_per_s(), [c + d for c, d in zip(fixed, dense)],
                                          [c + i for c, i in zip(fixed, idle)])
            # what this dispatcher reads: the additive matrix, LAIA's hit
            # counts, esd's de-duplicated model (nothing for cost-blind ones)
            result = self.dispatcher.decide(
                self.cost_model, kjt, rt.directory.cost_views, shares  # type: ignore[union-attr]
            )
            assignment.copy_(result.assignment)
        a = assignment.to(device)
        dist.broadcast(a, src=0, group=group)
        return a.cpu(), result, shares, flush

    def _gather_ids(self, batch: Batch, group) -> tuple:
        """All-gather the local batches' sparse features (and sizes)."""
        rt = self.runtime
        kjt = batch.sparse_features
        mine = {
            "keys": kjt.keys(),
            "lengths": kjt.lengths(),
            "values": kjt.values(),
            "weights": kjt.weights_or_none(),
            "stride": kjt.stride(),
        }
        every: List[Optional[dict]] = [None] * rt.config.num_workers
        dist.all_gather_object(every, mine, group=group)
        keys = every[0]["keys"]  # type: ignore[index]
        for r, e in enumerate(every):
            if e["keys"] != keys:  # type: ignore[index]
                raise EsdConfigError(
                    f"worker {r} passed features {e['keys']} but worker 0 passed {keys}"  # type: ignore[index]
                )
        strides = [e["stride"] for e in every]  # type: ignore[index]
        nk = len(keys)
        lengths = torch.cat([e["lengths"].view(nk, -1) for e in every], dim=1)  # type: ignore[index]
        # values are feature-major inside each worker's KJT: regroup per feature
        vals, wts = [], []
        for f in range(nk):
            for e in every:
                ln = e["lengths"].view(nk, -1).to(torch.int64)  # type: ignore[index]
                start = int(ln[:f].sum())
                n = int(ln[f].sum())
                vals.append(e["values"][start : start + n])  # type: ignore[index]
                if e["weights"] is not None:  # type: ignore[index]
                    wts.append(e["weights"][start : start + n])  # type: ignore[index]
        gkjt = KeyedJaggedTensor(
            keys=keys,
            values=torch.cat(vals),
            lengths=lengths.reshape(-1),
            weights=torch.cat(wts) if wts else None,
            stride=sum(strides),
        )
        return gkjt, strides

    # ------------------------------------------------------------ forward
    def loss(self, per_sample_losses: torch.Tensor) -> torch.Tensor:
        """This worker's part of the global batch's mean loss, ``sum * W / B``,
        from the per-sample losses (``reduction="none"``) of the batch the model
        just computed: the loss whose gradients are vanilla TorchRec's on the same
        global batch, at any shares.  Required under uneven shares (see
        :mod:`torchrec_esd.distributed.loss_scaling`); a wrong number of losses fails every rank."""
        if isinstance(per_sample_losses, torch.fx.Proxy):
            # TorchRec's train pipelines trace the model (torch.fx) to find its sharded
            # modules; nothing is computed, so there is no batch to check against
            return per_sample_losses.sum() * self.loss_scale
        try:
            return self.runtime.loss_scaling.scale(per_sample_losses)
        except EsdConfigError as e:
            self.runtime.fail(str(e))

    def forward(self, batch: Batch) -> Batch:
        self.runtime.require_sharded_module()
        require_dispatch_ahead(self.runtime, 0)
        group = self.runtime.worker_group
        try:
            d = self._dispatch(self._read(batch, group), group, self.device)
        except BadBatch as e:
            self._fail(e)
        return self._adopt(d)

    def _fail(self, e: BadBatch) -> None:
        """Stop the PS ranks and raise the batch's error (every worker sees the
        same global ids, so every worker gets here; called from the training
        thread, the only one that talks to the PS)."""
        self.runtime.abort(f"bad batch: {e.error}")
        raise e.error from None

    def dispatch_ahead(self, batches: Iterable[Batch], depth: int = 1) -> Iterator[Batch]:
        """This worker's batches of ``batches``, dispatched up to ``depth``
        batches ahead of the consumer in a background thread.

        Call it on every worker with the same sequence of batches (as
        :meth:`forward`) and train every batch it yields, in order.  The
        thread uses the runtime's dispatch group (gloo, CPU tensors), never
        the worker group the model's collectives run on.  Errors of the
        thread (a bad batch, a dispatcher failure) are raised here, at the
        batch they belong to; a bad batch also stops the PS ranks, as in
        :meth:`forward`.  After each yield, :attr:`last_result`,
        :attr:`last_mine`, :attr:`loss_scale`, :attr:`last_shares` and
        :attr:`last_link_estimates` describe the yielded batch, and
        :attr:`last_wait_s` says how long the consumer waited for it.
        """
        if int(depth) < 1:
            raise EsdConfigError(f"dispatch_ahead needs depth >= 1, got {depth}")
        rt = self.runtime
        rt.require_sharded_module()
        require_dispatch_ahead(rt, int(depth))
        cpu = torch.device("cpu")
        q: "queue.Queue[tuple]" = queue.Queue(maxsize=int(depth))
        # a batch is dispatched only once a slot is free: ``depth + 1`` slots
        # (decide, then wait for room), so when the consumer takes batch s,
        # batch s + depth + 1 may be decided: one batch of slack against a slow
        # decision, and the plan of batch s + 1 is there when the gradients of s
        # post its push/pull early (EsdConfig.early_pull) and when prefetch pulls
        # for it.  With online links and no prefetch, the
        # decision of batch j also waits for the publication of this worker's
        # exchange of step j - depth - 1, the step the consumer just took
        # (LinkEstimates.take, lag ``depth``): a link measured at step s steers
        # batch s + depth + 1, and the wait (about one push/pull) runs in the
        # dispatch thread while a whole step of slack remains.  (Measured on 4 x
        # 100 Mbit/s, benchmarks/results/s10_online_overhead.md: with ``depth``
        # slots and no wait, the plan missed the early pull at 3-8 of 30 steps,
        # each such push/pull then ran in the forward at 51-94 ms instead of
        # 32-44, and ESD with online links ran 9-16 % slower than without; in
        # session 9 a wait with ``depth`` slots left the consumer waiting 19 ms
        # per step, rate_change_v10_v11.md.)  With prefetch, lag ``depth + 1``:
        # the plans prefetch pulls for must not wait for an exchange.
        # The measured compute alone (a dispatcher reading rates, no online
        # links) keeps ``depth`` slots and no wait: its estimates, gathered one
        # dispatch late, then reach the decisions a step sooner (how the
        # per-batch shares were measured, session 8).
        links = rt.link_estimates is not None and not rt.config.prefetch_depth
        compute_only = rt.link_estimates is None and rt.compute_estimates is not None and not rt.config.prefetch_depth
        slots = threading.Semaphore(int(depth) + (0 if compute_only else 1))
        stop = threading.Event()
        self._estimate_lag = int(depth) + (0 if links else 1)
        self._dispatch_stop = stop.is_set

        def offer(item: tuple) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        window = rt.config.cache_lookahead if rt.directory.policy.reads_upcoming else 0  # type: ignore[union-attr]

        def produce() -> None:
            # batches are read (ids gathered, checked) ``window`` batches ahead of
            # the one dispatched, so that a policy reading the upcoming batches
            # sees them; a batch whose read failed ends the window before it
            ahead: "deque[ReadBatch]" = deque()
            source = iter(batches)
            try:
                while True:
                    while len(ahead) <= window and (not ahead or readable(ahead[-1])):
                        try:
                            batch = next(source, _END)
                        except BaseException as e:  # the loader's error, raised at its batch's turn
                            ahead.append(ReadBatch(None, failure=e))
                            break
                        if batch is _END:
                            break
                        ahead.append(self._read_safely(batch, rt.dispatch_group))
                    if stop.is_set():
                        return
                    if not ahead:
                        break
                    while not slots.acquire(timeout=0.05):
                        if stop.is_set():
                            return
                    current = ahead.popleft()
                    upcoming = [r.esd for r in ahead]
                    if ahead and not readable(ahead[-1]):
                        upcoming.pop()
                    d = self._dispatch(current, rt.dispatch_group, cpu, upcoming)
                    if not offer(("batch", d)):
                        return
                offer(("end", None))
            except BaseException as e:  # raised in the consumer, at its batch
                offer(("error", e))

        def produce_plans() -> None:
            try:
                produce()
            finally:  # a prefetch waiting for the next plan stops waiting
                rt.plans.producing(False)

        producer = threading.Thread(target=produce_plans, name="esd-dispatch-ahead", daemon=True)
        rt.plans.producing(True)
        producer.start()
        try:
            while True:
                t0 = time.perf_counter()
                kind, item = q.get()
                waited = time.perf_counter() - t0
                if kind == "end":
                    return
                if kind == "error":
                    if isinstance(item, BadBatch):
                        self._fail(item)
                    raise item
                slots.release()
                local = self._adopt(item)
                self.last_wait_s = waited
                yield local
        finally:
            stop.set()
            producer.join(timeout=1.0)
            self._estimate_lag, self._dispatch_stop = None, None
            self.last_wait_s = None

    def _adopt(self, d: DispatchedBatch) -> Batch:
        """Make ``d`` the current batch (the attributes describe it)."""
        self.last_result, self.last_mine, self.loss_scale = d.result, d.mine, d.loss_scale
        self.last_shares, self.last_link_estimates = d.shares, d.link_bytes_per_s
        self.last_compute_estimates = d.compute_samples_per_s
        return d.local

    def _read(self, batch: Batch, group) -> ReadBatch:
        """Gather the ids (local mode, a collective on ``group``) and check them."""
        rt = self.runtime
        rt.dispatched_batches += 1  # before any collective: the fault monitor's run-out check
        if self.mode == "global":
            gkjt, strides = batch.sparse_features, None
        else:
            gkjt, strides = self._gather_ids(batch, group)
        b = gkjt.stride()
        try:
            if b < 1:
                raise EsdConfigError("empty batch: a global batch of 0 samples (every batch needs samples to dispatch)")
            missing = [f for f in rt.esd_features if f not in gkjt.keys()]
            if missing:
                raise EsdIdError(f"batch has no feature(s) {missing} (read by the ESD tables); it has {gkjt.keys()}")
        except EsdConfigError as e:
            raise BadBatch(e) from e
        ekjt = rt.esd_view(gkjt)  # replicated tables' features are not dispatched on
        try:
            rt.directory.check_batch(ekjt)  # type: ignore[union-attr]
            rt.check_replicated_ids(gkjt)
        except EsdConfigError as e:
            return ReadBatch(batch, gkjt, strides, ekjt, bad=BadBatch(e))
        return ReadBatch(batch, gkjt, strides, ekjt)

    def _read_safely(self, batch: Batch, group) -> ReadBatch:
        try:
            return self._read(batch, group)
        except BaseException as e:  # raised when the batch's turn comes
            return ReadBatch(batch, failure=e)

    def _dispatch(
        self, read: ReadBatch, group, device: torch.device, upcoming: Sequence[KeyedJaggedTensor] = ()
    ) -> DispatchedBatch:
        """Decide, plan (queues the plan) and select this worker's samples;
        every collective runs on ``group``.  ``upcoming``: the next batches'
        ESD features, for an eviction policy that reads them."""
        if read.failure is not None:
            raise read.failure
        if read.bad is not None:
            raise read.bad
        rt = self.runtime
        me = rt.worker_index
        batch, gkjt, strides, ekjt = read.batch, read.global_kjt, read.strides, read.esd
        b = gkjt.stride()
        assignment, result, shares, flush = self._decide(ekjt, group, device)
        plan = plan_iteration(rt, ekjt, assignment, group, upcoming, flush=flush)
        bk = rt.keyspace.decode(ekjt)  # the directory's decode of this batch, not a second one
        plan.workers[me].fingerprint = batch_fingerprint(bk.keys[assignment[bk.sample] == me])
        if self.mode == "global":  # the PS checks that every worker was handed this batch
            kjt = batch.sparse_features
            plan.workers[me].global_fingerprint = global_batch_fingerprint(
                bk.keys, bk.lengths, batch.dense_features, batch.labels, kjt.weights_or_none()
            )
        plan.sample_counts = tuple(torch.bincount(assignment, minlength=rt.config.num_workers).tolist())
        rt.loss_scaling.dispatched(plan.iteration, b, shares)
        rt.enqueue(plan)
        mine = (assignment == me).nonzero().view(-1)  # global indices of this worker's samples
        if self.mode == "global":
            local = select_samples(batch, mine)
        else:
            local = Batch(
                dense_features=self._move_rows(batch.dense_features, assignment, strides, group, device),
                sparse_features=select_kjt_samples(gkjt, mine),
                labels=self._move_rows(batch.labels, assignment, strides, group, device),
            )
        est = rt.link_estimates
        links = est.bytes_per_second() if est is not None else None  # this thread updated them last
        compute = rt.compute_estimates.samples_per_s() if rt.compute_estimates is not None else None
        return DispatchedBatch(local, result, mine, rt.config.num_workers / b, shares, links, compute)

    def _move_rows(
        self, local: torch.Tensor, assignment: torch.Tensor, strides: List[int], group, device: torch.device
    ) -> torch.Tensor:
        """Uneven all-to-all of this worker's rows to their assigned workers
        (received in global sample order)."""
        rt = self.runtime
        me, W = rt.worker_index, rt.config.num_workers
        start = sum(strides[:me])
        mine = assignment[start : start + strides[me]]
        order = torch.argsort(mine, stable=True)
        send_counts = torch.bincount(mine, minlength=W).tolist()
        recv_counts = [
            int((assignment[sum(strides[:r]) : sum(strides[: r + 1])] == me).sum()) for r in range(W)
        ]
        send = local[order].contiguous().to(device)
        out = torch.empty((sum(recv_counts),) + tuple(local.shape[1:]), dtype=local.dtype, device=device)
        dist.all_to_all_single(out, send, recv_counts, send_counts, group=group)
        return out.to(local.device)
