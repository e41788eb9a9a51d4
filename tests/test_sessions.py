"""The session workload: exact iid at locality 0, its statistics at locality > 0."""

import math

import pytest
import torch

from torchrec_esd.apps.sessions import (
    SessionWorkload,
    SessionWorkloadConfig,
    make_workload,
    make_workload_config,
    session_repeat_rate,
)
from torchrec_esd.apps.workload import SyntheticWorkload, SyntheticWorkloadConfig, access_share_of_top
from torchrec_esd.config import EsdConfigError


def _same(a, b):
    ka, kb = a.sparse_features, b.sparse_features
    return (ka.keys() == kb.keys() and torch.equal(ka.values(), kb.values())
            and torch.equal(ka.lengths(), kb.lengths()) and torch.equal(a.dense_features, b.dense_features)
            and torch.equal(a.labels, b.labels))


@pytest.mark.parametrize("bag", [(1, 1), (0, 4)])
def test_locality_zero_is_the_iid_workload(bag):
    kw = dict(max_cardinality=3000, alpha=1.1, bag_size=bag, seed=4)
    s = SessionWorkload(SessionWorkloadConfig(locality=0.0, **kw))
    i = SyntheticWorkload(SyntheticWorkloadConfig(**kw))
    for step in (0, 3):
        assert _same(s.global_batch(step, 96), i.global_batch(step, 96))


def test_seeded_and_same_interface():
    cfg = SessionWorkloadConfig(max_cardinality=3000, seed=1)
    a, b = SessionWorkload(cfg).global_batch(2, 128), SessionWorkload(cfg).global_batch(2, 128)
    assert _same(a, b)
    assert not _same(a, SessionWorkload(cfg).global_batch(3, 128))
    iid = SyntheticWorkload(SyntheticWorkloadConfig(max_cardinality=3000, seed=1)).global_batch(2, 128)
    assert a.sparse_features.keys() == iid.sparse_features.keys()
    assert a.sparse_features.values().numel() == iid.sparse_features.values().numel()
    card = torch.tensor(cfg.cardinalities).repeat_interleave(128)
    assert bool((a.sparse_features.values() < card).all()) and bool((a.sparse_features.values() >= 0).all())
    # the config builds its workload (what the trainer and the benchmarks call)
    assert isinstance(make_workload(make_workload_config("sessions", max_cardinality=3000)), SessionWorkload)
    assert type(make_workload(make_workload_config("iid", max_cardinality=3000))) is SyntheticWorkload


def test_session_length_mean_matches_the_lognormal_model():
    cfg = SessionWorkloadConfig()
    wl = SessionWorkload(cfg)
    lengths = wl.session_lengths(200_000, torch.Generator().manual_seed(0)).double()
    # expectation of the clipped, rounded log-normal by quadrature over its quantiles
    q = (torch.arange(400_000, dtype=torch.float64) + 0.5) / 400_000
    z = math.sqrt(2) * torch.erfinv(2 * q - 1)
    expect = torch.exp(math.log(cfg.session_median) + cfg.session_sigma * z).round().clamp(
        cfg.min_session, cfg.max_session).mean()
    assert abs(float(lengths.mean()) / float(expect) - 1) < 0.03
    assert float(lengths.median()) == cfg.session_median
    assert 14.0 < float(expect) < 17.5  # OTTO: mean 16.8 before the clip


