"""DES sharding (partial sums next to the weights) trains the same model as
vanilla TorchRec DMP (table-wise, fused optimizer) on multi-hot features.

Each equivalence test launches real gloo worlds on localhost: vanilla TorchRec
on W ranks and DES (row-wise or table-wise) on W ranks, on the same global
batches, and compares losses per step, final tables and dense weights.
"""

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from torchrec_esd.config import EsdConfigError
from torchrec_esd.des.sharding import DesEmbeddingBagCollectionSharder, des_module_plan
from torchrec_esd.apps.launch import run_local_world
from torchrec_esd.ps import SparseOptimizer
from torchrec_esd.apps.trainer import JobConfig, build_model, run
from torchrec_esd.apps.workload import SyntheticWorkload, SyntheticWorkloadConfig

from equivalence import assert_close_rel, assert_same_model  # noqa: E402  (tests/ is on sys.path under pytest)

STEPS = 20
BATCH = 48
# multi-hot: 2..10 ids per sample per feature
WORKLOAD = SyntheticWorkloadConfig(num_sparse=4, cardinalities=[60, 150, 400, 25], bag_size=(2, 10), alpha=1.1, seed=3)


def _compare(W, optimizer, sharding):
    common = dict(steps=STEPS, global_batch=BATCH, workload=WORKLOAD, collect_tables=True,
                  sparse_optimizer=optimizer, sparse_lr=0.1, dense_lr=0.1)
    vanilla = run_local_world(run, W, JobConfig(method="vanilla", **common))
    des = run_local_world(run, W, JobConfig(method="des", des_sharding=sharding, **common))
    v, d = vanilla[0], des[0]
    assert_same_model(v, des, W)
    # training changed the tables, and partial results (not rows) moved
    ebc = build_model(JobConfig(**common), SyntheticWorkload(WORKLOAD)).sparse_arch.embedding_bag_collection
    assert all(not torch.equal(ebc.embedding_bags[n].weight.detach(), d["tables"][n]) for n in d["tables"])
    assert all(x["iterations"] == STEPS for x in des)
    assert sum(x["comm_bytes"]["partials_fwd"] for x in des) > 0
    assert sum(x["comm_bytes"]["partials_bwd"] for x in des) > 0
    return vanilla, des


def test_des_row_wise_two_ranks_sgd():
    _compare(2, "sgd", "row_wise")


def test_des_row_wise_four_ranks_rowwise_adagrad():
    _, des = _compare(4, "rowwise_adagrad", "row_wise")
    states = des[0]["tables_state"]
    assert all(s.shape[1] == 1 and float(s.max()) > 0 for s in states.values())


def test_des_table_wise_four_ranks_rowwise_adagrad():
    _compare(4, "rowwise_adagrad", "table_wise")


# ---------------------------------------------------------------- bad input
def test_des_rejects_non_sum_pooling_naming_the_feature():
    # TorchRec 1.9.2's PoolingType has SUM, MEAN and NONE (no MAX) and its
    # EmbeddingBagCollection cannot build NONE; set it on a built module's
    # config, as a subclass or a newer TorchRec (MAX) would present it
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name="t_ok", embedding_dim=4, num_embeddings=10, feature_names=["f_ok"]),
            EmbeddingBagConfig(name="t_max", embedding_dim=4, num_embeddings=10, feature_names=["f_max"]),
        ]
    )
    plan = des_module_plan(ebc, 2)
    ebc.embedding_bag_configs()[1].pooling = PoolingType.NONE
    with pytest.raises(EsdConfigError, match=r"f_max.*t_max.*NONE.*not a sum"):
        des_module_plan(ebc, 2)
    with pytest.raises(EsdConfigError, match=r"f_max"):
        DesEmbeddingBagCollectionSharder(SparseOptimizer()).shard(ebc, plan, env=None)


def test_des_rejects_unpooled_embedding_collection_naming_the_feature():
    ec = EmbeddingCollection(
        tables=[EmbeddingConfig(name="t_seq", embedding_dim=4, num_embeddings=10, feature_names=["f_seq"])]
    )
    with pytest.raises(EsdConfigError, match=r"f_seq.*per-id \(unpooled\)"):
        des_module_plan(ec, 2)


