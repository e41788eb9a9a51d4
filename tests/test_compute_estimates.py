"""Measured compute rates (distributed.compute_estimates) and the per-batch
shares that read them: the estimator converges, every worker agrees, and a
worker that computes slowly gets fewer samples while the model stays vanilla's."""

import time

import pytest
import torch

from torchrec_esd.config import EsdConfigError
from torchrec_esd.distributed.compute_estimates import ComputeEstimates, ComputeEstimator


def test_estimator_converges_from_a_wrong_prior():
    est = ComputeEstimator(1e-3)  # prior: 1 ms per sample, the truth is 0.3 ms (within the outlier factor)
    for _ in range(12):
        est.observe(0.3e-3 * 128, 128)
    assert est.seconds_per_sample == pytest.approx(0.3e-3, rel=1e-3)
    assert est.samples_per_second == pytest.approx(1 / 0.3e-3, rel=1e-3)


def test_estimator_separates_the_fixed_part_of_a_step_once_the_samples_spread_when_asked():
    est = ComputeEstimator(1e-4, fit_fixed=True)
    for n in [8, 16, 24, 12, 20, 8, 24, 16] * 3:  # 2 ms per step + 0.1 ms per sample
        est.observe(0.002 + 1e-4 * n, n)
    assert est.fixed_s == pytest.approx(0.002, rel=0.05)
    assert est.seconds_per_sample == pytest.approx(1e-4, rel=0.1)
    plain = ComputeEstimator(1e-4)  # the default: no fit, the fixed part is charged to the samples
    for n in [8, 16, 24, 12, 20, 8, 24, 16] * 3:
        plain.observe(0.002 + 1e-4 * n, n)
    assert plain.fixed_s == 0.0 and plain.seconds_per_sample > 1.5e-4
    same = ComputeEstimator(1e-4, fit_fixed=True)
    for _ in range(8):  # always 16 samples: the fixed part cannot be told apart
        same.observe(0.002 + 1e-4 * 16, 16)
    assert same.fixed_s == 0.0 and same.seconds_per_sample == pytest.approx(0.002 / 16 + 1e-4, rel=1e-2)


def test_estimator_drops_a_lone_outlier_and_follows_a_change():
    est = ComputeEstimator(1e-4)
    for _ in range(6):
        est.observe(1e-4 * 100, 100)
    est.observe(5e-3 * 100, 100)  # one slow step (a hiccup: 50x): held back
    assert est.seconds_per_sample == pytest.approx(1e-4)
    est.observe(1e-4 * 100, 100)  # back to normal: the hiccup is dropped
    assert est.seconds_per_sample == pytest.approx(1e-4) and est.dropped == 1
    est.observe(2e-3 * 50, 50)  # the worker became 20x slower: two in a row confirm it
    est.observe(2e-3 * 60, 60)
    assert est.seconds_per_sample == pytest.approx(2e-3)
    for _ in range(8):
        est.observe(2.2e-3 * 64, 64)
    assert est.seconds_per_sample == pytest.approx(2.2e-3, rel=1e-2)
    est.observe(0.0, 10)  # nothing measured: no news
    est.observe(1.0, 0)
    assert est.seconds_per_sample == pytest.approx(2.2e-3, rel=1e-2)


def test_estimates_are_fed_in_worker_order_and_the_clock_excludes_waiting():
    a, b = ComputeEstimates([1000.0, 1000.0], 0), ComputeEstimates([1000.0, 1000.0], 1)
    gathered = torch.tensor([[2.0, 2 * 0.0005 * 64, 128.0], [1.0, 0.004 * 64, 64.0]], dtype=torch.float64)
    for e in (a, b):
        e.update(gathered)
    assert a.samples_per_s() == b.samples_per_s()
    # per sample 0.5 ms and 4 ms, each halfway from the 1 ms prior (alpha 0.5)
    assert a.seconds_per_sample() == pytest.approx((0.75e-3, 2.5e-3))
    assert len(a.history) == 1
    clock = ComputeEstimates([1000.0], 0)
    clock.start()
    time.sleep(0.03)
    clock.exclude(0.02)  # 20 ms of it waited for others
    clock.stop(10)
    steps, seconds, samples = clock._pending
    assert steps == 1 and samples == 10 and 0.005 < seconds < 0.03
    clock.stop(10)  # no window running: nothing recorded
    assert clock._pending[0] == 1
    with pytest.raises(EsdConfigError):
        ComputeEstimates([1000.0, 0.0], 0)
    with pytest.raises(EsdConfigError):
        ComputeEstimates([1000.0], 1)
    with pytest.raises(EsdConfigError):
        a.update(torch.zeros(3, 3, dtype=torch.float64))


