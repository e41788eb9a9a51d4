"""The exact optimum of the de-duplicated dispatch objective and its LP bound."""

import numpy as np
import pytest
import torch

from torchrec_esd.cache import CacheDirectory
from torchrec_esd.config import EsdConfig, heterogeneous_workers
from torchrec_esd.cost import CostModel, DedupCost
from torchrec_esd.dispatch import DispatchError, make_dispatcher
from torchrec_esd.dispatch.true_optimum import brute_force_optimum, exact_optimum, lp_lower_bound, true_value
from torchrec_esd.apps.workload import SyntheticWorkload, SyntheticWorkloadConfig


def _random_dedup(rng, B, W, U, per_sample):
    occ = []
    for s in range(B):
        occ += [(s, int(k)) for k in sorted(rng.choice(U, size=min(U, per_sample), replace=False))]
    occ = np.array(occ)
    pull = rng.random((U, W)) * rng.integers(0, 2, (U, W))
    owner = np.where(rng.random(U) < 0.3, rng.integers(0, W, U), -1)
    return DedupCost(B, W, occ[:, 0], occ[:, 1], pull, rng.random((U, W)), owner,
                     np.where(owner >= 0, rng.random(U), 0.0))


@pytest.mark.parametrize("objective", ["total", "makespan"])
def test_exact_equals_brute_force_and_lp_is_below(objective):
    rng = np.random.default_rng(7)
    for _ in range(12):
        B, W = int(rng.integers(3, 8)), int(rng.integers(2, 4))
        d = _random_dedup(rng, B, W, int(rng.integers(3, 10)), int(rng.integers(1, 4)))
        shares = np.bincount(rng.integers(0, W, B), minlength=W)
        bf = brute_force_optimum(d, shares, objective)
        ex = exact_optimum(d, shares, objective, time_limit_s=20)
        lp = lp_lower_bound(d, shares, objective)
        assert ex.optimal
        assert ex.value == pytest.approx(bf.value, rel=1e-6, abs=1e-9)
        assert np.bincount(ex.assignment, minlength=W).tolist() == shares.tolist()
        assert ex.lower_bound <= bf.value + 1e-9
        assert lp.lower_bound <= ex.value + 1e-7


def _real_instance(B, seed=0):
    wl = SyntheticWorkload(SyntheticWorkloadConfig(num_sparse=6, max_cardinality=300, alpha=1.1, seed=seed))
    tables = wl.table_configs(8)
    cache = {t.name: max(1, t.num_embeddings // 10) for t in tables}
    config = EsdConfig(workers=heterogeneous_workers([1000, 100, 10], cache))
    cm = CostModel(config, tables, optimizer_state_bytes_per_row=4)
    directory = CacheDirectory(config, tables)
    shares = config.batch_shares(B)
    warm = make_dispatcher("hybrid")
    for step in range(3):  # warm caches: cached, outdated and dirty rows
        kjt = wl.global_batch(step, B).sparse_features
        cost, aux = warm.inputs(cm, kjt, directory.views())
        directory.plan(kjt, warm.assign(cost, shares, aux=aux).assignment)
    kjt = wl.global_batch(9, B).sparse_features
    return cm, kjt, directory.views(), shares


@pytest.mark.parametrize("objective", ["total", "makespan"])
def test_exact_is_below_every_dispatcher_on_a_real_batch(objective):
    cm, kjt, views, shares = _real_instance(12)
    dedup = cm.dedup_cost(kjt, views)
    ex = exact_optimum(dedup, shares, objective, time_limit_s=30)
    assert ex.optimal
    bf = brute_force_optimum(dedup, shares, objective)  # 12! / (4!)^3 = 34650 assignments
    assert ex.value == pytest.approx(bf.value, rel=1e-6, abs=1e-12)
    lp = lp_lower_bound(dedup, shares, objective)
    assert lp.lower_bound <= ex.value * (1 + 1e-7)
    for name in ("random", "laia", "heuristic", "optimal", "hybrid", "esd"):
        d = make_dispatcher(name)
        cost, aux = d.inputs(cm, kjt, views)
        a = d.assign(cost, shares, aux=aux).assignment.numpy()
        assert ex.value <= true_value(dedup, a, objective) * (1 + 1e-9) + 1e-12, name
    # the reported value is the float objective of the returned assignment
    assert ex.value == pytest.approx(true_value(dedup, ex.assignment, objective))


def test_bad_input():
    rng = np.random.default_rng(0)
    d = _random_dedup(rng, 4, 2, 5, 2)
    with pytest.raises(DispatchError):
        exact_optimum(d, [3, 3])
    with pytest.raises(DispatchError):
        lp_lower_bound(d, [2, 2], objective="mean")
    # one worker: nothing to decide
    d1 = _random_dedup(rng, 4, 1, 5, 2)
    r = exact_optimum(d1, [4])
    assert r.optimal and r.value == pytest.approx(d1.total(np.zeros(4, dtype=np.int64)))
    assert torch.is_tensor(torch.as_tensor(r.assignment))
