"""The cache directory's plans, executed on a simulator whose row values are
version numbers: every read must see the latest version (s = 0) or one at most
``s`` versions old, and no update may be lost."""

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_esd.cache import CacheDirectory, prefetch_keys
from torchrec_esd.config import EsdConfig, EsdConfigError, WorkerSpec
from torchrec_esd.apps.workload import SyntheticWorkload, SyntheticWorkloadConfig


def _tables(cards):
    return [
        EmbeddingBagConfig(name=f"t_cat_{i}", embedding_dim=4, num_embeddings=n, feature_names=[f"cat_{i}"])
        for i, n in enumerate(cards)
    ]


class VersionSimulator:
    """Executes plans with row values = versions; checks reads and updates.
    Rows the PS serves as partial sums (``des_pos``, EsdConfig.des_misses) are
    read on the PS after the pushes, and their update is applied there."""

    def __init__(self, directory: CacheDirectory, prefetch_depth: int = 0, rule=None):
        self.d = directory
        # prefetch (EsdConfig.prefetch_depth): after the pulls of iteration i, rows of
        # i+1..i+depth chosen by `rule` are read from the PS; their pull at j must read
        # the same value the PS holds then (else the prefetch was a stale read)
        self.depth, self.rule = prefetch_depth, rule or prefetch_keys
        self.prefetched = {}  # (worker, iteration) -> (keys, values read ahead)
        self.prefetched_rows = 0
        self.stale_prefetches = 0
        self.ps = torch.zeros(directory.total_rows, dtype=torch.int64)
        self.truth = torch.zeros(directory.total_rows, dtype=torch.int64)
        self.cache = [
            torch.full((int(directory.capacity(w).sum()),), -99, dtype=torch.int64)
            for w in range(directory.num_workers)
        ]
        self.max_lag = 0
        self.des_rows = 0

    def _pull(self, w, iteration, keys):
        pulled = self.ps[keys]
        ahead = self.prefetched.pop((w, iteration), None)
        if ahead is not None and ahead[0].numel():
            pos = torch.searchsorted(keys, ahead[0])
            assert torch.equal(keys[pos], ahead[0]), "prefetched a row the pull does not need"
            self.stale_prefetches += int((pulled[pos] != ahead[1]).sum())
            pulled[pos] = ahead[1]  # what the worker uses: the value read ahead
        return pulled

    def _prefetch(self, plan, ahead):
        for w in range(len(plan.workers)):
            done = {j: k for (v, j), (k, _) in self.prefetched.items() if v == w}
            for j, keys in self.rule(w, plan, ahead[: self.depth], done).items():
                old = self.prefetched.get((w, j), (keys[:0], keys[:0]))
                merged = torch.cat([old[0], keys])
                order = torch.argsort(merged)
                self.prefetched[(w, j)] = (merged[order], torch.cat([old[1], self.ps[keys]])[order])
                self.prefetched_rows += keys.numel()

    def step(self, plan, ahead=()):
        # phase 1: value pushes of all workers, then pulls
        for w, p in enumerate(plan.workers):
            self.ps[p.push_keys] = self.cache[w][p.push_slots]
        for w, p in enumerate(plan.workers):
            v = torch.full_like(p.used_keys, -1)
            inc = p.used_slot >= 0
            v[inc] = self.cache[w][p.used_slot[inc]]
            pulled = self._pull(w, plan.iteration, p.pull_keys)
            v[p.pull_pos] = pulled
            dst = p.used_slot[p.pull_pos]
            self.cache[w][dst[dst >= 0]] = pulled[dst >= 0]
            v[p.des_pos] = self.ps[p.used_keys[p.des_pos]]  # the PS pools its current rows
            self.des_rows += p.des_pos.numel()
            lag = self.truth[p.used_keys] - v
            assert (lag >= 0).all(), "read a version from the future"
            self.max_lag = max(self.max_lag, int(lag.max()) if lag.numel() else 0)
        if self.depth:  # between the push/pull and the gradient phase
            self._prefetch(plan, ahead)
        # phase 2: local updates and gradient pushes; each used row gains one version
        used = torch.unique(torch.cat([p.used_keys for p in plan.workers]))
        self.truth[used] += 1
        for w, p in enumerate(plan.workers):
            self.cache[w][p.used_slot[p.local_pos]] = self.truth[p.used_keys[p.local_pos]]
            for pos in (p.grad_pos, p.des_pos):  # row gradients and DES bag gradients reach the PS
                gk = p.used_keys[pos]
                self.ps[gk] = self.truth[gk]

    def flush(self):
        for w, p in enumerate(self.d.flush_plan()):
            self.ps[p.push_keys] = self.cache[w][p.push_slots]


