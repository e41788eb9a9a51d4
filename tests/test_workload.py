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
