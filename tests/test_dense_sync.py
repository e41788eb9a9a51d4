"""The star all-reduce of the dense gradients (torchrec_esd.distributed.dense_sync)."""

import pytest
import torch

from torchrec_esd.config import EsdConfigError
from torchrec_esd.distributed.dense_sync import (
    dense_gradient_bytes, fastest_worker, link_bytes_per_step, register_dense_sync, sync_seconds,
)
from torchrec_esd.apps.launch import run_local_world


def test_fastest_worker_is_the_hub():
    assert fastest_worker([10.0, 1000.0, 50.0]) == 1
    assert fastest_worker([100.0, 100.0]) == 0  # ties: the lowest index
    with pytest.raises(EsdConfigError, match="no workers"):
        fastest_worker([])


def test_dense_sync_seconds_on_each_link():
    # star through worker 1 (the fastest): once each way on the others' links, twice on the hub's
    link = link_bytes_per_step("star", [10.0, 1000.0, 50.0], 25_600)
    assert link == [25_600.0, 51_200.0, 25_600.0]
    s = sync_seconds(link, [1.25e6, 1.25e8, 6.25e6])
    assert s == pytest.approx([2 * 25_600 / 1.25e6, 2 * 51_200 / 1.25e8, 2 * 25_600 / 6.25e6])
    assert s[0] > 0.04  # 40 ms of a step on a 10 Mbit/s link, whatever the worker's samples
    assert dense_gradient_bytes(torch.nn.Linear(3, 3)) == 0  # no DDP part: nothing synchronised
    with pytest.raises(EsdConfigError, match="positive link rates"):
        sync_seconds(link, [1.0, 0.0, 1.0])


def _ddp_grads(mode, hidden=5, max_chunks=None, empty=None, skip=None):
    """Gradients of a DDP-wrapped model on this rank, with the ``mode`` sync,
    after one backward on rank-specific data; also the bytes this rank sent.
    ``max_chunks``: the star's most pieces per bucket (default: the module's).
    ``empty``: a rank with an empty batch; ``skip``: a rank the star is told
    sends nothing."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from torchrec_esd.distributed import dense_sync

    if max_chunks is not None:
        dense_sync.STAR_MAX_CHUNKS = max_chunks
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3))
    ddp = DistributedDataParallel(model)
    senders = None if skip is None else (lambda: [r != skip for r in range(world)])
    n = register_dense_sync(ddp, mode, [10.0, 1000.0, 50.0][:world], senders=senders)
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(0 if rank == empty else 4 + rank, 7, generator=g)
    ddp(x).pow(2).sum().backward()
    # what the mean gradient must be: every rank's local gradient, averaged
    local = torch.nn.Sequential(torch.nn.Linear(7, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3))
    local.load_state_dict(model.state_dict())
    local(x).pow(2).sum().backward()
    mine = torch.cat([p.grad.reshape(-1) for p in local.parameters()])
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    return {
        "hooked": n,
        "dense_bytes": dense_gradient_bytes(ddp),
        "grad": torch.cat([p.grad.reshape(-1) for p in model.parameters()]),
        "expected": torch.stack(every).mean(0),
    }


@pytest.mark.parametrize("world", [2, 3])
def test_star_allreduce_gives_the_mean_gradient_on_every_rank(world):
    out = run_local_world(_ddp_grads, world, "star", timeout_s=120)
    for r in range(world):
        assert out[r]["hooked"] == 1
        assert out[r]["dense_bytes"] == (7 * 5 + 5 + 5 * 3 + 3) * 4
        torch.testing.assert_close(out[r]["grad"], out[r]["expected"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[r]["grad"], out[0]["grad"], rtol=0, atol=0)  # identical everywhere


def test_star_in_pieces_gives_the_same_bits_as_one_piece():
    # 1000 hidden units: 44 kB of gradients, cut into 10 pieces of ~4.4 kB (4 KiB at least each)
    from torchrec_esd.distributed.dense_sync import star_chunks

    numel = 7 * 1000 + 1000 + 1000 * 3 + 3
    assert star_chunks(numel) == 10
    assert star_chunks(100) == 1 and star_chunks(10**7) == 16  # small buckets whole, at most 16 pieces
    pieces = run_local_world(_ddp_grads, 3, "star", 1000, timeout_s=120)
    whole = run_local_world(_ddp_grads, 3, "star", 1000, 1, timeout_s=120)
    for r in range(3):
        torch.testing.assert_close(pieces[r]["grad"], pieces[r]["expected"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pieces[r]["grad"], whole[r]["grad"], rtol=0, atol=0)  # same sums, same order
        torch.testing.assert_close(pieces[r]["grad"], pieces[0]["grad"], rtol=0, atol=0)


@pytest.mark.parametrize("idle", [0, 1])  # a worker, and the hub (rank 1 is the fastest)
def test_star_takes_no_gradient_from_a_worker_without_samples(idle):
    skipping = run_local_world(_ddp_grads, 3, "star", 1000, None, idle, idle, timeout_s=120)
    sending = run_local_world(_ddp_grads, 3, "star", 1000, None, idle, None, timeout_s=120)  # its zeros sent
    for r in range(3):
        torch.testing.assert_close(skipping[r]["grad"], skipping[r]["expected"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(skipping[r]["grad"], skipping[0]["grad"], rtol=0, atol=0)
        # leaving the zeros out of the sum changes nothing
        torch.testing.assert_close(skipping[r]["grad"], sending[r]["grad"], rtol=0, atol=0)


def _lying(_):
    return _ddp_grads("star", 5, None, None, 2)  # rank 2 has samples but is told it sends nothing


def test_a_worker_told_it_sends_nothing_but_holding_a_gradient_fails():
    from torchrec_esd.apps.launch import RankFailed

    with pytest.raises(RankFailed) as info:
        run_local_world(_lying, 3, None, timeout_s=120)
    assert "non-zero dense gradient" in str(info.value)


def test_star_pieces_overlap_the_two_directions_in_the_model():
    link = link_bytes_per_step("star", [10.0, 1000.0], 25_600)
    assert sync_seconds(link, [1.25e6, 1.25e8], chunks=4)[0] == pytest.approx(1.25 * 25_600 / 1.25e6)
    with pytest.raises(EsdConfigError, match="chunks must be an integer >= 1"):
        sync_seconds(link, [1.25e6, 1.25e8], chunks=0)


def _bad_mode(_):
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(torch.nn.Linear(2, 2))
    with pytest.raises(EsdConfigError, match="dense_sync must be one of"):
        register_dense_sync(ddp, "tree", [1.0, 2.0])
    with pytest.raises(EsdConfigError, match="3 worker bandwidths for a group of 2"):
        register_dense_sync(ddp, "star", [1.0, 2.0, 3.0])
    return register_dense_sync(ddp, "ring", [1.0, 2.0])  # DDP's own: nothing installed


def test_bad_dense_sync_settings_are_refused():
    assert run_local_world(_bad_mode, 2, None, timeout_s=120) == [0, 0]
