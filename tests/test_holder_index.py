"""The holder index (row key -> the workers caching it, cache/holders.py): the
dispatcher's cache-state lookup reads it instead of probing every worker's
slot map, so it must equal those probes exactly, step after step, whatever
path changed the caches (C++ cache step or the PyTorch one, evictions,
dirty rows, staleness, a cold reset)."""

import random

import numpy as np
import pytest
import torch

from torchrec_esd import ops
from torchrec_esd.apps.workload import SyntheticWorkload, SyntheticWorkloadConfig
from torchrec_esd.cache import CacheDirectory, directory as directory_mod
from torchrec_esd.cache.holders import HolderIndex
from torchrec_esd.cache.slots import WorkerSlots
from torchrec_esd.config import EsdConfig, WorkerSpec
from torchrec_esd.reference_holder_ops import holder_index_lookup_ref, holder_index_sync_ref
from tests.test_cache_scale import _hashed_ids_batch, _tables


def _probed(d: CacheDirectory, keys: torch.Tensor):
    """Every worker's state of ``keys`` by one slot-map probe per (worker, key)."""
    W = d.num_workers
    cached, outdated, dirty = (torch.zeros(W, keys.numel(), dtype=torch.bool) for _ in range(3))
    for w in range(W):
        st = d._w[w]
        s = st.find(keys)
        c = s >= 0
        cached[w] = c
        dirty[w, c] = st.dirty[s[c]]
        outdated[w, c] = (st.lag[s[c]] > 0) & ~st.dirty[s[c]]
    return cached, outdated, dirty


def _check(d: CacheDirectory, kjt) -> int:
    keys, _ = d.batch_keys(kjt)
    u = torch.unique(keys)
    state = d.cache_state()
    T = d.num_tables
    slots = [d._w[w] for w in range(d.num_workers)]
    assert torch.equal(state.occupied, torch.stack([st.per_table(st.keys >= 0, T) for st in slots]))
    assert torch.equal(state.ndirty, torch.stack([st.per_table(st.dirty, T) for st in slots]))
    look = state.lookup(u)
    want = _probed(d, u)
    for got, exp, f in zip((look.cached, look.outdated, look.dirty), want, ("cached", "outdated", "dirty")):
        assert torch.equal(got, exp), f
    h = look.hits
    assert h.worker.numel() == int(want[0].sum())
    # the one-pass C++ read (holder_index_read) equals the lookup and gathers, in order
    index = d.holder_index()
    ref = index.read(u, kernel=False)
    nobuckets = ops.holder_index_read(index.head, index.next, index.base, torch.zeros(0, dtype=torch.int64), 0,
                                      index.lag, index.dirty, u)  # the workers by binary search
    for got, got_bs, exp in zip(index.read(u), nobuckets, ref):
        assert torch.equal(got, exp) and torch.equal(got_bs, exp)
    # one list after the other, or several side by side (what an index too large for the caches
    # takes): the same hits in the same order
    bw = index._bucket_worker if index._bucket_worker is not None else torch.zeros(0, dtype=torch.int64)
    for lanes in (0, 1, 5, 24, 64):
        side = ops.holder_index_read(index.head, index.next, index.base, bw, index._shift, index.lag, index.dirty,
                                     u, lanes=lanes)
        assert all(torch.equal(a, b) for a, b in zip(side, ref)), lanes
        pos, g = ops.holder_index_lookup(index.head, index.next, u, lanes=lanes)
        assert torch.equal(pos, ref[0]) and torch.equal(index.slot_workers(g), ref[1]), lanes
    return int(want[2].sum())


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("policy,staleness", [("lru", 0), ("lfu", 1)])
def test_index_equals_slot_map_probes_on_evicting_steps(monkeypatch, kernel, policy, staleness):
    monkeypatch.setattr(directory_mod, "USE_PLAN_KERNEL", kernel)
    wl = SyntheticWorkload(SyntheticWorkloadConfig(num_sparse=3, cardinalities=[40, 200, 7], bag_size=(0, 4),
                                                   alpha=1.1, seed=2))
    tables = _tables(wl.config.cardinalities)
    cfg = EsdConfig([WorkerSpec({"t_cat_0": 8, "t_cat_1": 30, "t_cat_2": 7}, 1.0), WorkerSpec(3, 1.0),
                     WorkerSpec(5, 1.0), WorkerSpec(4, 1.0)], staleness=staleness, cache_policy=policy)
    d = CacheDirectory(cfg, tables)
    g = torch.Generator().manual_seed(4)
    dirty_seen = evicted = 0
    for step in range(25):
        kjt = wl.global_batch(step, 24).sparse_features
        if step == 3:  # the index is built lazily: from then on every step keeps it exact
            assert d._holders is None
        dirty_seen += _check(d, kjt) if step >= 3 else 0
        a = torch.randint(0, 4, (24,), generator=g)
        p = d.plan(kjt, a)
        evicted += sum(wp.rows["miss_push"] for wp in p.workers)
        if step == 8:
            d.flush_plan()  # every dirty row pushed: the next check sees no dirty slot
            assert _check(d, kjt) == 0 and int(d.cache_state().ndirty.sum()) == 0
        if step == 12:
            d.reset_caches()  # a cold start drops the index; the next lookup rebuilds it
            assert d._holders is None
    assert dirty_seen > 0 and evicted > 0
    assert d.nbytes() == sum(d.nbytes(w) for w in range(4)) + d.holder_index().nbytes()