def _run(staleness, policy, steps=25, seed=0, shares=(1, 1, 1), flush_at=None):
    wl = SyntheticWorkload(SyntheticWorkloadConfig(num_sparse=3, cardinalities=[40, 200, 7], bag_size=(0, 4), alpha=1.1, seed=seed))
    tables = _tables(wl.config.cardinalities)
    cfg = EsdConfig(
        [WorkerSpec({"t_cat_0": 8, "t_cat_1": 30, "t_cat_2": 7}, 1.0, share=s) for s in shares[:2]]
        + [WorkerSpec({"t_cat_0": 3, "t_cat_1": 5, "t_cat_2": 1}, 1.0, share=shares[2])],
        staleness=staleness,
        cache_policy=policy,
    )
    d = CacheDirectory(cfg, tables)
    sim = VersionSimulator(d)
    g = torch.Generator().manual_seed(seed)
    B = 24
    for step in range(steps):
        kjt = wl.global_batch(step, B).sparse_features
        sh = cfg.batch_shares(B)
        a = torch.repeat_interleave(torch.arange(3), torch.tensor(sh))[torch.randperm(B, generator=g)]
        flush = flush_at(step) if flush_at is not None else ()
        dirty = {w: d.dirty_keys(w).sort().values for w in flush}
        plan = d.plan(kjt, a, flush=flush)
        for w in flush:  # every row only it held up to date goes up in this iteration's value push
            assert torch.isin(dirty[w], plan.workers[w].push_keys).all()
            assert plan.workers[w].push_keys.unique().numel() == plan.workers[w].push_keys.numel()
        _check_plan_invariants(d, plan)
        sim.step(plan)
    return d, sim


def _check_plan_invariants(d, plan):
    owners = torch.zeros(d.total_rows, dtype=torch.int64)
    for w, p in enumerate(plan.workers):
        cached = d.cached_keys(w)
        assert cached.unique().numel() == cached.numel(), "a row sits in two slots"
        per_table = torch.bincount(d.table_of(cached), minlength=d.num_tables)
        assert (per_table <= d.capacity(w)).all()
        hits = p.used_keys.numel() - p.pull_pos.numel()
        # counters add up: hits + misses + outdated re-pulls = lookups
        assert hits + p.rows["miss_pull"] + p.rows["update_pull"] == p.used_keys.numel()
        assert p.local_pos.numel() + p.grad_pos.numel() == p.used_keys.numel()
        inc = p.used_slot >= 0
        assert torch.equal(d.slot_of(w, p.used_keys[inc]), p.used_slot[inc])
        # each slot holds rows of its own table only
        assert torch.equal(d.slot_table(w)[p.used_slot[inc]], d.table_of(p.used_keys[inc]))
        owners[d.dirty_keys(w)] += 1
    assert int(owners.max()) <= 1, "a row is dirty in two caches"


def _run_prefetch(depth, staleness, rule=None, steps=30, seed=4):
    """Plans made `depth` batches ahead (as dispatch_ahead does), executed with prefetch."""
    wl = SyntheticWorkload(SyntheticWorkloadConfig(num_sparse=3, cardinalities=[40, 200, 7], bag_size=(0, 4),
                                                   alpha=1.1, seed=seed))
    cfg = EsdConfig(
        [WorkerSpec({"t_cat_0": 8, "t_cat_1": 30, "t_cat_2": 7}, 1.0)] * 2
        + [WorkerSpec({"t_cat_0": 3, "t_cat_1": 5, "t_cat_2": 1}, 1.0)],
        staleness=staleness,
    )
    d = CacheDirectory(cfg, _tables(wl.config.cardinalities))
    g = torch.Generator().manual_seed(seed)
    plans = [d.plan(wl.global_batch(step, 24).sparse_features, torch.randint(0, 3, (24,), generator=g))
             for step in range(steps)]
    sim = VersionSimulator(d, prefetch_depth=depth, rule=rule)
    for i, plan in enumerate(plans):
        sim.step(plan, plans[i + 1 :])
    return d, sim


