"""id-table, cost-matrix and per-group de-duplication kernels vs their references.

Every kernel is compared with the pure-PyTorch reference of
``torchrec_esd.reference_ops`` and, on small inputs, with a brute-force Python
model written from the operator's definition (so a bug shared by a kernel and
its reference is caught too).
"""

import os

import pytest
import torch

from torchrec_esd import ops, reference_ops as R

INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
DTYPES = [torch.int32, torch.int64]
HAS_CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def test_kernels_are_registered():
    if os.environ.get("TORCHREC_ESD_ALLOW_NO_EXTENSION") == "1":
        pytest.skip("extension explicitly allowed to be missing")
    assert ops.EXTENSION_LOADED, f"torchrec_esd._C did not load: {ops.EXTENSION_ERROR}"
    for name in ("id_table_build", "id_table_lookup", "sample_cost_matrix",
                 "unique_keys_per_group"):
        assert hasattr(torch.ops.torchrec_esd, name), name


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def hi_of(dtype):
    return INT32_MAX if dtype == torch.int32 else INT64_MAX


def unique_keys(n, dtype, gen=None, big=False):
    """n distinct non-negative keys, including the dtype's extremes when big."""
    hi = hi_of(dtype)
    base = torch.randperm(max(4 * n, 8), generator=gen)[:n]
    if big and n >= 4:
        base = base.clone()
        base[:4] = torch.tensor([0, hi, hi - 1, hi // 2])
        rest = base[4:]
        base[4:] = torch.where(rest % 2 == 0, rest, hi - 2 - rest)  # keep distinct
        base = torch.unique(base)[torch.randperm(torch.unique(base).numel(), generator=gen)]
    return base.to(dtype)


def model_table(keys):
    """Brute-force model of the canonical layout, written from its definition."""
    keys = [int(k) for k in keys]
    n = len(keys)
    cap = 2
    while cap < 2 * n:
        cap *= 2
    mask = cap - 1
    home = [int(h) & mask for h in R.hash_ids_ref(torch.tensor(keys, dtype=torch.int64), 0, 0)] \
        if n else []
    count = [0] * cap
    for h in home:
        count[h] += 1
    run, best, e = 0, None, 0
    for s in range(cap):
        run += count[s] - 1
        if best is None or run < best:
            best, e = run, s
    start = (e + 1) % cap
    table = [(-1, -1)] * cap
    for i in sorted(range(n), key=lambda i: ((home[i] - start) % cap, keys[i])):
        s = home[i]
        while table[s][0] != -1:  # plain sequential linear probing
            s = (s + 1) % cap
        table[s] = (keys[i], i)
    return torch.tensor(table, dtype=torch.int64).reshape(cap, 2)


def check_table_invariants(slots, keys):
    cap = slots.size(0)
    n = keys.numel()
    assert slots.dtype == torch.int64 and slots.shape == (R.id_table_capacity(n), 2)
    assert cap >= max(2, 2 * n) and cap & (cap - 1) == 0
    full = slots[:, 0] >= 0
    assert int(full.sum()) == n
    assert bool((slots[~full] == -1).all())
    got = dict(zip(slots[full, 0].tolist(), slots[full, 1].tolist()))
    assert got == {int(k): i for i, k in enumerate(keys.tolist())}
    # every key is reachable from its home slot without crossing an empty row
    homes = R.hash_ids_ref(slots[full, 0], 0, 0) & (cap - 1)
    for pos, h in zip(torch.nonzero(full).flatten().tolist(), homes.tolist()):
        s = h
        while s != pos:
            assert slots[s, 0] >= 0
            s = (s + 1) % cap


def random_batch(B, max_bag, key_hi, dtype, gen=None, dup_rate=0.3):
    lengths = torch.randint(0, max_bag + 1, (B,), generator=gen)
    offsets = torch.zeros(B + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    n = int(offsets[-1])
    keys = torch.randint(0, key_hi, (n,), generator=gen)
    # duplicates inside bags: copy the previous key of the same bag
    same_bag = torch.zeros(n, dtype=torch.bool)
    if n > 1:
        sample = torch.repeat_interleave(torch.arange(B), lengths)
        same_bag[1:] = sample[1:] == sample[:-1]
        dup = same_bag & (torch.rand(n, generator=gen) < dup_rate)
        for i in torch.nonzero(dup).flatten().tolist():
            keys[i] = keys[i - 1]
    return keys.to(dtype), offsets


def model_cost(keys, offsets, tables, weights, miss):
    """Brute force: dict per worker, set per bag."""
    B, W = offsets.numel() - 1, len(tables)
    out = torch.zeros(B, W, dtype=torch.float64)
    maps = [dict(zip(t[:, 0].tolist(), t[:, 1].tolist())) for t in tables]
    for b in range(B):
        bag = set(keys[int(offsets[b]):int(offsets[b + 1])].tolist())
        for w in range(W):
            out[b, w] = sum(
                float(weights[w][maps[w][k]]) if k in maps[w] else float(miss[w]) for k in bag
            )
    return out


# ---------------------------------------------------------------------------
# id_table_build / id_table_lookup
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 17, 64, 300])
def test_build_matches_model_and_reference(dtype, n):
    gen = torch.Generator().manual_seed(n)
    for big in (False, True):
        keys = unique_keys(n, dtype, gen, big=big)
        got = ops.id_table_build(keys)
        want = R.id_table_build_ref(keys)
        assert torch.equal(got, want)
        assert torch.equal(got, model_table(keys))
        check_table_invariants(got, keys)


@pytest.mark.parametrize("dtype", DTYPES)
def test_build_large_and_clustered(dtype):
    gen = torch.Generator().manual_seed(1)
    keys = unique_keys(20000, dtype, gen, big=True)
    got = ops.id_table_build(keys)
    assert torch.equal(got, R.id_table_build_ref(keys))
    check_table_invariants(got, keys)
    # keys whose home is one of the last slots: clusters wrap around the end
    cand = torch.arange(200000, dtype=torch.int64)
    cap = R.id_table_capacity(40)
    h = R.hash_ids_ref(cand, 0, 0) & (cap - 1)
    keys = cand[h >= cap - 3][:40].to(dtype)
    assert keys.numel() == 40
    got = ops.id_table_build(keys)
    assert torch.equal(got, R.id_table_build_ref(keys))
    assert torch.equal(got, model_table(keys))
    check_table_invariants(got, keys)
    assert got[0, 0] >= 0  # wrapped


def test_build_and_lookup_with_threads():
    gen = torch.Generator().manual_seed(21)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        keys = torch.randperm(1 << 22, generator=gen)[:150_000]
        table = ops.id_table_build(keys)
        assert torch.equal(table, R.id_table_build_ref(keys))
        q = torch.randint(0, 1 << 22, (200_000,), generator=gen)
        assert torch.equal(ops.id_table_lookup(table, q), R.id_table_lookup_ref(table, q))
        with pytest.raises(RuntimeError, match="duplicate key"):
            ops.id_table_build(torch.cat([keys, keys[-1:]]))
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 2, 1000])
def test_lookup_matches_reference(dtype, n):
    gen = torch.Generator().manual_seed(7 + n)
    keys = unique_keys(n, dtype, gen, big=n >= 4)
    table = ops.id_table_build(keys)
    hi = hi_of(dtype)
    queries = torch.cat(
        [
            keys.to(torch.int64),
            torch.randint(0, 4 * max(n, 2), (500,), generator=gen),
            torch.tensor([0, 1, hi, hi - 1]),
        ]
    ).to(dtype)
    queries = queries[torch.randperm(queries.numel(), generator=gen)]
    got = ops.id_table_lookup(table, queries)
    assert got.dtype == torch.int64 and got.shape == queries.shape
    assert torch.equal(got, R.id_table_lookup_ref(table, queries))
    where = {int(k): i for i, k in enumerate(keys.tolist())}
    assert got.tolist() == [where.get(int(q), -1) for q in queries.tolist()]
    assert ops.id_table_lookup(table, torch.empty(0, dtype=dtype)).numel() == 0