def _brute_group_bits(d: CacheDirectory, group_of, keys: torch.Tensor):
    """Per key, the groups holding it and holding it fresh, from every worker's slots."""
    held, fresh = torch.zeros(keys.numel(), dtype=torch.int64), torch.zeros(keys.numel(), dtype=torch.int64)
    cached, outdated, _ = _probed(d, keys)
    for w, g in enumerate(group_of):
        if g >= 0:
            held |= cached[w].to(torch.int64) << g
            fresh |= (cached[w] & ~outdated[w]).to(torch.int64) << g
    return held, fresh


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("staleness", [0, 1])
def test_group_bits_equal_the_slots_after_every_step_flush_and_partition_change(monkeypatch, kernel, staleness):
    # kernel: the C++ cache step and the C++ group-bits pass, else both in PyTorch
    from torchrec_esd.cache import holders as holders_mod

    monkeypatch.setattr(holders_mod, "USE_BITS_KERNEL", kernel)
    # tables that start small and grow as rows come (HolderIndex._reserve) keep every entry
    monkeypatch.setattr(holders_mod.HolderIndex, "GROUP_TABLE_MIN_KEYS", 1)
    grown = set()
    """The grouped dispatcher's stage 1 reads per key the groups holding it (fresh) from bits
    the directory maintains, and each group reads its own workers' copies from lists kept per
    (key, group) and the keys' dirty owners: after evicting steps, flushes inside a step and
    outside, a partition change and a cold reset they equal what the slots say, for cached
    keys and for keys cached nowhere."""
    monkeypatch.setattr(directory_mod, "USE_PLAN_KERNEL", kernel)
    wl = SyntheticWorkload(SyntheticWorkloadConfig(num_sparse=3, cardinalities=[40, 200, 7], bag_size=(0, 4),
                                                   alpha=1.1, seed=7))
    tables = _tables(wl.config.cardinalities)
    W = 6
    cfg = EsdConfig([WorkerSpec(c, 1.0) for c in (7, 3, 5, 4, 6, 2)], staleness=staleness)
    d = CacheDirectory(cfg, tables)
    parts = [[0, 1, 0, 2, -1, 1], [3, 3, 0, 1, 2, 0]]
    all_keys = torch.arange(int(d.total_rows))
    g = torch.Generator().manual_seed(3)
    checked = fresh_and_outdated = dirty_keys = 0
    for step in range(24):
        part = parts[step >= 14]
        if step >= 2:  # first read at step 2 (built from the slots), then kept by the steps
            state = d.cache_state()
            held, fresh = state.group_bits(all_keys, torch.tensor(part))
            want = _brute_group_bits(d, part, all_keys)
            assert torch.equal(held, want[0]) and torch.equal(fresh, want[1]), step
            checked += 1
            fresh_and_outdated += int(((held & ~fresh) != 0).sum())  # some group holds a key outdated only
            # the lists are per (key, group) now: a full lookup still lists every copy, a group's
            # view its workers' copies, and every key's dirty owner is the lowest dirty worker
            cached, outdated, dirty = _probed(d, all_keys)
            look = state.lookup(all_keys)
            assert torch.equal(look.cached, cached) and torch.equal(look.outdated, outdated)
            assert torch.equal(look.dirty, dirty)
            for gi in range(max(part) + 1):
                mine = torch.tensor([x == gi for x in part]).view(-1, 1)
                gl = state.group_view(torch.tensor(part), gi).lookup(all_keys)
                assert torch.equal(gl.cached, cached & mine) and torch.equal(gl.outdated, outdated & mine)
                assert torch.equal(gl.dirty, dirty & mine)
            owner = state.group_view(torch.tensor(part), 0).dirty_owner(all_keys)
            first = torch.where(dirty.any(0), dirty.to(torch.int8).argmax(0), torch.full_like(owner, -1))
            assert torch.equal(owner, first)
            dirty_keys += int((owner >= 0).sum())
            grown.add(tuple(int(t.shape[0]) for t in d.holder_index()._gbits[2:]))
            assert d.holder_index()._gb_rows == [int((t[:, 0] >= 0).sum()) for t in d.holder_index()._gbits[2:]]
        kjt = wl.global_batch(step, 24).sparse_features
        d.plan(kjt, torch.randint(0, W, (24,), generator=g), flush=[1] if step == 6 else ())
        if step == 9:
            d.flush_plan()
        if step == 18:
            d.reset_caches()
    assert checked == 22 and fresh_and_outdated > 0 and dirty_keys > 0 and len(grown) > 2
    with pytest.raises(ValueError, match="group_of"):
        d.holder_index().group_bits(torch.tensor([0, 1, 31, 0, 0, 0]), all_keys)


