"""Lookahead eviction (Belady within the upcoming batches): the directory's
plans against the slot-exact brute-force simulation, the future-use
interface, replicas that agree, and its errors."""

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd.cache import CacheDirectory, LookaheadPolicy, UpcomingUse, make_policy
from torchrec_esd.config import EsdConfig, EsdConfigError, WorkerSpec

from test_cache_directory import VersionSimulator  # noqa: E402  (tests/ is on sys.path under pytest)
from test_cache_policy import BruteForceDirectory, _config, _tables, _trace, assert_plan_is_brute_force  # noqa: E402


def _batch(ids):
    return KeyedJaggedTensor(keys=["cat_0"], values=torch.tensor(ids), lengths=torch.ones(len(ids), dtype=torch.int32))


def test_upcoming_use_is_the_distance_to_the_first_use():
    u = UpcomingUse.from_batches([torch.tensor([7, 3, 7]), torch.tensor([]), torch.tensor([3, 9, 1])])
    assert u.window == 3
    assert u.keys.tolist() == [1, 3, 7, 9] and u.distance.tolist() == [3, 1, 1, 3]
    assert u.next_use(torch.tensor([9, 2, 3, 100])).tolist() == [3, 4, 1, 4]
    e = UpcomingUse.empty()
    assert e.window == 0 and e.next_use(torch.tensor([1, 2])).tolist() == [1, 1]


def test_lookahead_keeps_the_row_the_next_batch_uses():
    """One worker, 2 slots: rows 1 and 2 cached, 2 used last; row 3 misses.
    LRU evicts 1; with row 1 in the next batch the lookahead policy evicts 2."""
    def run(policy, upcoming):
        cfg = EsdConfig([WorkerSpec(2, 1.0)], cache_policy=policy)
        d = CacheDirectory(cfg, _tables([10]))
        for ids in ([1], [2]):
            d.plan(_batch(ids), torch.zeros(1, dtype=torch.int64))
        up = [_batch(upcoming)] if upcoming is not None else []
        d.plan(_batch([3]), torch.zeros(1, dtype=torch.int64), **({"upcoming": up} if policy == "lookahead" else {}))
        return sorted(d.cached_keys(0).tolist())

    assert run("lru", None) == [2, 3]
    assert run("lookahead", [1]) == [1, 3]
    assert run("lookahead", [5]) == [2, 3]  # neither is used in the window: LRU
    assert run("lookahead", None) == [2, 3]  # no window: LRU


def test_the_row_used_furthest_ahead_goes_first():
    cfg = EsdConfig([WorkerSpec(3, 1.0)], cache_policy="lookahead", cache_lookahead=3)
    d = CacheDirectory(cfg, _tables([10]))
    for ids in ([1], [2], [4]):  # LRU order: 1, 2, 4
        d.plan(_batch(ids), torch.zeros(1, dtype=torch.int64))
    up = [_batch([4]), _batch([1]), _batch([2, 1])]
    d.plan(_batch([5]), torch.zeros(1, dtype=torch.int64), up)  # 2 is used furthest ahead
    assert sorted(d.cached_keys(0).tolist()) == [1, 4, 5]


def _lookahead_priority(state):
    def priority(sl):
        k = state["window"] + 1 - state["next"].get(sl["key"], state["window"] + 1)
        return (k, sl["last_use"])

    return priority