def test_des_rejects_unknown_sharding():
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10,
                                                            feature_names=["f"])])
    with pytest.raises(EsdConfigError, match="row_wise"):
        des_module_plan(ebc, 2, "column_wise")


# ---------------------------------------------------------------- FM partial sums
def _fm_logits(s1, s2):
    return 0.5 * (s1.pow(2).sum(1) - s2)


def _fm_worker(sharding, optimizer, steps, batch):
    import torch.distributed as dist
    import torch.nn.functional as F
    from torchrec.distributed.types import ShardingEnv

    wl = SyntheticWorkload(WORKLOAD)
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=wl.table_configs(4))
    world, rank = dist.get_world_size(), dist.get_rank()
    opt = SparseOptimizer(optimizer, lr=0.2)
    sharded = DesEmbeddingBagCollectionSharder(opt).shard(
        ebc, des_module_plan(ebc, world, sharding), ShardingEnv.from_process_group(dist.group.WORLD))
    losses = []
    for step in range(steps):
        b = wl.local_batch(step, batch, rank, world)
        s1, s2 = sharded.fm_sums(b.sparse_features)
        loss = F.binary_cross_entropy_with_logits(_fm_logits(s1, s2), b.labels)
        loss.backward()
        g = loss.detach().clone()
        dist.all_reduce(g)
        losses.append(float(g) / world)
    tables, _ = sharded.gather_tables()
    return {"losses": losses, "tables": tables, "bytes": dict(sharded.comm_bytes)}


def _fm_reference(optimizer, steps, batch):
    """Unsharded FM on the global batch, same FBGEMM-style sparse optimizer."""
    import torch.nn.functional as F

    wl = SyntheticWorkload(WORKLOAD)
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=wl.table_configs(4))
    names = [t.name for t in ebc.embedding_bag_configs()]
    tables = {n: ebc.embedding_bags[n].weight.detach().clone() for n in names}
    state = {n: torch.zeros(tables[n].shape[0], 1) for n in names}
    opt = SparseOptimizer(optimizer, lr=0.2)
    losses = []
    for step in range(steps):
        b = wl.global_batch(step, batch)
        kjt = b.sparse_features.to_dict()
        params = {n: tables[n].clone().requires_grad_(True) for n in names}
        s1, s2 = 0, 0
        for f, n in zip(wl.config.feature_names, names):
            jt = kjt[f]
            off = jt.offsets()
            s1 = s1 + F.embedding_bag(jt.values(), params[n], off, mode="sum", include_last_offset=True)
            s2 = s2 + F.embedding_bag(jt.values(), params[n].pow(2).sum(1, keepdim=True), off, mode="sum",
                                      include_last_offset=True)[:, 0]
        loss = F.binary_cross_entropy_with_logits(_fm_logits(s1, s2), b.labels)
        loss.backward()
        losses.append(float(loss))
        for n in names:
            opt.apply_(tables[n], state[n], params[n].grad)
    return losses, tables


@pytest.mark.parametrize("sharding,W", [("row_wise", 2), ("table_wise", 4)])
def test_des_fm_first_and_second_order_sums_match_unsharded(sharding, W):
    steps, batch = 8, 32
    des = run_local_world(_fm_worker, W, sharding, "rowwise_adagrad", steps, batch)
    ref_losses, ref_tables = _fm_reference("rowwise_adagrad", steps, batch)
    assert_close_rel(torch.tensor(ref_losses), torch.tensor(des[0]["losses"]), "FM losses")
    torch.manual_seed(0)
    init = EmbeddingBagCollection(tables=SyntheticWorkload(WORKLOAD).table_configs(4))
    for n, t in ref_tables.items():
        assert not torch.equal(t, init.embedding_bags[n].weight.detach())  # training moved the rows
        assert_close_rel(t, des[0]["tables"][n], f"FM table {n}")
    # one (D + 1)-vector per sample per remote owner, each way
    assert sum(r["bytes"]["partials_fwd"] for r in des) > 0
