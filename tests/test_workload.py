import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd.config import EsdConfigError
from torchrec_esd.apps.workload import (
    SyntheticWorkload,
    SyntheticWorkloadConfig,
    access_share_of_top,
    select_samples,
)


def _ids_of(batch, key):
    return batch.sparse_features[key].values()


def test_criteo_shape_and_types():
    wl = SyntheticWorkload()
    b = wl.global_batch(0, 256)
    assert b.dense_features.shape == (256, 13)
    kjt = b.sparse_features
    assert isinstance(kjt, KeyedJaggedTensor)
    assert len(kjt.keys()) == 26 and kjt.stride() == 256
    assert b.labels.shape == (256,)
    assert set(b.labels.unique().tolist()) <= {0.0, 1.0}
    for f, n in zip(kjt.keys(), wl.config.cardinalities):
        ids = kjt[f].values()
        assert ids.dtype == torch.int64
        assert int(ids.min()) >= 0 and int(ids.max()) < n
        assert torch.all(kjt[f].lengths() == 1)  # one-hot by default
    assert [t.num_embeddings for t in wl.table_configs(8)] == list(wl.config.cardinalities)


def test_deterministic_per_seed_and_step():
    a = SyntheticWorkload(SyntheticWorkloadConfig(seed=3)).global_batch(5, 64)
    b = SyntheticWorkload(SyntheticWorkloadConfig(seed=3)).global_batch(5, 64)
    c = SyntheticWorkload(SyntheticWorkloadConfig(seed=3)).global_batch(6, 64)
    assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
    assert torch.equal(a.dense_features, b.dense_features)
    assert not torch.equal(a.sparse_features.values(), c.sparse_features.values())


def _global_batch_one_feature_at_a_time(wl, step, batch_size):
    """The batch as it was built before the vectorised path (feature by
    feature: a draw, a search and the id map, as sample_ids did, then each
    feature's label effect in turn): the values that path must reproduce bit
    for bit."""
    c = wl.config
    gen = wl._generator(step)
    lo, hi = c.bag_size
    dense = torch.randn(batch_size, c.num_dense, generator=gen)
    lengths = torch.randint(lo, hi + 1, (c.num_sparse, batch_size), generator=gen)
    values = []
    for f, n in enumerate(c.cardinalities):
        u = torch.rand(int(lengths[f].sum()), generator=gen, dtype=torch.float64)
        rank = torch.searchsorted(wl._cdfs[f], u).clamp_(max=n - 1)
        a, b = wl._perm[f]
        values.append((rank * a + b) % n)
    logit = dense.double() @ wl._dense_w
    for f in range(c.num_sparse):
        eff = ((values[f] * 2654435761 + wl._id_effect_salt[f]) % 1000).double() / 1000 - 0.5
        seg = torch.repeat_interleave(torch.arange(batch_size), lengths[f])
        logit += torch.zeros(batch_size, dtype=torch.float64).index_add_(0, seg, eff) / max(1.0, (lo + hi) / 2)
    noise = torch.rand(batch_size, generator=gen, dtype=torch.float64)
    return dense, lengths, torch.cat(values), (noise < torch.sigmoid(logit)).float(), logit


@pytest.mark.parametrize("cfg", [dict(), dict(bag_size=(0, 4), alpha=1.3, seed=7),
                                 dict(num_sparse=3, cardinalities=[5, 1, 300], bag_size=(2, 9), seed=2)])
def test_the_vectorised_batch_is_the_feature_by_feature_one_bit_for_bit(cfg):
    wl = SyntheticWorkload(SyntheticWorkloadConfig(**cfg))
    for step, b in ((0, 64), (3, 257), (11, 1)):
        dense, lengths, values, labels, logit = _global_batch_one_feature_at_a_time(wl, step, b)
        got = wl.global_batch(step, b)
        assert torch.equal(got.dense_features, dense)
        assert torch.equal(got.sparse_features.lengths(), lengths.reshape(-1).to(torch.int32))
        assert torch.equal(got.sparse_features.values(), values)
        assert torch.equal(got.labels, labels)
        assert 0 < float(labels.mean()) < 1 or b == 1  # the labels depend on the ids (logit spread)
        assert float(logit.std() if b > 1 else 1.0) > 0
    # sample_ids (what the sessions workload draws feature by feature) is the same map
    for f, n in enumerate(wl.config.cardinalities):
        g1, g2 = torch.Generator().manual_seed(f), torch.Generator().manual_seed(f)
        rank = torch.searchsorted(wl._cdfs[f], torch.rand(50, generator=g2, dtype=torch.float64)).clamp_(max=n - 1)
        a, b = wl._perm[f]
        assert torch.equal(wl.sample_ids(f, 50, g1), (rank * a + b) % n)


