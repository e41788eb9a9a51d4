"""Per-batch shares (dispatch.shares): bounds, prediction never worse than the base shares."""

import numpy as np
import pytest
import torch

from torchrec_esd.dispatch import DispatchError, make_dispatcher
from torchrec_esd.dispatch.shares import MIN_INNER_BUDGET_S, water_fill

from test_true_optimum import _real_instance  # noqa: E402


def test_water_fill_equalises_within_bounds():
    n = water_fill(np.array([1.0, 2.0, 4.0]), 70, np.array([0, 0, 0]), np.array([70, 70, 70]))
    assert n.sum() == 70 and n.tolist() == [40, 20, 10]
    n = water_fill(np.array([1.0, 2.0, 4.0]), 70, np.array([10, 10, 15]), np.array([30, 70, 70]))
    assert n.sum() == 70 and n[0] == 30 and n[2] >= 15 and (n >= [10, 10, 15]).all()
    with pytest.raises(DispatchError):
        water_fill(np.ones(2), 10, np.array([6, 6]), np.array([9, 9]))
    # a fixed load on a worker: fewer samples there
    n = water_fill(np.ones(2), 20, np.array([0, 0]), np.array([20, 20]), np.array([4.0, 0.0]))
    assert n.tolist() == [8, 12]


@pytest.mark.parametrize("inner", ["esd", "hybrid", "laia"])
def test_per_batch_shares_lower_the_predicted_time(inner):
    cm, kjt, views, shares = _real_instance(48)
    d = make_dispatcher("shares", inner=inner, samples_per_s=[300.0, 3000.0, 30000.0], bound=0.5, online=False,
                        dispatching_worker=None)
    cost, aux = d.inputs(cm, kjt, views)
    r = d.assign(cost, shares, aux=aux)
    counts = np.bincount(r.assignment.numpy(), minlength=3)
    assert counts.sum() == 48
    assert all(np.floor(s * 0.5) <= c <= np.ceil(s * 1.5) for s, c in zip(shares, counts))
    assert r.info["predicted_iter_s"] <= r.info["base_predicted_iter_s"]
    assert r.info["predicted_iter_s"] == pytest.approx(float(d.predicted_s(cost, r.assignment, aux).max()))
    # the slow-compute worker gets fewer samples than its base share
    assert counts[0] < shares[0] and r.info["predicted_iter_s"] < r.info["base_predicted_iter_s"]
    base = make_dispatcher(inner).assign(cost, shares, aux=aux).assignment
    assert float(d.predicted_s(cost, base, aux).max()) == pytest.approx(r.info["base_predicted_iter_s"])


def test_online_shares_follow_the_previous_batches():
    cm, kjt, views, shares = _real_instance(48)
    d = make_dispatcher("shares", inner="esd", samples_per_s=[300.0, 3000.0, 30000.0], dispatching_worker=None)
    cost, aux = d.inputs(cm, kjt, views)
    first = np.bincount(d.assign(cost, shares, aux=aux).assignment.numpy(), minlength=3)
    assert first.tolist() == list(shares)  # no estimate yet: the base shares
    r = d.assign(cost, shares, aux=aux)
    second = np.bincount(r.assignment.numpy(), minlength=3)
    assert r.info["decisions"] == 1 and second.sum() == 48 and second[0] < shares[0]
    # the dispatching worker's decision load moves samples off it
    w = make_dispatcher("shares", inner="esd", samples_per_s=[3000.0] * 3, dispatching_worker=2)
    w._decision_s = 0.01  # 10 ms of decisions = 30 samples of compute on worker 2
    w._link_per_sample = np.zeros(3)
    third = np.bincount(w.assign(cost, shares, aux=aux).assignment.numpy(), minlength=3)
    assert third[2] < shares[2]


