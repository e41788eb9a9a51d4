"""The grouped dispatcher's C++ kernels (csrc/cpu/heuristic_cpu.cpp) equal their
numpy / PyTorch references bit for bit: the total-objective regret heuristic
(prices, assignment, lower bound) and the stage-1 group price."""

import numpy as np
import pytest
import torch

from torchrec_esd import ops
from torchrec_esd.dispatch import make_dispatcher
from torchrec_esd.dispatch.heuristic import price_greedy, total_heuristic
from torchrec_esd.dispatch.lower_bound import dual_value
from test_dispatch import _grouped_world  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.skipif(not ops.has_grouped_kernels(), reason="C++ grouped-dispatch kernels not built")


def _instances(rng, n):
    for t in range(n):
        b, w = int(rng.integers(1, 200)), int(rng.integers(1, 18))
        c = rng.random((b, w)) * np.exp(rng.standard_normal(w))
        if t % 3 == 0:
            c = np.round(c, 1)  # many ties: regret ties, equal minima, equal prices
        if t % 7 == 0:
            c[:] = 1.0
        counts = np.bincount(rng.integers(0, w, b), minlength=w)
        yield c, counts.tolist()


def test_heuristic_total_solve_equals_price_greedy():
    rng = np.random.default_rng(0)
    for c, shares in _instances(rng, 300):
        for sweeps in (0, 1, 3):
            a_ref, u_ref = price_greedy(c, shares, sweeps)
            a, u, lb = ops.heuristic_total_solve(torch.from_numpy(c), shares, sweeps)
            assert np.array_equal(a.numpy(), a_ref), (c.shape, shares, sweeps)
            assert np.array_equal(u.numpy(), u_ref)
            assert lb == dual_value(c, shares, u_ref)
        a, info = total_heuristic(c, shares, improve_sweeps=1)
        a_ref, info_ref = total_heuristic(c, shares, improve_sweeps=1, kernel=False)
        assert np.array_equal(a, a_ref) and info == info_ref


def test_heuristic_total_solve_equals_price_greedy_on_large_batches():
    # columns longer than the kernel's sampled selection threshold (2048), with and without ties
    rng = np.random.default_rng(7)
    for b, w, digits in ((3000, 3, None), (5000, 6, 2), (4100, 2, 1)):
        c = rng.random((b, w)) * rng.uniform(0.1, 10, w)
        if digits is not None:
            c = np.round(c, digits)
        shares = np.bincount(rng.integers(0, w, b), minlength=w).tolist()
        a_ref, u_ref = price_greedy(c, shares, 3)
        a, u, lb = ops.heuristic_total_solve(torch.from_numpy(c), shares, 3)
        assert np.array_equal(a.numpy(), a_ref) and np.array_equal(u.numpy(), u_ref)
        assert lb == dual_value(c, shares, u_ref)


def test_heuristic_total_solve_rejects_bad_shares():
    a, u, lb = ops.heuristic_total_solve(torch.zeros(0, 3, dtype=torch.float64), [0, 0, 0])
    assert a.numel() == 0 and torch.equal(u, torch.zeros(3, dtype=torch.float64)) and lb == 0.0
    c = torch.ones(4, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="add up to"):
        ops.heuristic_total_solve(c, [1, 2])
    with pytest.raises(RuntimeError, match=">= 0"):
        ops.heuristic_total_solve(c, [5, -1])
    with pytest.raises(RuntimeError, match="one entry per cost column"):
        ops.heuristic_total_solve(c, [4])


@pytest.mark.parametrize("staleness", [0, 2])
def test_group_price_equals_reference(staleness):
    from torchrec_esd.cost.group_inputs import GroupInputs, link_groups

    cm, cd, kjt = _grouped_world(11, staleness=staleness, batch=120)
    gi = GroupInputs(cm, kjt, cd.cache_state())
    assert bool(gi.hits.outdated.any()) and bool((~gi.hits.outdated).any())
    b = kjt.stride()
    rng = np.random.default_rng(2)
    for size in (1, 3, 4, 11):
        for shares in (cm.config.batch_shares(b), np.bincount(rng.integers(0, 11, b), minlength=11).tolist()):
            active = [w for w, s in enumerate(shares) if s > 0]
            groups = link_groups(cm.bytes_per_second, active, size)
            got = gi.group_matrix(groups, shares)
            ref = gi.group_matrix_reference(groups, shares)
            assert torch.equal(got, ref), (size, shares)


