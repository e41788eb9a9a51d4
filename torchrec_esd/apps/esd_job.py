"""The ESD job (``method="esd"``): ``W`` workers + ``P`` parameter servers.

Every global batch goes through :class:`~torchrec_esd.distributed.input_dist.EsdInputDist`
(dispatcher by name, optionally dispatching ahead in a background thread) and
the ESD sharder under ``DistributedModelParallel``; steps are driven by a plain
loop or by TorchRec's ``TrainPipelineSparseDist``.  The PS ranks serve the
tables until the workers are done.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Dict, List, Optional

import torch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingPlan

from torchrec_esd.apps.checkpointing import LaggedStepSum, Preemption, checkpointer, dense_optimizer
from torchrec_esd.apps.job import (
    EBC_PATH,
    DlrmTask,
    JobConfig,
    _dense_state,
    _Tracker,
    build_model,
    job_tables,
    materialize,
    max_rss_bytes,
    sparse_optimizer,
    table_init,
)
from torchrec_esd.apps.workload import SyntheticWorkload
from torchrec_esd.config import EsdConfigError
from torchrec_esd.distributed.dense_sync import dense_gradient_bytes, register_dense_sync
from torchrec_esd.distributed.input_dist import EsdInputDist
from torchrec_esd.distributed.runtime import EsdRuntime
from torchrec_esd.distributed.sharding import EsdEmbeddingBagCollectionSharder, esd_module_plan
from torchrec_esd.metrics import TransmissionMeter

logger = logging.getLogger(__name__)


def _steady_metrics(runtime: EsdRuntime, now: Dict, first_step: int, at_warm: Optional[Dict]) -> Optional[Dict]:
    """Every worker's transmission from step ``first_step`` on, up to ``now``
    (its counters before the end-of-training flush): ``now`` less its counters
    when step ``first_step - 1`` ended (all of it for ``first_step`` 0),
    gathered by :meth:`EsdRuntime.gather_metrics`.  ``None`` on every worker
    when one of them did not get that far (a job of fewer steps)."""
    mine = now if first_step == 0 else (None if at_warm is None else TransmissionMeter.difference(now, at_warm))
    return runtime.gather_metrics(mine)


def _esd(job: JobConfig, workload: SyntheticWorkload) -> Dict:
    if job.lazy_tables and job.checkpoint_dir:
        raise EsdConfigError(
            "JobConfig.lazy_tables with checkpoint_dir: a checkpoint of lazy tables would materialise every "
            "row (not supported; see docs/checkpoints.md)"
        )
    if job.steady_from_step is not None and job.steady_from_step < 0:
        raise EsdConfigError(f"JobConfig.steady_from_step must be >= 0, got {job.steady_from_step}")
    if job.plan is not None:
        job = replace(job, esd=job.plan.esd_config(), replicated=tuple(job.plan.replicated))
    if job.esd is None:
        raise EsdConfigError("method 'esd' needs JobConfig.esd or JobConfig.plan")
    cfg = job.esd
    all_tables = job_tables(job, workload)
    unknown = set(job.replicated) - {t.name for t in all_tables}
    if unknown:
        raise EsdConfigError(f"replicated tables {sorted(unknown)} are not tables of the model")
    tables = [t for t in all_tables if t.name not in job.replicated]
    replicated = [t for t in all_tables if t.name in job.replicated]
    rss0 = max_rss_bytes()
    runtime = EsdRuntime(cfg, tables, sparse_optimizer(job), replicated_tables=replicated)
    runtime.lazy_tables = job.lazy_tables
    # lazy tables: the collection stays on the meta device (nothing table-sized on any
    # rank); replicated tables are whole on every worker, so they are allocated
    dlrm = build_model(job, workload, materialize_tables=False)
    if job.lazy_tables and replicated:
        materialize(dlrm.sparse_arch.embedding_bag_collection, table_init(job, workload), [t.name for t in replicated])
    if runtime.is_ps:
        # a preemption (SIGTERM to every rank) is handled by the workers, which
        # checkpoint through this PS and then stop it
        preemption = Preemption().install() if job.checkpoint_dir else None
        server = runtime.serve(dlrm.sparse_arch.embedding_bag_collection,
                               init=table_init(job, workload) if job.lazy_tables else None)
        if preemption is not None:
            preemption.uninstall()
        if not job.lazy_tables:
            return {"role": "ps"}
        # what the lazy storage holds: memory O(rows touched)
        return {"role": "ps", "storage_bytes": server.storage.nbytes(),
                "touched_rows": int(server.storage.touched().numel()), "max_rss_growth": max_rss_bytes() - rss0}
    W = cfg.num_workers
    dispatch = EsdInputDist(runtime, job.dispatcher, mode=job.input_mode, dispatcher_kwargs=job.dispatcher_kwargs)
    model = DlrmTask(dlrm, esd_loss=dispatch.loss)
    ebc = dlrm.sparse_arch.embedding_bag_collection
    plan = (
        job.plan.sharding_plan(EBC_PATH)
        if job.plan is not None
        else ShardingPlan({EBC_PATH: esd_module_plan(ebc, runtime)})
    )
    dmp = DistributedModelParallel(
        model,
        env=runtime.sharding_env(),
        plan=plan,
        sharders=[EsdEmbeddingBagCollectionSharder(runtime)],
        device=torch.device("cpu"),
    )
    if job.dense_sync != "ring":
        def blocked(seconds: float) -> None:  # waiting for the others is not this worker's compute
            if runtime.compute_estimates is not None:
                runtime.compute_estimates.exclude(seconds)

        if not register_dense_sync(dmp, job.dense_sync, [w.bandwidth_mbps for w in cfg.workers], runtime.worker_group,
                                   on_blocked=blocked, senders=runtime.dense_senders):
            raise EsdConfigError(f"dense_sync={job.dense_sync!r}: the model has no DistributedDataParallel part")
    runtime.set_dense_sync(job.dense_sync, dense_gradient_bytes(dmp))
    dense_opt = dense_optimizer(dmp, job.dense_lr)
    ckpt = checkpointer(job, dmp, dense_opt, runtime.worker_group, tables + replicated, runtime.optimizer,
                        fail=runtime.fail)
    start = ckpt.resume() if ckpt is not None and job.resume else 0
    preemption = Preemption().install() if ckpt is not None else None
    me = runtime.worker_index
    track = _Tracker(job, runtime.worker_group, me, f"ESD {job.dispatcher}")
    decisions, t0 = [], time.perf_counter()
    samples_seen = torch.zeros(job.global_batch, dtype=torch.int64)
    # batches are read while step < limit[0]; a preemption lowers it (see below)
    limit = [job.steps]
    local_samples: List[int] = []  # this worker's samples per step (they vary with per-batch shares)
    link_mbps: List[List[float]] = []  # every worker's estimated link after each dispatch (online_links)
    compute_sps: List[List[float]] = []  # every worker's estimated compute rate per dispatch (measured shares)

    bad_input: List[str] = []

    def batches(lo: int, hi: int):
        step = lo
        while step < min(hi, limit[0]):
            try:
                if job.input_mode == "global":
                    batch = workload.global_batch(step, job.global_batch)
                else:
                    batch = workload.local_batch(step, job.global_batch, me, W)
            except EsdConfigError as e:
                # every worker reads the same global batch (a local batch is a
                # slice of it), so every worker fails here; _abort_on_bad_input
                # stops the PS ranks from the training thread (dispatch-ahead
                # reads batches in its own thread, which must not talk to the PS)
                bad_input.append(f"bad input batch at step {step}: {e}")
                raise
            yield batch
            step += 1

    def dispatched(lo: int, hi: int):
        nonlocal samples_seen
        if job.dispatch_ahead > 0:
            locals_ = dispatch.dispatch_ahead(batches(lo, hi), depth=job.dispatch_ahead)
        else:
            locals_ = (dispatch(batch) for batch in batches(lo, hi))
        for local in _abort_on_bad_input(locals_):
            samples_seen += torch.bincount(dispatch.last_mine, minlength=job.global_batch)
            local_samples.append(int(dispatch.last_mine.numel()))
            if dispatch.last_link_estimates is not None:
                link_mbps.append([b * 8 / 1e6 for b in dispatch.last_link_estimates])
            if dispatch.last_compute_estimates is not None:
                compute_sps.append(list(dispatch.last_compute_estimates))
            if dispatch.last_result is not None:
                res = dispatch.last_result
                # "ms": the solve; "inputs_ms": reading the batch and building the solver's inputs
                # "cpu_ms": the dispatch thread's CPU time over the whole decision (inputs +
                # solve), "runqueue_ms" its time runnable but waiting for a core (Linux), where
                # the dispatcher reports them (not on a plain-split verdict); "wait_ms": how long the
                # training thread waited for this batch's dispatch (dispatched ahead; NaN inline)
                wait = dispatch.last_wait_s
                decisions.append({"solver": res.solver, "ms": res.decision_s * 1e3,
                                  "inputs_ms": res.info.get("inputs_s", 0.0) * 1e3,
                                  "cpu_ms": res.info.get("full_decision_cpu_s", float("nan")) * 1e3,
                                  "runqueue_ms": res.info.get("full_decision_runqueue_s", float("nan")) * 1e3,
                                  "wait_ms": float("nan") if wait is None else wait * 1e3})
            yield local

    def _abort_on_bad_input(it):
        try:
            yield from it
        except EsdConfigError:
            if bad_input:
                runtime.abort(bad_input[0])
            raise

    stop = {"at": None}
    # batches a worker may have read ahead of the step it just finished
    # (dispatch-ahead queue + the one in hand, the pipeline's in-flight batches)
    read_ahead = job.dispatch_ahead + (4 if job.use_pipeline else 2)

    # the loss sum of a step is read one step later: no barrier of every worker per step
    sums = LaggedStepSum(preemption, runtime.worker_group)

    def settled(done) -> None:
        if done is None:
            return
        total, preempted, (logits, labels, meter, decision) = done
        track.step(total / job.global_batch, logits, labels, meter=meter, decision=decision)
        if preempted and stop["at"] is None:
            # every worker agrees at this step; the batches already read ahead
            # (and dispatched: the directory counts them) are still trained
            stop["at"] = start + track.steps_ended
            limit[0] = min(limit[0], stop["at"] + read_ahead)

    # this worker's transmission counters when the warm-up steps ended (JobConfig.steady_from_step)
    warm_meter: Dict = {}

    def record(loss, logits, labels):
        step = track.end_step()
        if job.steady_from_step is not None and step + 1 == job.steady_from_step:
            warm_meter["at"] = runtime.meter.as_dict()
        decision = decisions[step] if track.metrics is not None and step < len(decisions) else None
        meter = runtime.meter.as_dict() if track.metrics is not None else None
        settled(sums.push(loss / dispatch.loss_scale, (logits, labels, meter, decision)))

    def train(lo: int, hi: int) -> None:
        if job.use_pipeline:
            # TorchRec's pipeline runs the ESD module's (local) input_dist of the
            # next batch ahead; dispatch plans are queued in order, the PS phases
            # run in compute and backward, so the pipelined result is the same.
            pipe = TrainPipelineSparseDist(dmp, dense_opt, torch.device("cpu"), execute_all_batches=True)
            it = dispatched(lo, hi)
            while True:
                try:
                    loss, logits, labels = pipe.progress(it)  # the model output's second element
                except StopIteration:
                    return
                record(loss, logits, labels)
        else:
            for local in dispatched(lo, hi):
                dense_opt.zero_grad()
                loss, (_, logits, labels) = dmp(local)
                if cfg.check_finite and not bool(torch.isfinite(loss.detach()).all()):
                    raise EsdConfigError(
                        f"check_finite: non-finite loss {float(loss.detach())} at step {start + track.steps_ended + 1} "
                        f"on worker {me}; the job stops before its gradients reach the parameter servers"
                    )
                loss.backward()
                dense_opt.step()
                record(loss, logits, labels)

    step = start
    while step < limit[0]:
        # a segment ends at a checkpoint: nothing is dispatched ahead across it
        hi = min(job.steps, (step // job.checkpoint_every + 1) * job.checkpoint_every) \
            if ckpt is not None and job.checkpoint_every > 0 else job.steps
        train(step, hi)
        settled(sums.settle())  # the segment's last step
        step = start + len(track.losses)
        if stop["at"] is not None:
            limit[0] = step  # everything read was trained: stop here
        if ckpt is not None and (ckpt.due(step) or step >= limit[0]):
            ckpt.save(step)
    if preemption is not None:
        preemption.uninstall()
    elapsed = time.perf_counter() - t0
    runtime.end_of_batches()
    logger.info("ESD %s: %d steps in %.1f s", job.dispatcher, len(track.losses), elapsed)
    # the training steps' traffic alone: the flush then writes back every dirty cached row once
    # (the same for any dispatch), which "metrics" counts too
    before_flush = runtime.all_metrics()
    steady = None
    if job.steady_from_step is not None:
        steady = _steady_metrics(runtime, before_flush["per_worker"][me], job.steady_from_step, warm_meter.get("at"))
    runtime.flush()
    track.write_metrics()
    out = {
        "losses": track.losses,
        "step_end_s": track.step_end_s,
        "step_end_cpu_s": track.step_end_cpu_s,
        "auc": track.auc(),
        "dense": _dense_state(dmp),
        "elapsed_s": elapsed,
        "metrics": runtime.all_metrics(),
        "metrics_before_flush": before_flush,
        "metrics_steady": steady,
        "decisions": decisions,
        "samples_seen": samples_seen,
        "start_step": start,
        "preempted_at": step if stop["at"] is not None else None,
        "local_samples": local_samples,
        "link_estimates_mbps": link_mbps,
        "compute_estimates_sps": compute_sps,
        "link_observations": list(runtime.link_estimates.history) if runtime.link_estimates is not None else [],
    }
    out["directory_bytes"] = runtime.directory.nbytes()
    if job.collect_rows:
        # the rows of the ids the job's batches used (nothing else is read: lazy tables)
        used = [workload.global_batch(s, job.global_batch).sparse_features for s in range(start, step)]
        ids = {t.name: torch.unique(torch.cat([kjt[f].values() for kjt in used for f in t.feature_names]))
               for t in tables}
        out["touched_tables"] = {name: (i, runtime.pull_rows(name, i)) for name, i in ids.items()}
    if job.collect_tables:
        out["tables"], out["tables_state"] = runtime.gather_tables()
        out["tables"].update(runtime.replica_tables())
    out["max_rss_growth"] = max_rss_bytes() - rss0
    runtime.shutdown(flush=False)
    return out