@pytest.mark.parametrize("staleness,window", [(0, 3), (1, 2), (0, 1)])
def test_plans_match_a_brute_force_simulation(staleness, window):
    cfg = EsdConfig(_config("lookahead", staleness).workers, staleness=staleness, cache_policy="lookahead",
                    cache_lookahead=window)
    wl, trace = _trace(30)
    tables = _tables(wl.config.cardinalities)
    d = CacheDirectory(cfg, tables)
    assert not d._kernel_plans(0)  # the reference path
    caps = [[w.cache_rows_for(t.name) for t in tables] for w in cfg.workers]
    state = {"window": 0, "next": {}}
    brute = BruteForceDirectory(caps, d.row_offset.tolist(), staleness, _lookahead_priority(state))
    sim = VersionSimulator(d)
    lru = CacheDirectory(EsdConfig(cfg.workers, staleness=staleness, cache_policy="lru"), tables)
    evicted = differs_from_lru = 0
    for step, (kjt, a) in enumerate(trace):
        upcoming = [k for k, _ in trace[step + 1 : step + 1 + window]]  # shrinks at the end of the stream
        state["window"], state["next"] = len(upcoming), {}
        for dist, k in enumerate(upcoming, 1):
            for key in d.batch_keys(k)[0].tolist():
                state["next"].setdefault(key, dist)
        plan = d.plan(kjt, a, upcoming)
        lru.plan(kjt, a)
        evicted += assert_plan_is_brute_force(d, plan, brute, step)
        for w in range(3):
            differs_from_lru += int(not torch.equal(d._w[w].keys, lru._w[w].keys))
        sim.step(plan)
    assert evicted > 0 and differs_from_lru > 0  # dirty rows were evicted, and not as LRU would
    assert sim.max_lag <= staleness
    sim.flush()
    assert torch.equal(sim.ps, sim.truth), "lost updates"


def test_a_worker_tracking_itself_plans_what_the_dispatchers_directory_plans():
    """The replicated directory stays exact: worker 1's own directory and the
    dispatcher's (all workers) give worker 1 the same plans and slots."""
    window = 3
    cfg = EsdConfig(_config("lookahead").workers, cache_policy="lookahead", cache_lookahead=window)
    wl, trace = _trace(25, seed=7)
    tables = _tables(wl.config.cardinalities)
    full, own = CacheDirectory(cfg, tables), CacheDirectory(cfg, tables, track=[1])
    fields = ("used_keys", "used_slot", "push_keys", "push_slots", "pull_pos", "local_pos", "grad_pos")
    for step, (kjt, a) in enumerate(trace):
        upcoming = [k for k, _ in trace[step + 1 : step + 1 + window]]
        pf, po = full.plan(kjt, a, upcoming), own.plan(kjt, a, upcoming)
        for f in fields:
            assert torch.equal(getattr(pf.workers[1], f), getattr(po.workers[1], f)), (step, f)
    assert torch.equal(full._w[1].keys, own._w[1].keys)


def test_errors_and_what_other_policies_do_with_upcoming_batches():
    cfg = EsdConfig([WorkerSpec(2, 1.0)], cache_policy="lookahead", cache_lookahead=1)
    d = CacheDirectory(cfg, _tables([10]))
    with pytest.raises(EsdConfigError, match="2 upcoming batches given, EsdConfig.cache_lookahead is 1"):
        d.plan(_batch([1]), torch.zeros(1, dtype=torch.int64), [_batch([2]), _batch([3])])
    with pytest.raises(EsdConfigError, match="outside"):  # an upcoming batch's ids are checked too
        d.plan(_batch([1]), torch.zeros(1, dtype=torch.int64), [_batch([10])])
    with pytest.raises(EsdConfigError, match="cache_lookahead must be an int >= 0"):
        EsdConfig([WorkerSpec(2, 1.0)], cache_lookahead=-1)
    assert isinstance(make_policy("lookahead"), LookaheadPolicy)
    # LRU does not read upcoming batches: the same plans with or without them
    wl, trace = _trace(10)
    tables = _tables(wl.config.cardinalities)
    a, b = CacheDirectory(_config("lru"), tables), CacheDirectory(_config("lru"), tables)
    for step, (kjt, asg) in enumerate(trace):
        pa, pb = a.plan(kjt, asg), b.plan(kjt, asg, [k for k, _ in trace[step + 1 : step + 3]])
        assert all(torch.equal(x.used_slot, y.used_slot) for x, y in zip(pa.workers, pb.workers))
