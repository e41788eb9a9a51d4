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



def _positioned_reference(values, salt):
    v = values.reshape(-1).to(torch.int64)
    return v * -0x4B47D5B1A37C3C43 + torch.arange(v.numel(), dtype=torch.int64) * 0x2545F4914F6CDD1D + salt


@pytest.mark.parametrize("kernel", [True, False])
def test_global_batch_fingerprint_is_the_positioned_order_free_one_and_sees_order(monkeypatch, kernel):
    """global_batch_fingerprint sums per part (positioned_mix_sum, C++ or its reference): the same value
    as batch_fingerprint of all parts' positioned values in one tensor; a swap of two values, a changed
    dense bit or label changes it."""
    from torchrec_esd import ops
    from torchrec_esd.distributed.plan_channel import _words, global_batch_fingerprint

    if kernel:
        assert ops.HAS_MIX_SUM, "the extension is built without positioned_mix_sum"
    monkeypatch.setattr(ops, "HAS_MIX_SUM", ops.HAS_MIX_SUM and kernel)
    g = torch.Generator().manual_seed(3)
    keys = torch.randint(0, 1 << 40, (300,), generator=g)
    lengths = torch.randint(0, 4, (60,), generator=g, dtype=torch.int32)
    dense = torch.randn(12, 5, generator=g)
    labels = (torch.rand(12, generator=g) < 0.5).float()
    weights = torch.rand(300, generator=g, dtype=torch.float64)
    parts = [(keys, 1), (lengths, 2), (_words(dense), 3), (_words(labels), 4), (_words(weights), 5)]
    ref = batch_fingerprint(torch.cat([_positioned_reference(t, s) for t, s in parts]))
    fp = global_batch_fingerprint(keys, lengths, dense, labels, weights)
    assert fp == ref
    swapped = keys.clone()
    swapped[[3, 4]] = keys[[4, 3]]
    assert global_batch_fingerprint(swapped, lengths, dense, labels, weights) != fp
    flipped = dense.clone()
    flipped.view(-1).view(torch.int32)[7] ^= 1
    assert global_batch_fingerprint(keys, lengths, flipped, labels, weights) != fp
    assert global_batch_fingerprint(keys, lengths, dense, 1 - labels, weights) != fp
    # uint8 and int16 words (1- and 2-byte tensors) and an empty batch
    small = torch.tensor([200, 3, 255], dtype=torch.uint8)
    half = torch.tensor([-7, 30000], dtype=torch.int16)
    assert global_batch_fingerprint(keys[:0], lengths[:0], small, half) == batch_fingerprint(
        torch.cat([_positioned_reference(small, 3), _positioned_reference(half, 4)]))
    assert global_batch_fingerprint(keys[:0], lengths[:0]) == 0

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