def test_measured_rates_and_fixed_compute_move_samples():
    cm, kjt, views, shares = _real_instance(48)
    d = make_dispatcher("shares", inner="laia", samples_per_s=[3000.0] * 3, dispatching_worker=None)
    assert d.reads_compute_rates and d.prior_samples_per_s == (3000.0, 3000.0, 3000.0)
    cost, aux = d.inputs(cm, kjt, views)
    d.assign(cost, shares, aux=aux)  # the first batch: base shares, link estimates from it
    d.set_rates([3000.0, 300.0, 3000.0])  # worker 1 measured 10x slower
    slow = np.bincount(d.assign(cost, shares, aux=aux).assignment.numpy(), minlength=3)
    assert slow[1] < shares[1]
    d.set_rates([3000.0] * 3, fixed_s=[0.0, 0.0, 0.01])  # worker 2 spends 10 ms per step whatever its share
    fixed = np.bincount(d.assign(cost, shares, aux=aux).assignment.numpy(), minlength=3)
    assert fixed[2] < shares[2] and fixed.sum() == 48
    with pytest.raises(DispatchError):
        d.set_rates([1.0, 2.0])
    with pytest.raises(DispatchError):
        d.set_rates([1.0, 2.0, 3.0], fixed_s=[0.0, -1.0, 0.0])
    assert not make_dispatcher("shares", samples_per_s=[1.0], measured_compute=False).reads_compute_rates


def test_bad_options():
    with pytest.raises(DispatchError):
        make_dispatcher("shares")
    with pytest.raises(DispatchError):
        make_dispatcher("shares", samples_per_s=[1.0, 0.0])
    with pytest.raises(DispatchError):
        make_dispatcher("shares", samples_per_s=[1.0], bound=1.5)  # (1.0 is valid: a worker may get none)
    with pytest.raises(DispatchError):
        make_dispatcher("shares", inner="shares", samples_per_s=[1.0])
    with pytest.raises(DispatchError):
        make_dispatcher("shares", samples_per_s=[1.0, 2.0], dispatching_worker=2)
    d = make_dispatcher("shares", samples_per_s=[1.0, 2.0])
    with pytest.raises(DispatchError):
        d.assign(torch.zeros(4, 3, dtype=torch.float64), [2, 1, 1])


def test_variable_shares_require_the_scaled_loss_even_at_equal_config_shares():
    from torchrec_esd.config import EsdConfig, WorkerSpec
    from torchrec_esd.distributed.loss_scaling import LossScaling

    scaling = LossScaling(EsdConfig([WorkerSpec(10, 1.0), WorkerSpec(10, 1.0)]))
    scaling.variable_shares = True  # what EsdInputDist sets for a dispatcher with varies_shares
    scaling.dispatched(1, 8)
    assert scaling.forward(1, 3, training=True) is None
    scaling.dispatched(2, 8)
    msg = scaling.forward(2, 5, training=True)
    assert "iteration 1 was not scaled" in msg and "decided per batch" in msg
    assert float(scaling.scale(torch.ones(5, requires_grad=True))) == pytest.approx(5 * 2 / 8)


def test_online_shares_keep_the_inner_search_within_a_share_of_the_predicted_iteration():
    cm, kjt, views, shares = _real_instance(48)
    d = make_dispatcher("shares", inner="esd", samples_per_s=[300.0, 3000.0, 30000.0], decision_share=0.05)
    budget0 = d.inner.time_budget_s
    cost, aux = d.inputs(cm, kjt, views)
    r1 = d.assign(cost, shares, aux=aux)
    assert d.inner.time_budget_s == budget0  # no prediction yet: the inner budget
    rest1 = d._rest_s  # what the first decision spent outside the search
    d.assign(cost, shares, aux=aux)
    # the share of the predicted iteration, less what the decision spent outside the search
    want = min(budget0, max(MIN_INNER_BUDGET_S, 0.05 * r1.info["predicted_iter_s"] - rest1))
    assert rest1 > 0 and d.inner.time_budget_s == pytest.approx(want) and d.inner.time_budget_s < budget0
    with pytest.raises(DispatchError, match="decision_share"):
        make_dispatcher("shares", inner="esd", samples_per_s=[1.0, 1.0, 1.0], decision_share=1.5)
    # other inner dispatchers keep their own budgets (HybridDis's is its CPU credit)
    h = make_dispatcher("shares", inner="hybrid", samples_per_s=[300.0, 3000.0, 30000.0], decision_share=0.05)
    before = h.inner.time_budget_s
    hcost, haux = h.inputs(cm, kjt, views)
    h.assign(hcost, shares, aux=haux)
    h.assign(hcost, shares, aux=haux)
    assert h.inner.time_budget_s == before


