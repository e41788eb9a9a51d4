"""Dispatchers: exactness against brute force, validity on odd inputs, hybrid."""

import itertools
import math

import numpy as np
import pytest
import torch

from torchrec_esd.dispatch import (
    DISPATCHERS,
    DispatchError,
    HybridDis,
    OptimalDispatcher,
    check_assignment,
    make_dispatcher,
    objective_value,
    proven_lower_bound,
)
from torchrec_esd.dispatch.heuristic import greedy_rounds, makespan_heuristic, total_heuristic
from torchrec_esd.dispatch.lower_bound import dual_value, makespan_lower_bound, transport_lower_bound
from torchrec_esd.dispatch.optimal import (
    cancel_negative_cycles,
    expand_group_flows,
    group_rows,
    mcf_total,
    solve_total,
)

# dispatchers that honour the given shares (PerBatchShares decides its own: tests/test_shares.py)
NAMES = sorted(n for n, c in DISPATCHERS.items() if not getattr(c, "varies_shares", False))


def _assign(name, cost, shares, **kw):
    d = make_dispatcher(name, **kw)
    aux = None
    if name == "laia":
        # a hit matrix that is not a function of the cost (LAIA ignores bandwidth)
        g = torch.Generator().manual_seed(cost.shape[0] * 31 + cost.shape[1])
        aux = {"hits": torch.randint(0, 4, tuple(cost.shape), generator=g).double()}
    return d.assign(cost, shares, aux=aux)


def _brute(cost: np.ndarray, shares, objective: str) -> float:
    """Enumerate every balanced assignment (multiset permutations)."""
    b, w = cost.shape
    labels = [j for j, s in enumerate(shares) for _ in range(s)]
    best = math.inf
    for perm in set(itertools.permutations(labels)):
        a = np.array(perm)
        per = cost[np.arange(b), a]
        if objective == "total":
            v = per.sum()
        else:
            v = np.bincount(a, weights=per, minlength=w).max()
        best = min(best, v)
    return best


