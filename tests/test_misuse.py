"""Drop-in means no silent misuse (issue 15).

Each case is a mistake a new TorchRec user makes when switching to ESD.  It
must either work as it does in vanilla TorchRec or fail with a clear error on
*every* rank (the parameter-server ranks included, through the workers' abort),
never train a different model silently nor hang.  Every world here is
2 workers + 1 PS on gloo, with two small tables and a few steps.
"""

import math

import pytest
import torch

from torchrec_esd.config import EsdConfig, WorkerSpec
from torchrec_esd.apps.launch import RankFailed, run_local_world

TIMEOUT_S = 60
DENSE = 3


def _tables():
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    return [
        EmbeddingBagConfig(name="t0", embedding_dim=4, num_embeddings=40, feature_names=["f0"]),
        EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=60, feature_names=["f1"]),
    ]


def _batch(step: int, size: int, extra_feature: bool = False):
    """A seeded global batch of the two features; ``extra_feature`` inserts a
    third one that no table reads (the other features stay the same)."""
    from torchrec.datasets.utils import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(100 + step)
    lengths = {f: torch.randint(1, 3, (size,), generator=g) for f in ("f0", "f1")}
    values = {f: torch.randint(0, n, (int(lengths[f].sum()),), generator=g) for f, n in (("f0", 40), ("f1", 60))}
    dense = torch.randn(size, DENSE, generator=g)
    labels = torch.randint(0, 2, (size,), generator=g).float()
    keys = ["f0", "f1"]
    if extra_feature:
        keys = ["f0", "f_unused", "f1"]
        lengths["f_unused"] = torch.randint(0, 3, (size,), generator=g)
        values["f_unused"] = torch.randint(0, 1000, (int(lengths["f_unused"].sum()),), generator=g)
    kjt = KeyedJaggedTensor(keys=keys, values=torch.cat([values[k] for k in keys]),
                            lengths=torch.cat([lengths[k] for k in keys]), stride=size)
    return Batch(dense_features=dense, sparse_features=kjt, labels=labels)


def _user_program(case: str, steps: int = 3, batch: int = 8):
    """What a user writes (the README's loop), with one mistake named ``case``.

    Cases: "ok", "plan_key" (a) plan key naming no module, "mean_loss" (b) an
    unscaled loss under uneven shares, "adam" / "fused_lr" (c) a fused optimizer
    config ESD does not run / that differs from the runtime's, "meta" (d) tables
    on the meta device, "no_env" (e) DMP without ``env=``, "extra_feature" (f)
    a KJT feature no table reads, "fused_ok" (c) a fused config equal to the runtime's.
    """
    from torch.nn.functional import binary_cross_entropy_with_logits as bce
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingPlan
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from torchrec_esd.dispatch import make_dispatcher
    from torchrec_esd.distributed.input_dist import EsdInputDist
    from torchrec_esd.ps import SparseOptimizer
    from torchrec_esd.distributed.runtime import EsdRuntime
    from torchrec_esd.distributed.sharding import EsdEmbeddingBagCollectionSharder, esd_module_plan

    shares = (1, 3) if case == "mean_loss" else (1, 1)
    cfg = EsdConfig([WorkerSpec(10, 100.0, share=shares[0]), WorkerSpec(10, 10.0, share=shares[1])],
                    collective_timeout_s=TIMEOUT_S / 2)
    tables = _tables()
    runtime = EsdRuntime(cfg, tables, SparseOptimizer("sgd", lr=0.1))
    torch.manual_seed(0)
    device = torch.device("meta") if case == "meta" else torch.device("cpu")
    ebc = EmbeddingBagCollection(tables=tables, device=device)
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=DENSE, dense_arch_layer_sizes=[8, 4],
                 over_arch_layer_sizes=[8, 1])
    sharder_kwargs = {}
    if case in ("adam", "fused_ok"):
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

        opt_cls = torch.optim.Adam if case == "adam" else torch.optim.SGD
        apply_optimizer_in_backward(opt_cls, ebc.parameters(), {"lr": 100.0 if case == "adam" else 0.1})
    if case == "fused_lr":
        from fbgemm_gpu.split_embedding_configs import EmbOptimType

        sharder_kwargs["fused_params"] = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 100.0}
    if runtime.is_ps:
        runtime.serve(ebc)
        return {"role": "ps"}
    path = "sparse_arch.embedding_bags" if case == "plan_key" else "sparse_arch.embedding_bag_collection"
    env = {} if case == "no_env" else {"env": runtime.sharding_env()}
    dmp = DistributedModelParallel(model, plan=ShardingPlan({path: esd_module_plan(ebc, runtime)}),
                                   sharders=[EsdEmbeddingBagCollectionSharder(runtime, **sharder_kwargs)], **env)
    initial = runtime.gather_tables()[0] if case == "meta" else None
    dense_opt = torch.optim.SGD(dmp.parameters(), lr=0.1)
    esd_dist = EsdInputDist(runtime, make_dispatcher("random"), mode="global")
    losses = []
    for step in range(steps):
        local = esd_dist(_batch(step, batch, extra_feature=case == "extra_feature"))
        dense_opt.zero_grad()
        logits = dmp(local.dense_features, local.sparse_features).squeeze(-1)
        if case == "mean_loss":  # the vanilla TorchRec loss: a mean over the local batch
            loss = bce(logits, local.labels)
        else:  # equal shares: the same as each worker's mean
            loss = bce(logits, local.labels, reduction="sum") * esd_dist.loss_scale
        loss.backward()
        dense_opt.step()
        losses.append(float(loss.detach()))
    runtime.shutdown()
    return {"role": "worker", "losses": losses, "initial": initial}