@pytest.mark.parametrize("depth,staleness", [(1, 0), (2, 0), (2, 2)])
def test_prefetch_reads_what_the_pull_would_read(depth, staleness):
    d, sim = _run_prefetch(depth, staleness)
    assert sim.prefetched_rows > 0 and sim.stale_prefetches == 0
    if staleness == 0:
        assert sim.max_lag == 0
    assert 0 <= sim.max_lag <= staleness
    sim.flush()
    assert torch.equal(sim.ps, sim.truth), "lost updates"


def test_prefetch_simulator_catches_an_unsafe_rule():
    # prefetching every pull of the next batch (rows batch i updates included) reads stale rows
    def every_pull(w, current, ahead, done):
        return {p.iteration: p.workers[w].pull_keys for p in ahead[:1]}

    _, sim = _run_prefetch(1, 0, rule=every_pull)
    assert sim.stale_prefetches > 0


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_synchronous_plans_read_latest_and_lose_nothing(policy):
    d, sim = _run(staleness=0, policy=policy)
    assert sim.max_lag == 0
    sim.flush()
    assert torch.equal(sim.ps, sim.truth), "lost updates"
    assert all(d.dirty_keys(w).numel() == 0 for w in range(3))


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_a_worker_that_writes_back_its_dirty_rows_keeps_every_read_exact(policy):
    # EsdConfig.flush_on_slowdown: now and then a worker pushes every dirty row of its cache;
    # reads stay at the latest version and nothing is lost
    d, sim = _run(staleness=0, policy=policy, steps=30, flush_at=lambda step: [step % 3] if step % 4 == 3 else [])
    assert sim.max_lag == 0
    sim.flush()
    assert torch.equal(sim.ps, sim.truth), "lost updates"


@pytest.mark.parametrize("s", [1, 3])
def test_bounded_staleness(s):
    d, sim = _run(staleness=s, policy="lru", steps=30, seed=2)
    assert 0 < sim.max_lag <= s
    sim.flush()
    assert torch.equal(sim.ps, sim.truth)


def test_uneven_shares_and_zero_share():
    d, sim = _run(staleness=0, policy="lru", shares=(3, 1, 0), steps=10)
    assert sim.max_lag == 0


def test_lru_evicts_least_recently_used():
    tables = _tables([10])
    cfg = EsdConfig([WorkerSpec(2, 1.0)])
    d = CacheDirectory(cfg, tables)
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    def batch(ids):
        return KeyedJaggedTensor(keys=["cat_0"], values=torch.tensor(ids), lengths=torch.ones(len(ids), dtype=torch.int32))

    d.plan(batch([1]), torch.zeros(1, dtype=torch.int64))
    d.plan(batch([2]), torch.zeros(1, dtype=torch.int64))
    d.plan(batch([1]), torch.zeros(1, dtype=torch.int64))  # 1 is now more recent than 2
    p = d.plan(batch([3]), torch.zeros(1, dtype=torch.int64))
    assert sorted(d.cached_keys(0).tolist()) == [1, 3]
    # 2 was dirty (updated locally, sole user): its eviction is a miss-push
    assert p.workers[0].rows["miss_push"] == 1
    assert p.workers[0].push_keys.tolist() == [2]


