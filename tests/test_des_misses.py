"""DES-served cache misses (``EsdConfig(des_misses=True)``): the per-worker
choice, the cache directory's plans (no read of an old version, no lost
update), and the cost model's per-(sample, worker) pricing.  The end-to-end
equivalence with vanilla TorchRec is in tests/test_esd_equivalence.py."""

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd.cache import CacheDirectory
from torchrec_esd.config import EsdConfig, EsdConfigError, WorkerSpec
from torchrec_esd.cost import CostModel, TableCacheView
from torchrec_esd.des.served_misses import choose_des_rows, des_bag_bytes, pair_bytes, row_pull_bytes
from torchrec_esd.apps.workload import SyntheticWorkload, SyntheticWorkloadConfig

from test_cache_directory import VersionSimulator  # noqa: E402  (tests/ is on sys.path under pytest)


def test_byte_formulas():
    assert pair_bytes(False) == 8 and pair_bytes(True) == 12  # packed (key, bag) [+ float32 weight]
    assert row_pull_bytes(16) == 8 + 16
    got = des_bag_bytes(torch.tensor([0, 1, 5]), 4)
    assert got.tolist() == [0.0, 32 + 8, 32 + 40]
    assert des_bag_bytes(torch.tensor([2]), 4, weighted=True).tolist() == [32 + 24]


def test_choose_des_rows_by_hand():
    # D = 4, row 16 B: a pulled row costs 24 B; a DES bag 32 B + 8 B per pair.
    # rows 0-4: cold, only in bag A -> DES (A: 6 candidate pairs, 80 B < 5 x 24 + 12 B)
    # row 5: cold, alone in bags B, D, E (40 B > 8 B, its third) -> pulled
    # row 6: cold, in bag A and alone in bag C (40 B > 12 B, its half) -> pulled, A reads the pulled copy
    # row 7: cached fresh (not a candidate), in bag A -> never DES
    pair_pos = torch.tensor([0, 1, 2, 3, 4, 5, 5, 5, 6, 6, 7])
    pair_bag = torch.tensor([10, 10, 10, 10, 10, 11, 13, 14, 10, 12, 10])
    candidate = torch.tensor([True] * 7 + [False])
    des = choose_des_rows(pair_pos, pair_bag, candidate, row_bytes=16, dim=4)
    assert des.tolist() == [True] * 5 + [False, False, False]
    one_bag = lambda n: (torch.arange(n), torch.zeros(n, dtype=torch.int64), torch.ones(n, dtype=torch.bool))
    # a lone missing row is pulled (and cached): 24 B against 40 B; two: 48 B against 48 B, still pulled
    assert not choose_des_rows(*one_bag(1), 16, 4).any() and not choose_des_rows(*one_bag(2), 16, 4).any()
    # three cold rows in one bag: 72 B pulled against 56 B by DES
    assert choose_des_rows(*one_bag(3), 16, 4).all()
    # with weights on the wire (12 B a pair): 68 B by DES, against 72 B (16 B rows) or 60 B (12 B rows)
    assert choose_des_rows(*one_bag(3), 16, 4, weighted=True).all()
    assert not choose_des_rows(*one_bag(3), 12, 4, weighted=True).any()
    # nothing to choose from
    assert not choose_des_rows(pair_pos, pair_bag, torch.zeros(8, dtype=torch.bool), 16, 4).any()
    assert choose_des_rows(pair_pos[:0], pair_bag[:0], candidate, 16, 4).sum() == 0


def _tables(cards, dim=8):
    return [
        EmbeddingBagConfig(name=f"t_cat_{i}", embedding_dim=dim, num_embeddings=n, feature_names=[f"cat_{i}"])
        for i, n in enumerate(cards)
    ]


@pytest.mark.parametrize("staleness", [0, 2])
def test_directory_plans_with_des_read_latest_and_lose_nothing(staleness):
    wl = SyntheticWorkload(SyntheticWorkloadConfig(num_sparse=3, cardinalities=[400, 900, 60], bag_size=(4, 14),
                                                   alpha=1.1, seed=4))
    tables = _tables(wl.config.cardinalities)
    caches = {"t_cat_0": 20, "t_cat_1": 40, "t_cat_2": 10}
    cfg = EsdConfig([WorkerSpec(caches, 1.0), WorkerSpec(caches, 4.0), WorkerSpec(caches, 8.0)],
                    staleness=staleness, des_misses=True)
    d = CacheDirectory(cfg, tables)
    sim = VersionSimulator(d)
    g = torch.Generator().manual_seed(0)
    B = 30
    for step in range(20):
        kjt = wl.global_batch(step, B).sparse_features
        a = torch.arange(B) % 3
        a = a[torch.randperm(B, generator=g)]
        plan = d.plan(kjt, a)
        for w, p in enumerate(plan.workers):
            U = p.used_keys.numel()
            des = torch.zeros(U, dtype=torch.bool)
            des[p.des_pos] = True
            pulled = torch.zeros(U, dtype=torch.bool)
            pulled[p.pull_pos] = True
            assert not (des & pulled).any(), "a row both pulled and DES-served"
            # DES rows are never cached (nor refreshed), never updated locally
            fresh = torch.isin(p.used_keys[des], d.cached_keys(w))
            assert not (fresh & (p.used_slot[des] < 0)).any()
            assert p.local_pos.numel() + p.grad_pos.numel() + p.des_pos.numel() == U
            assert not torch.isin(p.des_pos, p.local_pos).any() and not torch.isin(p.des_pos, p.grad_pos).any()
            assert p.rows["des_rows"] == p.des_pos.numel()
            served_from_cache = U - p.pull_pos.numel() - p.des_pos.numel()
            assert served_from_cache + p.rows["miss_pull"] + p.rows["update_pull"] + p.rows["des_rows"] == U
        sim.step(plan)
    assert sim.des_rows > 0
    assert sim.max_lag <= staleness
    if staleness == 0:
        assert sim.max_lag == 0
    for w, p in enumerate(d.flush_plan()):
        sim.ps[p.push_keys] = sim.cache[w][p.push_slots]
    assert torch.equal(sim.ps, sim.truth), "lost updates"