def _random_shares(rng, b, w, allow_zero=False):
    if allow_zero and w > 1 and rng.random() < 0.3:
        cuts = np.sort(rng.integers(0, b + 1, w - 1))
    else:
        base = np.full(w, b // w)
        base[: b % w] += 1
        return rng.permutation(base).tolist()
    return np.diff(np.concatenate([[0], cuts, [b]])).tolist()


def _instances(seed, n, bmax=8, wmax=3):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        b = int(rng.integers(1, bmax + 1))
        w = int(rng.integers(1, wmax + 1))
        kind = rng.integers(0, 3)
        if kind == 0:  # continuous random
            c = rng.random((b, w))
        elif kind == 1:  # few distinct values: ties and duplicate rows
            c = rng.integers(0, 3, (b, w)).astype(np.float64)
        else:  # miss counts x heterogeneous per-row link time (the ESD structure)
            c = rng.integers(0, 6, (b, w)) * rng.choice([1.0, 0.5, 0.25, 0.125], w)
        yield c, _random_shares(rng, b, w, allow_zero=True)


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("method", ["auto", "cycles", "mcf"])
def test_optimal_total_equals_brute_force(method):
    for c, shares in _instances(1, 120):
        d = OptimalDispatcher("total", method=method)
        r = d.assign(torch.from_numpy(c), shares)
        assert r.objective == pytest.approx(_brute(c, shares, "total"), abs=1e-9)
        assert r.info["lower_bound"] <= r.objective + 1e-9 if "lower_bound" in r.info else True


def test_optimal_makespan_equals_brute_force():
    milp_used = 0
    for c, shares in _instances(2, 80):
        r = OptimalDispatcher("makespan").assign(torch.from_numpy(c), shares)
        assert r.objective == pytest.approx(_brute(c, shares, "makespan"), rel=1e-6, abs=1e-9)
        milp_used += int(r.info.get("milp_ran", 0))
    assert milp_used > 0  # the MILP path is exercised, not only the certificate


def test_makespan_milp_alone_matches_brute_force():
    from torchrec_esd.dispatch.optimal import makespan_milp

    for c, shares in _instances(3, 25):
        shares_pos = [s for s in shares if s > 0]
        cols = [j for j, s in enumerate(shares) if s > 0]
        cc = np.ascontiguousarray(c[:, cols])
        a, info = makespan_milp(cc, shares_pos, time_limit_s=10)
        assert a is not None and info["proven_optimal"] == 1.0
        loads = np.bincount(a, weights=cc[np.arange(len(a)), a], minlength=len(cols))
        assert loads.max() == pytest.approx(_brute(cc, shares_pos, "makespan"), rel=1e-6, abs=1e-9)


def test_cycle_cancelling_certificate_on_medium_instance():
    rng = np.random.default_rng(4)
    b, w = 600, 6
    c = rng.integers(0, 20, (b, w)) * (1.0 / np.array([1, 2, 4, 8, 1, 2]))
    shares = [100] * 6
    start = greedy_rounds(c, shares)
    a, phi, iters, tol = cancel_negative_cycles(c, start, max_iters=10_000)
    assert phi is not None and iters > 0
    ref, _ = mcf_total(c, shares)
    v = c[np.arange(b), a].sum()
    assert v == pytest.approx(c[np.arange(b), ref].sum(), abs=1e-9)
    # the potentials certify optimality: dual bound == cost
    assert dual_value(c, shares, phi) >= v - b * tol - 1e-9
    check_assignment(torch.from_numpy(a), shares)


def test_auto_exact_paths_agree_with_min_cost_flow():
    rng = np.random.default_rng(16)
    paths = set()
    for i in range(12):
        b, w = int(rng.integers(100, 400)), int(rng.integers(2, 9))
        c = rng.integers(0, 12, (b, w)) * (1.0 / np.tile([1.0, 2.0, 4.0, 8.0], 3)[:w])
        if i % 3 == 0:
            c = c + rng.random((b, w)) * 1e-3  # break the ties
        shares = _random_shares(rng, b, w)
        a, info = solve_total(c, shares, "auto")
        ref, _ = mcf_total(c, shares)
        check_assignment(torch.from_numpy(a), shares)
        assert c[np.arange(b), a].sum() == pytest.approx(c[np.arange(b), ref].sum(), rel=1e-12, abs=1e-12)
        assert info["certified"] == 1.0
        assert info["lower_bound"] <= c[np.arange(b), a].sum() + 1e-9
        paths.add(info["exact_path"])
    assert 1.0 in paths  # restricted flow + cycle certificate is exercised
    # no cycles allowed from a poor start: the full min-cost flow decides
    c = rng.integers(0, 12, (200, 4)) * 1.0
    start = np.repeat(np.arange(4), 50)
    a, info = solve_total(c, [50] * 4, "cycles", warm_start=start, max_cancel_iters=0)
    assert info["exact_path"] == 3.0
    assert c[np.arange(200), a].sum() == pytest.approx(c[np.arange(200), mcf_total(c, [50] * 4)[0]].sum())
    # no fallback and no time: an uncertified but valid, never worse answer
    a, info = solve_total(c, [50] * 4, "cycles", warm_start=start, deadline=0.0, fallback=False)
    assert info["certified"] == 0.0
    check_assignment(torch.from_numpy(a), [50] * 4)
    assert c[np.arange(200), a].sum() <= c[np.arange(200), start].sum()


def test_mcf_rounding_bound_reported_and_tiny():
    rng = np.random.default_rng(5)
    c = rng.random((200, 4)) * 1e-3
    a, info = mcf_total(c, [50] * 4)
    assert 0 < info["rounding_bound_s"] < 1e-9 * c.sum()


def test_group_rows_and_expand_roundtrip():
    rng = np.random.default_rng(6)
    c = rng.integers(0, 3, (50, 3)).astype(np.float64)
    rows, inv, counts = group_rows(c)
    assert rows.shape[0] < 50 and counts.sum() == 50
    np.testing.assert_array_equal(rows[inv], c)
    assert len({tuple(r) for r in rows}) == rows.shape[0]  # groups are distinct
    flows = np.zeros((rows.shape[0], 3), dtype=np.int64)
    flows[:, 0] = counts // 2
    flows[:, 2] = counts - counts // 2
    a = expand_group_flows(inv, counts, flows)
    for g in range(rows.shape[0]):
        got = np.bincount(a[inv == g], minlength=3)
        np.testing.assert_array_equal(got, flows[g])


# ---------------------------------------------------------------- bounds
def test_lower_bounds_below_optimum_and_tight_with_prices():
    for c, shares in _instances(7, 60):
        shares_pos = [s for s in shares if s > 0]
        cols = [j for j, s in enumerate(shares) if s > 0]
        cc = np.ascontiguousarray(c[:, cols])
        opt_t = _brute(cc, shares_pos, "total")
        opt_m = _brute(cc, shares_pos, "makespan")
        lb, u = transport_lower_bound(cc, shares_pos)
        assert lb <= opt_t + 1e-9
        assert lb >= cc.min(axis=1).sum() - 1e-12  # never worse than the row minimum
        assert makespan_lower_bound(cc, shares_pos) <= opt_m + 1e-9
        assert proven_lower_bound(torch.from_numpy(c), shares) <= opt_t + 1e-9
        assert proven_lower_bound(torch.from_numpy(c), shares, "makespan") <= opt_m + 1e-9


def test_dual_bound_beats_row_minimum_on_heterogeneous_links():
    rng = np.random.default_rng(8)
    c = rng.integers(1, 10, (400, 4)) / np.array([1.0, 2.0, 4.0, 8.0])
    shares = [100] * 4
    lb, _ = transport_lower_bound(c, shares)
    opt = c[np.arange(400), mcf_total(c, shares)[0]].sum()
    row_min = c.min(axis=1).sum()
    assert row_min < 0.6 * opt  # everyone wants the fast link: trivial bound is weak
    assert lb > 0.99 * opt


# ---------------------------------------------------------------- validity
def _check_valid(r, shares, b):
    a = r.assignment
    assert a.dtype == torch.int64 and a.shape == (b,)
    assert torch.bincount(a, minlength=len(shares)).tolist() == list(shares)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("objective", ["total", "makespan"])
def test_every_solver_valid_on_random_and_degenerate(name, objective):
    rng = np.random.default_rng(9)
    cases = []
    for b, w in [(1, 1), (1, 3), (7, 3), (64, 4), (257, 5)]:
        cases.append((rng.random((b, w)), _random_shares(rng, b, w, allow_zero=True)))
    cases.append((np.ones((40, 4)), [10] * 4))  # all costs equal
    cases.append((np.zeros((40, 4)), [0, 20, 0, 20]))  # zero shares
    c = rng.random((30, 3))
    c[:, 1] = np.inf  # unreachable worker with share 0
    cases.append((c, [15, 0, 15]))
    c = rng.random((50, 4))  # every sample prefers worker 0 by far
    c[:, 0] = 0.0
    c[:, 1:] = 1e6
    cases.append((c, [5, 15, 15, 15]))
    cases.append((rng.random((30, 3)) * 1e-12, [10, 10, 10]))  # tiny magnitudes
    cases.append((rng.random((30, 3)) * 1e9, [10, 10, 10]))  # huge magnitudes
    cases.append((rng.random((30, 3)) - 0.5, [10, 10, 10]))  # negative costs
    for c, shares in cases:
        kw = {"objective": objective}
        if name == "optimal":
            kw["time_limit_s"] = 0.5  # continuous random makespan MILPs may not close
        r = _assign(name, torch.from_numpy(c), shares, **kw)
        _check_valid(r, shares, c.shape[0])
        assert math.isfinite(r.objective)
        assert r.decision_s >= 0
        if 0 in shares:
            for j, s in enumerate(shares):
                if s == 0:
                    assert not bool((r.assignment == j).any())


@pytest.mark.parametrize("name", NAMES)
def test_inf_worker_with_positive_share_is_an_error(name):
    c = torch.rand(12, 3, dtype=torch.float64)
    c[:, 2] = math.inf
    with pytest.raises(DispatchError, match="worker 2"):
        _assign(name, c, [4, 4, 4])
    c[0, 0] = math.nan
    with pytest.raises(DispatchError, match="NaN"):
        _assign(name, c, [6, 6, 0])


@pytest.mark.parametrize("name", NAMES)
def test_bad_shares_are_errors(name):
    c = torch.rand(6, 2, dtype=torch.float64)
    with pytest.raises(DispatchError):
        _assign(name, c, [3, 2])
    with pytest.raises(DispatchError):
        _assign(name, c, [7, -1])
    with pytest.raises(DispatchError):
        _assign(name, c, [6])


def test_unknown_dispatcher_and_objective():
    with pytest.raises(DispatchError, match="unknown dispatcher"):
        make_dispatcher("fastest")
    for name in NAMES:
        with pytest.raises(DispatchError):
            make_dispatcher(name, objective="latency")


def test_solvers_never_beat_optimum_and_heuristic_is_close():
    rng = np.random.default_rng(10)
    for _ in range(10):
        b, w = 256, 4
        c = rng.integers(0, 26, (b, w)) * (5e-4 / np.array([1, 2, 4, 8]))
        ct = torch.from_numpy(c)
        shares = [64] * 4
        opt = make_dispatcher("optimal").assign(ct, shares).objective
        for name in NAMES:
            v = _assign(name, ct, shares).objective
            assert v >= opt - 1e-9
        h = make_dispatcher("heuristic").assign(ct, shares).objective
        assert h <= opt * 1.03
        hb = make_dispatcher("hybrid", time_budget_ms=1000).assign(ct, shares)
        assert hb.objective == pytest.approx(opt, rel=1e-9)


def test_makespan_heuristic_close_and_bounds_hold():
    rng = np.random.default_rng(11)
    c = rng.integers(0, 26, (512, 4)) * (5e-4 / np.array([1, 2, 4, 8]))
    shares = [128] * 4
    a, info = makespan_heuristic(c, shares)
    check_assignment(torch.from_numpy(a), shares)
    v = np.bincount(a, weights=c[np.arange(512), a], minlength=4).max()
    assert info["lower_bound"] <= v + 1e-12
    lb = makespan_lower_bound(c, shares)
    assert lb <= v + 1e-12 and v <= 1.03 * lb
    # makespan-aware beats the total-optimal assignment on the makespan
    at, _ = solve_total(c, shares)
    vt = np.bincount(at, weights=c[np.arange(512), at], minlength=4).max()
    assert v <= vt + 1e-12


# ---------------------------------------------------------------- baselines
def test_round_robin_is_contiguous_slices():
    r = make_dispatcher("round_robin").assign(torch.rand(10, 3, dtype=torch.float64), [3, 3, 4])
    assert r.assignment.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    r = make_dispatcher("round_robin").assign(torch.rand(5, 3, dtype=torch.float64), [2, 0, 3])
    assert r.assignment.tolist() == [0, 0, 2, 2, 2]


def test_random_is_seeded_and_varies_per_batch():
    c = torch.rand(40, 4, dtype=torch.float64)
    d1, d2 = make_dispatcher("random", seed=3), make_dispatcher("random", seed=3)
    a1, a2 = d1.assign(c, [10] * 4).assignment, d2.assign(c, [10] * 4).assignment
    assert torch.equal(a1, a2)
    assert not torch.equal(d1.assign(c, [10] * 4).assignment, a1)


def test_laia_follows_hits_and_ignores_bandwidth():
    b = 8
    hits = torch.zeros(b, 2, dtype=torch.float64)
    hits[:4, 0] = 3  # samples 0-3 cached on worker 0
    hits[4:, 1] = 2
    # worker 1 is far cheaper for everything (fast link): LAIA does not care
    cost = torch.stack([torch.full((b,), 10.0), torch.full((b,), 1.0)], 1).double()
    r = make_dispatcher("laia").assign(cost, [4, 4], aux={"hits": hits})
    assert r.assignment.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # capacity: everyone wants worker 0, earliest samples win
    hits = torch.zeros(b, 2, dtype=torch.float64)
    hits[:, 0] = 1
    r = make_dispatcher("laia").assign(cost, [3, 5], aux={"hits": hits})
    assert r.assignment.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    with pytest.raises(DispatchError, match="hit"):
        make_dispatcher("laia").assign(cost, [4, 4])
    with pytest.raises(DispatchError, match="shape"):
        make_dispatcher("laia").assign(cost, [4, 4], aux={"hits": hits[:3]})


def test_regret_greedy_places_high_regret_first():
    # two samples want worker 0 (room 1): the one that loses more gets it
    c = np.array([[0.0, 1.0], [0.0, 5.0]])
    assert greedy_rounds(c, [1, 1]).tolist() == [1, 0]
    a, info = total_heuristic(c, [1, 1], improve_sweeps=0, price_sweeps=0)
    assert a.tolist() == [1, 0]


# ---------------------------------------------------------------- hybrid
def _esd_like(rng, b, w):
    return rng.integers(0, 26, (b, w)) * (5e-4 / np.tile([1, 2, 4, 8], w // 4 + 1)[:w])


def test_hybrid_runs_exact_when_gap_and_budget_allow():
    rng = np.random.default_rng(12)
    c = torch.from_numpy(_esd_like(rng, 512, 8))
    shares = [64] * 8
    opt = make_dispatcher("optimal").assign(c, shares).objective
    h = HybridDis(time_budget_ms=2000, gap_threshold=0.0)
    r = h.assign(c, shares)
    assert r.solver == "hybrid:optimal"
    assert r.info["exact_ran"] == 1.0 and r.info["exact_certified"] == 1.0
    assert r.objective == pytest.approx(opt, rel=1e-12)
    assert r.info["heuristic_cost"] >= r.objective - 1e-12
    assert r.info["lower_bound"] <= r.objective + 1e-9
    assert r.info["gap"] == pytest.approx(0.0, abs=1e-9)
    assert len(h.history) == 1  # the time model learned from the solve


def test_hybrid_skips_exact_when_budget_too_small_or_gap_small():
    rng = np.random.default_rng(13)
    c = torch.from_numpy(_esd_like(rng, 512, 8))
    shares = [64] * 8
    tiny = HybridDis(time_budget_ms=1e-3)
    r = tiny.assign(c, shares)
    assert r.solver == "hybrid:heuristic" and r.info["exact_ran"] == 0.0
    assert r.info["predicted_exact_s"] > 1e-6
    loose = HybridDis(time_budget_ms=5000, gap_threshold=10.0)
    r = loose.assign(c, shares)
    assert r.solver == "hybrid:heuristic"
    assert r.info["gap_heuristic"] <= 10.0


def test_hybrid_cpu_budget_limits_exact_runs():
    rng = np.random.default_rng(14)
    shares = [32] * 8
    h = HybridDis(time_budget_ms=200, cpu_budget=0.01, gap_threshold=0.0, burst=1.0,
                  prior_s_per_cell=1e-5)  # predicted 2.6 ms > credit 2 ms
    runs = 0
    for _ in range(5):
        c = torch.from_numpy(_esd_like(rng, 256, 8))
        runs += int(h.assign(c, shares).info["exact_ran"])
    assert runs == 0
    h = HybridDis(time_budget_ms=200, cpu_budget=1.0, gap_threshold=0.0)
    runs = sum(
        int(h.assign(torch.from_numpy(_esd_like(rng, 256, 8)), shares).info["exact_ran"])
        for _ in range(3)
    )
    assert runs >= 1


def test_hybrid_makespan():
    rng = np.random.default_rng(15)
    c = torch.from_numpy(_esd_like(rng, 256, 4))
    shares = [64] * 4
    r = HybridDis(time_budget_ms=3000, objective="makespan").assign(c, shares)
    ref = OptimalDispatcher("makespan").assign(c, shares)
    assert r.objective <= ref.objective * 1.01
    assert r.info["lower_bound"] <= ref.objective + 1e-9


def test_objective_value_helper():
    c = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
    a = torch.tensor([0, 1, 1])
    assert objective_value(c, a, "total") == 11.0
    assert objective_value(c, a, "makespan") == 10.0


# ---------------------------------------------------------------- esd (de-duplicated cost)
from torchrec_esd.cost import DedupCost  # noqa: E402
from torchrec_esd.dispatch.dedup_refine_reference import _Search, _select_swaps, _swap_candidates  # noqa: E402
from torchrec_esd.dispatch.dedup_search import refine  # noqa: E402
from torchrec_esd.dispatch.heuristic import price_greedy  # noqa: E402


def _coloc_instance():
    """8 samples on 2 workers (worker 1's link 10x slower): samples 0-3 share
    row A, samples 4-7 row B, all use the hot row H.  Every row is a miss
    everywhere, so the additive matrix is the same for every sample (every
    balanced assignment has the same additive cost); the true cost is 33 when
    A and B each stay on one worker (only H is shared) and up to 66 otherwise."""
    occ_s = np.repeat(np.arange(8), 2)
    occ_k = np.array([0, 1] * 4 + [0, 2] * 4)
    rt = np.array([[1.0, 10.0]] * 3)
    return DedupCost(8, 2, occ_s, occ_k, pull=rt, push=rt, owner=np.full(3, -1), owner_push=np.zeros(3))


def _all_balanced(b, shares):
    labels = [j for j, s in enumerate(shares) for _ in range(s)]
    return [np.array(p) for p in set(itertools.permutations(labels))]


def test_esd_colocates_where_additive_dispatch_cannot_tell():
    d = _coloc_instance()
    cost = torch.from_numpy(d.additive_matrix())
    assert float(cost.std()) == 0.0 or torch.allclose(cost, cost[0].expand_as(cost))
    everything = [d.total(a) for a in _all_balanced(8, [4, 4])]
    assert min(everything) == 33.0 and max(everything) == 66.0
    r = make_dispatcher("esd").assign(cost, [4, 4], aux={"dedup": d})
    assert d.total(r.assignment.numpy()) == 33.0
    # never worse than any random dispatch, strictly better on average
    rand = [d.total(make_dispatcher("random", seed=i).assign(cost, [4, 4]).assignment.numpy())
            for i in range(20)]
    assert min(rand) >= 33.0 and np.mean(rand) > 40.0
    # the local search repairs a start one swap away from co-location
    a0 = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    a, info = refine(d, a0)
    assert d.total(a) == 33.0 and info["start_cost"] == 66.0 and info["cost"] == 33.0


def _random_dedup(rng, B, W, K, max_rows=4, every_row_used=False):
    """A random DedupCost: every sample uses 1..max_rows of the K rows
    (``every_row_used``: a row no sample drew goes to a random sample)."""
    pairs = {(int(s), int(k)) for s in range(B)
             for k in rng.choice(K, int(rng.integers(1, min(K, max_rows) + 1)), replace=False)}
    if every_row_used:
        used = {k for _, k in pairs}
        pairs.update((int(rng.integers(0, B)), k) for k in range(K) if k not in used)
    occ = np.array(sorted(pairs))
    rt = rng.choice([1.0, 2.0, 10.0], size=W)[None, :] * np.ones((K, 1))
    pull = rt * rng.choice([0.0, 1.0, 1.25], size=(K, W))
    owner = np.where(rng.random(K) < 0.3, rng.integers(0, W, K), -1)
    return DedupCost(B, W, occ[:, 0], occ[:, 1], pull, rt, owner,
                     np.where(owner >= 0, rt[0, np.maximum(owner, 0)], 0.0))


def test_esd_close_to_brute_force_on_small_instances():
    rng = np.random.default_rng(3)
    gaps = []
    for _ in range(25):
        B, W = int(rng.integers(4, 9)), int(rng.integers(2, 4))
        d = _random_dedup(rng, B, W, int(rng.integers(3, 10)))
        shares = _random_shares(rng, B, W)
        best = min(d.total(a) for a in _all_balanced(B, shares))
        r = make_dispatcher("esd").assign(torch.from_numpy(d.additive_matrix()), shares, aux={"dedup": d})
        _check_valid(r, shares, B)
        v = d.total(r.assignment.numpy())
        assert v >= best - 1e-9
        # never worse than its own start (the local search only improves)
        start, _ = price_greedy(d.amortised_matrix(shares), shares)
        assert v <= d.total(start) + 1e-9
        gaps.append(v / best - 1.0)
    # swap-local optima only: almost always the optimum on instances this small
    assert np.mean(gaps) < 0.02 and np.mean(np.array(gaps) == 0.0) >= 0.8


def test_refine_incremental_state_matches_fresh_computation():
    rng = np.random.default_rng(4)
    for _ in range(10):
        B, W = int(rng.integers(20, 60)), int(rng.integers(2, 5))
        d = _random_dedup(rng, B, W, int(rng.integers(5, 30)))
        a = rng.integers(0, W, B)
        S = _Search(d, a)
        for _ in range(4):  # arbitrary swaps, not only improving ones
            s_, t_ = rng.choice(B, 2, replace=False)
            if S.a[s_] == S.a[t_]:
                continue
            S.apply(np.array([s_, t_]), np.array([S.a[t_], S.a[s_]]))
            np.testing.assert_array_equal(S.cnt, d.counts(S.a))
            np.testing.assert_allclose(S.M, d.move_deltas(S.a), atol=1e-9)
            assert S.cur == pytest.approx(d.total(S.a), abs=1e-9)


def test_selected_swaps_never_do_worse_than_predicted():
    rng = np.random.default_rng(5)
    checked = 0
    for _ in range(40):
        B, W = int(rng.integers(10, 50)), int(rng.integers(2, 5))
        d = _random_dedup(rng, B, W, int(rng.integers(3, 20)))
        a = rng.integers(0, W, B)
        S = _Search(d, a)
        s, t, x, y = _swap_candidates(S.M, S.a, B, 6)
        if s.size == 0:
            continue
        sel, g = _select_swaps(S, s, t, x, y, 1e-12)
        # every swap's gain is exact on its own
        for i in range(s.size):
            b = a.copy()
            b[s[i]], b[t[i]] = y[i], x[i]
            assert d.total(b) - d.total(a) == pytest.approx(g[i], abs=1e-9)
        if sel.size == 0:
            continue
        assert np.unique(np.concatenate([s[sel], t[sel]])).size == 2 * sel.size
        b = a.copy()
        b[s[sel]] = y[sel]
        b[t[sel]] = x[sel]
        assert d.total(b) - d.total(a) <= float(g[sel].sum()) + 1e-9
        checked += 1
    assert checked > 10


def test_esd_zero_share_worker_fallback_and_errors():
    d = _coloc_instance()
    # three workers, the middle one with share 0 (and an unreachable link)
    pull = np.concatenate([d.pull[:, :1], np.full((3, 1), np.inf), d.pull[:, 1:]], 1)
    d3 = DedupCost(8, 3, d.occ_s, d.occ_k, pull, pull, np.full(3, -1), np.zeros(3))
    cost = torch.from_numpy(d3.additive_matrix())
    r = make_dispatcher("esd").assign(cost, [4, 0, 4], aux={"dedup": d3})
    _check_valid(r, [4, 0, 4], 8)
    assert d3.restrict([0, 2]).total(np.where(r.assignment.numpy() == 2, 1, 0)) == 33.0
    # without the de-duplicated model: additive greedy, reported as such
    r = make_dispatcher("esd").assign(torch.rand(8, 2, dtype=torch.float64), [4, 4])
    assert r.solver == "esd:additive"
    _check_valid(r, [4, 4], 8)
    with pytest.raises(DispatchError, match="dedup cost is for 8 samples"):
        make_dispatcher("esd").assign(torch.rand(6, 2, dtype=torch.float64), [3, 3], aux={"dedup": d})
    with pytest.raises(DispatchError, match="restrict"):
        make_dispatcher("esd").assign(torch.rand(8, 2, dtype=torch.float64), [4, 4], aux={"dedup": object()})
    with pytest.raises(DispatchError, match="time_budget_ms"):
        make_dispatcher("esd", time_budget_ms=0)


def test_esd_deadline_returns_the_amortised_start():
    rng = np.random.default_rng(6)
    d = _random_dedup(rng, 200, 4, 60)
    shares = [50] * 4
    r = make_dispatcher("esd", time_budget_ms=1e-9).assign(
        torch.from_numpy(d.additive_matrix()), shares, aux={"dedup": d})
    assert r.info["rounds"] == 0 and r.info["stopped_at_deadline"] == 1.0
    start, _ = price_greedy(d.amortised_matrix(shares), shares)
    np.testing.assert_array_equal(r.assignment.numpy(), start)
    full = make_dispatcher("esd", time_budget_ms=10_000).assign(
        torch.from_numpy(d.additive_matrix()), shares, aux={"dedup": d})
    assert full.info["cost"] <= r.info["cost"]


def test_esd_makespan_objective():
    rng = np.random.default_rng(7)
    d = _random_dedup(rng, 120, 3, 40)
    cost = torch.from_numpy(d.additive_matrix())
    tot = make_dispatcher("esd", time_budget_ms=10_000).assign(cost, [40] * 3, aux={"dedup": d})
    mk = make_dispatcher("esd", objective="makespan", time_budget_ms=10_000).assign(
        cost, [40] * 3, aux={"dedup": d})
    _check_valid(mk, [40] * 3, 120)
    assert d.per_worker(mk.assignment.numpy()).max() <= d.per_worker(tot.assignment.numpy()).max() + 1e-9
    assert mk.info["predicted_makespan_s"] == pytest.approx(d.per_worker(mk.assignment.numpy()).max())


def _small_world(bws=(100.0, 10.0, 1.0)):
    from torchrec_esd.config import EsdConfig, heterogeneous_workers
    from torchrec_esd.cost import CostModel
    from torchrec_esd.apps.workload import SyntheticWorkload, SyntheticWorkloadConfig

    wl = SyntheticWorkload(SyntheticWorkloadConfig(num_sparse=8, max_cardinality=2000, alpha=1.1))
    tables = wl.table_configs(8)
    cfg = EsdConfig(workers=heterogeneous_workers(
        list(bws), cache_rows={t.name: max(1, t.num_embeddings // 10) for t in tables}))
    return wl, tables, cfg, CostModel(cfg, tables, optimizer_state_bytes_per_row=4)


def test_inputs_give_each_dispatcher_what_it_reads():
    from torchrec_esd.cache import CacheDirectory

    wl, tables, cfg, cm = _small_world()
    cd = CacheDirectory(cfg, tables)
    kjt = wl.global_batch(0, 30).sparse_features
    cd.plan(kjt, torch.arange(30) % 3)
    kjt = wl.global_batch(1, 30).sparse_features
    views = cd.views()

    def boom():
        raise AssertionError("a cost-blind dispatcher must not snapshot the directory")

    cost, aux = make_dispatcher("random").inputs(cm, kjt, boom)
    assert aux is None and float(cost.abs().sum()) == 0.0 and cost.shape == (30, 3)
    cost, aux = make_dispatcher("laia").inputs(cm, kjt, lambda: views)
    torch.testing.assert_close(aux["hits"], cm.hit_matrix(kjt, views))
    # LAIA reads the hit counts alone: no cost matrix is built for it
    assert float(cost.abs().sum()) == 0.0 and cost.shape == (30, 3)
    # cost-matrix dispatchers read the expected matrix (shared rows amortised
    # over the config's shares of the batch) unless asked for the additive one
    expected = torch.from_numpy(cm.dedup_cost(kjt, views).amortised_matrix(cfg.batch_shares(30)))
    for name in ("hybrid", "optimal", "heuristic"):
        cost, aux = make_dispatcher(name).inputs(cm, kjt, views)
        assert aux is None
        torch.testing.assert_close(cost, expected, rtol=1e-12, atol=1e-15)
        cost, _ = make_dispatcher(name, cost_input="additive").inputs(cm, kjt, views)
        torch.testing.assert_close(cost, cm.matrix(kjt, views))
    assert not torch.allclose(expected, cm.matrix(kjt, views))
    with pytest.raises(DispatchError, match="cost_input must be one of"):
        make_dispatcher("hybrid", cost_input="amortized")
    cost, aux = make_dispatcher("esd").inputs(cm, kjt, views)
    torch.testing.assert_close(cost, cm.matrix(kjt, views), rtol=1e-12, atol=1e-15)
    assert isinstance(aux["dedup"], DedupCost) and aux["dedup"].num_samples == 30


def test_esd_beats_baselines_on_the_cache_directory_ground_truth():
    """Through the real cache directory (its plans are what the runtime moves),
    esd moves less link time than random, LAIA and the additive optimum."""
    from torchrec_esd.cache import KINDS, CacheDirectory

    wl, tables, cfg, cm = _small_world()
    B, shares = 96, [32, 32, 32]
    link = {}
    for name in ("random", "laia", "hybrid", "esd"):
        d = make_dispatcher(name, **({"time_budget_ms": 10_000} if name == "esd" else {}))
        cd = CacheDirectory(cfg, tables)
        total = 0.0
        for step in range(6):
            kjt = wl.global_batch(step, B).sparse_features
            cost, aux = d.inputs(cm, kjt, cd.views)
            plan = cd.plan(kjt, d.assign(cost, shares, aux=aux).assignment)
            for w, spec in enumerate(cfg.workers):
                rows = sum(plan.workers[w].rows[k] for k in KINDS)
                total += rows * float(cm.row_bytes[0]) / spec.bytes_per_second
        link[name] = total
    assert link["esd"] < 0.95 * min(link["random"], link["laia"], link["hybrid"]), link


def _directory_link_s(name, wl, tables, cfg, cm, steps=6, B=96, **kw):
    """Link seconds the cache directory plans for ``steps`` batches dispatched by ``name``."""
    from torchrec_esd.cache import KINDS, CacheDirectory

    d = make_dispatcher(name, **kw)
    cd = CacheDirectory(cfg, tables)
    total = 0.0
    for step in range(steps):
        kjt = wl.global_batch(step, B).sparse_features
        cost, aux = d.inputs(cm, kjt, cd.views)
        plan = cd.plan(kjt, d.assign(cost, cfg.batch_shares(B), aux=aux).assignment)
        for w, spec in enumerate(cfg.workers):
            rows = sum(plan.workers[w].rows[k] for k in KINDS)
            total += rows * float(cm.row_bytes[0]) / spec.bytes_per_second
    return total


def test_expected_matrix_moves_less_than_the_additive_one():
    """HybridDis on the expected matrix (a hot row pulled once for many samples
    is not charged in full to each) moves less, through the real cache
    directory, than on the additive matrix, and less than LAIA."""
    wl, tables, cfg, cm = _small_world()
    expected = _directory_link_s("hybrid", wl, tables, cfg, cm)
    additive = _directory_link_s("hybrid", wl, tables, cfg, cm, cost_input="additive")
    laia = _directory_link_s("laia", wl, tables, cfg, cm)
    assert expected < 0.97 * additive and expected < laia, (expected, additive, laia)


def test_expected_matrix_with_des_misses_is_the_des_priced_matrix():
    # the per-bag DES price exists only in the additive model: kept as is
    import dataclasses

    from torchrec_esd.cache import CacheDirectory
    from torchrec_esd.cost import CostModel

    wl, tables, cfg, _ = _small_world()
    cfg = dataclasses.replace(cfg, des_misses=True)
    cm = CostModel(cfg, tables, optimizer_state_bytes_per_row=4)

    cd = CacheDirectory(cfg, tables)
    kjt = wl.global_batch(0, 30).sparse_features
    torch.testing.assert_close(cm.expected_matrix(kjt, cd.views()), cm.matrix(kjt, cd.views()))


def test_esd_budget_fraction_of_the_predicted_link_makespan():
    rng = np.random.default_rng(8)
    d = _random_dedup(rng, 300, 4, 80)
    shares = [75] * 4
    cost = torch.from_numpy(d.additive_matrix())
    r = make_dispatcher("esd", time_budget_ms=10_000, budget_fraction=1e-3).assign(cost, shares, aux={"dedup": d})
    start, _ = price_greedy(d.amortised_matrix(shares), shares)
    assert r.info["budget_ms"] == pytest.approx(1e-3 * d.per_worker(start).max() * 1e3)
    r = make_dispatcher("esd", time_budget_ms=5.0, budget_fraction=1e9).assign(cost, shares, aux={"dedup": d})
    assert r.info["budget_ms"] == pytest.approx(5.0)
    with pytest.raises(DispatchError, match="budget_fraction"):
        make_dispatcher("esd", budget_fraction=0.0)


@pytest.mark.parametrize("inner", ["heuristic", "hybrid", "laia"])
@pytest.mark.parametrize("objective", ["total", "makespan"])
def test_grouped_respects_shares_with_many_groups(inner, objective):
    rng = np.random.default_rng(17)
    for b, w in [(1, 3), (9, 5), (200, 11), (301, 23)]:
        c = torch.from_numpy(rng.random((b, w)) * rng.random(w) * 10)
        shares = _random_shares(rng, b, w, allow_zero=True)
        aux = {"hits": torch.from_numpy(rng.integers(0, 4, (b, w))).double()} if inner == "laia" else None
        d = make_dispatcher("grouped", inner=inner, group_size=3, objective=objective)
        r = d.assign(c, shares, aux=aux)
        _check_valid(r, shares, b)
        assert math.isfinite(r.objective)
        if sum(s > 0 for s in shares) > 3:
            assert r.info["groups"] == math.ceil(sum(s > 0 for s in shares) / 3)


@pytest.mark.parametrize("inner", ["heuristic", "hybrid", "optimal"])
def test_grouped_with_one_group_is_the_inner_dispatcher(inner):
    rng = np.random.default_rng(5)
    c = torch.from_numpy(rng.random((120, 6)) * rng.random(6))
    shares = [30, 10, 20, 25, 15, 20]
    g = make_dispatcher("grouped", inner=inner, group_size=6).assign(c, shares)
    ref = make_dispatcher(inner).assign(c, shares)
    assert torch.equal(g.assignment, ref.assignment)
    assert g.objective == ref.objective


def test_grouped_bad_options_and_groups_mix_links():
    with pytest.raises(DispatchError, match="group_size"):
        make_dispatcher("grouped", group_size=0)
    with pytest.raises(DispatchError, match="per-batch model"):
        make_dispatcher("grouped", inner="esd")
    with pytest.raises(DispatchError, match="unknown dispatcher"):
        make_dispatcher("grouped", inner="fastest")
    from torchrec_esd.dispatch.grouped import worker_groups

    c = torch.tensor([5.0, 1, 7, 0, 3, 2, 6, 4], dtype=torch.float64).view(1, 8).repeat(4, 1)
    assert worker_groups(c, 4) == [[1, 3, 4, 5], [0, 2, 6, 7]]  # the 4 cheapest columns, then the rest
    assert worker_groups(c, 3) == [[1, 3, 5], [0, 4, 7], [2, 6]]
    # grouped cannot beat the exact optimum and is not far from the flat heuristic here
    rng = np.random.default_rng(3)
    c = torch.from_numpy(rng.random((240, 12)) * rng.uniform(0.1, 10, 12))
    shares = [20] * 12
    opt = make_dispatcher("optimal").assign(c, shares).objective
    g = make_dispatcher("grouped", group_size=4).assign(c, shares).objective
    assert opt <= g + 1e-9
    rnd = make_dispatcher("random").assign(c, shares).objective
    assert g < rnd


def _grouped_world(num_workers, steps=4, batch=90, staleness=0):
    """A directory with cached, outdated and dirty rows on ``num_workers``
    heterogeneous workers, and the next batch."""
    import dataclasses

    from torchrec_esd.cache import CacheDirectory

    rng = np.random.default_rng(num_workers)
    wl, tables, cfg, _ = _small_world(tuple(rng.uniform(1, 1000, num_workers).tolist()))
    cfg = dataclasses.replace(cfg, staleness=staleness)
    from torchrec_esd.cost import CostModel

    cm = CostModel(cfg, tables, optimizer_state_bytes_per_row=4)
    cd = CacheDirectory(cfg, tables)
    for step in range(steps):
        kjt = wl.global_batch(step, batch).sparse_features
        cd.plan(kjt, torch.from_numpy(rng.integers(0, num_workers, batch)))
    return cm, cd, wl.global_batch(steps, batch).sparse_features


@pytest.mark.parametrize("staleness", [0, 2])
def test_group_inputs_are_the_slices_of_the_full_matrices(staleness):
    # the reference twin: per-group inputs built without the [B, W] matrix equal
    # its slices exactly, for every kind the inner dispatchers read
    from torchrec_esd.cost.group_inputs import GroupInputs

    cm, cd, kjt = _grouped_world(7, staleness=staleness)
    state = cd.cache_state()
    st = cm._state(kjt, state)
    assert bool(st.dirty.any()) and bool((st.cached & st.outdated).any()) and bool(st.cached.any())
    full = {"additive": cm.matrix(kjt, state), "expected": cm.expected_matrix(kjt, state)}
    hits = cm.hit_matrix(kjt, state)
    gi = GroupInputs(cm, kjt, state)
    rng = np.random.default_rng(0)
    for workers in ([0, 1, 2, 3, 4, 5, 6], [2, 5], [6], [0, 3, 4]):
        samples = torch.from_numpy(np.sort(rng.choice(kjt.stride(), 37, replace=False)))
        for kind, m in full.items():
            sub, h = gi.sub_matrix(samples, workers, kind, hits=True)
            assert torch.equal(sub, m[samples][:, workers]), (kind, workers)
            assert torch.equal(h, hits[samples][:, workers])
        zero, none = gi.sub_matrix(samples, workers, "none")
        assert none is None and torch.equal(zero, torch.zeros(37, len(workers), dtype=torch.float64))
    with pytest.raises(ValueError, match="kind"):
        gi.sub_matrix(samples, [0], "fastest")


@pytest.mark.parametrize("staleness", [0, 2])
def test_stage1_price_from_group_bits_is_the_price_from_the_cached_copies(staleness):
    # stage 1 of the split decision reads which groups hold each key from the directory's
    # group bits (one probe per key) instead of every cached copy: the same [B, G] matrix
    from torchrec_esd.cost.group_inputs import GroupInputs, group_matrix_from_bits, link_groups

    cm, cd, kjt = _grouped_world(11, staleness=staleness)
    state = cd.cache_state()
    b = kjt.stride()
    rng = np.random.default_rng(1)
    for shares in (cm.config.batch_shares(b), _random_shares(rng, b, 11, allow_zero=True)):
        active = [w for w, s in enumerate(shares) if s > 0]
        for size in (1, 3, 4):
            groups = link_groups(cm.bytes_per_second, active, size)
            gi = GroupInputs(cm, kjt, state)
            want = gi.group_matrix(groups, shares)
            assert torch.equal(want, gi.group_matrix_reference(groups, shares))
            for kernel in (True, False):  # the one-pass C++ kernel and the PyTorch path
                got = group_matrix_from_bits(cm, kjt, state, groups, shares, kernel=kernel)
                assert torch.equal(got, want), (size, shares, kernel)
            if size == 3:  # the instance has keys held fresh, held outdated only, and held nowhere, per group
                keys, _ = cm.row_keys(kjt)
                gof = torch.full((11,), -1, dtype=torch.int64)
                for gi_, g in enumerate(groups):
                    gof[torch.tensor(g)] = gi_
                held, fresh = state.group_bits(torch.unique(keys), gof)
                assert bool((fresh != 0).any()) and bool((held & ~fresh != 0).any())
                assert bool((held != (1 << len(groups)) - 1).any())


def test_grouped_split_decision_is_the_same_with_and_without_group_bits():
    from torchrec_esd.cache.directory_state import DirectoryCacheState

    class CopiesOnly:  # the live state without its group bits: stage 1 reads every cached copy
        def __init__(self, st):
            self._st = st
            self.tables, self.occupied, self.ndirty, self.capacity = st.tables, st.occupied, st.ndirty, st.capacity

        def lookup(self, keys):
            return self._st.lookup(keys)

    cm, cd, kjt = _grouped_world(23, batch=230)
    b = kjt.stride()
    d = make_dispatcher("grouped", inner="heuristic", group_size=3, stage1_slices=4)
    state = cd.cache_state()
    assert isinstance(state, DirectoryCacheState)
    with_bits = d.decide(cm, kjt, state, cm.config.batch_shares(b))
    assert cd.holder_index()._gbits is not None  # the bits were read
    copies = d.decide(cm, kjt, CopiesOnly(state), cm.config.batch_shares(b))
    assert torch.equal(with_bits.assignment, copies.assignment) and with_bits.objective == copies.objective


@pytest.mark.parametrize("inner", ["heuristic", "hybrid", "laia", "random"])
@pytest.mark.parametrize("objective", ["total", "makespan"])
def test_grouped_decide_is_valid_at_many_groups(inner, objective):
    from torchrec_esd.cost.group_inputs import link_groups

    cm, cd, kjt = _grouped_world(23, batch=230)
    b = kjt.stride()
    rng = np.random.default_rng(1)
    for shares in (cm.config.batch_shares(b), _random_shares(rng, b, 23, allow_zero=True)):
        d = make_dispatcher("grouped", inner=inner, group_size=3, objective=objective)
        r = d.decide(cm, kjt, cd.cache_state, shares)
        _check_valid(r, shares, b)
        active = [w for w, s in enumerate(shares) if s > 0]
        assert r.solver == "grouped" and r.info["groups"] == math.ceil(len(active) / 3)
        assert r.info["inputs_s"] >= 0 and r.decision_s >= r.info["stage1_s"] >= 0
        # the whole decision's CPU time is reported (the grouped path's own decide)
        assert r.info["full_decision_cpu_s"] > 0
        # the reported objective is the full matrix's for this assignment
        full = cm.matrix(kjt, cd.cache_state()) if d.cost_input == "additive" else cm.expected_matrix(kjt, cd.cache_state())
        if d.needs_cost:
            assert r.objective == pytest.approx(objective_value(full, r.assignment, objective), rel=1e-12)
        # each group's workers get the samples of that group: groups are cut by link speed
        groups = link_groups(cm.bytes_per_second, active, 3)
        assert sorted(w for g in groups for w in g) == active
        bps = cm.bytes_per_second
        for g0, g1 in zip(groups, groups[1:]):
            assert float(bps[g0].min()) >= float(bps[g1].max())
    # one group, or DES misses: the full-input path (the inner dispatcher's answer)
    d = make_dispatcher("grouped", inner="heuristic", group_size=64)
    shares = cm.config.batch_shares(b)
    ref = make_dispatcher("heuristic")
    assert torch.equal(d.decide(cm, kjt, cd.cache_state, shares).assignment,
                       ref.decide(cm, kjt, cd.cache_state, shares).assignment)
    with pytest.raises(DispatchError, match="do not split"):
        d.decide(cm, kjt, cd.cache_state, shares[:-1])


def _hybrid_solvers(bws, steps=7, name="hybrid", **kw):
    """HybridDis.decide (or another StakeRule dispatcher's) on ``steps`` batches through a real cache directory:
    the results, and the shares of every batch."""
    from torchrec_esd.cache import CacheDirectory

    wl, tables, cfg, cm = _small_world(bws)
    cd = CacheDirectory(cfg, tables)
    d = make_dispatcher(name, **kw)
    out, B = [], 60
    shares = cfg.batch_shares(B)
    for step in range(steps):
        kjt = wl.global_batch(step, B).sparse_features
        r = d.decide(cm, kjt, cd.cache_state, shares)
        _check_valid(r, shares, B)
        cd.plan(kjt, r.assignment)
        out.append(r)
    return out, shares


@pytest.mark.parametrize("name", ["laia", "heuristic", "random"])
def test_decide_reports_the_time_its_inputs_took_beside_the_solve(name):
    from torchrec_esd.cache import CacheDirectory

    wl, tables, cfg, cm = _small_world((100.0, 50.0, 10.0))
    cd = CacheDirectory(cfg, tables)
    kjt = wl.global_batch(0, 60).sparse_features
    shares = cfg.batch_shares(60)
    r = make_dispatcher(name).decide(cm, kjt, cd.cache_state, shares)
    _check_valid(r, shares, 60)
    assert r.info["inputs_s"] > 0 and r.decision_s > 0
    # assign() alone builds no inputs: nothing to report
    cost, aux = make_dispatcher(name).inputs(cm, kjt, cd.cache_state)
    assert "inputs_s" not in make_dispatcher(name).assign(cost, shares, aux=aux).info


@pytest.mark.parametrize("name", ["laia", "esd", "hybrid"])
def test_decide_reports_its_cpu_time_and_its_wait_for_a_core(name, monkeypatch):
    """The whole decision's CPU time (and, where the kernel has it, the time the thread
    waited for a core) beside its wall time: a decision that spins in CPU reports it."""
    import time as _time

    from torchrec_esd.cache import CacheDirectory
    from torchrec_esd.dispatch import clock

    wl, tables, cfg, cm = _small_world((100.0, 50.0, 10.0))
    cd = CacheDirectory(cfg, tables)
    kjt = wl.global_batch(0, 60).sparse_features
    shares = cfg.batch_shares(60)
    d = make_dispatcher(name, stake_ratio=0.0) if name != "laia" else make_dispatcher(name)
    plain_inputs = d.inputs

    def spinning_inputs(*a, **k):  # 30 ms of this thread's CPU inside the decision
        t = _time.thread_time()
        while _time.thread_time() - t < 0.03:
            pass
        return plain_inputs(*a, **k)

    monkeypatch.setattr(d, "inputs", spinning_inputs)
    t0 = _time.perf_counter()
    r = d.decide(cm, kjt, cd.cache_state, shares)
    wall = _time.perf_counter() - t0
    _check_valid(r, shares, 60)
    cpu = r.info["full_decision_cpu_s"]
    assert 0.03 <= cpu <= wall + 1e-3
    if clock.runqueue_wait_s() is not None:
        assert 0.0 <= r.info["full_decision_runqueue_s"] <= wall - cpu + 2e-3
    # without the scheduler's statistics the wait is left out, not made up
    monkeypatch.setattr(clock, "_SCHEDSTAT", "/nonexistent/schedstat")
    assert clock.runqueue_wait_s() is None
    r = d.decide(cm, kjt, cd.cache_state, shares)
    assert "full_decision_runqueue_s" not in r.info and r.info["full_decision_cpu_s"] > 0


@pytest.mark.parametrize("name", ["hybrid", "esd"])
def test_hybrid_takes_the_plain_split_when_the_link_at_stake_is_below_its_decision_time(name):
    from torchrec_esd.dispatch.baselines import contiguous_slices as plain_split

    # links so fast that the slowest link of any split takes far less than a
    # decision (picoseconds): after each full decision, probe_every - 1 splits
    fast, shares = _hybrid_solvers((1e9, 1e9, 1e9), name=name, probe_every=3)
    kinds = ["split" if r.solver == f"{name}:split" else "full" for r in fast]
    assert kinds == ["full", "split", "split", "full", "split", "split", "full"]
    for r in fast:
        if r.solver == f"{name}:split":
            assert torch.equal(r.assignment, plain_split(shares)) and math.isnan(r.objective)
        else:
            assert 0 <= r.info["stake_s"] < r.info["full_decision_cpu_s"] and r.info["full_decision_s"] > 0
            # the whole decision is its inputs plus the solve
            assert 0 < r.info["inputs_s"] and r.info["inputs_s"] + r.decision_s <= r.info["full_decision_s"]
    # links so slow that a split's slowest link takes seconds: always decide
    slow, _ = _hybrid_solvers((1e-3, 1e-3, 1e-4), name=name, probe_every=3)
    assert all(r.solver != f"{name}:split" for r in slow)
    assert all(r.info["stake_s"] > max(r.info["full_decision_cpu_s"], r.info["full_decision_s"]) for r in slow)
    # stake_ratio=0: the rule is off
    off, _ = _hybrid_solvers((1e9, 1e9, 1e9), name=name, probe_every=3, stake_ratio=0.0)
    assert all(r.solver != f"{name}:split" for r in off)
    assert torch.equal(plain_split([2, 0, 3]), torch.tensor([0, 0, 2, 2, 2]))
    with pytest.raises(DispatchError, match="stake_ratio"):
        HybridDis(stake_ratio=-1.0)
    with pytest.raises(DispatchError, match="probe_every"):
        HybridDis(probe_every=0)


def test_split_makespan_is_the_slowest_worker_of_the_plain_split():
    from torchrec_esd.dispatch.stake import split_makespan

    inf = float("inf")
    c = torch.tensor([[1.0, inf, 0.0], [2.0, inf, 0.0], [0.0, inf, 0.5], [9.0, inf, 0.5], [0.0, inf, 1.0]])
    assert split_makespan(c, [2, 0, 3]) == 3.0  # worker 0: 1 + 2; worker 2: 0.5 + 0.5 + 1
    assert split_makespan(torch.zeros(0, 3, dtype=torch.float64), [0, 0, 0]) == 0.0


@pytest.mark.parametrize("slow_calls", [1, 100])
def test_a_split_verdict_on_the_first_decision_is_timed_again(monkeypatch, slow_calls):
    """The first decision pays one-time costs: its split verdict is confirmed by
    timing the same decision again; a dispatcher slow on every call still splits."""
    import time as _time

    calls = {"n": 0}
    real_inputs = HybridDis.inputs

    def inputs(self, *a, **k):
        calls["n"] += 1
        if calls["n"] <= slow_calls:  # burn 60 ms of this thread's CPU
            c0 = _time.thread_time()
            while _time.thread_time() - c0 < 0.06:
                pass
        return real_inputs(self, *a, **k)

    monkeypatch.setattr(HybridDis, "inputs", inputs)
    monkeypatch.setattr(HybridDis, "stake_s", lambda self, cost, aux, shares: 0.03)  # 30 ms at stake
    res, _ = _hybrid_solvers((100.0, 50.0, 10.0), steps=3, name="hybrid", probe_every=3)
    first = res[0].info
    assert first["first_decision_cpu_s"] >= 0.06 and calls["n"] >= 2
    if slow_calls == 1:
        assert first["full_decision_cpu_s"] < 0.03  # the second timing: no one-time cost
        assert [r.solver.endswith(":split") for r in res] == [False, False, False]
    else:
        assert first["full_decision_cpu_s"] >= 0.06
        assert [r.solver.endswith(":split") for r in res] == [False, True, True]


@pytest.mark.parametrize("name", ["random", "round_robin"])
def test_input_blind_dispatchers_decide_without_reading_the_caches(name):
    """random / round_robin read no inputs: decide() builds no [B, W] matrix and never
    reads the caches, and gives assign()'s assignment (the same seed) with zero shares too."""
    wl, tables, cfg, cm = _small_world((100.0, 50.0, 10.0))
    kjt = wl.global_batch(0, 60).sparse_features

    def views():
        raise AssertionError("an input-blind dispatcher read the caches")

    for shares in ([20, 20, 20], [0, 45, 15], [60, 0, 0]):
        r = make_dispatcher(name).decide(cm, kjt, views, shares)
        _check_valid(r, shares, 60)
        ref = make_dispatcher(name).assign(torch.zeros(60, 3, dtype=torch.float64), shares)
        assert torch.equal(r.assignment, ref.assignment) and r.objective == ref.objective == 0.0
        assert r.solver == name and r.info["inputs_s"] >= 0 and r.decision_s >= 0
    with pytest.raises(DispatchError, match="add up to"):
        make_dispatcher(name).decide(cm, kjt, views, [20, 20, 19])
    with pytest.raises(DispatchError, match="shares for"):
        make_dispatcher(name).decide(cm, kjt, views, [30, 30])


def test_slice_capacities_deal_every_group_over_the_slices():
    from torchrec_esd.dispatch.grouped import slice_capacities

    rng = np.random.default_rng(7)
    for _ in range(40):
        caps = rng.integers(0, 60, rng.integers(1, 9)).tolist()
        k = int(rng.integers(1, 12))
        c = np.array(slice_capacities(caps, k))
        B = sum(caps)
        assert c.shape == (k, len(caps)) and (c >= 0).all()
        assert c.sum(0).tolist() == caps  # every group's parts add up to its capacity
        assert c.sum(1).tolist() == [(j + 1) * B // k - j * B // k for j in range(k)]  # contiguous cuts
        # each slice gets about each group's proportional part (the seats are dealt evenly)
        want = np.outer(c.sum(1), caps) / max(B, 1)
        assert (np.abs(c - want) < 2.0).all(), (caps, k, c)
    with pytest.raises(DispatchError):
        slice_capacities([3, -1], 2)


@pytest.mark.parametrize("inner", ["heuristic", "laia"])
def test_grouped_split_decision_keeps_the_shares_and_reports_its_critical_path(inner):
    cm, cd, kjt = _grouped_world(23, batch=230)
    b = kjt.stride()
    rng = np.random.default_rng(2)
    for shares in (cm.config.batch_shares(b), _random_shares(rng, b, 23, allow_zero=True)):
        d = make_dispatcher("grouped", inner=inner, group_size=3, stage1_slices=4)
        r = d.decide(cm, kjt, cd.cache_state, shares)
        _check_valid(r, shares, b)
        active = [w for w, s in enumerate(shares) if s > 0]
        assert r.info["groups"] == math.ceil(len(active) / 3) and r.info["slices"] == 4
        assert 0 < r.info["critical_s"] <= r.info["stage1_s_max"] + r.info["join_s"] + r.info["group_s_sum"]
        assert r.info["group_s_max"] <= r.info["group_s_sum"]
        # every slice's stage 1 and every group's read are timed: the critical path is their slowest,
        # with the join of the slices' decoded keys (which the groups read theirs from) between
        assert r.info["stage1_s_max"] > 0 and r.info["join_s"] >= 0 and r.info["critical_s"] == pytest.approx(
            r.info["stage1_s_max"] + r.info["join_s"] + r.info["group_s_max"])
    with pytest.raises(DispatchError, match="stage1_slices"):
        make_dispatcher("grouped", stage1_slices=0)