def test_local_batches_partition_the_global_batch():
    wl = SyntheticWorkload(SyntheticWorkloadConfig(bag_size=(0, 4)))
    g = wl.global_batch(2, 60)
    parts = [wl.local_batch(2, 60, r, 3) for r in range(3)]
    for key in g.sparse_features.keys():
        cat = torch.cat([p.sparse_features[key].values() for p in parts])
        assert torch.equal(cat, g.sparse_features[key].values())
    assert torch.equal(torch.cat([p.labels for p in parts]), g.labels)


def test_select_samples_reorders_bags_with_weights():
    kjt = KeyedJaggedTensor(
        keys=["a", "b"],
        values=torch.tensor([1, 2, 3, 4, 5, 6]),
        lengths=torch.tensor([2, 0, 1, 1, 1, 1]),
        weights=torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]),
    )
    from torchrec.datasets.utils import Batch

    b = Batch(dense_features=torch.arange(3.0)[:, None], sparse_features=kjt, labels=torch.arange(3.0))
    s = select_samples(b, torch.tensor([2, 0]))
    assert s.sparse_features["a"].values().tolist() == [3, 1, 2]
    assert s.sparse_features["a"].lengths().tolist() == [1, 2]
    assert s.sparse_features["b"].values().tolist() == [6, 4]
    assert torch.allclose(s.sparse_features.weights(), torch.tensor([0.3, 0.1, 0.2, 0.6, 0.4]))
    assert s.labels.tolist() == [2.0, 0.0]
    with pytest.raises(IndexError):
        select_samples(b, torch.tensor([3]))



def test_select_range_is_the_selection_of_the_range():
    from torchrec_esd.batch_select import select_kjt_range, select_kjt_samples

    g = torch.Generator().manual_seed(0)
    for weighted in (False, True):
        lengths = torch.randint(0, 4, (3 * 7,), generator=g)
        n = int(lengths.sum())
        kjt = KeyedJaggedTensor(keys=["a", "b", "c"], values=torch.randint(0, 100, (n,), generator=g),
                                lengths=lengths, weights=torch.rand(n, generator=g) if weighted else None)
        for start, stop in ((0, 7), (2, 5), (3, 3), (6, 7)):
            got, want = select_kjt_range(kjt, start, stop), select_kjt_samples(kjt, torch.arange(start, stop))
            assert got.stride() == want.stride() == stop - start and got.keys() == want.keys()
            assert torch.equal(got.values(), want.values()) and torch.equal(got.lengths(), want.lengths())
            assert (got.weights_or_none() is None) == (not weighted)
            if weighted:
                assert torch.equal(got.weights(), want.weights())
    with pytest.raises(IndexError):
        select_kjt_range(kjt, 5, 8)


@pytest.mark.parametrize("n", [10_000])
def test_zipf_skew_grows_with_alpha(n):
    shares = []
    for alpha in (0.6, 1.05, 1.2, 1.5):
        wl = SyntheticWorkload(
            SyntheticWorkloadConfig(num_sparse=1, cardinalities=[n], alpha=alpha, seed=1)
        )
        ids = torch.cat([_ids_of(wl.global_batch(s, 20_000), "cat_0") for s in range(5)])
        shares.append(access_share_of_top(ids, 0.01, n))
    assert all(a < b for a, b in zip(shares, shares[1:])), shares
    # theory: share of top-1% ranks of a truncated Zipf law
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    for alpha, got in zip((0.6, 1.05, 1.2, 1.5), shares):
        p = ranks.pow(-alpha)
        want = float(p[: n // 100].sum() / p.sum())
        assert abs(got - want) < 0.02, (alpha, got, want)


def test_hot_ids_are_scattered():
    wl = SyntheticWorkload(SyntheticWorkloadConfig(num_sparse=1, cardinalities=[50_000], seed=2))
    ids = _ids_of(wl.global_batch(0, 50_000), "cat_0")
    top = torch.bincount(ids, minlength=50_000).topk(20).indices
    assert int(top.max()) > 1000  # not simply the smallest ids


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"num_sparse": 0}, "num_sparse"),
        ({"num_dense": -1}, "num_dense"),
        ({"num_sparse": 2, "cardinalities": [10, -5]}, "cardinality"),
        ({"num_sparse": 2, "cardinalities": [10]}, "cardinalities"),
        ({"bag_size": (3, 1)}, "bag_size"),
        ({"max_cardinality": 0}, "max_cardinality"),
    ],
)
def test_bad_workload_config(kwargs, match):
    with pytest.raises(EsdConfigError, match=match):
        SyntheticWorkloadConfig(**kwargs)


def test_bad_batch_requests():
    wl = SyntheticWorkload(SyntheticWorkloadConfig(num_sparse=2, cardinalities=[5, 5]))
    with pytest.raises(EsdConfigError, match="batch_size"):
        wl.global_batch(0, 0)
    with pytest.raises(EsdConfigError, match="divisible"):
        wl.local_batch(0, 10, 0, 3)
    with pytest.raises(EsdConfigError, match="embedding_dim"):
        wl.table_configs(0)