def test_without_the_flag_no_row_is_des_served():
    wl = SyntheticWorkload(SyntheticWorkloadConfig(num_sparse=2, cardinalities=[400, 900], bag_size=(10, 20), seed=1))
    cfg = EsdConfig([WorkerSpec(5, 1.0), WorkerSpec(5, 1.0)])
    d = CacheDirectory(cfg, _tables(wl.config.cardinalities))
    plan = d.plan(wl.global_batch(0, 8).sparse_features, torch.arange(8) % 2)
    assert all(p.des_pos.numel() == 0 and p.rows["des_rows"] == 0 for p in plan.workers)


def test_cost_matrix_prices_des_per_bag_by_hand():
    # one table (D = 4, no optimizer state: a row is 16 B), 2 workers at 1000 and 2000 B/s
    tables = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=100, feature_names=["f"])]
    workers = [WorkerSpec({"t": 10}, 0.008), WorkerSpec({"t": 10}, 0.016)]
    views = [{"t": TableCacheView(torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.bool),
                                  torch.tensor([], dtype=torch.bool), 10)},
             {"t": TableCacheView(torch.tensor([50]), torch.tensor([False]), torch.tensor([False]), 10)}]
    # sample 0: 6 distinct cold ids (one twice); sample 1: id 50 (cached fresh on worker 1)
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([1, 2, 3, 4, 5, 6, 6, 50]),
                            lengths=torch.tensor([7, 1], dtype=torch.int32))
    bps = torch.tensor([1000.0, 2000.0], dtype=torch.float64)
    plain = CostModel(EsdConfig(workers), tables).matrix(kjt, views)
    assert torch.allclose(plain[0], 6 * 16 / bps)
    c = CostModel(EsdConfig(workers, des_misses=True), tables).matrix(kjt, views)
    # bag of sample 0: pull 6 x (8 + 16) = 144 B, DES 32 + 6 x 8 = 80 B -> DES
    assert torch.allclose(c[0], 80 / bps)
    # sample 1 on worker 0: pull 24 B < DES 40 B; on worker 1 a fresh hit costs nothing
    assert torch.allclose(c[1], torch.tensor([24 / 1000.0, 0.0], dtype=torch.float64))
    # with per-sample weights on the wire a pair costs 12 B: 32 + 72 = 104 B
    wkjt = KeyedJaggedTensor(keys=["f"], values=kjt.values(), lengths=kjt.lengths(), weights=torch.ones(8))
    cw = CostModel(EsdConfig(workers, des_misses=True), tables).matrix(wkjt, views)
    assert torch.allclose(cw[0], 104 / bps) and torch.allclose(cw[1], c[1])


def test_des_misses_must_be_a_bool():
    with pytest.raises(EsdConfigError, match="des_misses must be a bool"):
        EsdConfig([WorkerSpec(1, 1.0)], des_misses="yes")


def _build_with_unpooled_table(job):
    from torchrec.modules.embedding_configs import PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from torchrec_esd.ps import SparseOptimizer
    from torchrec_esd.distributed.runtime import EsdRuntime
    from torchrec_esd.distributed.sharding import ShardedEsdEmbeddingBagCollection

    tables = [
        EmbeddingBagConfig(name="t_ok", embedding_dim=4, num_embeddings=10, feature_names=["f_ok"]),
        EmbeddingBagConfig(name="t_seq", embedding_dim=4, num_embeddings=10, feature_names=["f_seq"]),
    ]
    rt = EsdRuntime(job, tables, SparseOptimizer())
    if rt.is_ps:
        return "ps"
    ebc = EmbeddingBagCollection(tables=tables)
    ebc.embedding_bag_configs()[1].pooling = PoolingType.NONE  # per-id (unpooled), as a newer TorchRec has
    try:
        ShardedEsdEmbeddingBagCollection(ebc, rt)
    except EsdConfigError as e:
        return str(e)
    return "no error"


def test_des_misses_reject_unpooled_features_naming_the_feature():
    from torchrec_esd.apps.launch import run_local_world

    cfg = EsdConfig([WorkerSpec(2, 1.0)], des_misses=True, collective_timeout_s=60)
    out = run_local_world(_build_with_unpooled_table, 2, cfg)
    assert out[1] == "ps"
    assert "t_seq" in out[0] and "f_seq" in out[0] and "SUM and MEAN" in out[0]