# ---------------------------------------------------------------- end to end
SLOW_S_PER_SAMPLE = 5e-3  # what the test adds to worker 1's compute of every sample


def _slow_worker_job(job, slow_rank):
    """``run(job)``, with rank ``slow_rank``'s model forward slowed down by a
    sleep per sample (a test-only slowdown: inside the compute window, after the
    forward's PS exchange and before the embedding gradients)."""
    import torch.distributed as dist

    from torchrec_esd.apps import job as job_module
    from torchrec_esd.apps.trainer import run

    if dist.get_rank() == slow_rank:
        plain = job_module.DlrmTask.forward

        def slow_forward(self, batch):
            out = plain(self, batch)
            time.sleep(SLOW_S_PER_SAMPLE * batch.labels.numel())
            return out

        job_module.DlrmTask.forward = slow_forward
    return run(job)


def test_a_worker_with_slow_compute_gets_fewer_samples_and_the_model_stays_vanilla():
    from torchrec_esd.apps.launch import run_local_world
    from torchrec_esd.apps.trainer import JobConfig, run
    from torchrec_esd.config import EsdConfig, WorkerSpec

    from equivalence import assert_same_model  # noqa: E402
    from test_esd_equivalence import BATCH, CACHE, STEPS, WORKLOAD  # noqa: E402

    W = 3
    common = dict(steps=STEPS, global_batch=BATCH, workload=WORKLOAD, collect_tables=True,
                  sparse_optimizer="rowwise_adagrad", sparse_lr=0.1, dense_lr=0.1)
    vanilla = run_local_world(run, W, JobConfig(method="vanilla", **common))
    cfg = EsdConfig([WorkerSpec(CACHE, 100.0) for _ in range(W)])  # equal links, equal configured compute
    job = JobConfig(method="esd", esd=cfg, dispatcher="shares", dense_sync="star", dispatch_ahead=1,
                    dispatcher_kwargs={"inner": "hybrid", "samples_per_s": [20000.0] * W}, **common)
    esd = run_local_world(_slow_worker_job, W + 1, job, 1)
    assert_same_model(vanilla[0], esd, W)
    seen = sum(esd[r]["samples_seen"] for r in range(W))
    assert torch.equal(seen, torch.full((BATCH,), STEPS, dtype=torch.int64))
    sizes = [esd[r]["local_samples"] for r in range(W)]
    assert all(sum(s[t] for s in sizes) == BATCH for t in range(STEPS))
    # every worker holds the same estimates; worker 1's is the slow one
    rates = [esd[r]["compute_estimates_sps"] for r in range(W)]
    assert rates[0] == rates[1] == rates[2] and len(rates[0]) == STEPS
    last = rates[0][-1]
    assert last[1] < 0.5 * min(last[0], last[2]), f"estimated rates {last}"
    assert last[1] < 1.5 / SLOW_S_PER_SAMPLE  # close to what the sleep allows (<= 200 samples/s)
    # from the second half on, the slow worker trains fewer than its equal share every step
    later = range(STEPS // 2, STEPS)
    assert all(sizes[1][t] < BATCH // W for t in later), f"worker 1's samples {sizes[1]}"
    assert sum(sizes[1][t] for t in later) < sum(min(sizes[0][t], sizes[2][t]) for t in later)
