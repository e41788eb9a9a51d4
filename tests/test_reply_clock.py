"""The native waiter of posted replies (``csrc/reply_clock.cpp``) on real gloo
receives: the times it reads do not depend on the GIL, and a silent peer is a
clear, bounded error naming it.

A 2-rank gloo world on localhost: rank 1 plays the PS with raw sends (a
marker, then a reply ``REPLY_GAP_S`` later), rank 0 posts the receives and
times them with :class:`torchrec_esd.ps.client.ReplyClock` while its own
thread runs Python code without pause."""

import time

import pytest
import torch
import torch.distributed as dist

from torchrec_esd import ops
from torchrec_esd.apps.launch import run_local_world
from torchrec_esd.ps.client import ReplyClock
from torchrec_esd.ps.protocol import EsdPeerLostError
from torchrec_esd.ps.transport import GlooP2PTransport

pytestmark = pytest.mark.skipif(not ops.HAS_NATIVE_REPLY_CLOCK, reason="the C++ extension is not built")

REPLY_GAP_S = 0.25
REPLY_BYTES = 1 << 16


def _busy(seconds: float) -> int:
    """Pure Python for ``seconds`` (the GIL taken back after every switch interval)."""
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        n += 1
    return n


def _clock_world(silent: bool):
    rank = dist.get_rank()
    t = GlooP2PTransport(dist.group.WORLD, 2, ps_ranks=[1], timeout_s=0.5 if silent else 30.0)
    if rank == 1:
        if not silent:
            time.sleep(0.1)
            t.wait([t.send(0, torch.tensor([REPLY_BYTES], dtype=torch.int64))])
            time.sleep(REPLY_GAP_S)
            t.wait([t.send(0, torch.full((REPLY_BYTES,), 7, dtype=torch.uint8))])
            dist.barrier()
        else:
            time.sleep(2.0)  # up, but silent, past rank 0's timeout (a gloo timeout closes the pair)
        return None
    marker = t.recv(1, torch.empty(1, dtype=torch.int64))
    reply = t.recv(1, torch.empty(REPLY_BYTES, dtype=torch.uint8))
    native = t.native_clock([marker], [reply])
    clock = ReplyClock(t, [marker], [reply], native)
    _busy(0.6)  # the training thread computes meanwhile: the reply is in before join
    t0 = time.perf_counter()
    try:
        seconds = clock.join()
    except EsdPeerLostError as e:
        return {"error": str(e), "join_s": time.perf_counter() - t0, "native": clock.native}
    received = t.meter.total().bytes_received
    dist.barrier()
    return {"seconds": seconds, "first": clock.first, "end": clock.end, "native": clock.native,
            "done": marker.done and reply.done, "received": received, "ok": bool((reply.buf == 7).all()),
            "marker": int(marker.buf[0])}


def test_a_posted_reply_is_timed_by_the_native_waiter_while_the_training_thread_runs_python():
    out = run_local_world(_clock_world, 2, False, timeout_s=60)[0]
    assert out["native"] and out["done"] and out["ok"] and out["marker"] == REPLY_BYTES
    # marker to reply: the PS's gap, read when the receives completed, not when the GIL came back
    assert REPLY_GAP_S - 0.02 <= out["seconds"] <= REPLY_GAP_S + 0.1
    assert out["end"] <= time.monotonic()  # CLOCK_MONOTONIC: the clock of time.monotonic
    # the waited receives are metered once, by the training thread at the join
    assert out["received"] == 8 + REPLY_BYTES


def test_a_silent_peer_ends_the_native_wait_with_an_error_naming_it():
    out = run_local_world(_clock_world, 2, True, timeout_s=60)[0]
    assert out["native"]
    assert out["error"].startswith("receiving from PS 0 (rank 1) failed:")
    assert "Timed out" in out["error"]
    assert out["join_s"] < 5.0


def test_a_dropped_native_clock_does_not_hang_or_crash_the_process():
    # a waiter never joined (the training step failed before its finish): its thread ends on its own
    out = run_local_world(_dropped_clock_world, 2, timeout_s=60)
    assert out[0] == "survived"


def _dropped_clock_world():
    t = GlooP2PTransport(dist.group.WORLD, 2, ps_ranks=[1], timeout_s=0.3)
    if dist.get_rank() == 1:
        time.sleep(1.5)
        return None
    t.native_clock([], [t.recv(1, torch.empty(4, dtype=torch.int64))])  # dropped at once
    time.sleep(0.8)  # past the wait's timeout: the detached thread has ended
    return "survived"


def test_the_native_clock_refuses_a_non_positive_timeout():
    with pytest.raises((ValueError, RuntimeError), match="timeout_s must be positive"):
        ops.native_reply_clock([], [], 0.0)
