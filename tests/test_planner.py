import pytest
import torch
from torchrec.distributed.planner.types import ParameterConstraints

from torchrec_esd.config import EsdConfigError
from torchrec_esd.apps.launch import run_local_world
from torchrec_esd.distributed.planner import (
    DIRECTORY_BYTES_PER_ROW,
    EsdPlan,
    EsdShardingPlanner,
    PsResources,
    WorkerResources,
)
from torchrec_esd.apps.trainer import JobConfig, run
from torchrec_esd.apps.workload import SyntheticWorkload, SyntheticWorkloadConfig

MiB = 2**20


def _setup(workers=None, ps=None, sample=True, **kw):
    wl = SyntheticWorkload(SyntheticWorkloadConfig(max_cardinality=5000, alpha=1.1, seed=4))
    tables = wl.table_configs(8)
    workers = workers or [
        WorkerResources(4 * MiB, 1000),
        WorkerResources(3 * MiB // 2, 100),
        WorkerResources(2 * MiB, 10, samples_per_s=4000),
    ]
    ps = ps or [PsResources(64 * MiB), PsResources(64 * MiB)]
    smp = [wl.global_batch(s, 256).sparse_features for s in range(4)] if sample else None
    return wl, tables, EsdShardingPlanner(workers, ps, tables, sample=smp, global_batch_size=256, **kw)


def test_plan_respects_budgets_and_is_sane():
    wl, tables, planner = _setup()
    plan = planner.plan()
    rows = {t.name: t.num_embeddings for t in tables}
    row_bytes = (8 + 1) * 4
    for w in plan.workers:
        assert w["memory_used_bytes"] <= w["memory_budget_bytes"]
        rep = sum(rows[n] for n in plan.replicated) * row_bytes
        directory = DIRECTORY_BYTES_PER_ROW * sum(rows[n] for n in plan.esd_tables)
        assert w["memory_used_bytes"] == rep + directory + sum(w["cache_rows"].values()) * row_bytes
        for name, c in w["cache_rows"].items():
            assert 1 <= c <= rows[name]
        assert set(w["cache_rows"]) == set(plan.esd_tables)
    # tiny tables are replicated, big ones go through PS + cache
    assert "t_cat_8" in plan.replicated and "t_cat_19" in plan.replicated  # 3 and 4 rows
    assert "t_cat_2" in plan.esd_tables
    # a bigger memory budget never gets fewer cache rows
    assert sum(plan.workers[0]["cache_rows"].values()) > sum(plan.workers[1]["cache_rows"].values())
    # the slow link gets a smaller share than the fast one with the same compute
    assert plan.workers[1]["share"] < plan.workers[0]["share"]
    assert abs(sum(w["share"] for w in plan.workers) - 1) < 1e-5
    # PS: bytes balanced to within a row per table
    assert abs(plan.ps[0]["bytes"] - plan.ps[1]["bytes"]) <= len(plan.esd_tables) * row_bytes
    cfg = plan.esd_config(staleness=0)
    cfg.validate_tables({n: rows[n] for n in plan.esd_tables})
    assert cfg.num_ps == 2


def test_shares_for_given_caches():
    wl, tables, planner = _setup(workers=[WorkerResources(4 * MiB, bw) for bw in (1000, 100, 10)])
    plan = planner.plan()
    esd = [t for t in tables if t.name in plan.esd_tables]
    caches = [w["cache_rows"] for w in plan.workers]
    # plan() uses the same rule
    assert planner.shares_for(caches, esd) == [w["share"] for w in plan.workers]
    # same caches and compute everywhere: the slower the link, the smaller the share
    same = [{t.name: max(1, t.num_embeddings // 10) for t in tables}] * 3
    shares = planner.shares_for(same)
    assert abs(sum(shares) - 1) < 1e-5 and shares[0] > shares[1] > shares[2] > 0
    # compute-bound workers (slow compute, fast links) get nearly equal shares
    _, _, cpu_bound = _setup(workers=[WorkerResources(4 * MiB, 1e6 / k, samples_per_s=10) for k in (1, 2, 4)])
    assert max(cpu_bound.shares_for(same)) - min(cpu_bound.shares_for(same)) < 1e-3
    with pytest.raises(EsdConfigError, match="2 cache layouts for 3 workers"):
        planner.shares_for(same[:2])


def test_equal_time_shares_closed_form():
    _, _, planner = _setup()
    B = planner.global_batch_size
    a, f = [1e-4, 4e-4, 2e-3], [0.0, 0.002, 0.01]
    shares = planner._equal_time_shares(a, f)
    n = [x * B for x in shares]
    assert sum(n) == pytest.approx(B)
    times = [ni * ai + fi for ni, ai, fi in zip(n, a, f)]
    assert max(times) - min(times) < 1e-9
    # a fixed time beyond the others' whole step: that worker keeps one sample
    shares = planner._equal_time_shares(a, [0.0, 0.0, 10.0])
    assert shares[2] == pytest.approx(1 / B) and sum(shares) == pytest.approx(1.0)


def test_shares_count_the_dense_all_reduce_and_rebalance_on_the_replay():
    workers = [WorkerResources(4 * MiB, bw) for bw in (1000, 100, 10)]
    same = None
    out = {}
    cases = {"base": {}, "dense": {"dense_param_bytes": 20_000}, "linear": {"share_rounds": 0},
             "star": {"dense_param_bytes": 20_000, "dense_sync": "star"}}
    for key, kw in cases.items():
        _, tables, planner = _setup(workers=workers, **kw)
        same = same or [{t.name: max(1, t.num_embeddings // 10) for t in tables}] * 3
        out[key] = planner.shares_for(same)
        assert abs(sum(out[key]) - 1) < 1e-5 and out[key][0] > out[key][1] > out[key][2] > 0
    # the dense gradient crosses every link each step: the slow link gets fewer samples
    assert out["dense"][2] < out["base"][2]
    # through the fastest worker the slow link carries the gradients once each way, not 2 (W-1)/W
    assert out["base"][2] > out["star"][2] > out["dense"][2]
    # replaying at the planned shares moves them (a worker pays hot rows once per step)
    assert out["base"] != out["linear"]
    with pytest.raises(EsdConfigError, match="dense_param_bytes"):
        _setup(dense_param_bytes=-1)
    with pytest.raises(EsdConfigError, match="share_rounds"):
        _setup(share_rounds=-1)
    with pytest.raises(EsdConfigError, match="dense_sync must be one of"):
        _setup(dense_sync="tree")


def test_caches_follow_access_frequency():
    wl, tables, planner = _setup()
    plan = planner.plan()
    caches = plan.workers[1]["cache_rows"]
    # same size tables (5000 rows) but different skew -> not proportional split
    big = [t.name for t in tables if t.num_embeddings == 5000 and t.name in caches]
    assert len({caches[n] for n in big}) > 1 or all(caches[n] == 5000 for n in big)


def test_deterministic_and_json_roundtrip(tmp_path):
    _, _, p1 = _setup()
    _, _, p2 = _setup()
    a, b = p1.plan(), p2.plan()
    assert a == b and a.to_json() == b.to_json()
    path = tmp_path / "plan.json"
    a.save(str(path))
    assert EsdPlan.load(str(path)) == a
    text = str(a)
    assert "data_parallel" in text and "esd_ps_cache" in text and "share" in text


def test_without_sample_and_constraints():
    wl, tables, planner = _setup(
        sample=False,
        constraints={
            "t_cat_8": ParameterConstraints(sharding_types=["esd_ps_cache"]),
            "t_cat_0": ParameterConstraints(sharding_types=["data_parallel"]),
        },
    )
    plan = planner.plan()
    assert "t_cat_8" in plan.esd_tables and "t_cat_0" in plan.replicated
    assert any("no workload sample" in n for n in plan.notes)


def test_infeasible_plans_raise_clear_errors():
    with pytest.raises(EsdConfigError, match="worker 1: memory .* no feasible plan"):
        _setup(workers=[WorkerResources(8 * MiB, 100), WorkerResources(64 * 1024, 10)])[2].plan()
    with pytest.raises(EsdConfigError, match="parameter server 0: .* no feasible plan"):
        _setup(ps=[PsResources(1024)])[2].plan()
    with pytest.raises(EsdConfigError, match="sharding types"):
        _setup(constraints={"t_cat_0": ParameterConstraints(sharding_types=["table_wise"])})
    with pytest.raises(EsdConfigError, match="memory_bytes"):
        WorkerResources(0, 10)
    with pytest.raises(EsdConfigError, match="bandwidth"):
        WorkerResources(MiB, 0)


def test_planned_model_trains_under_dmp_like_vanilla():
    """2 workers + 1 PS, the plan's own TorchRec ShardingPlan (with replicated
    tables) under DistributedModelParallel: same model as vanilla TorchRec."""
    wl_cfg = SyntheticWorkloadConfig(num_sparse=5, cardinalities=[4, 300, 900, 12, 2000], bag_size=(1, 3), alpha=1.1, seed=5)
    wl = SyntheticWorkload(wl_cfg)
    tables = wl.table_configs(8)
    planner = EsdShardingPlanner(
        [WorkerResources(96 * 1024, 100), WorkerResources(64 * 1024, 10)],
        [PsResources(MiB)],
        tables,
        sample=[wl.global_batch(s, 32).sparse_features for s in range(3)],
        global_batch_size=32,
    )
    plan = planner.plan()
    assert plan.replicated and plan.esd_tables
    common = dict(steps=8, global_batch=32, workload=wl_cfg, embedding_dim=8, collect_tables=True,
                  sparse_optimizer="rowwise_adagrad", sparse_lr=0.1)
    vanilla = run_local_world(run, 2, JobConfig(method="vanilla", **common))
    esd = run_local_world(run, 3, JobConfig(method="esd", plan=plan, dispatcher="hybrid", **common))
    assert esd[2] == {"role": "ps"}
    v, e = vanilla[0], esd[0]
    assert torch.allclose(torch.tensor(v["losses"]), torch.tensor(e["losses"]), rtol=1e-5, atol=1e-6)
    for name in v["tables"]:
        assert torch.allclose(v["tables"][name], e["tables"][name], rtol=1e-5, atol=1e-6), name
    # uneven planned shares were used
    seen = [int(r["samples_seen"].sum()) for r in esd[:2]]
    assert sum(seen) == 8 * 32