def test_bad_inputs():
    tables = _tables([10, 20])
    with pytest.raises(EsdConfigError, match="no cache capacity"):
        EsdConfig([WorkerSpec({"t_cat_0": 0, "t_cat_1": 1}, 1.0)])
    with pytest.raises(EsdConfigError, match="exceeds"):
        CacheDirectory(EsdConfig([WorkerSpec({"t_cat_0": 11, "t_cat_1": 1}, 1.0)]), tables)
    d = CacheDirectory(EsdConfig([WorkerSpec(5, 1.0)] * 2), tables)
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    bad = KeyedJaggedTensor(keys=["cat_0", "cat_1"], values=torch.tensor([3, 20]), lengths=torch.ones(2, dtype=torch.int32))
    with pytest.raises(EsdConfigError, match="id 20 is outside table 't_cat_1' of 20 rows"):
        d.check_batch(bad)
    neg = KeyedJaggedTensor(keys=["cat_0", "cat_1"], values=torch.tensor([-1, 2]), lengths=torch.ones(2, dtype=torch.int32))
    with pytest.raises(EsdConfigError, match="id -1"):
        d.plan(neg, torch.zeros(1, dtype=torch.int64))
    ok = KeyedJaggedTensor(keys=["cat_0", "cat_1"], values=torch.tensor([1, 2]), lengths=torch.ones(2, dtype=torch.int32))
    with pytest.raises(EsdConfigError, match="outside"):
        d.plan(ok, torch.tensor([2]))
    unknown = KeyedJaggedTensor(keys=["cat_9"], values=torch.tensor([1]), lengths=torch.ones(1, dtype=torch.int32))
    with pytest.raises(EsdConfigError, match="no embedding table"):
        d.check_batch(unknown)
    floats = KeyedJaggedTensor(keys=["cat_0"], values=torch.tensor([1.0]), lengths=torch.ones(1, dtype=torch.int32))
    with pytest.raises(EsdConfigError, match="int32/int64"):
        d.check_batch(floats)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_single_worker_tracking_gives_the_same_plans(policy):
    """Workers other than the dispatcher track only their own cache: their plans
    must be identical to the full directory's."""
    wl = SyntheticWorkload(SyntheticWorkloadConfig(num_sparse=3, cardinalities=[40, 200, 7], bag_size=(0, 4), alpha=1.1, seed=7))
    tables = _tables(wl.config.cardinalities)
    cfg = EsdConfig(
        [WorkerSpec({"t_cat_0": 8, "t_cat_1": 30, "t_cat_2": 7}, 1.0), WorkerSpec({"t_cat_0": 3, "t_cat_1": 5, "t_cat_2": 1}, 1.0)],
        staleness=1,
        cache_policy=policy,
    )
    full = CacheDirectory(cfg, tables)
    mine = [CacheDirectory(cfg, tables, track=[w]) for w in range(2)]
    g = torch.Generator().manual_seed(1)
    fields = ("used_keys", "used_slot", "push_keys", "push_slots", "pull_pos", "local_pos", "grad_pos")
    for step in range(20):
        kjt = wl.global_batch(step, 20).sparse_features
        a = torch.randint(0, 2, (20,), generator=g)
        pf = full.plan(kjt, a)
        for w in range(2):
            pw = mine[w].plan(kjt, a)
            assert pw.workers[1 - w] is None
            for f in fields:
                assert torch.equal(getattr(pf.workers[w], f), getattr(pw.workers[w], f)), (step, w, f)
            assert pf.workers[w].rows == pw.workers[w].rows
    with pytest.raises(EsdConfigError, match="tracks every worker"):
        mine[0].views()
    with pytest.raises(EsdConfigError, match="not tracked"):
        mine[0].cached_keys(1)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_dense_slot_map_and_sorted_lookup_give_the_same_plans(policy, monkeypatch):
    """Small tables keep a dense key -> slot map per worker; large ones a
    hashed one (O(slots)): the plans must not depend on which."""
    import torchrec_esd.cache.slots as slots_mod

    wl = SyntheticWorkload(SyntheticWorkloadConfig(num_sparse=3, cardinalities=[40, 200, 7], bag_size=(0, 4), alpha=1.1, seed=3))
    tables = _tables(wl.config.cardinalities)
    cfg = EsdConfig([WorkerSpec({"t_cat_0": 8, "t_cat_1": 30, "t_cat_2": 7}, 1.0), WorkerSpec(3, 1.0)], staleness=1, cache_policy=policy)
    dense = CacheDirectory(cfg, tables)
    monkeypatch.setattr(slots_mod, "DENSE_SLOT_MAP_ROWS", 0)
    monkeypatch.setattr(slots_mod, "DENSE_ROWS_PER_SLOT", 0)
    sorted_lookup = CacheDirectory(cfg, tables)
    assert dense._w[0].dense and not sorted_lookup._w[0].dense
    assert sorted_lookup._w[0].slot_map.shape == (128, 2)  # 45 slots: a 128-row id table
    g = torch.Generator().manual_seed(5)
    fields = ("used_keys", "used_slot", "push_keys", "push_slots", "pull_pos", "local_pos", "grad_pos")
    for step in range(25):
        kjt = wl.global_batch(step, 24).sparse_features
        a = torch.randint(0, 2, (24,), generator=g)
        pd, ps = dense.plan(kjt, a), sorted_lookup.plan(kjt, a)
        for w in range(2):
            for f in fields:
                assert torch.equal(getattr(pd.workers[w], f), getattr(ps.workers[w], f)), (step, w, f)
    every = torch.arange(dense.total_rows)
    for w in range(2):
        assert torch.equal(dense.slot_of(w, every), sorted_lookup.slot_of(w, every))
        assert int((dense.slot_of(w, every) >= 0).sum()) == dense.cached_keys(w).numel()


