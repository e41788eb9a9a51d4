"""Eviction policies as a seam: the registry, a user-defined policy on the
reference path, and every policy's plans against a slot-exact brute-force
simulation of the directory's rules in plain Python."""

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd import ops
from torchrec_esd.cache import (
    CacheDirectory,
    EvictionPolicy,
    KernelPolicy,
    LfuPolicy,
    LruPolicy,
    make_policy,
    policy_names,
    register_policy,
    unregister_policy,
)
from torchrec_esd.config import EsdConfig, EsdConfigError, WorkerSpec
from torchrec_esd.apps.workload import SyntheticWorkload, SyntheticWorkloadConfig

from test_cache_directory import VersionSimulator  # noqa: E402  (tests/ is on sys.path under pytest)

PLACED = 1 << 32


class FifoPolicy(EvictionPolicy):
    """First in, first out: the row placed earliest goes first (rows placed in
    one iteration in the order of their keys)."""

    name = "test_fifo"

    def slot_state(self, num_slots):
        return {"placed": torch.zeros(num_slots, dtype=torch.int64)}

    def on_place(self, cache, slots, iteration):
        cache.policy_state["placed"][slots] = iteration * PLACED + torch.arange(slots.numel())

    def priority(self, cache, slots):
        return cache.policy_state["placed"][slots]


class ReferenceLru(LruPolicy):
    """LRU without a kernel code: the same order on the PyTorch reference path."""

    name = "test_reference_lru"
    kernel_code = None


@pytest.fixture
def registered():
    added = []

    def add(cls):
        register_policy(cls)
        added.append(cls.name)
        return cls

    yield add
    for name in added:
        unregister_policy(name)


def _tables(cards):
    return [
        EmbeddingBagConfig(name=f"t_cat_{i}", embedding_dim=4, num_embeddings=n, feature_names=[f"cat_{i}"])
        for i, n in enumerate(cards)
    ]


def _config(policy, staleness=0):
    return EsdConfig(
        [WorkerSpec({"t_cat_0": 6, "t_cat_1": 9, "t_cat_2": 3}, 1.0, share=2.0),
         WorkerSpec({"t_cat_0": 3, "t_cat_1": 4, "t_cat_2": 1}, 1.0),
         WorkerSpec(2, 1.0)],
        staleness=staleness, cache_policy=policy,
    )


def _trace(steps, B=18, seed=4):
    wl = SyntheticWorkload(
        SyntheticWorkloadConfig(num_sparse=3, cardinalities=[30, 60, 5], bag_size=(0, 4), alpha=1.05, seed=seed)
    )
    g = torch.Generator().manual_seed(seed)
    return wl, [(wl.global_batch(s, B).sparse_features, torch.randint(0, 3, (B,), generator=g)) for s in range(steps)]


# --------------------------------------------------------------------------- registry
def test_unknown_policy_names_the_known_ones(registered):
    assert {"lru", "lfu"} <= set(policy_names())
    with pytest.raises(EsdConfigError, match=r"unknown cache_policy 'nope'.*'lru', 'lfu'"):
        make_policy("nope")
    with pytest.raises(EsdConfigError, match="cache_policy"):
        EsdConfig([WorkerSpec(1, 1.0)], cache_policy="test_fifo")
    registered(FifoPolicy)
    cfg = EsdConfig([WorkerSpec(1, 1.0)], cache_policy="test_fifo")  # the config accepts a registered name
    assert isinstance(CacheDirectory(cfg, _tables([4])).policy, FifoPolicy)
    unregister_policy("test_fifo")
    with pytest.raises(EsdConfigError, match=r"unknown cache_policy 'test_fifo'; known policies: \('lru', 'lfu'"):
        CacheDirectory(cfg, _tables([4]))
    register_policy(FifoPolicy)  # the fixture unregisters it


def test_register_refuses_what_it_cannot_run(registered):
    class NoName(EvictionPolicy):
        pass

    class ClaimsLru(EvictionPolicy):
        name = "test_claims_lru"
        kernel_code = KernelPolicy.LRU

    class UnknownCode(EvictionPolicy):
        name = "test_unknown_code"
        kernel_code = 7

    class OtherLru(LruPolicy):
        name = "lru"

    with pytest.raises(EsdConfigError, match="EvictionPolicy subclass"):
        register_policy(object)
    with pytest.raises(EsdConfigError, match="non-empty string"):
        register_policy(NoName)
    with pytest.raises(EsdConfigError, match="already the code of LruPolicy"):
        register_policy(ClaimsLru)
    with pytest.raises(EsdConfigError, match="not one the C\\+\\+ cache step implements"):
        register_policy(UnknownCode)
    with pytest.raises(EsdConfigError, match="already registered"):
        register_policy(OtherLru)
    with pytest.raises(EsdConfigError, match="cannot be unregistered"):
        unregister_policy("lru")
    with pytest.raises(EsdConfigError, match="not registered"):
        unregister_policy("test_never")
    assert register_policy(LruPolicy) is LruPolicy  # re-registering the same class: a no-op
    assert make_policy("lru").kernel_code == KernelPolicy.LRU and make_policy("lfu").kernel_code == KernelPolicy.LFU
    assert "test_claims_lru" not in policy_names()