def test_occupancy_read_after_skipped_steps_and_a_flush_is_the_current_count():
    """The per-table counts are lazy (HolderIndex.count marks, occupancy() counts): read after
    several unread steps, a flush and more steps, they are the slots' counts at that moment."""
    wl = SyntheticWorkload(SyntheticWorkloadConfig(num_sparse=3, cardinalities=[40, 200, 7], bag_size=(0, 4),
                                                   alpha=1.1, seed=5))
    tables = _tables(wl.config.cardinalities)
    cfg = EsdConfig([WorkerSpec(6, 1.0), WorkerSpec(3, 1.0), WorkerSpec(5, 1.0)])
    d = CacheDirectory(cfg, tables)
    d.holder_index()
    g = torch.Generator().manual_seed(1)
    T = d.num_tables
    for step in range(14):
        kjt = wl.global_batch(step, 24).sparse_features
        d.plan(kjt, torch.randint(0, 3, (24,), generator=g))
        if step == 6:
            d.flush_plan()
        if step in (4, 6, 11, 13):  # unread steps in between (a plain-split dispatcher reads nothing)
            state = d.cache_state()
            slots = [d._w[w] for w in range(3)]
            assert torch.equal(state.occupied, torch.stack([st.per_table(st.keys >= 0, T) for st in slots]))
            assert torch.equal(state.ndirty, torch.stack([st.per_table(st.dirty, T) for st in slots]))
            # right after the flush no row is dirty; elsewhere the local updates left some
            assert (int(state.ndirty.sum()) == 0) == (step == 6)
            assert int(state.occupied.sum()) > 0

