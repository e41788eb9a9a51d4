import pytest

from torchrec_esd.config import EsdConfig, EsdConfigError, WorkerSpec, heterogeneous_workers


def test_batch_shares_sum_and_proportions():
    cfg = EsdConfig(heterogeneous_workers([1, 2, 4, 8], 100, shares=[1, 1, 2, 0]))
    shares = cfg.batch_shares(1001)
    assert sum(shares) == 1001
    assert shares[3] == 0
    assert shares[2] in (500, 501) and abs(shares[0] - shares[1]) <= 1
    assert EsdConfig(heterogeneous_workers([1, 1, 1], 10)).batch_shares(7) in ([3, 2, 2], [2, 3, 2], [2, 2, 3])


def test_link_time():
    w = WorkerSpec(cache_rows=10, bandwidth_mbps=8.0, latency_ms=2.0)
    assert w.link_time(1_000_000) == pytest.approx(1.0 + 0.002)
    assert w.link_time(0, num_messages=3) == pytest.approx(0.006)


def test_roundtrip_and_fingerprint():
    cfg = EsdConfig(
        [WorkerSpec({"t0": 5, "t1": 6}, 10.0, 1.0), WorkerSpec({"t0": 2, "t1": 3}, 100.0)],
        num_ps=2,
        staleness=1,
        objective="makespan",
    )
    again = EsdConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.fingerprint() == cfg.fingerprint()
    assert cfg.world_size == 4 and cfg.ps_ranks() == [2, 3]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: WorkerSpec(cache_rows=0, bandwidth_mbps=1), "no cache capacity"),
        (lambda: WorkerSpec(cache_rows=-3, bandwidth_mbps=1), "cache_rows"),
        (lambda: WorkerSpec(cache_rows={"t": 0}, bandwidth_mbps=1), "no cache capacity"),
        (lambda: WorkerSpec(cache_rows=1, bandwidth_mbps=0), "bandwidth"),
        (lambda: WorkerSpec(cache_rows=1, bandwidth_mbps=float("nan")), "bandwidth"),
        (lambda: WorkerSpec(cache_rows=1, bandwidth_mbps=1, latency_ms=-1), "latency"),
        (lambda: WorkerSpec(cache_rows=1, bandwidth_mbps=1, share=-1), "share"),
        (lambda: EsdConfig([]), "empty"),
        (lambda: EsdConfig([WorkerSpec(1, 1, share=0)]), "shares are 0"),
        (lambda: EsdConfig([WorkerSpec(1, 1)], num_ps=0), "num_ps"),
        (lambda: EsdConfig([WorkerSpec(1, 1)], staleness=-1), "staleness"),
        (lambda: EsdConfig([WorkerSpec(1, 1)], objective="fast"), "objective"),
        (lambda: EsdConfig([WorkerSpec(1, 1)], cache_policy="fifo"), "cache_policy"),
        (lambda: EsdConfig([WorkerSpec(1, 1)]).batch_shares(0), "batch size"),
        (lambda: EsdConfig([WorkerSpec(1, 1)], prefetch_depth=-1), "prefetch_depth"),
        (lambda: EsdConfig([WorkerSpec(1, 1)], prefetch_depth=True), "prefetch_depth"),
        (lambda: EsdConfig([WorkerSpec(1, 1)], prefetch_depth=1, plan_from_summaries=True), "plan_from_summaries"),
        (lambda: EsdConfig([WorkerSpec(1, 1)], pre_push=1), "pre_push must be a bool"),
        (lambda: EsdConfig([WorkerSpec(1, 1)], pre_push=True, staleness=1), "exact only at staleness=0"),
        (lambda: EsdConfig([WorkerSpec(1, 1)], pre_push=True, des_misses=True), "des_misses"),
        (lambda: EsdConfig([WorkerSpec(1, 1)], pre_push=True, prefetch_depth=1), "prefetch_depth"),
    ],
)
def test_bad_config(make, match):
    with pytest.raises(EsdConfigError, match=match):
        make()


def test_validate_tables():
    cfg = EsdConfig([WorkerSpec(50, 1), WorkerSpec(200, 1)])
    cfg.validate_tables({"a": 200, "b": 300})
    with pytest.raises(EsdConfigError, match="exceeds"):
        cfg.validate_tables({"a": 100})
    cfg2 = EsdConfig([WorkerSpec({"a": 5}, 1)])
    with pytest.raises(EsdConfigError, match="no entry for table 'b'"):
        cfg2.validate_tables({"a": 10, "b": 10})


def test_job_pooling_must_be_sum_or_mean():
    from torchrec.modules.embedding_configs import PoolingType

    from torchrec_esd.apps.trainer import JobConfig, job_tables
    from torchrec_esd.apps.workload import SyntheticWorkload, SyntheticWorkloadConfig

    wl = SyntheticWorkload(SyntheticWorkloadConfig(num_sparse=2, cardinalities=[5, 6]))
    assert {t.pooling for t in job_tables(JobConfig(pooling="mean"), wl)} == {PoolingType.MEAN}
    with pytest.raises(EsdConfigError, match="pooling must be 'sum' or 'mean', got 'max'"):
        job_tables(JobConfig(pooling="max"), wl)


def test_mixed_uniform_and_per_table_capacities():
    """A uniform capacity on one worker and per-table ones on another is valid;
    unknown tables are named whichever worker lists them."""
    cfg = EsdConfig([WorkerSpec(3, 100.0), WorkerSpec({"a": 2, "b": 1}, 10.0)])
    cfg.validate_tables({"a": 10, "b": 5})
    with pytest.raises(EsdConfigError, match=r"worker 1: cache_rows names unknown tables \['c'\]"):
        EsdConfig([WorkerSpec(3, 100.0), WorkerSpec({"a": 2, "b": 1, "c": 1}, 10.0)]).validate_tables({"a": 10, "b": 5})