def test_kernel_refuses_an_unknown_policy_code():
    assert ops.has_plan_kernel(), "the extension is built without plan_worker_cache"
    d = CacheDirectory(EsdConfig([WorkerSpec(2, 1.0)]), _tables([10]))
    st = d._w[0]
    e = torch.zeros(0, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="unknown eviction policy code 5"):
        ops.plan_worker_cache(st.keys, st.last_use, st.freq, st.lag, st.dirty, st.slot_map, st.table_start,
                              e, e, torch.tensor([1]), d.row_offset, 1, 0, 5)


# --------------------------------------------------------------------------- brute force
class BruteForceDirectory:
    """The directory's rules, slot by slot, in plain Python: step A (shared dirty
    rows pushed, slot order), lookups with staleness ``s``, per table the
    ``misses - free`` unpinned cached slots evicted lowest ``priority`` first
    (ties: lowest slot), the r-th miss (ascending key) in the r-th free slot,
    transient misses beyond, local update iff sole user with a current copy."""

    def __init__(self, capacities, row_offset, staleness, priority):
        self.row_offset = row_offset
        self.s = staleness
        self.priority = priority  # slot dict -> sortable
        self.workers = []
        for caps in capacities:
            slots, start = [], 0
            for t, c in enumerate(caps):
                slots += [dict(key=None, table=t, ver=0, dirty=False, last_use=0, freq=0, placed=0) for _ in range(c)]
                start += c
            self.workers.append(slots)
        self.latest = {}
        self.iteration = 0

    def table_of(self, key):
        return max(t for t in range(len(self.row_offset) - 1) if self.row_offset[t] <= key)

    def plan(self, used):
        self.iteration += 1
        it = self.iteration
        users = {}
        for keys in used:
            for k in keys:
                users[k] = users.get(k, 0) + 1
        pushes = []
        for w, slots in enumerate(self.workers):
            p = []
            for i, sl in enumerate(slots):
                if sl["dirty"] and users.get(sl["key"], 0) - (sl["key"] in used[w]) > 0:
                    p.append((sl["key"], i))
                    sl["dirty"] = False
            pushes.append(p)
        out = []
        for w, slots in enumerate(self.workers):
            keys = sorted(used[w])
            where = {sl["key"]: i for i, sl in enumerate(slots) if sl["key"] is not None}
            slot, miss, update, current = {}, set(), set(), set()
            for k in keys:
                i = where.get(k)
                lag = self.latest.get(k, 0) - (slots[i]["ver"] if i is not None else 0)
                slot[k] = i
                if i is None:
                    miss.add(k)
                elif lag > self.s:
                    update.add(k)
                if i is not None and lag == 0:
                    current.add(k)
            pinned = {slot[k] for k in keys if slot[k] is not None}
            miss_push = []
            placed = 0
            for t in range(len(self.row_offset) - 1):
                tslots = [i for i, sl in enumerate(slots) if sl["table"] == t]
                tmiss = [k for k in keys if k in miss and self.table_of(k) == t]
                free = [i for i in tslots if slots[i]["key"] is None]
                need = max(len(tmiss) - len(free), 0)
                cand = sorted((self.priority(slots[i]), i) for i in tslots
                              if slots[i]["key"] is not None and i not in pinned)
                for _, v in cand[:need]:
                    if slots[v]["dirty"]:
                        miss_push.append((slots[v]["key"], v))
                    slots[v].update(key=None, dirty=False, freq=0)
                    free.append(v)
                for k, i in zip(tmiss, sorted(free)):
                    slots[i].update(key=k, dirty=False, freq=0, placed=it * PLACED + placed)
                    placed += 1
                    slot[k] = i
            local, grad = [], []
            for k in keys:
                i = slot[k]
                pulled = k in miss or k in update
                if i is not None:
                    if pulled:
                        slots[i]["ver"] = self.latest.get(k, 0)
                    slots[i]["last_use"] = it
                    slots[i]["freq"] += 1
                is_local = users[k] == 1 and i is not None and (k in current or pulled)
                (local if is_local else grad).append(k)
            out.append(dict(
                used_slot=[-1 if slot[k] is None else slot[k] for k in keys],
                pull_keys=[k for k in keys if k in miss or k in update],
                local_keys=local, grad_keys=grad,
                push=pushes[w] + miss_push,
                rows={"miss_pull": len(miss), "update_pull": len(update), "miss_push": len(miss_push),
                      "update_push": len(pushes[w]) + len(grad)},
            ))
        for k in users:
            self.latest[k] = self.latest.get(k, 0) + 1
        for w, o in enumerate(out):
            for k in o["local_keys"]:
                sl = self.workers[w][o["used_slot"][sorted(used[w]).index(k)]]
                sl["ver"], sl["dirty"] = self.latest[k], True
        return out