def test_table_of_one_key_and_mixed_dtypes():
    t = ops.id_table_build(torch.tensor([INT64_MAX]))
    assert t.shape == (2, 2)
    assert ops.id_table_lookup(t, torch.tensor([INT64_MAX, 0, 5])).tolist() == [0, -1, -1]
    t32 = ops.id_table_build(torch.tensor([7, 3], dtype=torch.int32))
    assert torch.equal(t32, ops.id_table_build(torch.tensor([7, 3])))
    assert ops.id_table_lookup(t32, torch.tensor([3, 7, 8])).tolist() == [1, 0, -1]


def test_lookup_in_full_table_terminates():
    # a hand-made table without empty row: probing must stop after cap steps
    full = torch.tensor([[4, 0], [6, 1]])
    assert ops.id_table_lookup(full, torch.tensor([4, 6, 8])).tolist() == [0, 1, -1]
    assert R.id_table_lookup_ref(full, torch.tensor([4, 6, 8])).tolist() == [0, 1, -1]


# ---------------------------------------------------------------------------
# sample_cost_matrix / cache_hit_counts
# ---------------------------------------------------------------------------


def make_workers(W, key_hi, sizes, dtype, gen):
    tables, weights = [], []
    for w in range(W):
        keys = torch.randperm(key_hi, generator=gen)[: sizes[w % len(sizes)]].to(dtype)
        tables.append(ops.id_table_build(keys))
        weights.append(torch.rand(keys.numel(), generator=gen, dtype=torch.float64) * 3)
    miss = torch.rand(W, generator=gen, dtype=torch.float64) * 10
    return tables, weights, miss


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("off_dtype", DTYPES)
@pytest.mark.parametrize("W", [1, 3])
def test_cost_matrix_matches_model_and_reference(dtype, off_dtype, W):
    gen = torch.Generator().manual_seed(W)
    keys, offsets = random_batch(40, 6, 60, dtype, gen)
    offsets = offsets.to(off_dtype)
    tables, weights, miss = make_workers(W, 60, [1, 20, 45], dtype, gen)
    got = ops.sample_cost_matrix(keys, offsets, tables, weights, miss)
    assert got.dtype == torch.float64 and got.shape == (40, W)
    torch.testing.assert_close(got, R.sample_cost_matrix_ref(keys, offsets, tables, weights, miss),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, model_cost(keys, offsets, tables, weights, miss),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cost_matrix_edges(dtype):
    gen = torch.Generator().manual_seed(3)
    hi = hi_of(dtype)
    tables, weights, miss = make_workers(2, 50, [1, 30], dtype, gen)
    # B = 0
    empty = ops.sample_cost_matrix(torch.empty(0, dtype=dtype), torch.zeros(1, dtype=torch.int64),
                                   tables, weights, miss)
    assert empty.shape == (0, 2)
    # W = 0
    k, o = random_batch(5, 3, 50, dtype, gen)
    assert ops.sample_cost_matrix(k, o, [], [], torch.empty(0, dtype=torch.float64)).shape == (5, 0)
    # only empty bags, then bags with repeated keys and extreme keys; a big bag
    keys = torch.tensor([hi, hi, 0, 0, 0, hi - 1] + list(range(100)) * 2, dtype=dtype)
    offsets = torch.tensor([0, 0, 0, 2, 2, 6, 206, 206])
    big_tab = ops.id_table_build(torch.tensor([hi, 5, 0, 77], dtype=dtype))
    tabs = tables + [big_tab]
    wts = weights + [torch.tensor([1.5, 2.0, 4.0, 8.0], dtype=torch.float64)]
    ms = torch.cat([miss, torch.tensor([0.25], dtype=torch.float64)])
    got = ops.sample_cost_matrix(keys, offsets, tabs, wts, ms)
    want = model_cost(keys, offsets, tabs, wts, ms)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, R.sample_cost_matrix_ref(keys, offsets, tabs, wts, ms),
                               rtol=1e-12, atol=1e-12)
    assert got[0].tolist() == [0.0, 0.0, 0.0] and got[6].tolist() == [0.0, 0.0, 0.0]
    assert got[2, 2] == 1.5  # {hi} hit once though it appears twice
    assert got[5, 2] == pytest.approx(4.0 + 2.0 + 8.0 + 97 * 0.25)  # 0, 5, 77 hit


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_hit_counts(dtype):
    gen = torch.Generator().manual_seed(11)
    keys, offsets = random_batch(64, 10, 100, dtype, gen, dup_rate=0.5)
    tables, weights, miss = make_workers(4, 100, [1, 10, 50, 90], dtype, gen)
    got = ops.cache_hit_counts(keys, offsets, tables)
    assert got.dtype == torch.int64 and got.shape == (64, 4)
    ones = [torch.ones(w.numel(), dtype=torch.float64) for w in weights]
    want = model_cost(keys, offsets, tables, ones, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(got, want.to(torch.int64))
    assert torch.equal(got, R.cache_hit_counts_ref(keys, offsets, tables))


def test_cost_matrix_with_threads_on_larger_batch():
    gen = torch.Generator().manual_seed(5)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        keys, offsets = random_batch(3000, 40, 5000, torch.int64, gen, dup_rate=0.2)
        tables, weights, miss = make_workers(5, 5000, [2000, 700], torch.int64, gen)
        got = ops.sample_cost_matrix(keys, offsets, tables, weights, miss)
        want = R.sample_cost_matrix_ref(keys, offsets, tables, weights, miss)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)
    finally:
        torch.set_num_threads(old)