def _jobs(cases):
    """Run the user program once per case, one after the other, in one world."""
    return {case: _user_program(case) for case in cases}


def _fails_everywhere(case: str, *needles: str) -> dict:
    with pytest.raises(RankFailed) as info:
        run_local_world(_user_program, 3, case, timeout_s=TIMEOUT_S)
    errors = info.value.errors
    assert sorted(errors) == [0, 1, 2], errors
    for r in (0, 1):
        assert errors[r]["error"].startswith("EsdConfigError: "), errors[r]["error"]
    assert "aborted by the workers" in errors[2]["error"], errors[2]["error"]
    for r in (0, 1, 2):
        for needle in needles:
            assert needle in errors[r]["error"], (r, needle, errors[r]["error"])
    return errors


# the mistakes that must work as in vanilla TorchRec, run in one world (one job each)
WORKING = ("ok", "extra_feature", "meta", "fused_ok")


@pytest.fixture(scope="module")
def working():
    out = run_local_world(_jobs, 3, WORKING, timeout_s=TIMEOUT_S)
    for case in WORKING:
        assert out[2][case]["role"] == "ps"
        for r in (0, 1):
            assert out[r][case]["role"] == "worker" and len(out[r][case]["losses"]) == 3
            assert all(math.isfinite(x) for x in out[r][case]["losses"]), (case, out[r][case])
    return out


# ---------------------------------------------------------------- (a)
def test_plan_key_that_names_no_module_fails_every_rank():
    # DMP leaves a module whose path matches no plan key unsharded (a plain
    # replicated EmbeddingBagCollection under DDP) while EsdInputDist queues plans
    _fails_everywhere("plan_key", "no EmbeddingBagCollection was sharded by ESD")


# ---------------------------------------------------------------- (b)
def test_unscaled_mean_loss_under_uneven_shares_fails_every_rank():
    # shares 2 : 6 of a batch of 8: each worker's mean weights its samples by
    # 1/2 or 1/6 instead of vanilla's 1/8, which trains another model
    _fails_everywhere("mean_loss", "was not scaled by EsdInputDist.loss", "[2, 6]")