def assert_plan_is_brute_force(d, plan, brute, step) -> int:
    """Every worker's plan of ``step`` and the directory's slots after it are
    what ``brute`` computes from the same used keys; returns the dirty rows
    the plan evicts (its ``miss_push`` rows)."""
    used = [set(p.used_keys.tolist()) for p in plan.workers]
    expect = brute.plan(used)
    evicted = 0
    for w, (p, e) in enumerate(zip(plan.workers, expect)):
        where = (step, w)
        assert p.used_slot.tolist() == e["used_slot"], where
        assert p.pull_keys.tolist() == e["pull_keys"], where
        assert p.used_keys[p.local_pos].tolist() == e["local_keys"], where
        assert p.used_keys[p.grad_pos].tolist() == e["grad_keys"], where
        assert list(zip(p.push_keys.tolist(), p.push_slots.tolist())) == e["push"], where
        assert {k: p.rows[k] for k in e["rows"]} == e["rows"], where
        evicted += p.rows["miss_push"]
    for w in range(len(plan.workers)):
        assert d._w[w].keys.tolist() == [-1 if sl["key"] is None else sl["key"] for sl in brute.workers[w]]
    return evicted


def _brute_force_priority(name):
    return {
        "lru": lambda sl: sl["last_use"],
        "lfu": lambda sl: (sl["freq"], sl["last_use"]),
        "test_fifo": lambda sl: sl["placed"],
        "test_reference_lru": lambda sl: sl["last_use"],
    }[name]


@pytest.mark.parametrize("policy,staleness", [("test_fifo", 0), ("test_fifo", 2), ("lru", 0), ("lfu", 1),
                                              ("test_reference_lru", 0)])
def test_plans_match_a_brute_force_simulation(policy, staleness, registered):
    registered(FifoPolicy)
    registered(ReferenceLru)
    cfg = _config(policy, staleness)
    wl, trace = _trace(30)
    tables = _tables(wl.config.cardinalities)
    d = CacheDirectory(cfg, tables)
    kernel = make_policy(policy).kernel_code is not None
    assert all(d._kernel_plans(w) == (kernel and ops.has_plan_kernel()) for w in range(3))
    caps = [[w.cache_rows_for(t.name) for t in tables] for w in cfg.workers]
    brute = BruteForceDirectory(caps, d.row_offset.tolist(), staleness, _brute_force_priority(policy))
    sim = VersionSimulator(d)
    evicted = 0
    for step, (kjt, a) in enumerate(trace):
        plan = d.plan(kjt, a)
        evicted += assert_plan_is_brute_force(d, plan, brute, step)
        sim.step(plan)
    assert evicted > 0  # dirty rows were evicted: the eviction order mattered
    assert sim.max_lag <= staleness
    sim.flush()
    assert torch.equal(sim.ps, sim.truth), "lost updates"


def test_fifo_evicts_the_oldest_placement_even_if_used_since(registered):
    registered(FifoPolicy)
    d = CacheDirectory(EsdConfig([WorkerSpec(2, 1.0)], cache_policy="test_fifo"), _tables([10]))

    def batch(ids):
        return KeyedJaggedTensor(keys=["cat_0"], values=torch.tensor(ids), lengths=torch.ones(len(ids), dtype=torch.int32))

    for ids in ([1], [2], [1]):  # 1 placed first, then used again: LRU would evict 2
        d.plan(batch(ids), torch.zeros(len(ids), dtype=torch.int64))
    d.plan(batch([3]), torch.zeros(1, dtype=torch.int64))
    assert sorted(d.cached_keys(0).tolist()) == [2, 3]


def test_a_kernel_policy_and_its_reference_twin_give_the_same_plans(registered):
    """LRU in the C++ cache step and the same order as a policy without a kernel
    code (reference path): same plans, same end state."""
    assert ops.has_plan_kernel()
    registered(ReferenceLru)
    wl, trace = _trace(40, B=24, seed=9)
    tables = _tables(wl.config.cardinalities)
    fast = CacheDirectory(_config("lru", 1), tables)
    ref = CacheDirectory(_config("test_reference_lru", 1), tables)
    assert fast._kernel_plans(0) and not ref._kernel_plans(0)
    fields = ("used_keys", "used_slot", "push_keys", "push_slots", "pull_pos", "local_pos", "grad_pos")
    for step, (kjt, a) in enumerate(trace):
        pf, pr = fast.plan(kjt, a), ref.plan(kjt, a)
        for w in range(3):
            for f in fields:
                assert torch.equal(getattr(pf.workers[w], f), getattr(pr.workers[w], f)), (step, w, f)
            assert pf.workers[w].rows == pr.workers[w].rows
    for w in range(3):
        for f in ("keys", "last_use", "freq", "lag", "dirty", "slot_map"):
            assert torch.equal(getattr(fast._w[w], f), getattr(ref._w[w], f)), (w, f)


def test_policies_are_instances_per_directory():
    cfg = EsdConfig([WorkerSpec(2, 1.0)], cache_policy="lfu")
    a, b = CacheDirectory(cfg, _tables([5])), CacheDirectory(cfg, _tables([5]))
    assert isinstance(a.policy, LfuPolicy) and a.policy is not b.policy