def test_cost_matrix_giant_bag_among_small_ones():
    # one bag larger than a kernel segment, surrounded by small and empty bags
    gen = torch.Generator().manual_seed(12)
    giant = torch.randint(0, 3000, (150_000,), generator=gen)
    small = torch.randint(0, 3000, (40,), generator=gen)
    keys = torch.cat([small[:20], giant, small[20:]])
    offsets = torch.tensor([0, 7, 20, 20, 20 + giant.numel(), keys.numel() - 5, keys.numel()])
    tables, weights, miss = make_workers(6, 3000, [1500, 10, 2999], torch.int64, gen)
    got = ops.sample_cost_matrix(keys, offsets, tables, weights, miss)
    want = R.sample_cost_matrix_ref(keys, offsets, tables, weights, miss)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)
    hits = ops.cache_hit_counts(keys, offsets, tables)
    in_giant = torch.unique(giant)
    assert hits[3].tolist() == [
        int((ops.id_table_lookup(t, in_giant) >= 0).sum()) for t in tables
    ]


# ---------------------------------------------------------------------------
# unique_keys_per_group
# ---------------------------------------------------------------------------


def model_unique(keys, group):
    counts = {}
    for k, g in zip(keys.tolist(), group.tolist()):
        counts[(g, k)] = counts.get((g, k), 0) + 1
    pairs = sorted(counts)
    return [k for g, k in pairs], [g for g, k in pairs], [counts[p] for p in pairs]