@pytest.mark.parametrize("staleness", [0, 2])
def test_group_slice_equals_reference(staleness):
    from torchrec_esd.cost.group_inputs import GroupInputs

    cm, cd, kjt = _grouped_world(11, staleness=staleness, batch=120)
    state = cd.cache_state()
    gi = GroupInputs(cm, kjt, state)
    assert bool(gi.has_owner.any()) and float(gi.uses.max()) > 1
    full = cm.expected_matrix(kjt, state)
    rng = np.random.default_rng(3)
    for workers in (list(range(11)), [2, 5], [6], [0, 3, 4, 9], [10, 1]):
        for n in (1, 17, 120):
            samples = torch.from_numpy(np.sort(rng.choice(kjt.stride(), n, replace=False)))
            got, none = gi.sub_matrix(samples, workers, "expected")
            ref, _ = gi.sub_matrix_reference(samples, workers, "expected")
            assert none is None and torch.equal(got, ref), (workers, n)
            assert torch.equal(got, full[samples][:, sorted(workers)] if workers == sorted(workers)
                               else full[samples][:, workers])
    with pytest.raises(RuntimeError, match="ascending"):
        gi.sub_matrix(torch.tensor([5, 3]), [0, 1], "expected")


def test_group_price_in_any_pair_order():
    # unsorted pairs take the pair-order loop: equal to index_add_ of the keys' rows in pair order
    from torchrec_esd.cost.group_inputs import GroupInputs, link_groups

    cm, cd, kjt = _grouped_world(11, batch=120)
    gi = GroupInputs(cm, kjt, cd.cache_state())
    b, u = kjt.stride(), gi.st.uniq.numel()
    groups = link_groups(cm.bytes_per_second, list(range(11)), 4)
    shares = cm.config.batch_shares(b)
    ref = gi.group_matrix(groups, shares)
    args = _price_args(gi, groups, shares)
    # each key's row alone: chunks of b keys, one per sample
    rows = torch.cat([ops.group_price(*args[:8], b, torch.arange(min(b, u - c)), torch.arange(c, min(u, c + b)))
                      [:min(b, u - c)] for c in range(0, u, b)])
    perm = torch.from_numpy(np.random.default_rng(5).permutation(gi.occ_s.numel()))
    got = ops.group_price(*args[:8], b, gi.occ_s[perm], gi.occ_k[perm])
    want = torch.zeros(b, len(groups), dtype=torch.float64).index_add_(0, gi.occ_s[perm], rows[gi.occ_k[perm]])
    assert torch.equal(got, want)
    assert torch.allclose(got, ref, rtol=1e-12, atol=0)


def _price_args(gi, groups, shares):
    W = gi.row_time.shape[0]
    group_of = torch.full((W,), -1, dtype=torch.int64)
    for k, g in enumerate(groups):
        group_of[torch.tensor(g)] = k
    rt = torch.stack([gi.row_time[g].min(0).values for g in groups], 1).contiguous()
    ev = torch.stack([gi.evict_time[g].min(0).values for g in groups], 1).contiguous()
    per = torch.tensor([max(sum(shares[w] for w in g) / len(g) - 1.0, 0.0) for g in groups], dtype=torch.float64)
    h = gi.hits
    return (h.key, group_of[h.worker], h.outdated, gi.st.table_of, rt, ev, gi.uses, per, gi.num_samples,
            gi.occ_s, gi.occ_k)


def test_sample_key_pairs_equal_reference():
    from torchrec_esd.cost.group_inputs import sample_key_pairs_reference

    rng = np.random.default_rng(4)
    for b, u in ((0, 0), (1, 1), (5, 3), (200, 40), (300, 1000)):
        lens = torch.from_numpy(rng.integers(0, 6, b))
        offsets = torch.zeros(b + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lens, 0)
        n = int(offsets[-1])
        kidx = torch.from_numpy(rng.integers(0, u, n)) if u else torch.zeros(0, dtype=torch.int64)
        got = ops.sample_key_pairs(offsets, kidx, u)
        ref = sample_key_pairs_reference(offsets, kidx, u)
        for x, y in zip(got, ref):
            assert x.dtype == y.dtype and torch.equal(x, y), (b, u)
    with pytest.raises(RuntimeError, match="outside"):
        ops.sample_key_pairs(torch.tensor([0, 2]), torch.tensor([0, 7]), 3)


def test_bucket_order_is_the_stable_argsort():
    g = torch.Generator().manual_seed(6)
    for n, k in ((0, 0), (0, 3), (10, 1), (1000, 7), (5000, 256)):
        bins = torch.randint(0, max(k, 1), (n,), generator=g)
        order, ptr = ops.bucket_order(bins, k)
        assert torch.equal(order, torch.argsort(bins, stable=True))
        assert ptr[0] == 0 and torch.equal(ptr[1:] - ptr[:-1], torch.bincount(bins, minlength=k))
    with pytest.raises(RuntimeError, match="outside"):
        ops.bucket_order(torch.tensor([0, 3]), 3)


