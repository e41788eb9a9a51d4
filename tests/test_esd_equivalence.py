"""ESD with staleness 0 trains the same model as vanilla TorchRec DMP.

Each test launches real gloo worlds on localhost: vanilla TorchRec
``DistributedModelParallel`` (table-wise, fused optimizer) on W ranks, and ESD
on W workers + 1 parameter server, on the same global batches.
"""

import pytest
import torch

from torchrec_esd.config import EsdConfig, WorkerSpec
from torchrec_esd.apps.launch import RankFailed, run_local_world
from torchrec_esd.apps.trainer import JobConfig, run
from torchrec_esd.apps.workload import SyntheticWorkloadConfig

from equivalence import assert_same_model  # noqa: E402  (tests/ is on sys.path under pytest)

STEPS = 20
BATCH = 48
WORKLOAD = SyntheticWorkloadConfig(num_sparse=4, cardinalities=[60, 150, 400, 25], bag_size=(1, 4), alpha=1.1, seed=3)
CACHE = {"t_cat_0": 12, "t_cat_1": 30, "t_cat_2": 40, "t_cat_3": 6}


def _compare(W, shares, dispatcher, optimizer, mode, bandwidths, num_ps=1, workload=WORKLOAD, cache=CACHE,
             des_misses=False, pooling="sum", esd_options=None, esd_runner=None, **esd_kwargs):
    common = dict(steps=STEPS, global_batch=BATCH, workload=workload, collect_tables=True,
                  sparse_optimizer=optimizer, sparse_lr=0.1, dense_lr=0.1, pooling=pooling)
    vanilla = run_local_world(run, W, JobConfig(method="vanilla", **common))
    cfg = EsdConfig([WorkerSpec(cache, bw, share=s) for bw, s in zip(bandwidths, shares)], num_ps=num_ps,
                    des_misses=des_misses, **(esd_options or {}))
    esd = run_local_world(
        esd_runner or run, W + num_ps,
        JobConfig(method="esd", esd=cfg, dispatcher=dispatcher, input_mode=mode, **esd_kwargs, **common)
    )
    v, e = vanilla[0], esd[0]
    assert all(esd[W + p] == {"role": "ps"} for p in range(num_ps))
    # same losses per step (the loss is the global-batch mean on both sides), same final
    # tables (after the flush, from the PS) and dense weights; the same dense weights everywhere
    assert_same_model(v, esd, W)
    # conservation: every sample of every step trained exactly once
    seen = sum(esd[r]["samples_seen"] for r in range(W))
    assert torch.equal(seen, torch.full((BATCH,), STEPS, dtype=torch.int64))
    # training actually moved rows over the links, and the ESD caches worked
    m = e["metrics"]
    assert m["rows"]["miss_pull"] > 0 and m["total_bytes"] > 0
    assert all(w["iterations"] == STEPS for w in m["per_worker"])
    if "metrics_before_flush" in e:  # the end-of-training flush adds its written-back rows alone
        b = e["metrics_before_flush"]
        assert all(b["rows"][k] == m["rows"][k] for k in m["rows"] if k != "update_push")
        assert b["rows"]["update_push"] <= m["rows"]["update_push"] and b["total_link_s"] <= m["total_link_s"]
    return vanilla, esd


def test_equivalence_two_workers_two_ps_sgd_local_batches():
    # tables split row-wise over 2 parameter servers
    _compare(2, [1, 1], "heuristic", "sgd", "local", [1.0, 8.0], num_ps=2)


def test_equivalence_four_workers_rowwise_adagrad_uneven_shares_train_pipeline_star_dense_sync():
    # driven by TorchRec's TrainPipelineSparseDist (input_dist run ahead); the
    # dense gradients are all-reduced through the fastest worker (worker 3)
    _, esd = _compare(
        4, [1, 2, 2, 3], "random", "rowwise_adagrad", "global", [1.0, 2.0, 4.0, 8.0], use_pipeline=True,
        dense_sync="star",
    )
    states = esd[0]["tables_state"]
    assert all(s.shape[1] == 1 and float(s.max()) > 0 for s in states.values())


