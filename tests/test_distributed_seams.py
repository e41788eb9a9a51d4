"""Seams of the execution side: the plan channel between EsdInputDist and the
sharded module, the lookup backend registry, the objective's one home;
misuse is an error that names what is wrong."""

import threading

import pytest
import torch

from torchrec_esd.cache import IterationPlan
from torchrec_esd.config import EsdConfigError
from torchrec_esd.distributed.lookup import ESD_COMPUTE_KERNEL, lookup_backend, lookup_backends
from torchrec_esd.distributed.plan_channel import PlanChannel, batch_fingerprint


def _plan(i):
    return IterationPlan(i, [None])


def test_plans_are_taken_in_iteration_order():
    ch = PlanChannel()
    for i in (1, 2, 3):
        ch.put(_plan(i))
    assert ch.pending == 3
    assert [ch.take().iteration for _ in range(2)] == [1, 2]
    assert ch.take(3).iteration == 3 and ch.pending == 0 and ch.last_taken == 3


def test_a_batch_without_a_plan_names_the_iteration():
    ch = PlanChannel()
    with pytest.raises(EsdConfigError, match="no dispatch plan for iteration 1.*did not go through EsdInputDist"):
        ch.take()
    ch.put(_plan(1))
    ch.take()
    with pytest.raises(EsdConfigError, match="no dispatch plan for iteration 2 \\(the last dispatched is 1\\)"):
        ch.take()


def test_a_plan_taken_by_the_wrong_iteration_is_an_error():
    ch = PlanChannel()
    ch.put(_plan(1))
    ch.put(_plan(2))
    with pytest.raises(EsdConfigError, match="asked for the plan of iteration 2 but iteration 1 is next"):
        ch.take(2)
    assert ch.take(1).iteration == 1  # nothing was consumed by the failed take


def test_plans_must_come_in_dispatch_order():
    ch = PlanChannel()
    ch.put(_plan(1))
    with pytest.raises(EsdConfigError, match="plan of iteration 3 put after iteration 1"):
        ch.put(_plan(3))
    with pytest.raises(EsdConfigError, match="plan of iteration 1 put after iteration 1"):
        ch.put(_plan(1))


def test_put_from_a_dispatch_thread_take_from_training():
    ch = PlanChannel()
    t = threading.Thread(target=lambda: [ch.put(_plan(i)) for i in range(1, 201)])
    t.start()
    t.join()
    assert [ch.take().iteration for _ in range(200)] == list(range(1, 201))


def test_batch_fingerprint_is_order_free_and_sees_multiplicity():
    keys = torch.tensor([5, 3, 3, 1 << 40, 0])
    assert batch_fingerprint(keys) == batch_fingerprint(keys.flip(0))
    assert batch_fingerprint(keys) != batch_fingerprint(torch.tensor([5, 3, 1 << 40, 0]))  # one 3 less
    assert batch_fingerprint(keys) != batch_fingerprint(torch.tensor([5, 3, 4, 1 << 40, 0]))
    assert batch_fingerprint(keys) != batch_fingerprint(torch.tensor([5, 2, 4, 1 << 40, 0]))  # same sum
    assert batch_fingerprint(torch.empty(0, dtype=torch.int64)) == 0


def test_compute_kernel_names_a_lookup_backend():
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    tables = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=3, feature_names=["f"])]
    assert ESD_COMPUTE_KERNEL in lookup_backends()
    assert lookup_backend(ESD_COMPUTE_KERNEL, tables, ["f"]).dims == [4]
    with pytest.raises(EsdConfigError, match="compute_kernel 'fused_uvm' has no ESD lookup backend"):
        lookup_backend("fused_uvm", tables, ["f"])


def test_the_objective_comes_from_the_config():
    from torchrec_esd.dispatch import make_dispatcher
    from torchrec_esd.distributed.input_dist import EsdInputDist

    built = EsdInputDist._dispatcher("hybrid", {}, "makespan")
    assert built.objective == "makespan"
    assert EsdInputDist._dispatcher("random", {"seed": 1}, "total").objective == "total"
    mine = make_dispatcher("heuristic", objective="makespan")
    assert EsdInputDist._dispatcher(mine, {}, "makespan") is mine
    with pytest.raises(EsdConfigError, match="optimises objective 'total' but EsdConfig.objective is 'makespan'"):
        EsdInputDist._dispatcher(make_dispatcher("hybrid"), {}, "makespan")
    with pytest.raises(EsdConfigError, match="comes from EsdConfig.objective"):
        EsdInputDist._dispatcher("hybrid", {"objective": "total"}, "total")
    with pytest.raises(EsdConfigError, match="unknown dispatcher 'hybird'"):
        EsdInputDist._dispatcher("hybird", {}, "total")
    with pytest.raises(EsdConfigError, match="dispatcher 'heuristic': .*unexpected keyword argument 'seed'"):
        EsdInputDist._dispatcher("heuristic", {"seed": 1}, "total")