def test_grouped_decide_same_with_and_without_kernels(monkeypatch):
    cm, cd, kjt = _grouped_world(23, batch=230)
    shares = cm.config.batch_shares(kjt.stride())
    d = make_dispatcher("grouped", group_size=4)
    fast = d.decide(cm, kjt, cd.cache_state, shares)
    monkeypatch.setattr(ops, "HAS_GROUPED_KERNELS", False)
    assert not ops.has_grouped_kernels()
    ref = d.decide(cm, kjt, cd.cache_state, shares)
    assert torch.equal(fast.assignment, ref.assignment) and fast.objective == ref.objective


@pytest.mark.skipif(not ops.HAS_GROUP_PRICE_BITS, reason="group_price_bits not built")
def test_group_price_bits_equals_the_pytorch_price_on_random_slices():
    """The one-pass stage-1 price from row keys and group bits equals the PyTorch price
    (group_inputs.group_price on the distinct (sample, key) pairs) bit for bit: repeated keys
    within a sample, empty samples, keys held nowhere, fresh and outdated-only groups."""
    from torchrec_esd.cost.group_inputs import group_price, sample_key_pairs_reference

    rng = np.random.default_rng(3)
    for trial in range(60):
        T, G = int(rng.integers(1, 5)), int(rng.integers(1, 32))
        rows = rng.integers(1, 50, T)
        row_offset = torch.from_numpy(np.concatenate([[0], np.cumsum(rows)])).to(torch.int64)
        b = int(rng.integers(1, 40))
        lengths = rng.integers(0, 6, b)
        offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])).to(torch.int64)
        keys = torch.from_numpy(rng.integers(0, int(row_offset[-1]), int(lengths.sum()))).to(torch.int64)
        # group bits of a random subset of the keys: held groups, a fresh subset of them
        known = torch.unique(keys)[torch.from_numpy(rng.random(torch.unique(keys).numel()) < 0.7)]
        held = torch.from_numpy(rng.integers(0, 1 << G, known.numel())).to(torch.int64)
        fresh = held & torch.from_numpy(rng.integers(0, 1 << G, known.numel())).to(torch.int64)
        table = torch.full((ops.id_table_capacity(max(1, known.numel())), 2), -1, dtype=torch.int64)
        some = held > 0
        ops.id_table_assign(table, known[~some], known[some], held[some] | (fresh[some] << 31))
        W = G + 2
        row_time = torch.from_numpy(rng.random((W, T)) * 1e-4)
        evict_time = row_time * torch.from_numpy(rng.random((W, T)))
        if trial % 4 == 0:
            evict_time.zero_()
        groups = [[g] for g in range(G)]
        groups[0] = [0, G, G + 1]
        shares = rng.integers(0, 30, W).tolist()
        from torchrec_esd.cost.group_inputs import _group_terms

        _, rt, ev, per = _group_terms(row_time, evict_time, groups, shares)
        got = ops.group_price_bits(keys, offsets, table, row_offset, rt, ev, per)
        # the reference: distinct keys and pairs in PyTorch, the bits per key, the PyTorch price
        uniq = torch.unique(keys)
        kidx = torch.searchsorted(uniq, keys)
        occ_s, occ_k, _, uses = sample_key_pairs_reference(offsets, kidx, uniq.numel())
        v = ops.id_table_lookup(table, uniq).clamp(min=0)
        bit = torch.ones(G, dtype=torch.int64) << torch.arange(G)
        held_m, fresh_m = (v.view(-1, 1) & bit) != 0, ((v >> 31).view(-1, 1) & bit) != 0
        table_of = torch.searchsorted(row_offset, uniq, right=True) - 1
        want = group_price(held_m, fresh_m, table_of, row_time, evict_time, groups, shares, uses, b, occ_s, occ_k)
        assert torch.equal(got, want), trial
    with pytest.raises(RuntimeError, match="outside the tables"):
        ops.group_price_bits(torch.tensor([0, int(row_offset[-1])]), torch.tensor([0, 2]), table, row_offset, rt,
                             ev, per)
    with pytest.raises(RuntimeError, match="offsets must run"):
        ops.group_price_bits(keys, offsets[:-1], table, row_offset, rt, ev, per)
    torch.library.opcheck(torch.ops.torchrec_esd.group_price_bits, (keys, offsets, table, row_offset, rt, ev, per),
                          test_utils=("test_schema", "test_faketensor"))