def test_equivalence_workers_plan_from_worker_0s_summaries():
    # the summary path (the default from 16 workers on), forced at 3 workers
    _compare(3, [1, 1, 2], "hybrid", "rowwise_adagrad", "local", [1.0, 4.0, 8.0], dispatch_ahead=1,
             esd_options=dict(plan_from_summaries=True))


def test_equivalence_hybrid_plain_split_on_links_too_fast_to_be_worth_a_decision():
    # links so fast that HybridDis's stake rule takes vanilla's plain split on most
    # batches (and decides in full on every 4th): the same model either way
    _, esd = _compare(2, [1, 1], "hybrid", "rowwise_adagrad", "global", [1e9, 1e9], dispatch_ahead=1,
                      dispatcher_kwargs=dict(probe_every=4))
    solvers = [d["solver"] for d in esd[0]["decisions"]]
    assert len(solvers) == STEPS and solvers.count("hybrid:split") == STEPS - STEPS // 4, solvers
    assert all(s != "hybrid:split" for s in solvers[::4]), solvers


# ---------------------------------------------------------------- dispatch ahead
def test_equivalence_dispatch_ahead_local_batches_two_ps():
    # the dispatch thread all-gathers the ids and moves dense rows and labels
    # on the dispatch group while the model trains on the worker group
    _, esd = _compare(2, [1, 1], "hybrid", "sgd", "local", [1.0, 8.0], num_ps=2, dispatch_ahead=2)
    assert len(esd[0]["step_end_s"]) == STEPS


def test_equivalence_dispatch_ahead_train_pipeline_same_decisions():
    # TorchRec's pipeline on top of a dispatch-ahead iterator: the same
    # assignments as dispatching batch by batch (the decision depends only on
    # the directory, not on when it runs), and the vanilla model
    args = (4, [1, 2, 2, 3], "heuristic", "rowwise_adagrad", "global", [1.0, 2.0, 4.0, 8.0])
    _, ahead = _compare(*args, use_pipeline=True, dispatch_ahead=1)
    _, inline = _compare(*args)
    for r in range(4):
        assert torch.equal(ahead[r]["samples_seen"], inline[r]["samples_seen"])
    assert ahead[0]["metrics"]["rows"] == inline[0]["metrics"]["rows"]


def test_equivalence_lookahead_eviction_dispatch_ahead_local_batches():
    # the dispatch thread reads (all-gathers) 3 batches beyond the one it
    # dispatches and the directory evicts by their next use: still vanilla's model
    _compare(2, [1, 2], "heuristic", "rowwise_adagrad", "local", [1.0, 8.0], dispatch_ahead=2,
             esd_options=dict(cache_policy="lookahead", cache_lookahead=3))