def test_esd_loss_takes_per_sample_losses_of_the_computed_batch():
    from torchrec_esd.config import EsdConfigError
    from torchrec_esd.distributed.loss_scaling import LossScaling

    scaling = LossScaling(EsdConfig([WorkerSpec(10, 1.0, share=1), WorkerSpec(10, 1.0, share=3)]))
    with pytest.raises(EsdConfigError, match="run the model's forward"):
        scaling.scale(torch.ones(2))
    scaling.dispatched(1, 8)
    assert scaling.forward(1, 2, training=True) is None
    with pytest.raises(EsdConfigError, match="2 per-sample losses of iteration 1"):
        scaling.scale(torch.ones(2, requires_grad=True).mean())  # already reduced
    per_sample = torch.tensor([0.5, 1.5], requires_grad=True)
    assert float(scaling.scale(per_sample)) == pytest.approx(2.0 * 2 / 8)  # sum * W / B
    scaling.dispatched(2, 8)
    assert scaling.forward(2, 2, training=True) is None  # iteration 1 was scaled
    scaling.dispatched(3, 8)
    assert "iteration 2 was not scaled" in scaling.forward(3, 2, training=True)
    # equal shares: a local mean is vanilla's loss, nothing is owed
    even = LossScaling(EsdConfig([WorkerSpec(10, 1.0), WorkerSpec(10, 1.0)]))
    for it in (1, 2):
        even.dispatched(it, 8)
        assert even.forward(it, 4, training=True) is None
    assert even.unscaled() is None


# ---------------------------------------------------------------- (c)
def test_fused_optimizer_esd_does_not_run_is_rejected_by_name_on_every_rank():
    # apply_optimizer_in_backward(Adam, lr=100) used to be ignored silently
    _fails_everywhere("adam", "Adam", "ADAM", "do not run")


def test_fused_params_that_differ_from_the_runtime_optimizer_fail_every_rank():
    _fails_everywhere("fused_lr", "learning rate 100.0", "SparseOptimizer('sgd', lr=0.1")


def test_fused_optimizer_equal_to_the_runtime_optimizer_trains(working):
    # apply_optimizer_in_backward(SGD, lr=0.1) is the runtime's optimizer: honoured
    for r in (0, 1):
        assert working[r]["fused_ok"]["losses"] == working[r]["ok"]["losses"]


def test_fused_config_is_read_like_torchrec():
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from torchrec_esd.config import EsdConfigError
    from torchrec_esd.distributed.fused_config import check_fused_optimizer, fused_optimizer
    from torchrec_esd.optim import SparseOptimizer

    assert fused_optimizer(None) is None and fused_optimizer({}) is None
    assert fused_optimizer({"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.3}) == SparseOptimizer("sgd", 0.3)
    assert fused_optimizer({"learning_rate": 0.3}) == SparseOptimizer("sgd", 0.3)  # FBGEMM's default: EXACT_SGD
    assert fused_optimizer({"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "lr": 0.2, "eps": 1e-6,
                            "weight_decay": 0.0}) == SparseOptimizer("rowwise_adagrad", 0.2, 1e-6)
    for bad, named in (({"optimizer": EmbOptimType.ADAM}, "ADAM"),
                       ({"optimizer": EmbOptimType.EXACT_ADAGRAD}, "EXACT_ADAGRAD"),
                       ({"optimizer": EmbOptimType.EXACT_SGD, "weight_decay": 0.01}, "weight_decay=0.01"),
                       ({"optimizer": EmbOptimType.EXACT_SGD, "momentum": 0.9}, "momentum=0.9"),
                       ({"optimizer": EmbOptimType.EXACT_SGD, "cache_load_factor": 0.2}, "cache_load_factor")):
        with pytest.raises(EsdConfigError, match=named):
            fused_optimizer(bad, table="t0")
    # apply_optimizer_in_backward's tag on the weight wins over the sharder's config
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    ebc = EmbeddingBagCollection(tables=_tables(), device=torch.device("meta"))
    apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.05, "eps": 1e-8})
    sharder_sgd = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.5}
    assert check_fused_optimizer(ebc, sharder_sgd, SparseOptimizer("rowwise_adagrad", 0.05, 1e-8)) is None
    problem = check_fused_optimizer(ebc, sharder_sgd, SparseOptimizer("rowwise_adagrad", 0.01, 1e-8))
    assert "rowwise_adagrad (learning rate 0.05, eps 1e-08)" in problem and "lr=0.01" in problem
    assert check_fused_optimizer(EmbeddingBagCollection(tables=_tables(), device=torch.device("meta")), None,
                                 SparseOptimizer("sgd", 0.1)) is None