def check_unique(keys, group, num_groups):
    uk, ug, cnt = ops.unique_keys_per_group(keys, group, num_groups)
    assert uk.dtype == keys.dtype and ug.dtype == torch.int64 and cnt.dtype == torch.int64
    rk, rg, rc = R.unique_keys_per_group_ref(keys, group, num_groups)
    assert torch.equal(uk, rk) and torch.equal(ug, rg) and torch.equal(cnt, rc)
    mk, mg, mc = model_unique(keys, group)
    assert uk.tolist() == mk and ug.tolist() == mg and cnt.tolist() == mc
    assert int(cnt.sum()) == keys.numel()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gdtype", DTYPES)
def test_unique_per_group_matches_model(dtype, gdtype):
    gen = torch.Generator().manual_seed(2)
    for n, hi, G in [(0, 5, 3), (1, 5, 1), (500, 40, 1), (2000, 300, 7), (3000, 10**6, 16)]:
        keys = torch.randint(0, hi, (n,), generator=gen).to(dtype)
        group = torch.randint(0, G, (n,), generator=gen).to(gdtype)
        check_unique(keys, group, G)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unique_per_group_extreme_keys(dtype):
    hi = hi_of(dtype)
    keys = torch.tensor([hi, 0, hi, hi - 1, 0, hi, 3], dtype=dtype)
    # 1 and 2 groups: keys packed with the group; 5 groups at int64: wide path
    for G in (1, 2, 5):
        group = torch.tensor([0, 0, 1, 1, 0, 1, 0]) % G
        check_unique(keys, group, G)
    check_unique(keys, torch.zeros(7, dtype=torch.int64), 1000)  # unused groups
    # more groups than the per-group path takes: packed sort / wide-key pair sort
    many = torch.tensor([9000, 3, 9000, 3, 0, 9000, 4999])
    check_unique(torch.tensor([5, 1, 5, 2, 1, 5, 7], dtype=dtype), many, 10_000)
    check_unique(keys, many, 10_000)


def test_unique_per_group_many_groups_random():
    gen = torch.Generator().manual_seed(13)
    keys = torch.randint(0, 500, (20_000,), generator=gen)
    group = torch.randint(0, 6000, (20_000,), generator=gen)
    check_unique(keys, group, 6000)
    check_unique(keys, group % 3, 3)