def test_fill_with_idle_leaves_out_a_worker_whose_fixed_cost_outweighs_its_samples():
    from torchrec_esd.dispatch.shares import fill_with_idle

    t = np.array([1e-4, 1e-4, 1e-4, 2e-3])  # worker 3: 20x slower per sample
    fixed = np.array([0.005, 0.005, 0.005, 0.040])  # and 40 ms per step whatever its samples
    idle = np.array([0.001, 0.001, 0.001, 0.020])  # 20 ms with none (it still receives the dense mean)
    lo, hi = np.zeros(4, dtype=np.int64), np.array([1024, 1024, 1024, 32])
    n = fill_with_idle(t, 512, lo, hi, fixed, idle)
    assert n.sum() == 512 and n[3] == 0 and (n[:3] > 0).all()
    # with a small fixed cost it keeps its samples (water filling alone)
    n = fill_with_idle(t, 512, lo, hi, np.full(4, 0.001), idle)
    assert n[3] > 0 and n.tolist() == water_fill(t, 512, np.ones(4, dtype=np.int64), hi, np.full(4, 0.001)).tolist()
    # a worker whose lower bound is positive is never left out
    n = fill_with_idle(t, 512, np.array([0, 0, 0, 4]), hi, fixed, idle)
    assert n[3] >= 4


def test_per_batch_shares_may_leave_a_worker_idle_and_price_it_idle():
    cm, kjt, views, shares = _real_instance(48)
    d = make_dispatcher("shares", inner="esd", samples_per_s=[3000.0, 3000.0, 3000.0], dispatching_worker=None)
    # worker 0: a large fixed cost per step with samples, a small one without
    d.set_rates([3000.0, 3000.0, 3000.0], fixed_s=[1.0, 0.0, 0.0], idle_s=[0.001, 0.0, 0.0])
    cost, aux = d.inputs(cm, kjt, views)
    d.assign(cost, shares, aux=aux)  # the first batch runs at the base shares
    r = d.assign(cost, shares, aux=aux)
    counts = np.bincount(r.assignment.numpy(), minlength=3)
    assert counts[0] == 0 and counts.sum() == 48
    pred = d.predicted_s(cost, r.assignment, aux)
    assert pred[0] == pytest.approx(0.001 + d._link(cost, r.assignment, aux)[0])  # idle, plus the rows it pushes
    with pytest.raises(DispatchError, match="idle times must be finite"):
        d.set_rates([1.0, 1.0, 1.0], idle_s=[0.0, -1.0, 0.0])


@pytest.mark.parametrize("inner", ["laia", "random"])
def test_shares_read_the_cost_matrix_where_their_inner_dispatcher_reads_none(inner):
    """LAIA reads hit counts alone and random nothing; the per-batch shares over them still
    predict link times from the additive cost matrix, so they read it (and LAIA's hits)."""
    cm, kjt, views, shares = _real_instance(48)
    d = make_dispatcher("shares", inner=inner, samples_per_s=[300.0, 3000.0, 30000.0], bound=0.5, online=False,
                        dispatching_worker=None)
    cost, aux = d.inputs(cm, kjt, views)
    torch.testing.assert_close(cost, cm.matrix(kjt, views))
    assert float(cost.abs().sum()) > 0
    if inner == "laia":
        torch.testing.assert_close(aux["hits"], cm.hit_matrix(kjt, views))
    alone, _ = make_dispatcher(inner).inputs(cm, kjt, views)
    assert float(alone.abs().sum()) == 0.0  # the inner dispatcher alone builds no matrix
    r = d.decide(cm, kjt, views, shares)
    assert np.bincount(r.assignment.numpy(), minlength=3).sum() == 48
