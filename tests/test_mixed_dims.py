"""Tables of different embedding dims in one collection (two-tower style),
which TorchRec allows: ESD trains the same model as vanilla TorchRec DMP.

The model is not a DLRM (DLRM needs one dim): pooled embeddings of three
tables of dims 4, 8 and 12 (FBGEMM wants multiples of 4) are concatenated into a linear head.  Vanilla
TorchRec shards every table table-wise with the fused row-wise Adagrad; ESD
puts two tables on 2 PS (rows travel zero-padded to dim 8, the optimizer
normalises by each row's own dim) and keeps the widest whole on every worker.
"""

import torch
from torch import nn

from torchrec_esd.apps.launch import run_local_world
from torchrec_esd.config import EsdConfig, WorkerSpec

from equivalence import assert_close_rel  # noqa: E402  (tests/ is on sys.path under pytest)

W, STEPS, BATCH, LR, EPS = 2, 8, 16, 0.1, 1e-8
DIMS = {"ta": 4, "tb": 8, "tc": 12}
ROWS = {"ta": 50, "tb": 80, "tc": 30}


def _tables():
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    return [EmbeddingBagConfig(name=n, embedding_dim=DIMS[n], num_embeddings=ROWS[n], feature_names=[f"f_{n}"])
            for n in DIMS]


def _batch(step: int):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(7 + step)
    lengths = torch.randint(1, 4, (len(DIMS), BATCH), generator=g)
    values = [torch.randint(0, ROWS[n], (int(lengths[i].sum()),), generator=g) for i, n in enumerate(DIMS)]
    kjt = KeyedJaggedTensor(keys=[f"f_{n}" for n in DIMS], values=torch.cat(values), lengths=lengths.reshape(-1))
    return kjt, torch.randint(0, 2, (BATCH,), generator=g).float()


class TwoTower(nn.Module):
    def __init__(self, ebc) -> None:
        super().__init__()
        self.ebc = ebc
        self.head = nn.Linear(sum(DIMS.values()), 1)

    def forward(self, kjt):
        pooled = self.ebc(kjt).to_dict()  # by feature: a sharded EBC may order its output otherwise
        return self.head(torch.cat([pooled[f"f_{n}"] for n in DIMS], dim=1)).squeeze(-1)


def _model():
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    torch.manual_seed(0)
    return TwoTower(EmbeddingBagCollection(tables=_tables(), device=torch.device("cpu")))


def _vanilla(_):
    import torch.distributed as dist
    from torch.nn.functional import binary_cross_entropy_with_logits as bce
    from torchrec import optim as trec_optim
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import ShardingEnv
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from torchrec_esd.batch_select import select_kjt_samples

    rank, group = dist.get_rank(), dist.group.WORLD
    model = _model()
    initial = {k: v.clone() for k, v in model.state_dict().items() if "embedding_bags" in k}
    apply_optimizer_in_backward(trec_optim.RowWiseAdagrad, model.ebc.parameters(), {"lr": LR, "eps": EPS})
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=W, compute_device="cpu", local_world_size=W),
        constraints={n: ParameterConstraints(sharding_types=["table_wise"]) for n in DIMS})
    sharders = [EmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(model, sharders, group)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(group), plan=plan,
                                   sharders=sharders, device=torch.device("cpu"))
    dmp.load_state_dict(initial, strict=False)
    opt = torch.optim.SGD([p for n, p in dmp.named_parameters() if "head" in n], lr=LR)
    per, losses = BATCH // W, []
    for step in range(STEPS):
        kjt, labels = _batch(step)
        mine = torch.arange(rank * per, (rank + 1) * per)
        opt.zero_grad()
        loss = bce(dmp(select_kjt_samples(kjt, mine)), labels[mine])
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / W)
    sd = dmp.state_dict()
    tables = {}
    for n in DIMS:
        full = torch.zeros(ROWS[n], DIMS[n])
        for shard in sd[[k for k in sd if k.endswith(f"embedding_bags.{n}.weight")][0]].local_shards():
            o, s = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            full[o[0] : o[0] + s[0], o[1] : o[1] + s[1]] = shard.tensor
        dist.all_reduce(full)
        tables[n] = full
    head = {k.split("head.")[-1]: v.detach().clone() for k, v in dmp.named_parameters() if "head" in k}
    return {"losses": losses, "tables": tables, "head": head}


def _esd(_):
    import torch.distributed as dist
    from torch.nn.functional import binary_cross_entropy_with_logits as bce
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingPlan

    from torchrec_esd import (
        EsdEmbeddingBagCollectionSharder,
        EsdInputDist,
        EsdRuntime,
        SparseOptimizer,
        esd_module_plan,
        make_dispatcher,
    )

    cfg = EsdConfig([WorkerSpec({"ta": 10, "tb": 12}, 1.0), WorkerSpec({"ta": 6, "tb": 20}, 8.0)], num_ps=2,
                    collective_timeout_s=60)
    tables = _tables()
    rt = EsdRuntime(cfg, tables[:2], SparseOptimizer("rowwise_adagrad", LR, EPS), replicated_tables=tables[2:])
    model = _model()
    if rt.is_ps:
        rt.serve(model.ebc)
        return {"role": "ps"}
    dmp = DistributedModelParallel(model, env=rt.sharding_env(), plan=ShardingPlan({"ebc": esd_module_plan(model.ebc, rt)}),
                                   sharders=[EsdEmbeddingBagCollectionSharder(rt)], device=torch.device("cpu"))
    opt = torch.optim.SGD([p for n, p in dmp.named_parameters() if "head" in n], lr=LR)
    esd_dist = EsdInputDist(rt, make_dispatcher("heuristic"))
    losses = []
    for step in range(STEPS):
        from torchrec.datasets.utils import Batch

        kjt, labels = _batch(step)
        local = esd_dist(Batch(dense_features=torch.zeros(BATCH, 1), sparse_features=kjt, labels=labels))
        opt.zero_grad()
        loss = esd_dist.loss(bce(dmp(local.sparse_features), local.labels, reduction="none"))
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total, group=rt.worker_group)
        losses.append(float(total) / W)
    rt.flush()
    tables, _ = rt.gather_tables()
    tables.update(rt.replica_tables())
    head = {k.split("head.")[-1]: v.detach().clone() for k, v in dmp.named_parameters() if "head" in k}
    rows = rt.metrics()["rows"]
    rt.shutdown(flush=False)
    return {"losses": losses, "tables": tables, "head": head, "rows": rows}


def test_tables_of_different_dims_train_the_vanilla_model():
    vanilla = run_local_world(_vanilla, W, None, timeout_s=120)[0]
    esd = run_local_world(_esd, W + 2, None, timeout_s=120)
    assert esd[W] == esd[W + 1] == {"role": "ps"}
    e = esd[0]
    assert_close_rel(torch.tensor(vanilla["losses"]), torch.tensor(e["losses"]), "losses")
    for n in DIMS:
        assert e["tables"][n].shape == (ROWS[n], DIMS[n])
        assert_close_rel(vanilla["tables"][n], e["tables"][n], f"table {n}")
    for k in vanilla["head"]:
        assert_close_rel(vanilla["head"][k], e["head"][k], f"head {k}")
        assert torch.equal(esd[1]["head"][k], e["head"][k])
    assert e["rows"]["miss_pull"] > 0  # rows really moved between the PS and the caches