def test_cost_views_read_like_the_per_table_views():
    """The cost model gives the same inputs from the directory's cost views as
    from its per-table views, refuses views of other tables and views used
    after the directory moved on."""
    from torchrec_esd.cost import CostModel

    wl = SyntheticWorkload(SyntheticWorkloadConfig(num_sparse=3, cardinalities=[40, 200, 7], bag_size=(0, 4), alpha=1.1, seed=4))
    tables = _tables(wl.config.cardinalities)
    cfg = EsdConfig([WorkerSpec(6, 1000.0), WorkerSpec(3, 10.0), WorkerSpec(4, 100.0)], staleness=1)
    d = CacheDirectory(cfg, tables)
    cm = CostModel(cfg, tables, optimizer_state_bytes_per_row=4)
    g = torch.Generator().manual_seed(2)
    for step in range(12):
        kjt = wl.global_batch(step, 30).sparse_features
        direct, views = d.cost_views(), d.views()
        assert torch.equal(cm.matrix(kjt, direct), cm.matrix(kjt, views))
        assert torch.equal(cm.expected_matrix(kjt, direct), cm.expected_matrix(kjt, views))
        assert torch.equal(cm.hit_matrix(kjt, direct), cm.hit_matrix(kjt, views))
        d.plan(kjt, torch.randint(0, 3, (30,), generator=g))
    assert int(d.cost_views().ndirty.sum()) == sum(d.dirty_keys(w).numel() for w in range(3)) > 0
    other = CostModel(cfg, list(reversed(tables)), optimizer_state_bytes_per_row=4)
    with pytest.raises(ValueError, match="do not match"):
        other.matrix(kjt, d.cost_views())
    stale = d.cost_views()
    d.plan(kjt, torch.zeros(30, dtype=torch.int64))
    with pytest.raises(EsdConfigError, match="after the directory planned"):
        cm.matrix(kjt, stale)
    with pytest.raises(EsdConfigError, match="tracks every worker"):
        CacheDirectory(cfg, tables, track=[1]).cost_views()


@pytest.mark.parametrize("policy,staleness,hashed", [("lru", 0, False), ("lfu", 0, False), ("lru", 2, False),
                                                      ("lfu", 3, False), ("lru", 1, True), ("lfu", 0, True)])