def test_index_on_hashed_maps_of_a_big_table():
    rows = 1 << 30
    tables = _tables([rows, rows])
    cfg = EsdConfig([WorkerSpec(60, 1.0), WorkerSpec(30, 1.0), WorkerSpec(10, 1.0)], staleness=1)
    d = CacheDirectory(cfg, tables)
    d.holder_index()  # built on empty caches
    g = torch.Generator().manual_seed(0)
    for step in range(12):
        kjt = _hashed_ids_batch(step, 30, rows, 2, 3, seed=1)
        _check(d, kjt)
        d.plan(kjt, torch.randint(0, 3, (30,), generator=g))
    assert not d._w[0].dense


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_sync_and_lookup_kernels_equal_a_dict(impl):
    """Random slot rewrites on 3 workers x 6 slots with few distinct keys (long
    holder lists, heads moving): lookups always list exactly the holders, and
    the kernel and the reference leave the same tensors."""
    if impl == "kernel":
        assert ops.HAS_HOLDER_INDEX, "the extension is built without the holder index"
    rng = random.Random(5)
    slots = [WorkerSlots([3, 3], 100, dense=True) for _ in range(3)]
    idx, ref = HolderIndex(slots), HolderIndex([WorkerSlots([3, 3], 100, dense=True) for _ in range(3)])
    for _ in range(200):
        w = rng.randrange(3)
        new = torch.tensor([rng.choice([-1, 1, 2, 3, 4, 5]) for _ in range(6)], dtype=torch.int64)
        slots[w].keys = new
        old = idx.gkey[int(idx.base[w]):int(idx.base[w]) + 6].clone()
        if impl == "kernel":
            left = ops.holder_index_sync(idx.head, idx.next, idx.prev, idx.gkey, int(idx.base[w]), new)
        else:
            left = holder_index_sync_ref(idx.head, idx.next, idx.prev, idx.gkey, int(idx.base[w]), new)
        rleft = holder_index_sync_ref(ref.head, ref.next, ref.prev, ref.gkey, int(ref.base[w]), new)
        # the keys that left a slot, in slot order
        assert torch.equal(left, rleft) and torch.equal(left, old[(old != new.clamp(min=-1)) & (old >= 0)])
        for f in ("head", "next", "prev", "gkey"):
            assert torch.equal(getattr(idx, f), getattr(ref, f)), f
        q = torch.tensor([0, 1, 2, 3, 4, 5, 6], dtype=torch.int64)
        rpos, rg = holder_index_lookup_ref(idx.head, idx.next, q)
        for lanes in (-1, 0, 1, 3, 24):
            pos, g = ops.holder_index_lookup(idx.head, idx.next, q, lanes=lanes)
            assert torch.equal(pos, rpos) and torch.equal(g, rg), lanes
        truth = sorted((i, 6 * w_ + s) for w_ in range(3) for s, k in enumerate(slots[w_].keys.tolist())
                       for i, x in enumerate(q.tolist()) if k == x)
        assert sorted(zip(pos.tolist(), g.tolist())) == truth
    with pytest.raises(RuntimeError, match="outside"):
        ops.holder_index_sync(idx.head, idx.next, idx.prev, idx.gkey, 16, torch.zeros(6, dtype=torch.int64))


@pytest.mark.parametrize("kernel", [True, False])
def test_plans_and_state_equal_without_the_index(monkeypatch, kernel):
    """With the index, plan() adds the end-of-step version to every worker's
    copies at once; the plans and every slot field equal a directory without it."""
    monkeypatch.setattr(directory_mod, "USE_PLAN_KERNEL", kernel)
    wl = SyntheticWorkload(SyntheticWorkloadConfig(num_sparse=3, cardinalities=[40, 200, 7], bag_size=(0, 4),
                                                   alpha=1.1, seed=3))
    tables = _tables(wl.config.cardinalities)
    cfg = EsdConfig([WorkerSpec(6, 1.0), WorkerSpec(3, 1.0), WorkerSpec(5, 1.0)], staleness=1)
    with_index, plain = CacheDirectory(cfg, tables), CacheDirectory(cfg, tables)
    with_index.holder_index()
    g = torch.Generator().manual_seed(1)
    for step in range(20):
        kjt = wl.global_batch(step, 18).sparse_features
        a = torch.randint(0, 3, (18,), generator=g)
        p1, p2 = with_index.plan(kjt, a), plain.plan(kjt, a)
        for w in range(3):
            for f in ("used_slot", "push_keys", "pull_pos", "local_pos", "grad_pos"):
                assert torch.equal(getattr(p1.workers[w], f), getattr(p2.workers[w], f)), (step, w, f)
            for f in ("keys", "lag", "dirty", "last_use", "freq"):
                assert torch.equal(getattr(with_index._w[w], f), getattr(plain._w[w], f)), (step, w, f)
    assert plain._holders is None


def test_slot_workers_equal_the_binary_search():
    # the O(1) bucket lookup of a global slot's worker, against searchsorted over the bases,
    # with equal, unequal and (binary-search fallback) empty slot ranges
    class _Slots:  # the fields HolderIndex reads of a worker's slots, all empty
        def __init__(self, n):
            self.num_slots, self.keys = n, torch.full((n,), -1, dtype=torch.int64)
            self.lag, self.dirty = torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.bool)
            self.table_start = torch.tensor([0, n])

        def per_table(self, mask, T):
            return torch.zeros(T, dtype=torch.int64)

    rng = torch.Generator().manual_seed(0)
    for sizes in ([8] * 5, [1, 7, 3], [16, 17, 31, 9], [5, 0, 4], torch.randint(1, 60, (40,), generator=rng).tolist()):
        index = HolderIndex([_Slots(int(n)) for n in sizes])
        g = torch.arange(int(index.base[-1]))
        assert torch.equal(index.slot_workers(g), torch.searchsorted(index.base, g, right=True) - 1), sizes