def _run_with_a_slowdown_every_other_dispatch(job):
    """``run`` where every other dispatch reports one worker's link (in turn)
    as slowed down (``LinkEstimates.slowed_down``; the same on every worker:
    every worker calls it once per dispatch), so that worker writes back its
    dirty rows (``EsdConfig.flush_on_slowdown``)."""
    from torchrec_esd.distributed.link_estimates import LinkEstimates

    calls = [0]

    def slowed_down(self, factor):
        calls[0] += 1
        return [calls[0] // 2 % len(self.links)] if calls[0] % 2 == 0 else []

    LinkEstimates.slowed_down = slowed_down
    return run(job)


@pytest.mark.parametrize("flush", [False, True])
def test_equivalence_online_links_shares_follow_the_measured_links(flush):
    # the shares come from the links measured on the PS exchanges, gathered on every
    # worker (they change from step to step): the loss scaling keeps vanilla's model;
    # and with a worker writing back its dirty rows every other iteration
    # (EsdConfig.flush_on_slowdown after a slowdown) still vanilla's model
    _, esd = _compare(3, [1, 1, 1], "esd", "rowwise_adagrad", "global", [1.0, 8.0, 8.0], dispatch_ahead=1,
                      esd_options=dict(online_links=True, compute_s_per_sample=1e-4,
                                       flush_on_slowdown=2.0 if flush else None),
                      esd_runner=_run_with_a_slowdown_every_other_dispatch if flush else None)
    flushed = esd[0]["metrics"]["flushed_rows"]
    assert (flushed > 0) if flush else (flushed == 0), flushed
    # timed replies posted early (EsdConfig.early_pull), timed off the training thread (ReplyClock)
    assert esd[0]["metrics"]["early_pulls"] > 0, esd[0]["metrics"]["early_pulls"]
    # these replies are small: every other one came padded to a measurable size (PushPullFrame.probe)
    assert esd[0]["metrics"]["probe_bytes"] > 0, esd[0]["metrics"]["probe_bytes"]
    est = [esd[r]["link_estimates_mbps"] for r in range(3)]
    assert est[0] == est[1] == est[2] and len(est[0]) == STEPS
    counts = [esd[r]["local_samples"] for r in range(3)]
    assert all(sum(c[s] for c in counts) == BATCH for s in range(STEPS))
    assert len({tuple(c[s] for c in counts) for s in range(STEPS)}) > 1  # the shares moved


# ---------------------------------------------------------------- prefetch
@pytest.mark.parametrize("depth,optimizer,dispatcher,mode,num_ps", [
    (1, "sgd", "hybrid", "global", 2),
    (2, "rowwise_adagrad", "heuristic", "local", 1),
])
def test_equivalence_prefetch(depth, optimizer, dispatcher, mode, num_ps):
    # the rows of the next `depth` batches that nothing changes first are pulled while
    # the current batch computes (a PREFETCH phase between its push/pull and gradients)
    _, esd = _compare(3, [1, 1, 2], dispatcher, optimizer, mode, [1.0, 4.0, 8.0], num_ps=num_ps,
                      dispatch_ahead=depth, esd_options=dict(prefetch_depth=depth))
    m = esd[0]["metrics"]
    pulled = m["rows"]["miss_pull"] + m["rows"]["update_pull"]
    assert 0 < m["prefetched_rows"] < pulled, (m["prefetched_rows"], pulled)
    # and the push/pulls went right after the previous gradients (EsdConfig.early_pull, on by default)
    assert 0 < m["early_pulls"] < STEPS * 3, m["early_pulls"]


@pytest.mark.parametrize("early_pull,split_reply", [(True, True), (True, False), (False, True)])
def test_equivalence_early_pull(early_pull, split_reply):
    # batch i+1's push/pull is posted right after batch i's gradients (its plan dispatched
    # ahead), so its reply comes down during i's dense all-reduce and optimizer step; with
    # split replies it goes between the gradients' keys and values, and the PS answers in parts
    _, esd = _compare(3, [1, 2, 1], "esd", "rowwise_adagrad", "global", [1.0, 4.0, 8.0], num_ps=2,
                      dispatch_ahead=1, dense_sync="star",
                      esd_options=dict(early_pull=early_pull, split_reply=split_reply))
    posted, split = esd[0]["metrics"]["early_pulls"], esd[0]["metrics"]["split_replies"]
    if early_pull:  # every push/pull but the first is posted early, as far as the dispatch thread kept ahead
        assert 0 < posted <= 3 * (STEPS - 1), posted
    else:
        assert posted == 0
    # (a worker splits where its values take at least ps_sync.SPLIT_MIN_S on its link)
    assert (0 < split <= posted) if split_reply and early_pull else (split == 0), (split, posted)


@pytest.mark.parametrize("split_sums", [True, False], ids=["sums", "rows"])
def test_split_replies_leave_the_same_bits_as_whole_gradient_phases(split_sums):
    # the PS sums each row's gradients in one order (fastest configured link first) whatever
    # order the split values arrive in, and the slowest worker, summed last, makes its rows from
    # the others' gradient sums with the PS's own operations (split_sums): the tables, optimizer
    # states and losses are bit for bit those of whole phases
    common = dict(steps=STEPS, global_batch=BATCH, workload=WORKLOAD, collect_tables=True,
                  sparse_optimizer="rowwise_adagrad", sparse_lr=0.1, dense_lr=0.1)
    runs = []
    for split in (True, False):
        cfg = EsdConfig([WorkerSpec(CACHE, bw) for bw in (1.0, 4.0, 8.0)], num_ps=2, split_reply=split,
                        split_sums=split_sums)
        runs.append(run_local_world(run, 5, JobConfig(method="esd", esd=cfg, dispatcher="esd", input_mode="global",
                                                      dispatch_ahead=1, **common)))
    a, b = runs[0][0], runs[1][0]
    assert a["metrics"]["split_replies"] > 0 and b["metrics"]["split_replies"] == 0
    # worker 0 (1 Mbit/s) is summed last: it alone takes sums, on every split exchange of its
    per = a["metrics"]["per_worker"]
    assert [w["sum_replies"] for w in per[1:]] == [0, 0] and b["metrics"]["sum_replies"] == 0, per
    assert per[0]["sum_replies"] == (per[0]["split_replies"] if split_sums else 0) and per[0]["split_replies"] > 0
    for name in b["tables"]:
        assert torch.equal(a["tables"][name], b["tables"][name]), name
        assert torch.equal(a["tables_state"][name], b["tables_state"][name]), name
    assert a["losses"] == b["losses"]


@pytest.mark.parametrize("dispatch_ahead", [0, 1])
def test_prefetch_without_dispatch_ahead_deep_enough_fails_every_rank(dispatch_ahead):
    # batch by batch (or one ahead for depth 2), no later plan is known while a batch trains
    cfg = EsdConfig([WorkerSpec(CACHE, 1.0), WorkerSpec(CACHE, 2.0)], prefetch_depth=2, collective_timeout_s=60)
    job = JobConfig(method="esd", esd=cfg, steps=2, global_batch=8, workload=WORKLOAD, dispatch_ahead=dispatch_ahead)
    with pytest.raises(RankFailed) as info:
        run_local_world(run, 3, job, timeout_s=120)
    assert sorted(info.value.errors) == [0, 1, 2]
    assert all("prefetch_depth=2" in e["error"] for e in info.value.errors.values()), info.value.errors


# ---------------------------------------------------------------- DES-served misses
# multi-hot bags of 6-16 ids over small caches: most bags hold several cold rows,
# which the PS serves as pooled partial sums (and hot rows are still pulled/cached)
MULTI_HOT = SyntheticWorkloadConfig(num_sparse=4, cardinalities=[300, 800, 2000, 120], bag_size=(6, 16),
                                    alpha=1.1, seed=5)
MULTI_HOT_CACHE = {"t_cat_0": 30, "t_cat_1": 60, "t_cat_2": 80, "t_cat_3": 20}


def _des_used(esd, W):
    m = esd[0]["metrics"]
    assert m["rows"]["des_pull"] > 0 and m["rows"]["des_push"] > 0, m["rows"]
    assert m["rows"]["miss_pull"] > 0  # rows used by several bags are still pulled and cached
    assert all(esd[r]["metrics"] == m for r in range(W))


def test_equivalence_des_misses_two_workers_two_ps_sgd():
    _, esd = _compare(2, [1, 1], "hybrid", "sgd", "local", [1.0, 8.0], num_ps=2, workload=MULTI_HOT,
                      cache=MULTI_HOT_CACHE, des_misses=True)
    _des_used(esd, 2)


def test_equivalence_des_misses_four_workers_rowwise_adagrad_train_pipeline_dispatch_ahead():
    _, esd = _compare(4, [1, 2, 2, 3], "random", "rowwise_adagrad", "global", [1.0, 2.0, 4.0, 8.0],
                      workload=MULTI_HOT, cache=MULTI_HOT_CACHE, des_misses=True, use_pipeline=True,
                      dispatch_ahead=1)
    _des_used(esd, 4)


@pytest.mark.parametrize("des_misses", [False, True], ids=["row-pull", "des-misses"])
def test_equivalence_mean_pooling(des_misses):
    # MEAN bags: TorchRec/FBGEMM divide by the bag length; with DES misses the
    # worker adds the PS's partial sums first and then divides
    _, esd = _compare(2, [1, 1], "hybrid", "sgd", "global", [1.0, 8.0], workload=MULTI_HOT,
                      cache=MULTI_HOT_CACHE, des_misses=des_misses, pooling="mean")
    if des_misses:
        _des_used(esd, 2)


# ---------------------------------------------------------------- bad input
def _bad_id_job(job):
    """Training whose third global batch has an id outside its table."""
    import torchrec_esd.apps.workload as wlmod

    orig = wlmod.SyntheticWorkload.global_batch

    def global_batch(self, step, batch_size):
        b = orig(self, step, batch_size)
        if step == 2:
            b.sparse_features.values()[0] = 10_000
        return b

    wlmod.SyntheticWorkload.global_batch = global_batch
    return run(job)


@pytest.mark.parametrize("dispatch_ahead,policy,prefetch", [(0, "lru", 0), (2, "lru", 0), (2, "lookahead", 0),
                                                             (2, "lru", 2)],
                         ids=["inline", "dispatch-ahead", "dispatch-ahead-lookahead", "dispatch-ahead-prefetch"])
def test_out_of_range_id_fails_every_rank_without_hanging(dispatch_ahead, policy, prefetch):
    # with dispatch-ahead the bad batch is found in the dispatch thread, two steps
    # ahead of training (with the lookahead policy, when it enters the window of
    # upcoming batches, which ends before it); the training thread stops the PS
    # ranks at that batch (with prefetch, while a prefetch of the batches before it is posted)
    cfg = EsdConfig([WorkerSpec(CACHE, 1.0), WorkerSpec(CACHE, 2.0)], collective_timeout_s=60,
                    cache_policy=policy, cache_lookahead=3, prefetch_depth=prefetch)
    job = JobConfig(method="esd", esd=cfg, steps=5, global_batch=8, workload=WORKLOAD,
                    dispatcher="hybrid" if dispatch_ahead else "random", dispatch_ahead=dispatch_ahead)
    with pytest.raises(RankFailed) as info:
        run_local_world(_bad_id_job, 3, job, timeout_s=120)
    errors = info.value.errors
    assert sorted(errors) == [0, 1, 2]
    for r in (0, 1):
        assert "id 10000 is outside table 't_cat_0'" in errors[r]["error"]
    assert "aborted by the workers" in errors[2]["error"] and "id 10000" in errors[2]["error"]


def _stop_early_job(job):
    """Train 2 batches of a dispatch-ahead iterator of 4, then flush."""
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingPlan

    from torchrec_esd.config import EsdConfigError
    from torchrec_esd.dispatch import make_dispatcher
    from torchrec_esd.distributed.input_dist import EsdInputDist
    from torchrec_esd.distributed.runtime import EsdRuntime
    from torchrec_esd.distributed.sharding import EsdEmbeddingBagCollectionSharder, esd_module_plan
    from torchrec_esd.apps.trainer import EBC_PATH, DlrmTask, build_model, job_tables, sparse_optimizer
    from torchrec_esd.apps.workload import SyntheticWorkload

    wl = SyntheticWorkload(job.workload)
    rt = EsdRuntime(job.esd, job_tables(job, wl), sparse_optimizer(job))
    dlrm = build_model(job, wl)
    if rt.is_ps:
        rt.serve(dlrm.sparse_arch.embedding_bag_collection)
        return {"role": "ps"}
    ebc = dlrm.sparse_arch.embedding_bag_collection
    dmp = DistributedModelParallel(
        DlrmTask(dlrm, loss_scale=2 / job.global_batch), env=rt.sharding_env(),
        plan=ShardingPlan({EBC_PATH: esd_module_plan(ebc, rt)}),
        sharders=[EsdEmbeddingBagCollectionSharder(rt)], device=torch.device("cpu"),
    )
    ahead = EsdInputDist(rt, make_dispatcher("random")).dispatch_ahead(
        (wl.global_batch(step, job.global_batch) for step in range(4)), depth=2
    )
    for _ in range(2):
        loss, _ = dmp(next(ahead))
        loss.backward()
    ahead.close()  # the thread had dispatched batch 2 (and maybe 3) already
    try:
        rt.flush()
    except EsdConfigError as e:
        rt.shutdown(flush=False)
        return {"error": str(e)}
    rt.shutdown(flush=False)
    return {"error": None}


def test_flush_refuses_batches_dispatched_but_never_trained():
    # the directory already counts the updates of dispatched batches: a flush
    # then would push rows the worker never computed (lost / wrong updates)
    cfg = EsdConfig([WorkerSpec(CACHE, 1.0), WorkerSpec(CACHE, 2.0)], collective_timeout_s=60)
    job = JobConfig(method="esd", esd=cfg, steps=4, global_batch=8, workload=WORKLOAD)
    out = run_local_world(_stop_early_job, 3, job, timeout_s=120)
    assert out[2] == {"role": "ps"}
    for r in (0, 1):
        assert out[r]["error"] is not None and "were never trained" in out[r]["error"], out[r]


def _mismatched_config_job(job):
    import dataclasses

    import torch.distributed as dist

    if dist.get_rank() == 1:  # this worker believes in a bigger cache
        w = list(job.esd.workers)
        w[1] = WorkerSpec({k: v + 1 for k, v in CACHE.items()}, 2.0)
        job = dataclasses.replace(job, esd=dataclasses.replace(job.esd, workers=w))
    return run(job)


def test_mismatched_configs_fail_every_rank():
    cfg = EsdConfig([WorkerSpec(CACHE, 1.0), WorkerSpec(CACHE, 2.0)], collective_timeout_s=60)
    job = JobConfig(method="esd", esd=cfg, steps=2, global_batch=8, workload=WORKLOAD)
    with pytest.raises(RankFailed) as info:
        run_local_world(_mismatched_config_job, 3, job, timeout_s=120)
    assert sorted(info.value.errors) == [0, 1, 2]
    assert all("mismatched configs" in e["error"] for e in info.value.errors.values())


def test_world_size_must_match_topology():
    cfg = EsdConfig([WorkerSpec(CACHE, 1.0), WorkerSpec(CACHE, 2.0)], num_ps=2, collective_timeout_s=60)
    job = JobConfig(method="esd", esd=cfg, steps=1, global_batch=8, workload=WORKLOAD)
    with pytest.raises(RankFailed) as info:
        run_local_world(run, 3, job, timeout_s=120)
    assert sorted(info.value.errors) == [0, 1, 2]
    assert all("2 workers + 2 parameter servers = 4 ranks" in e["error"] for e in info.value.errors.values())


def test_cache_larger_than_table_fails_every_rank():
    too_big = dict(CACHE, t_cat_3=26)  # t_cat_3 has 25 rows
    cfg = EsdConfig([WorkerSpec(CACHE, 1.0), WorkerSpec(too_big, 2.0)], collective_timeout_s=60)
    job = JobConfig(method="esd", esd=cfg, steps=1, global_batch=8, workload=WORKLOAD)
    with pytest.raises(RankFailed) as info:
        run_local_world(run, 3, job, timeout_s=120)
    assert sorted(info.value.errors) == [0, 1, 2]
    assert all(
        "cache capacity 26 rows for table 't_cat_3' exceeds the table's 25 rows" in e["error"]
        for e in info.value.errors.values()
    )


# ---------------------------------------------------------------- per-batch shares
def test_equivalence_per_batch_shares():
    # shares decided per batch from compute rates and predicted link times (dispatch.shares):
    # local batches change size from step to step, the model must not
    rates = [400.0, 4000.0, 20000.0]
    _, esd = _compare(3, [1, 1, 1], "shares", "rowwise_adagrad", "global", [1.0, 4.0, 8.0],
                      dispatcher_kwargs={"inner": "esd", "samples_per_s": rates})
    sizes = [esd[r]["local_samples"] for r in range(3)]
    assert all(sum(s[t] for s in sizes) == BATCH for t in range(STEPS))
    assert len({tuple(s[t] for s in sizes) for t in range(STEPS)}) > 1, "the shares never changed"
    assert any(s[t] != BATCH // 3 for s in sizes for t in range(STEPS))


def test_equivalence_per_batch_shares_leave_a_slow_worker_idle():
    # worker 0 computes 400x slower than the others (configured rates): the per-batch shares
    # give it no sample from the second batch on; it then sends no dense gradients through
    # the star (it only receives their mean) and still trains the same model as vanilla
    rates = [50.0, 20000.0, 20000.0]
    _, esd = _compare(3, [1, 1, 1], "shares", "rowwise_adagrad", "global", [1.0, 4.0, 8.0], dense_sync="star",
                      dispatch_ahead=1, dispatcher_kwargs={"inner": "esd", "samples_per_s": rates,
                                                           "measured_compute": False})
    sizes = [esd[r]["local_samples"] for r in range(3)]
    assert all(sum(s[t] for s in sizes) == BATCH for t in range(STEPS))
    assert sizes[0][0] == BATCH // 3 and all(n == 0 for n in sizes[0][1:]), sizes[0]


def test_equivalence_grouped_dispatch_from_per_group_inputs():
    # worker 0 decides through GroupedDispatcher.decide (a [B, G] stage 1, then inputs
    # built per group: one worker per group here), inside the real runtime
    _, esd = _compare(3, [1, 1, 2], "grouped", "sgd", "global", [1.0, 4.0, 8.0],
                      dispatcher_kwargs={"group_size": 1})
    assert {d["solver"] for d in esd[0]["decisions"]} == {"grouped"}


@pytest.mark.parametrize("early_pull,num_ps,mode", [(True, 2, "global"), (False, 1, "local")])
def test_equivalence_pre_push(early_pull, num_ps, mode):
    # EsdConfig.pre_push: right after each push/pull, the dirty rows the next batch's push/pull
    # would push (and this batch does not use) go to the PS (a PRE_PUSH phase before the gradients),
    # and that push/pull leaves them out: still vanilla's model, the same rows per kind
    args = (3, [1, 2, 3], "esd", "rowwise_adagrad", mode, [1.0, 4.0, 8.0])
    kw = dict(num_ps=num_ps, dispatch_ahead=2, dense_sync="star")
    _, pre = _compare(*args, esd_options=dict(pre_push=True, early_pull=early_pull), **kw)
    _, plain = _compare(*args, esd_options=dict(early_pull=early_pull), **kw)
    m, p = pre[0]["metrics"], plain[0]["metrics"]
    sent_early = sum(w["pre_pushed_rows"] for w in m["per_worker"])
    pushed = m["rows"]["update_push"] + m["rows"]["miss_push"]
    assert 0 < sent_early < pushed, (sent_early, pushed)
    assert p["pre_pushed_rows"] == 0
    # the same decisions and plans with and without: only when the pushes leave differs
    for r in range(3):
        assert torch.equal(pre[r]["samples_seen"], plain[r]["samples_seen"])
    assert m["rows"] == p["rows"]
