"""benchmarks/pull_dependencies.py: what the slowest worker's pulls wait for."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import pull_dependencies as pd  # noqa: E402


def test_pulls_split_into_what_they_wait_for_and_the_untouched_ones_are_the_prefetch():
    args = pd.parse_args(["--iters", "8", "--warmup-skip", "2", "--batch", "128"])
    r = pd.run(args)  # raises where the untouched rows differ from prefetch_keys of depth 1
    rows = r["pull_rows_per_step"]
    assert r["worker"] == 3 and r["bandwidth_mbps"] == 10.0
    # with shared hot rows every kind occurs on the iid workload
    assert all(rows[k] > 0 for k in pd.CATEGORIES), rows
    m = r["model"]
    assert m["others_sum_s"] <= m["split_reply_s"] <= m["sequential_s"]
    assert m["sequential_s"] == pytest.approx(
        m["up_s"] + m["down_own_shared_s"] + m["down_others_updated_s"] + m["down_others_pushed_s"])


def test_classify_pulls_partitions_the_plan_and_refuses_gaps():
    args = pd.parse_args(["--iters", "5", "--warmup-skip", "1", "--batch", "64"])
    targs = pd.dtc.parse_args(["--iters", "5", "--batch", "64"])
    wl = pd.make_workload(pd.make_workload_config("iid", max_cardinality=targs.max_cardinality,
                                                  alpha=targs.alpha, seed=0))
    tables, config, cm, _ = pd.dtc.build(targs, wl, [1000.0, 100.0, 50.0, 10.0])
    directory = pd.CacheDirectory(config, tables)
    d = pd.dtc.make(args.dispatcher, targs)
    plans = []
    for step in range(4):
        kjt = wl.global_batch(step, 64).sparse_features
        cost, aux = d.inputs(cm, kjt, directory.views())
        plans.append(directory.plan(kjt, d.assign(cost, config.batch_shares(64), aux=aux).assignment))
    for w in range(4):
        parts = pd.classify_pulls(plans[1], plans[2], w)
        got = torch.sort(torch.cat([parts[k] for k in pd.CATEGORIES])).values
        assert torch.equal(got, torch.sort(plans[2].workers[w].pull_keys).values)
        # a worker never waits on its own upload for a row it did not use
        assert torch.isin(parts["own_shared"], plans[1].workers[w].used_keys).all()
    with pytest.raises(ValueError, match="not consecutive"):
        pd.classify_pulls(plans[0], plans[2], 3)