def test_unique_per_group_with_threads():
    gen = torch.Generator().manual_seed(9)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        keys = torch.randint(0, 1 << 20, (200_000,), generator=gen)
        group = torch.randint(0, 16, (200_000,), generator=gen)
        uk, ug, cnt = ops.unique_keys_per_group(keys, group, 16)
        rk, rg, rc = R.unique_keys_per_group_ref(keys, group, 16)
        assert torch.equal(uk, rk) and torch.equal(ug, rg) and torch.equal(cnt, rc)
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


def test_build_and_lookup_bad_input():
    with pytest.raises(RuntimeError, match="duplicate key 5"):
        ops.id_table_build(torch.tensor([1, 5, 9, 5]))
    with pytest.raises(RuntimeError, match="non-negative"):
        ops.id_table_build(torch.tensor([1, -2]))
    with pytest.raises(RuntimeError, match="int32 or int64"):
        ops.id_table_build(torch.tensor([1.0]))
    with pytest.raises(RuntimeError, match="1-D"):
        ops.id_table_build(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.id_table_build(torch.arange(10)[::2])
    t = ops.id_table_build(torch.tensor([1, 2, 3]))
    with pytest.raises(RuntimeError, match="non-negative"):
        ops.id_table_lookup(t, torch.tensor([1, -1]))
    with pytest.raises(RuntimeError, match="queries must be int32 or int64"):
        ops.id_table_lookup(t, torch.tensor([1.0]))
    with pytest.raises(RuntimeError, match="queries must be contiguous"):
        ops.id_table_lookup(t, torch.arange(10)[::2])
    with pytest.raises(RuntimeError, match="slots must be int64"):
        ops.id_table_lookup(t.to(torch.int32), torch.tensor([1]))
    with pytest.raises(RuntimeError, match=r"shape \[cap, 2\]"):
        ops.id_table_lookup(t[:, :1], torch.tensor([1]))
    with pytest.raises(RuntimeError, match="power of two"):
        ops.id_table_lookup(t[:6], torch.tensor([1]))
    with pytest.raises(RuntimeError, match="slots must be contiguous"):
        ops.id_table_lookup(t.t().contiguous().t(), torch.tensor([1]))
    if HAS_CUDA:
        with pytest.raises(RuntimeError, match="same device"):
            ops.id_table_lookup(t, torch.tensor([1], device="cuda"))


def _cost_args():
    keys = torch.tensor([1, 2, 3, 4])
    offsets = torch.tensor([0, 2, 4])
    tables = [ops.id_table_build(torch.tensor([1, 3])), ops.id_table_build(torch.tensor([4]))]
    weights = [torch.ones(2, dtype=torch.float64), torch.ones(1, dtype=torch.float64)]
    return keys, offsets, tables, weights, torch.zeros(2, dtype=torch.float64)


def test_cost_matrix_bad_input():
    keys, offsets, tables, weights, miss = _cost_args()
    f = ops.sample_cost_matrix
    assert f(keys, offsets, tables, weights, miss).tolist() == [[1.0, 0.0], [1.0, 1.0]]
    cases = [
        ("keys must be non-negative", (torch.tensor([1, -2, 3, 4]), offsets, tables, weights, miss)),
        ("keys must be int32 or int64", (keys.double(), offsets, tables, weights, miss)),
        ("keys must be contiguous", (torch.arange(8)[::2], offsets, tables, weights, miss)),
        ("offsets must be int32 or int64", (keys, offsets.float(), tables, weights, miss)),
        ("offsets must have B\\+1 >= 1", (keys, offsets[:0], tables, weights, miss)),
        ("offsets\\[0\\] must be 0", (keys, torch.tensor([1, 2, 4]), tables, weights, miss)),
        ("offsets must be non-decreasing", (keys, torch.tensor([0, 3, 2, 4]), tables, weights, miss)),
        ("offsets\\[-1\\] must equal keys.numel", (keys, torch.tensor([0, 2, 5]), tables, weights, miss)),
        ("offsets\\[-1\\] must equal keys.numel", (keys, torch.tensor([0, 2, 3]), tables, weights, miss)),
        ("slots and weights must have the same length", (keys, offsets, tables, weights[:1], miss)),
        ("miss_weight must be 1-D with one entry per worker", (keys, offsets, tables, weights, miss[:1])),
        ("miss_weight must be a float64", (keys, offsets, tables, weights, miss.float())),
        ("weights\\[1\\] must be a float64", (keys, offsets, tables, [weights[0], weights[1].float()], miss)),
        ("slots\\[0\\] must be int64", (keys, offsets, [tables[0].int(), tables[1]], weights, miss)),
        ("slots\\[1\\] capacity must be a power of two", (keys, offsets, [tables[0], tables[0][:3]], weights, miss)),
        ("weights\\[0\\] has only 1 entries", (keys, offsets, tables, [weights[0][:1], weights[1]], miss)),
    ]
    for msg, args in cases:
        with pytest.raises(RuntimeError, match=msg):
            f(*args)
        with pytest.raises(RuntimeError, match=msg):
            R.sample_cost_matrix_ref(*args)
    if HAS_CUDA:
        with pytest.raises(RuntimeError, match="same device"):
            f(keys, offsets, [tables[0].cuda(), tables[1]], weights, miss)
        with pytest.raises(RuntimeError, match="same device"):
            f(keys.cuda(), offsets.cuda(), tables, weights, miss)


def test_unique_bad_input():
    k = torch.tensor([1, 2, 3])
    g = torch.tensor([0, 1, 0])
    with pytest.raises(RuntimeError, match="same length"):
        ops.unique_keys_per_group(k, g[:2], 2)
    with pytest.raises(RuntimeError, match=r"group values must be in \[0, num_groups = 2\), got 2"):
        ops.unique_keys_per_group(k, torch.tensor([0, 2, 1]), 2)
    with pytest.raises(RuntimeError, match="got -1"):
        ops.unique_keys_per_group(k, torch.tensor([0, -1, 1]), 2)
    with pytest.raises(RuntimeError, match="keys must be non-negative"):
        ops.unique_keys_per_group(torch.tensor([1, -5, 3]), g, 2)
    with pytest.raises(RuntimeError, match="group must be int32 or int64"):
        ops.unique_keys_per_group(k, g.float(), 2)
    with pytest.raises(RuntimeError, match="keys must be contiguous"):
        ops.unique_keys_per_group(torch.arange(6)[::2], g, 2)
    with pytest.raises(RuntimeError, match="num_groups must be >= 0"):
        ops.unique_keys_per_group(k[:0], g[:0], -1)


# ---------------------------------------------------------------------------
# fake tensors / torch.compile
# ---------------------------------------------------------------------------


@pytest.mark.skipif(not ops.EXTENSION_LOADED, reason="needs the extension")
def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    T = torch.ops.torchrec_esd
    with FakeTensorMode(shape_env=ShapeEnv()):
        k = torch.empty(11, dtype=torch.int32)
        t = T.id_table_build(k)
        assert t.shape == (32, 2) and t.dtype == torch.int64
        assert T.id_table_lookup(t, k).shape == (11,)
        m = T.sample_cost_matrix(k, torch.empty(4, dtype=torch.int64), [t, t],
                                 [torch.empty(3, dtype=torch.float64)] * 2,
                                 torch.empty(2, dtype=torch.float64))
        assert m.shape == (3, 2) and m.dtype == torch.float64
        uk, ug, c = T.unique_keys_per_group(k, k, 3)
        assert uk.dtype == torch.int32 and ug.dtype == torch.int64
        assert uk.shape == ug.shape == c.shape


@pytest.mark.skipif(not ops.EXTENSION_LOADED, reason="needs the extension")
def test_opcheck():
    keys, offsets, tables, weights, miss = _cost_args()
    T = torch.ops.torchrec_esd
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(T.id_table_build, (keys,), test_utils=checks)
    torch.library.opcheck(T.id_table_lookup, (tables[0], keys), test_utils=checks)
    torch.library.opcheck(T.sample_cost_matrix, (keys, offsets, tables, weights, miss),
                          test_utils=checks)
    torch.library.opcheck(T.unique_keys_per_group, (keys, torch.tensor([1, 0, 1, 1]), 2),
                          test_utils=checks)


def _mix_sum_model(values, salt):
    """positioned_mix_sum from its definition, in Python integers mod 2^64."""
    M = (1 << 64) - 1

    def signed(x):
        return x - (1 << 64) if x >> 63 else x

    def sxor(x, k):  # x ^ (x >> k), the shift arithmetic on the signed value
        return (x ^ (signed(x) >> k)) & M

    total = 0
    for i, v in enumerate(int(x) for x in values.reshape(-1).tolist()):
        x = (v * -0x4B47D5B1A37C3C43 + i * 0x2545F4914F6CDD1D + salt) & M
        x = sxor((x * -0x61C8864680B583EB) & M, 31)
        total = (total + sxor((x * -0x40A7B892E31B1A47) & M, 29)) & M
    return signed(total)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_positioned_mix_sum_kernel_reference_and_model(dtype):
    gen = torch.Generator().manual_seed(9)
    info = torch.iinfo(dtype)
    for n in (0, 1, 7, 300):
        v = torch.randint(info.min, info.max, (n,), generator=gen, dtype=torch.int64).to(dtype)
        if n >= 2:
            v[0], v[1] = info.min, info.max
        for salt in (0, 3, -5):
            want = _mix_sum_model(v, salt)
            ref = R.positioned_mix_sum_ref(v, salt)
            assert ref.dtype == torch.int64 and ref.dim() == 0 and int(ref) == want
            if ops.HAS_MIX_SUM:
                got = torch.ops.torchrec_esd.positioned_mix_sum(v.view(-1, 1) if n % 2 else v, salt)
                assert got.dtype == torch.int64 and got.dim() == 0 and int(got) == want
    if ops.HAS_MIX_SUM:
        with pytest.raises(RuntimeError, match="int64/int32/int16/uint8"):
            torch.ops.torchrec_esd.positioned_mix_sum(torch.ones(3), 1)
        torch.library.opcheck(torch.ops.torchrec_esd.positioned_mix_sum, (torch.arange(5), 2),
                               test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------
# CUDA kernels vs the CPU reference
# ---------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_build_and_lookup(dtype):
    gen = torch.Generator().manual_seed(4)
    for n in (0, 1, 2, 17, 5000):
        keys = unique_keys(n, dtype, gen, big=n >= 4)
        want = R.id_table_build_ref(keys)
        got = ops.id_table_build(keys.cuda())
        assert got.is_cuda and torch.equal(got.cpu(), want)
        q = torch.cat([keys.to(torch.int64), torch.randint(0, 4 * n + 8, (3000,), generator=gen),
                       torch.tensor([hi_of(dtype)])]).to(dtype)
        assert torch.equal(ops.id_table_lookup(got, q.cuda()).cpu(), R.id_table_lookup_ref(want, q))
    with pytest.raises(RuntimeError, match="duplicate key 5"):
        ops.id_table_build(torch.tensor([5, 1, 5], dtype=dtype, device="cuda"))
    with pytest.raises(RuntimeError, match="non-negative"):
        ops.id_table_build(torch.tensor([5, -1], dtype=dtype, device="cuda"))
    t = ops.id_table_build(torch.tensor([1], dtype=dtype, device="cuda"))
    with pytest.raises(RuntimeError, match="non-negative"):
        ops.id_table_lookup(t, torch.tensor([-3], dtype=dtype, device="cuda"))


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("W", [1, 4])
def test_cuda_cost_matrix(dtype, W):
    gen = torch.Generator().manual_seed(6)
    for B, max_bag in ((0, 3), (50, 6), (500, 80), (7, 3000)):  # last: sort-based dedup
        keys, offsets = random_batch(B, max_bag, 300, dtype, gen)
        tables, weights, miss = make_workers(W, 300, [1, 100, 250], dtype, gen)
        want = R.sample_cost_matrix_ref(keys, offsets, tables, weights, miss)
        cu = lambda ts: [t.cuda() for t in ts]  # noqa: E731
        got = ops.sample_cost_matrix(keys.cuda(), offsets.cuda(), cu(tables), cu(weights),
                                     miss.cuda())
        assert got.is_cuda
        torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-9)
        hits = ops.cache_hit_counts(keys.cuda(), offsets.cuda(), cu(tables))
        assert torch.equal(hits.cpu(), R.cache_hit_counts_ref(keys, offsets, tables))
    keys, offsets, tables, weights, miss = _cost_args()
    with pytest.raises(RuntimeError, match="non-decreasing"):
        ops.sample_cost_matrix(keys.cuda(), torch.tensor([0, 3, 2, 4]).cuda(),
                               [t.cuda() for t in tables], [w.cuda() for w in weights], miss.cuda())
    with pytest.raises(RuntimeError, match="non-negative"):
        ops.sample_cost_matrix(torch.tensor([1, -2, 3, 4]).cuda(), offsets.cuda(),
                               [t.cuda() for t in tables], [w.cuda() for w in weights], miss.cuda())


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_unique_per_group(dtype):
    gen = torch.Generator().manual_seed(8)
    hi = hi_of(dtype)
    cases = [(torch.randint(0, 1000, (n,), generator=gen).to(dtype),
              torch.randint(0, G, (n,), generator=gen), G)
             for n, G in ((0, 2), (1, 1), (5000, 16))]
    ext = torch.tensor([hi, 0, hi, hi - 1, 0], dtype=dtype)
    cases += [(ext, torch.tensor([0, 1, 0, 2, 1]), 3), (ext, torch.zeros(5, dtype=torch.int64), 1)]
    for keys, group, G in cases:
        got = ops.unique_keys_per_group(keys.cuda(), group.cuda(), G)
        want = R.unique_keys_per_group_ref(keys, group, G)
        for a, b in zip(got, want):
            assert a.is_cuda and torch.equal(a.cpu(), b)
    with pytest.raises(RuntimeError, match="group values must be in"):
        ops.unique_keys_per_group(ext.cuda(), torch.tensor([0, 1, 0, 2, 3]).cuda(), 3)


def test_wrappers_fall_back_to_reference(monkeypatch):
    # what ops.py does when the extension failed to load (it warns loudly then)
    monkeypatch.setattr(ops, "EXTENSION_LOADED", False)
    keys = torch.tensor([9, 4, 7])
    t = ops.id_table_build(keys)
    assert torch.equal(t, R.id_table_build_ref(keys))
    assert ops.id_table_lookup(t, torch.tensor([4, 5])).tolist() == [1, -1]
    offsets = torch.tensor([0, 2, 3])
    q = torch.tensor([4, 4, 5])
    assert ops.cache_hit_counts(q, offsets, [t]).tolist() == [[1], [0]]
    uk, ug, c = ops.unique_keys_per_group(q, torch.tensor([1, 1, 0]), 2)
    assert uk.tolist() == [5, 4] and ug.tolist() == [0, 1] and c.tolist() == [1, 2]


# ---------------------------------------------------------------------------
# slot_table_counts: occupied and dirty slots per table
# ---------------------------------------------------------------------------


def _slot_counts_brute(keys, dirty, table_start):
    occ, nd = [], []
    for t in range(table_start.numel() - 1):
        lo, hi = int(table_start[t]), int(table_start[t + 1])
        occ.append(sum(int(k) >= 0 for k in keys[lo:hi]))
        nd.append(sum(bool(d) for d in dirty[lo:hi]))
    return torch.tensor(occ, dtype=torch.int64), torch.tensor(nd, dtype=torch.int64)


@pytest.mark.parametrize("sizes", [[5, 0, 17, 1], [0], [64], [3, 3, 0, 0, 9]])
def test_slot_table_counts_equal_the_reference_and_the_definition(sizes):
    g = torch.Generator().manual_seed(sum(sizes) + len(sizes))
    S = sum(sizes)
    table_start = torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0)
    keys = torch.randint(-1, 50, (S,), generator=g)
    dirty = (torch.rand(S, generator=g) < 0.4) & (keys >= 0)
    want = _slot_counts_brute(keys, dirty, table_start)
    for got in (ops.slot_table_counts(keys, dirty, table_start), R.slot_table_counts(keys, dirty, table_start)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert got[0].dtype == torch.int64 and got[0].shape == (len(sizes),)


@pytest.mark.parametrize("args, match", [
    ((torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.bool), torch.tensor([0, 3])), "keys must be"),
    ((torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.bool), torch.tensor([0, 3])),
     "one flag per slot"),
    ((torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.bool), torch.tensor([0, 2])),
     "run from 0 to the 3 slots"),
    ((torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.bool), torch.tensor([0, 2, 1, 3])),
     "must not decrease"),
    ((torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.bool), torch.zeros(0, dtype=torch.int64)),
     "at least one entry"),
])
def test_slot_table_counts_refuse_bad_input_like_the_reference(args, match):
    for fn in (ops.slot_table_counts, R.slot_table_counts):
        with pytest.raises(RuntimeError, match=match):
            fn(*args)
