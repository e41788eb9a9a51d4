"""The C++ start of the esd dispatcher (torchrec_esd::dedup_start) against its
numpy reference (start_reference: price_greedy on DedupCost.amortised_matrix):
the same assignment, bit for bit, on batches of the iid and sessions workloads
read against real cache states (W = 4 and a heterogeneous W = 3, staleness 0
and 1, plain and makespan-scaled costs) and on random instances."""

import os
import sys

import numpy as np
import pytest
import torch

from torchrec_esd import ops
from torchrec_esd.apps.sessions import make_workload, make_workload_config
from torchrec_esd.cache import CacheDirectory
from torchrec_esd.cost.dedup import amortise_factors, amortise_table
from torchrec_esd.dispatch import make_dispatcher
from torchrec_esd.dispatch.dedup_search import refine, start, start_and_refine, start_reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import dispatch_true_cost as dtc  # noqa: E402
from test_dispatch import _random_dedup  # noqa: E402  (tests/ is on sys.path under pytest)

needs_op = pytest.mark.skipif(not ops.has_dedup_start(), reason="extension without dedup_start")


def workload_world(workload, bandwidths, argv=()):
    """``dispatch_true_cost.py``'s world for ``workload`` on links of
    ``bandwidths`` (its command-line ``argv``): the workload, its tables, the
    config, the cost model and a cold cache directory."""
    args = dtc.parse_args(list(argv))
    wl = make_workload(make_workload_config(workload))
    tables, config, cm, _ = dtc.build(args, wl, bandwidths)
    return wl, tables, config, cm, CacheDirectory(config, tables)


def test_amortise_table_rows_equal_the_factors_of_every_row():
    rng = np.random.default_rng(3)
    uses = rng.integers(1, 301, 2000).astype(np.float64)
    for shares in ((150, 60, 60, 30), (100, 200), (7, 0, 293)):
        m, p = amortise_factors(uses, shares, 300)
        tm, tp = amortise_table(shares, 300)
        n = uses.astype(np.int64)
        np.testing.assert_array_equal(tm.numpy()[n], m)
        np.testing.assert_array_equal(tp.numpy()[n], p)


@needs_op
@pytest.mark.parametrize("workload", ["iid", "sessions"])
@pytest.mark.parametrize("bandwidths", [[1000.0, 100.0, 50.0, 10.0], [1000.0, 300.0, 10.0]])
@pytest.mark.parametrize("staleness", [0, 1])
def test_equals_the_reference_on_workload_batches(workload, bandwidths, staleness):
    wl, _, config, cm, directory = workload_world(workload, bandwidths,
                                                  ["--staleness", str(staleness), "--max-cardinality", "5000"])
    B = 256
    shares = [int(s) for s in config.batch_shares(B)]
    esd = make_dispatcher("esd")
    weights = np.linspace(0.5, 2.0, len(shares))
    for step in range(4):
        kjt = wl.global_batch(step, B).sparse_features
        state = directory.cache_state()
        dedup = cm.dedup_cost(kjt, state)
        for d in (dedup, dedup.scaled(weights)):
            np.testing.assert_array_equal(start(d, shares), start_reference(d, shares))
        # the one-call decision (dedup_decide) is the start then the local search
        a, info = start_and_refine(dedup, shares)
        ref, ref_info = refine(dedup, start_reference(dedup, shares))
        np.testing.assert_array_equal(a, ref)
        assert info == ref_info
        directory.plan(kjt, esd.decide(cm, kjt, state, shares).assignment)


@needs_op
def test_equals_the_reference_on_random_instances():
    rng = np.random.default_rng(5)
    for _ in range(20):
        B, W = int(rng.integers(2, 80)), int(rng.integers(1, 6))
        d = _random_dedup(rng, B, W, int(rng.integers(3, 50)), every_row_used=True)
        shares = np.bincount(rng.integers(0, W, B), minlength=W).tolist()  # some may be 0
        a = start(d, shares)
        np.testing.assert_array_equal(a, start_reference(d, shares))
        np.testing.assert_array_equal(np.bincount(a, minlength=W), shares)


@needs_op
def test_bad_inputs_raise():
    rng = np.random.default_rng(7)
    d = _random_dedup(rng, 20, 3, 10, every_row_used=True)
    m, p = amortise_table((10, 5, 5), 20)
    t = lambda v: torch.from_numpy(v)  # noqa: E731
    base = [t(d.occ_s), t(d.occ_k), t(d.pull), t(d.push), t(d.owner), t(d.owner_push), m, p]
    with pytest.raises(RuntimeError, match="shares"):
        ops.dedup_start(*base, [10, 5], 3)
    with pytest.raises(RuntimeError, match="not a sample"):
        ops.dedup_start(*base, [5, 5, 5], 3)  # B = 15 < 20 samples
    with pytest.raises(RuntimeError, match="tables"):
        ops.dedup_start(*base[:6], m[:1], p[:1], [10, 5, 5], 3)
    bad = d.occ_s.copy()
    bad[[0, -1]] = bad[[-1, 0]]
    with pytest.raises(RuntimeError, match="sorted"):
        ops.dedup_start(t(bad), *base[1:], [10, 5, 5], 3)


def test_without_the_operator_start_is_the_reference(monkeypatch):
    rng = np.random.default_rng(9)
    d = _random_dedup(rng, 40, 3, 30, every_row_used=True)
    monkeypatch.setattr(ops, "HAS_DEDUP_START", False)
    monkeypatch.setattr(ops, "HAS_DEDUP_DECIDE", False)
    np.testing.assert_array_equal(start(d, [20, 10, 10]), start_reference(d, [20, 10, 10]))
    a, info = start_and_refine(d, [20, 10, 10])
    ref, ref_info = refine(d, start_reference(d, [20, 10, 10]))
    np.testing.assert_array_equal(a, ref)
    assert info == ref_info


@needs_op
def test_decide_counts_the_start_in_the_budget():
    rng = np.random.default_rng(8)
    d = _random_dedup(rng, 60, 3, 40, every_row_used=True)
    m, p = amortise_table((20, 20, 20), 60)
    arrays = [torch.from_numpy(v) for v in (d.occ_s, d.occ_k, d.pull, d.push, d.owner, d.owner_push)]
    a, swaps, info, first = ops.dedup_decide(*arrays, m, p, [20, 20, 20], 3, 64, 0.0, 4)
    np.testing.assert_array_equal(first.numpy(), start_reference(d, [20, 20, 20]))
    np.testing.assert_array_equal(a, first)  # no budget left: no pass
    assert info[5] == 2 and swaps.shape == (0, 3)
    with pytest.raises(RuntimeError, match="NaN"):
        ops.dedup_decide(*arrays, m, p, [20, 20, 20], 3, 64, float("nan"), 4)