def test_cache_step_kernel_matches_the_pytorch_reference(policy, staleness, hashed, monkeypatch):
    """The C++ cache step (ops.plan_worker_cache) gives the plans and the end
    state of CacheDirectory._plan_worker's PyTorch code, step after step,
    through evictions of clean and dirty rows, full tables and uneven shares,
    with dense and with hashed slot maps."""
    import torchrec_esd.cache.directory as cache_mod
    import torchrec_esd.cache.slots as slots_mod
    from torchrec_esd import ops

    if hashed:
        monkeypatch.setattr(slots_mod, "DENSE_SLOT_MAP_ROWS", 0)
        monkeypatch.setattr(slots_mod, "DENSE_ROWS_PER_SLOT", 0)

    assert ops.has_plan_kernel(), "the extension is built without plan_worker_cache"
    wl = SyntheticWorkload(SyntheticWorkloadConfig(num_sparse=4, cardinalities=[40, 300, 7, 90], bag_size=(0, 5), alpha=1.05, seed=11))
    tables = _tables(wl.config.cardinalities)
    cfg = EsdConfig(
        [WorkerSpec({"t_cat_0": 8, "t_cat_1": 30, "t_cat_2": 7, "t_cat_3": 2}, 1.0, share=3.0), WorkerSpec(3, 1.0), WorkerSpec(5, 1.0)],
        staleness=staleness, cache_policy=policy,
    )
    kernel = CacheDirectory(cfg, tables)
    monkeypatch.setattr(cache_mod, "USE_PLAN_KERNEL", False)
    reference = CacheDirectory(cfg, tables)
    g = torch.Generator().manual_seed(9)
    fields = ("used_keys", "used_slot", "push_keys", "push_slots", "pull_pos", "local_pos", "grad_pos")
    evicted_dirty = 0
    for step in range(40):
        kjt = wl.global_batch(step, 36).sparse_features
        a = torch.randint(0, 3, (36,), generator=g)
        monkeypatch.setattr(cache_mod, "USE_PLAN_KERNEL", True)
        pk = kernel.plan(kjt, a)
        monkeypatch.setattr(cache_mod, "USE_PLAN_KERNEL", False)
        pr = reference.plan(kjt, a)
        for w in range(3):
            for f in fields:
                assert torch.equal(getattr(pk.workers[w], f), getattr(pr.workers[w], f)), (step, w, f)
            assert pk.workers[w].rows == pr.workers[w].rows, (step, w)
            evicted_dirty += pk.workers[w].rows["miss_push"]
    assert evicted_dirty > 0  # the dirty-eviction path ran
    every = torch.arange(kernel.total_rows)
    for w in range(3):
        assert kernel._w[w].dense == (not hashed)
        # a hashed map's layout depends on the order of its inserts: compare what it maps
        for f in ("keys", "last_use", "freq", "lag", "dirty") + (() if hashed else ("slot_map",)):
            assert torch.equal(getattr(kernel._w[w], f), getattr(reference._w[w], f)), (w, f)
        assert torch.equal(kernel.slot_of(w, every), reference.slot_of(w, every))


def test_cache_step_kernel_refuses_bad_keys():
    from torchrec_esd import ops

    d = CacheDirectory(EsdConfig([WorkerSpec(2, 1.0)]), _tables([10, 5]))
    st = d._w[0]
    e = torch.zeros(0, dtype=torch.int64)

    def step(keys):
        return ops.plan_worker_cache(st.keys, st.last_use, st.freq, st.lag, st.dirty, st.slot_map, st.table_start,
                                     e, e, torch.tensor(keys, dtype=torch.int64), d.row_offset, 1, 0, False)

    with pytest.raises(RuntimeError, match="ascending"):
        step([3, 1])
    with pytest.raises(RuntimeError, match="outside"):
        step([1, 15])
    with pytest.raises(RuntimeError, match="must be"):
        ops.plan_worker_cache(st.keys, st.last_use, st.freq, st.lag, st.dirty.long(), st.slot_map, st.table_start,
                              e, e, torch.tensor([1]), d.row_offset, 1, 0, False)
    with pytest.raises(RuntimeError, match="user_keys must be distinct and ascending"):
        ops.plan_worker_cache(st.keys, st.last_use, st.freq, st.lag, st.dirty, st.slot_map, st.table_start,
                              torch.tensor([3, 1]), torch.tensor([1, 1]), torch.tensor([1]), d.row_offset, 1, 0, False)
    # an id table that does not map user_keys to their positions, or is not an id table
    with pytest.raises(RuntimeError, match="user_table does not map user_keys"):
        ops.plan_worker_cache(st.keys, st.last_use, st.freq, st.lag, st.dirty, st.slot_map, st.table_start,
                              torch.tensor([1, 3]), torch.tensor([1, 1]), torch.tensor([1]), d.row_offset, 1, 0, False,
                              ops.id_table_build(torch.tensor([3, 1])))
    with pytest.raises(RuntimeError, match="user_table must be an id table"):
        ops.plan_worker_cache(st.keys, st.last_use, st.freq, st.lag, st.dirty, st.slot_map, st.table_start,
                              torch.tensor([1, 3]), torch.tensor([1, 1]), torch.tensor([1]), d.row_offset, 1, 0, False,
                              torch.zeros(3, 2, dtype=torch.int64))