@pytest.mark.skipif(not ops.HAS_GROUP_BITS_ASSIGN, reason="group_bits_assign not built")
def test_group_bits_assign_kernel_equals_the_reference_on_random_copies():
    """HolderIndex._assign's C++ pass stores the same bits and owners as its PyTorch reference
    (read back key by key: the two tables may lay their rows out differently), erasing keys
    no group holds and keys no worker holds dirty, over tables that hold earlier values."""
    rng = np.random.default_rng(4)
    for trial in range(40):
        W, G = int(rng.integers(1, 12)), int(rng.integers(1, 8))
        lists = torch.from_numpy(rng.integers(0, G + 1, W)).to(torch.int64)  # G: in no group
        keys = torch.from_numpy(np.sort(rng.choice(500, int(rng.integers(1, 60)), replace=False))).to(torch.int64)
        H = int(rng.integers(0, 200))
        pos = torch.from_numpy(rng.integers(0, keys.numel(), H)).to(torch.int64)
        worker = torch.from_numpy(rng.integers(0, W, H)).to(torch.int64)
        outdated = torch.from_numpy(rng.random(H) < 0.4)
        dirty = torch.from_numpy(rng.random(H) < 0.2) & ~outdated
        results = []
        for kernel in (True, False):
            idx = HolderIndex([WorkerSlots([2], 1000, dense=True) for _ in range(W)])
            cap = ops.id_table_capacity(1000)
            tables = [torch.full((cap, 2), -1, dtype=torch.int64) for _ in range(2)]
            stale = torch.arange(0, 500, 3, dtype=torch.int64)  # earlier entries, some of them erased now
            for t in tables:
                ops.id_table_assign(t, torch.zeros(0, dtype=torch.int64), stale, stale + 1)
            idx.heads = [idx.heads[0]] * (G + 1)
            idx._gbits = (tuple(lists.tolist()), lists, tables[0], tables[1])
            if kernel:
                ops.group_bits_assign(tables[0], tables[1], keys, pos, worker, outdated, dirty, lists, G)
            else:
                idx._assign_reference(keys, pos, worker, outdated, dirty)
            q = torch.arange(500, dtype=torch.int64)
            results.append((ops.id_table_lookup(tables[0], q), ops.id_table_lookup(tables[1], q)))
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1]), trial
    with pytest.raises(RuntimeError, match="outside"):
        ops.group_bits_assign(tables[0], tables[1], keys, torch.tensor([keys.numel()]), torch.tensor([0]),
                              torch.tensor([False]), torch.tensor([False]), lists, G)
    torch.library.opcheck(torch.ops.torchrec_esd.group_bits_assign,
                          (tables[0], tables[1], keys, pos, worker, outdated, dirty, lists, G),
                          test_utils=("test_schema",))


@pytest.mark.skipif(not ops.HAS_HOLDER_READ, reason="the holder index kernels are not built")
def test_a_cyclic_holder_list_is_an_error_not_a_hang():
    slots = [WorkerSlots([4], 100, dense=True) for _ in range(3)]
    for w, st in enumerate(slots):
        st.keys = torch.tensor([1, 2, 10 + w, -1], dtype=torch.int64)
    idx = HolderIndex(slots)
    q = torch.tensor([1, 2, 5], dtype=torch.int64)
    pos, g = ops.holder_index_lookup(idx.head, idx.next, q)
    assert pos.tolist() == [0, 0, 0, 1, 1, 1]
    idx.next[int(g[0])] = int(g[0])  # key 1's list now loops on its first holder
    bw = idx._bucket_worker if idx._bucket_worker is not None else torch.zeros(0, dtype=torch.int64)
    for lanes in (0, 1, 24):
        with pytest.raises(RuntimeError, match="corrupt holder list of key 1"):
            ops.holder_index_lookup(idx.head, idx.next, q, lanes=lanes)
        with pytest.raises(RuntimeError, match="corrupt holder list of key 1"):
            ops.holder_index_read(idx.head, idx.next, idx.base, bw, idx._shift, idx.lag, idx.dirty, q, lanes=lanes)
    with pytest.raises(RuntimeError, match="lanes"):
        ops.holder_index_lookup(idx.head, idx.next, q, lanes=-2)