# ---------------------------------------------------------------- (d)
def test_meta_device_tables_are_initialised_like_torchrec(working):
    # the PS used to crash with a raw NotImplementedError copying meta tensors
    for name, n in (("t0", 40), ("t1", 60)):
        rows = working[0]["meta"]["initial"][name]  # from the PS, before the first step
        bound = math.sqrt(1 / n)  # TorchRec: uniform(-sqrt(1/N), sqrt(1/N)) unless weight_init_min/max
        assert rows.shape == (n, 4)
        assert float(rows.abs().max()) <= bound and float(rows.std()) > bound / 4


# ---------------------------------------------------------------- (e)
def test_dmp_without_the_esd_sharding_env_fails_every_rank_without_hanging():
    _fails_everywhere("no_env", "env=runtime.sharding_env()")


# ---------------------------------------------------------------- (f)
def test_kjt_feature_no_table_reads_is_ignored_like_torchrec(working):
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    # vanilla TorchRec accepts it
    ebc = EmbeddingBagCollection(tables=_tables())
    assert ebc(_batch(0, 4, extra_feature=True).sparse_features).keys() == ["f0", "f1"]
    # ... and ESD trains the same model as without it
    for r in (0, 1):
        assert working[r]["extra_feature"]["losses"] == working[r]["ok"]["losses"]


# ---------------------------------------------------------------- roles
def _wrong_role_calls(_):
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from torchrec_esd.config import EsdConfigError
    from torchrec_esd.distributed.runtime import EsdPsRuntime, EsdRuntime, EsdWorkerRuntime
    from torchrec_esd.optim import SparseOptimizer

    cfg = EsdConfig([WorkerSpec(10, 100.0), WorkerSpec(10, 10.0)], collective_timeout_s=TIMEOUT_S / 2)
    rt = EsdRuntime(cfg, _tables(), SparseOptimizer("sgd", lr=0.1))
    ebc = EmbeddingBagCollection(tables=_tables())
    errors = []
    if rt.is_ps:
        assert isinstance(rt, EsdPsRuntime) and not isinstance(rt, EsdWorkerRuntime)
        for call in (lambda: rt.sharding_env(), lambda: rt.directory, lambda: rt.flush()):
            try:
                call()
            except EsdConfigError as e:
                errors.append(str(e))
        rt.serve(ebc)
        return {"role": "ps", "errors": errors}
    assert isinstance(rt, EsdWorkerRuntime) and rt.worker_index == rt.rank
    try:
        rt.serve(ebc)
    except EsdConfigError as e:
        errors.append(str(e))
    rt.shutdown(flush=False)
    return {"role": "worker", "errors": errors}


def test_each_rank_gets_its_role_and_the_other_roles_api_is_a_clear_error():
    out = run_local_world(_wrong_role_calls, 3, None, timeout_s=TIMEOUT_S)
    ps = out[2]["errors"]
    assert len(ps) == 3
    for name, msg in zip(("sharding_env", "directory", "flush"), ps):
        assert f"rank 2 is a parameter server: EsdRuntime.{name} belongs to worker ranks (ranks 0..1)" in msg
    for r in (0, 1):
        assert out[r]["errors"] == [f"rank {r} is a worker; only parameter-server ranks (2..2) serve"]