def test_repeat_rates():
    cfg = SessionWorkloadConfig(num_sparse=2, num_user_features=1, cardinalities=[10**6, 10**6], alpha=0.3,
                                cluster_items=20, seed=3)
    wl = SessionWorkload(cfg)
    B = 2048
    b = wl.global_batch(0, B)
    session_of, _ = wl.sessions(0, B)
    v = b.sparse_features.values().view(2, B)
    n_sessions = int(session_of.max()) + 1
    # user side at locality 1: every sample after the first of its session repeats the user's value
    assert session_repeat_rate(v[0], session_of) == pytest.approx((B - n_sessions) / B)
    # item side: uniform draws from the cluster's 20 ids (distinct w.h.p. at this cardinality)
    L = torch.bincount(session_of).double()
    m = cfg.cluster_items
    expect = float((L - m * (1 - (1 - 1 / m) ** L)).sum()) / B
    assert session_repeat_rate(v[1], session_of) == pytest.approx(expect, rel=0.08)
    # half the locality: fewer repeats
    half = SessionWorkload(SessionWorkloadConfig(**{**cfg.__dict__, "locality": 0.5}))
    vh = half.global_batch(0, B).sparse_features.values().view(2, B)
    assert session_repeat_rate(vh[1], session_of) < 0.6 * session_repeat_rate(v[1], session_of)


def test_popularity_stays_zipf():
    kw = dict(num_sparse=2, cardinalities=[4000, 4000], alpha=1.1, seed=5)
    s = SessionWorkload(SessionWorkloadConfig(num_users=5000, num_user_features=1, **kw))
    i = SyntheticWorkload(SyntheticWorkloadConfig(**kw))
    for f in range(2):
        ids_s = torch.cat([s.global_batch(t, 1024).sparse_features.values().view(2, -1)[f] for t in range(40)])
        ids_i = torch.cat([i.global_batch(t, 1024).sparse_features.values().view(2, -1)[f] for t in range(40)])
        top_s, top_i = access_share_of_top(ids_s, 0.01, 4000), access_share_of_top(ids_i, 0.01, 4000)
        assert abs(top_s - top_i) < 0.06, (f, top_s, top_i)


def test_bad_configs():
    with pytest.raises(EsdConfigError):
        SessionWorkloadConfig(locality=1.5)
    with pytest.raises(EsdConfigError):
        SessionWorkloadConfig(num_user_features=27)
    with pytest.raises(EsdConfigError):
        SessionWorkloadConfig(session_median=20.0, session_mean=10.0)
    with pytest.raises(EsdConfigError):
        make_workload_config("markov")
    with pytest.raises(EsdConfigError):
        SessionWorkload(SyntheticWorkloadConfig())


def _global_batch_feature_by_feature(wl, step, batch_size):
    """The session batch built one feature after the other (the reference of
    the vectorised :meth:`SessionWorkload.global_batch`)."""
    c = wl.config
    gen = wl._generator(step)
    lo, hi = c.bag_size
    dense = torch.randn(batch_size, c.num_dense, generator=gen)
    lengths = torch.randint(lo, hi + 1, (c.num_sparse, batch_size), generator=gen)
    session_of, users = wl.sessions(step, batch_size)
    sgen = torch.Generator().manual_seed(c.seed * 1_000_003 + step + 1 + (2 << 40))
    sample_user = users[session_of]
    values = []
    for f in range(c.num_sparse):
        n = int(lengths[f].sum())
        iid = wl.sample_ids(f, n, gen)
        seg = torch.repeat_interleave(torch.arange(batch_size), lengths[f])
        starts = torch.cumsum(lengths[f], 0) - lengths[f]
        position = torch.arange(n) - starts[seg]
        local = torch.rand(n, generator=sgen, dtype=torch.float64) < c.locality
        member = torch.randint(0, c.cluster_items, (n,), generator=sgen)
        values.append(torch.where(local, wl.local_ids(f, sample_user[seg], position, member), iid))
    return wl.make_batch(dense, lengths, values, gen)


@pytest.mark.parametrize("kw", [dict(), dict(bag_size=(0, 4), locality=0.6, seed=3),
                                dict(bag_size=(2, 2), num_user_features=0, seed=5),
                                dict(num_user_features=26, cluster_items=7, seed=6)])
def test_vectorised_batch_equals_the_feature_by_feature_one(kw):
    wl = SessionWorkload(SessionWorkloadConfig(max_cardinality=5000, alpha=1.1, **kw))
    for step, b in ((0, 512), (7, 96), (31, 1)):
        assert _same(wl.global_batch(step, b), _global_batch_feature_by_feature(wl, step, b))