@pytest.mark.parametrize("hashed", [False, True])
def test_cache_step_kernel_finds_the_same_shared_dirty_rows_by_either_search(hashed, monkeypatch):
    """Step A of the C++ cache step (a dirty copy another worker uses is
    pushed) either looks the batch's rows up in the slot map (few batch rows)
    or scans the worker's slots for dirty ones (the batch's rows outnumber its
    slots, as at large W).  The same step on the same state, once as it is
    (fewer batch rows than slots) and once with ``user_keys`` padded by keys
    past the last row (never cached: more batch rows than slots), gives the
    same plan and the same end state, with shared dirty rows pushed."""
    import torchrec_esd.cache.slots as slots_mod
    from torchrec_esd import ops

    if hashed:
        monkeypatch.setattr(slots_mod, "DENSE_SLOT_MAP_ROWS", 0)
        monkeypatch.setattr(slots_mod, "DENSE_ROWS_PER_SLOT", 0)
    assert ops.has_plan_kernel(), "the extension is built without plan_worker_cache"
    wl = SyntheticWorkload(SyntheticWorkloadConfig(num_sparse=2, cardinalities=[400, 300], bag_size=(1, 3),
                                                   alpha=1.05, seed=5))
    tables = _tables(wl.config.cardinalities)
    cfg = EsdConfig([WorkerSpec(60, 1.0), WorkerSpec(60, 1.0)], cache_policy="lru")
    d = CacheDirectory(cfg, tables)
    g = torch.Generator().manual_seed(3)
    pushed = 0
    for step in range(30):
        kjt = wl.global_batch(step, 8).sparse_features
        a = torch.randint(0, 2, (8,), generator=g)
        keys, sample = d.batch_keys(kjt)
        ukeys, uw, _ = ops.unique_keys_per_group(keys, a[sample], 2)
        used = list(torch.split(ukeys, torch.bincount(uw, minlength=2).tolist()))
        user_keys, user_counts = ops.sorted_distinct(ukeys)
        st = d._w[0]
        assert user_keys.numel() < st.keys.numel()  # the lookup of the batch's rows
        pad = torch.arange(st.keys.numel() + 1, dtype=torch.int64) + d.total_rows
        padded = (torch.cat([user_keys, pad]), torch.cat([user_counts, torch.ones_like(pad)]))
        outs, states = [], []
        # as it is, padded, and each with the users found in an id table (what plan() passes)
        for uk, uc, table in ((user_keys, user_counts, False), (*padded, False), (user_keys, user_counts, True),
                              (*padded, True)):
            s = [t.clone() for t in (st.keys, st.last_use, st.freq, st.lag, st.dirty, st.slot_map)]
            outs.append(ops.plan_worker_cache(*s, st.table_start, uk, uc, used[0], d.row_offset, d.iteration + 1,
                                              0, int(d.policy.kernel_code), ops.id_table_build(uk) if table else None))
            states.append(s)
        for i in range(1, 4):
            for x, y in zip(outs[0], outs[i]):
                assert torch.equal(x, y), (step, i)
            for x, y in zip(states[0], states[i]):
                assert torch.equal(x, y), (step, i)
        pushed += int(outs[0][6][2])  # shared dirty rows pushed
        d.plan(kjt, a)
    assert pushed > 0  # step A found shared dirty rows
