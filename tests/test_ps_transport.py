"""The PS transport seam: the server and client driven through an in-process
(non-gloo) Transport, the per-link meter, and the transmission meter fed by
what the transport really moved."""

import dataclasses
import queue
import threading
from collections import defaultdict, deque

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_esd.config import WorkerSpec
from torchrec_esd.layout import KeySpace
from torchrec_esd.metrics import TransmissionMeter
from torchrec_esd.ps import (
    DesRequest,
    EsdProtocolError,
    EsdRemoteError,
    LinkStats,
    ParameterServer,
    PsClient,
    Section,
    SectionSize,
    SparseOptimizer,
    Traffic,
    Transport,
)
from torchrec_esd.ps.protocol import (
    FRAME_BYTES,
    FRAME_WORDS,
    Command,
    GradsFrame,
    PrePushFrame,
    PushPullFrame,
    encode_frame,
)

DIM = 4


class _Hub:
    """Message queues between in-process ranks, one per (source, destination)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._queues = {}

    def q(self, src, dst) -> queue.Queue:
        with self._lock:
            return self._queues.setdefault((src, dst), queue.Queue())


class _Recv:
    def __init__(self, buf, peer):
        self.buf, self.peer, self.done = buf, peer, False


class QueueTransport(Transport):
    """A Transport over in-process queues: sends complete at once; receives
    posted for a peer are matched in posting order (the Transport contract)."""

    def __init__(self, hub, rank, ps_ranks, worker_ranks, timeout_s=20.0):
        super().__init__(ps_ranks, worker_ranks, timeout_s)
        self.hub, self.rank = hub, rank
        self._posted = defaultdict(deque)
        # a split reply's two reply clocks wait on one peer's receives from two threads: taking the
        # next posted receive and the next message is one step per peer
        self._lock = threading.Lock()
        self._peer_locks = {}

    def _peer_lock(self, peer):
        with self._lock:
            return self._peer_locks.setdefault(peer, threading.Lock())

    def _isend(self, buf, peer):
        self.hub.q(self.rank, peer).put(buf.clone())
        return None

    def _irecv(self, buf, peer):
        r = _Recv(buf, peer)
        self._posted[peer].append(r)
        return r

    def _wait(self, work, timeout_s):
        if work is None:  # a send
            return
        while not work.done:
            with self._peer_lock(work.peer):
                if work.done:
                    break
                r = self._posted[work.peer].popleft()
                data = self.hub.q(work.peer, self.rank).get(timeout=timeout_s)
                dst = r.buf.view(-1).view(torch.uint8)
                src = data.view(-1).view(torch.uint8)
                if dst.numel() != src.numel():
                    raise RuntimeError(f"message of {src.numel()} bytes into a buffer of {dst.numel()}")
                dst.copy_(src)
                r.done = True


TABLES = [
    EmbeddingBagConfig(name="t0", embedding_dim=DIM, num_embeddings=10, feature_names=["f0"]),
    EmbeddingBagConfig(name="t1", embedding_dim=DIM, num_embeddings=7, feature_names=["f1"]),
]


def _world(num_workers, num_ps, des, optimizer, weights, worker_fns, transport_of=None, timed_replies=False,
           **server_kwargs):
    """Run ``num_ps`` servers and one ``worker_fns[w](client)`` per worker in
    threads over a QueueTransport (``transport_of[rank]``: another class for
    that rank); returns (results, servers, transports, errors)."""
    hub = _Hub()
    workers = list(range(num_workers))
    ps = list(range(num_workers, num_workers + num_ps))
    routing = KeySpace(TABLES, num_ps)
    transports = {r: (transport_of or {}).get(r, QueueTransport)(hub, r, ps, workers) for r in workers + ps}
    servers = [ParameterServer(i, routing, optimizer, transports[r], weights, des=des, **server_kwargs)
               for i, r in enumerate(ps)]
    results, errors = {}, {}

    def run(rank, fn):
        try:
            results[rank] = fn()
        except Exception as e:  # noqa: BLE001  (reported to the test)
            errors[rank] = e

    threads = [threading.Thread(target=run, args=(r, s.serve)) for r, s in zip(ps, servers)]
    clients = [PsClient(routing, optimizer, transports[w], des=des, timed_replies=timed_replies) for w in workers]
    threads += [threading.Thread(target=run, args=(w, lambda w=w: worker_fns[w](clients[w]))) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results, servers, transports, errors


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {t.name: torch.randn(t.num_embeddings, DIM, generator=g) for t in TABLES}


def test_push_pull_grads_gather_through_a_non_gloo_transport():
    w0 = _weights()
    glob = torch.cat([w0["t0"], w0["t1"]])  # global keys: t0 0..9, t1 10..16
    lr = 0.5
    pushed = {1: torch.full((DIM,), 7.0), 12: torch.full((DIM,), -3.0), 5: torch.full((DIM,), 2.0)}

    def worker0(c):
        keys = torch.tensor([1, 12])
        rows, partial, route = c.push_pull(keys, torch.stack([pushed[1], pushed[12]]), torch.tensor([3, 15]))
        out = {"rows": rows, "pp": c.last_traffic}
        c.push_grads(torch.tensor([3]), torch.ones(1, DIM))
        out["grads"] = c.last_traffic
        c.push_pull(torch.empty(0, dtype=torch.int64), torch.empty(0, DIM), torch.empty(0, dtype=torch.int64))
        out["tables"] = c.gather_tables()
        c.stop()
        return out

    def worker1(c):
        rows, _, _ = c.push_pull(torch.tensor([5]), pushed[5].view(1, DIM), torch.tensor([12, 1, 8]))
        c.push_grads(torch.tensor([3, 8]), torch.tensor([[1.0] * DIM, [2.0] * DIM]))
        out = {"rows": rows}
        c.push_pull(torch.empty(0, dtype=torch.int64), torch.empty(0, DIM), torch.empty(0, dtype=torch.int64))
        out["tables"] = c.gather_tables()
        c.stop()
        return out

    res, servers, transports, errors = _world(2, 2, False, SparseOptimizer("sgd", lr), w0, [worker0, worker1])
    assert errors == {}
    # pulls see the pushes of every worker of the same phase; pulled rows come in the asked order
    assert torch.equal(res[0]["rows"], glob[[3, 15]])
    assert torch.equal(res[1]["rows"], torch.stack([pushed[12], pushed[1], glob[8]]))
    # gradients of all workers are summed per row, the optimizer applied once
    expect = glob.clone()
    for k, v in pushed.items():
        expect[k] = v
    expect[3] -= lr * 2.0
    expect[8] -= lr * 2.0
    for r in (0, 1):
        tables, states = res[r]["tables"]
        assert torch.equal(tables["t0"], expect[:10]) and torch.equal(tables["t1"], expect[10:])
        assert states["t0"].shape == (10, 0)
    assert all(s.iterations == 1 for s in servers)
    # the meter: what one side of a link sent the other side received, per link
    for w in (0, 1):
        for p in (2, 3):
            a, b = transports[w].meter.link(p), transports[p].meter.link(w)
            assert a.bytes_sent == b.bytes_received and a.bytes_received == b.bytes_sent
            assert a.messages_sent == b.messages_received and a.messages_received == b.messages_sent
    assert set(transports[0].meter.per_link()) == {2, 3}
    # worker 0's first push/pull: a frame to each PS, keys (2 pushes + 2 pulls) and 2 pushed rows up,
    # 2 pulled rows down
    pp = res[0]["pp"]
    assert pp.link.bytes_sent == 2 * FRAME_BYTES + 4 * 8 + 2 * DIM * 4
    assert pp.link.bytes_received == 2 * DIM * 4
    assert pp.section(Section.PUSH_ROWS) == SectionSize(2, 2 * DIM * 4)
    assert pp.section(Section.PULL_ROWS) == SectionSize(2, 2 * DIM * 4)
    assert pp.wire_bytes - pp.payload_bytes == 2 * FRAME_BYTES + 4 * 8
    # frames to both PS + payloads to both (each PS owns one pushed and one pulled row) + 2 replies
    assert pp.link.messages_sent == 4 and pp.link.messages_received == 2
    # gradients: a frame to each PS (the one owning key 3 also gets its key and gradient), no reply
    gr = res[0]["grads"]
    assert gr.link == LinkStats(bytes_sent=2 * FRAME_BYTES + 8 + DIM * 4, messages_sent=3)
    assert gr.section(Section.ROW_GRADS) == SectionSize(1, DIM * 4)


def test_des_partial_sums_and_bag_gradients_through_a_non_gloo_transport():
    w0 = _weights(1)
    glob = torch.cat([w0["t0"], w0["t1"]])
    lr = 0.25
    # worker 0: one bag of rows 2 (weight 1) and 14 (weight 2), split over both PS
    req = DesRequest(torch.tensor([2, 14]), torch.tensor([0, 0]), torch.tensor([1.0, 2.0]), 1)
    bag_grad = torch.arange(DIM, dtype=torch.float32).view(1, DIM) + 1

    def worker0(c):
        _, partial, route = c.push_pull(torch.empty(0, dtype=torch.int64), torch.empty(0, DIM), torch.tensor([4]), req)
        c.push_grads(torch.empty(0, dtype=torch.int64), torch.empty(0, DIM), route, bag_grad)
        tables = c.gather_tables()
        c.stop()
        return {"partial": partial, "tables": tables}

    def worker1(c):
        c.push_pull(torch.empty(0, dtype=torch.int64), torch.empty(0, DIM), torch.empty(0, dtype=torch.int64))
        c.push_grads(torch.tensor([2]), torch.ones(1, DIM))
        c.gather_tables()
        c.stop()
        return None

    res, _, _, errors = _world(2, 2, True, SparseOptimizer("sgd", lr), w0, [worker0, worker1])
    assert errors == {}
    assert torch.allclose(res[0]["partial"], (glob[2] + 2 * glob[14]).view(1, DIM))
    expect = glob.clone()
    expect[2] -= lr * (bag_grad[0] + 1.0)  # the bag's gradient x weight 1, plus worker 1's row gradient
    expect[14] -= lr * 2 * bag_grad[0]
    tables, _ = res[0]["tables"]
    assert torch.allclose(torch.cat([tables["t0"], tables["t1"]]), expect)


def test_abort_reaches_the_servers_through_the_transport():
    def worker(c):
        c.abort("bad input batch at step 2")

    _, _, _, errors = _world(2, 1, False, SparseOptimizer(), _weights(), [worker, worker])
    assert isinstance(errors[2], EsdRemoteError) and "aborted by the workers" in str(errors[2])
    assert "bad input batch at step 2" in str(errors[2])


class _Rogue:
    """A worker that sends raw frame words instead of a client's request."""

    def __init__(self, words, payload=None):
        self.words, self.payload = words, payload

    def __call__(self, c):
        t = c.transport
        sends = [t.send(t.ps_ranks[0], self.words)]
        if self.payload is not None:
            sends.append(t.send(t.ps_ranks[0], self.payload))
        t.wait(sends)


def test_server_rejects_a_huge_frame_before_allocating(monkeypatch):
    words = encode_frame(PushPullFrame(0, 0), 0)
    words[1], words[3] = 2**62, 2**40  # payload bytes, pulls
    big = []
    real_empty = torch.empty

    def spy(*args, **kwargs):
        size = args[0] if args and isinstance(args[0], int) else 0
        if size > 1 << 20:
            big.append(args)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", spy)
    _, _, _, errors = _world(1, 1, False, SparseOptimizer(), _weights(), [_Rogue(words)])
    assert isinstance(errors[1], EsdProtocolError)
    assert "'pulls' = 1099511627776" in str(errors[1]) and "bound 17" in str(errors[1])  # 1 PS owns all 17 rows
    assert big == []


def test_server_checks_bag_gradients_against_the_bags_it_served():
    words = encode_frame(GradsFrame(0, 3), 3 * DIM * 4)
    rogue = _Rogue(words, torch.zeros(3 * DIM * 4, dtype=torch.uint8))
    _, _, _, errors = _world(1, 1, True, SparseOptimizer(), _weights(), [rogue])
    assert isinstance(errors[1], EsdProtocolError)
    assert "'bags' = 3 but this PS served 0 DES bags" in str(errors[1])


def test_pre_pushed_rows_are_stored_before_the_gradients_of_the_phase():
    # EsdConfig.pre_push: PUSH_PULL, then PRE_PUSH (worker 0 sends rows of the next
    # iteration, worker 1 an empty request), then GRADS of other rows: the next pulls see them
    w0 = _weights(1)
    glob = torch.cat([w0["t0"], w0["t1"]])
    early = torch.full((2, DIM), 4.5)

    def worker0(c):
        c.push_pull(torch.empty(0, dtype=torch.int64), torch.empty(0, DIM), torch.tensor([2]))
        c.pre_push(torch.tensor([6, 13]), early)
        out = {"pre": c.last_traffic}
        c.push_grads(torch.tensor([2]), torch.ones(1, DIM))
        out["rows"], _, _ = c.push_pull(torch.empty(0, dtype=torch.int64), torch.empty(0, DIM),
                                        torch.tensor([13, 6, 2]))
        c.stop()
        return out

    def worker1(c):
        c.push_pull(torch.empty(0, dtype=torch.int64), torch.empty(0, DIM), torch.empty(0, dtype=torch.int64))
        c.pre_push(torch.empty(0, dtype=torch.int64), torch.empty(0, DIM))
        c.push_grads(torch.empty(0, dtype=torch.int64), torch.empty(0, DIM))
        rows, _, _ = c.push_pull(torch.empty(0, dtype=torch.int64), torch.empty(0, DIM), torch.tensor([6]))
        c.stop()
        return rows

    res, _, _, errors = _world(2, 2, False, SparseOptimizer("sgd", 0.5), w0, [worker0, worker1])
    assert errors == {}
    assert torch.equal(res[0]["rows"][:2], early) and torch.equal(res[1], early[:1])
    assert torch.equal(res[0]["rows"][2], glob[2] - 0.5)
    # a frame to each PS, a payload (keys and rows) to each PS owning one of the keys
    owners = len(set(KeySpace(TABLES, 2).locate(torch.tensor([6, 13]))[0].tolist()))
    pre = res[0]["pre"]
    assert pre.link == LinkStats(bytes_sent=2 * FRAME_BYTES + 2 * (8 + DIM * 4), messages_sent=2 + owners)
    assert pre.section(Section.PUSH_ROWS) == SectionSize(2, 2 * DIM * 4)


def test_a_pre_push_to_a_des_ps_is_a_protocol_error():
    words = encode_frame(PrePushFrame(1), 8 + DIM * 4)
    rogue = _Rogue(words, torch.zeros(8 + DIM * 4, dtype=torch.uint8))
    _, _, _, errors = _world(1, 1, True, SparseOptimizer(), _weights(), [rogue])
    assert isinstance(errors[1], EsdProtocolError)
    assert "PRE_PUSH request to a PS with DES" in str(errors[1])


def test_transmission_meter_takes_bytes_and_messages_from_the_traffic():
    link = WorkerSpec(cache_rows=1, bandwidth_mbps=8.0, latency_ms=1.0)  # 1e6 B/s
    row = 5 * 4
    pp = Traffic(
        LinkStats(bytes_sent=1000, bytes_received=600, messages_sent=4, messages_received=2),
        {Section.KEYS: SectionSize(9, 72), Section.PUSH_ROWS: SectionSize(4, 4 * row),
         Section.PULL_ROWS: SectionSize(5, 5 * row), Section.DES_PARTIALS: SectionSize(2, 32)},
    )
    m = TransmissionMeter()
    m.record_push_pull({"miss_pull": 3, "update_pull": 2, "miss_push": 1, "des_rows": 6}, pp, link)
    assert m.rows["miss_pull"] == 3 and m.bytes["miss_pull"] == 3 * row
    assert m.rows["update_pull"] == 2 and m.bytes["update_pull"] == 2 * row
    assert m.rows["miss_push"] == 1 and m.bytes["miss_push"] == row
    assert m.rows["update_push"] == 3 and m.bytes["update_push"] == 3 * row
    assert m.rows["des_pull"] == 6 and m.bytes["des_pull"] == 32
    d = m.as_dict()
    assert d["wire_bytes"] == 1600 and d["total_bytes"] == 9 * row + 32
    assert d["messages"] == 6
    assert d["link_s"] == pytest.approx(1000 / 1e6 + 0.001 + 600 / 1e6 + 0.001)
    g = Traffic(LinkStats(bytes_sent=300, messages_sent=2),
                {Section.KEYS: SectionSize(2, 16), Section.ROW_GRADS: SectionSize(2, 32),
                 Section.BAG_GRADS: SectionSize(3, 48)})
    m.record_grads(g, link)
    assert m.rows["update_push"] == 5 and m.bytes["update_push"] == 3 * row + 32
    assert m.rows["des_push"] == 3 and m.bytes["des_push"] == 48
    d = m.as_dict()
    assert d["wire_bytes"] == 1900 and d["messages"] == 8
    assert d["link_s"] == pytest.approx(1900 / 1e6 + 0.003)  # nothing received: no reply latency
    with pytest.raises(ValueError, match="do not add up"):
        m.record_push_pull({"miss_pull": 1, "update_pull": 1}, pp, link)


def _timed_world(delay_s, posted=False):
    """Two workers with timed replies; worker 1 sends its push/pull
    ``delay_s`` late, so the PS holds worker 0's reply that long.  With
    ``posted``, worker 0 posts its push/pull (the early pull) and finishes it
    later; its traffic then carries the wall seconds from posting to the
    finish as ``seconds``."""
    import time

    w0 = _weights(3)
    glob = torch.cat([w0["t0"], w0["t1"]])
    hub = _Hub()
    routing = KeySpace(TABLES, 1)
    transports = {r: QueueTransport(hub, r, [2], [0, 1]) for r in (0, 1, 2)}
    server = ParameterServer(0, routing, SparseOptimizer(), transports[2], w0)
    clients = [PsClient(routing, SparseOptimizer(), transports[w], timed_replies=True) for w in (0, 1)]
    res, errors = {}, {}

    def worker(w):
        try:
            if w == 1:
                time.sleep(delay_s)
            keys = torch.tensor([3, 15, 4]) if w == 0 else torch.tensor([1])
            if posted and w == 0:
                t0 = time.perf_counter()
                p = clients[w].post_push_pull(torch.empty(0, dtype=torch.int64), torch.empty(0, DIM + 0), keys)
                rows = clients[w].finish_push_pull(p)
                tr = clients[w].last_traffic
                tr = dataclasses.replace(tr, seconds=time.perf_counter() - t0)
            else:
                rows, _, _ = clients[w].push_pull(torch.empty(0, dtype=torch.int64), torch.empty(0, DIM + 0), keys)
                tr = clients[w].last_traffic
            res[w] = (rows, tr)
            clients[w].stop()
        except Exception as e:  # noqa: BLE001
            errors[w] = e

    threads = [threading.Thread(target=server.serve)] + [threading.Thread(target=worker, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == {} and not any(t.is_alive() for t in threads)
    return res, glob


@pytest.mark.parametrize("posted", [False, True], ids=["synchronous", "posted"])
def test_timed_replies_time_the_transfer_without_the_wait_for_other_workers(posted):
    # posted: the early pull's exchange, timed by a ReplyClock while the worker would compute
    res, glob = _timed_world(0.3, posted)
    rows, tr = res[0]
    assert torch.equal(rows, glob[[3, 15, 4]])  # the marker does not change the reply
    assert torch.equal(res[1][0], glob[[1]])
    # the reply's bytes are timed, the 8-byte marker is on the wire but not in them
    assert tr.transfer_bytes == 3 * DIM * 4
    assert tr.link.bytes_received == 3 * DIM * 4 + 8 and tr.link.messages_received == 2
    # worker 0 waited at the PS for worker 1 (>= 0.3 s), its reply's transfer took a fraction of that
    assert tr.seconds >= 0.29
    assert 0.0 <= tr.transfer_seconds < 0.1 and tr.transfer_seconds <= tr.seconds


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_a_timed_reply_carries_the_padding_its_request_asks_for(split):
    # a worker given few samples asks for its reply padded to a measurable size (PushPullFrame.probe,
    # PROBE_REPLY_BYTES): the rows are those of an unpadded reply, and the padding is timed with them
    # (in a split reply, with the first part)
    w0 = _weights(4)
    glob = torch.cat([w0["t0"], w0["t1"]])
    lr = 0.5
    no_keys, no_rows = torch.empty(0, dtype=torch.int64), torch.empty(0, DIM)
    pulls = torch.tensor([3, 4])
    out = {}

    def worker0(c):
        c.push_pull(no_keys, no_rows, no_keys)
        if split:
            p, _ = c.post_grads_push_pull(torch.tensor([3]), torch.ones(1, DIM), no_keys, no_rows, pulls,
                                          probe_bytes=1000)
            out["rows"] = c.finish_push_pull(p)
        else:
            c.push_grads(torch.tensor([3]), torch.ones(1, DIM))
            out["rows"], _, _ = c.push_pull(no_keys, no_rows, pulls, probe_bytes=1000)
        out["traffic"] = c.last_traffic
        c.stop()

    def worker1(c):
        c.push_pull(no_keys, no_rows, no_keys)
        c.push_grads(torch.tensor([3]), torch.full((1, DIM), 2.0))
        c.push_pull(no_keys, no_rows, no_keys)
        c.stop()

    _, _, _, errors = _world(2, 1, False, SparseOptimizer("sgd", lr), w0, [worker0, worker1], timed_replies=True)
    assert errors == {}
    expect = glob.clone()
    expect[3] -= lr * 3.0
    assert torch.equal(out["rows"], expect[pulls])
    tr = out["traffic"]
    assert tr.transfer_bytes == 2 * DIM * 4 + 1000  # the rows and the padding, timed
    assert tr.section(Section.PROBE) == SectionSize(1000, 1000)
    assert tr.section(Section.PULL_ROWS) == SectionSize(2, 2 * DIM * 4)


def test_padding_is_bounded_and_only_for_timed_replies():
    from torchrec_esd.layout import RowFormat
    from torchrec_esd.ps.protocol import MAX_PROBE_BYTES, ProtocolLimits, decode_frame

    fmt, limits = RowFormat(DIM), ProtocolLimits(rows=10)
    for frame, why in ((PushPullFrame(0, 1, probe=8), "0 when not timed"),
                       (PushPullFrame(0, 1, timed=True, probe=MAX_PROBE_BYTES + 1), "MAX_PROBE_BYTES")):
        with pytest.raises(EsdProtocolError, match=f"'probe' = {frame.probe} exceeds .*{why}"):
            decode_frame(encode_frame(frame, frame.payload_bytes(fmt)), limits, fmt, "test")
    ok = PushPullFrame(0, 1, timed=True, probe=MAX_PROBE_BYTES)
    assert decode_frame(encode_frame(ok, ok.payload_bytes(fmt)), limits, fmt, "test") == ok
    assert ok.reply_bytes(fmt) == DIM * 4 + MAX_PROBE_BYTES


@pytest.mark.parametrize("posted", [False, True], ids=["synchronous", "posted"])
def test_a_reply_marker_that_disagrees_with_the_request_is_a_protocol_error(posted):
    hub = _Hub()
    routing = KeySpace(TABLES, 1)
    worker, ps = QueueTransport(hub, 0, [1], [0]), QueueTransport(hub, 1, [1], [0])
    client = PsClient(routing, SparseOptimizer(), worker, timed_replies=True)
    out = {}

    def rogue_ps():  # answers a timed pull of 2 rows with a marker announcing 3
        f = ps.recv_frame(0)
        ps.wait([f])
        payload = ps.recv(0, torch.empty(int(f.buf[1]), dtype=torch.uint8))
        ps.wait([payload])
        ps.wait([ps.send(0, torch.tensor([3 * DIM * 4], dtype=torch.int64)),
                 ps.send(0, torch.zeros(2 * DIM * 4, dtype=torch.uint8))])

    def run():
        try:
            if posted:
                client.finish_push_pull(client.post_push_pull(torch.empty(0, dtype=torch.int64), torch.empty(0, DIM),
                                                              torch.tensor([1, 2])))
            else:
                client.push_pull(torch.empty(0, dtype=torch.int64), torch.empty(0, DIM), torch.tensor([1, 2]))
        except Exception as e:  # noqa: BLE001
            out["error"] = e

    threads = [threading.Thread(target=rogue_ps), threading.Thread(target=run)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert isinstance(out.get("error"), EsdProtocolError)
    assert "marker announces 48 bytes, the request implies 32" in str(out["error"])


def test_a_posted_timed_push_pull_whose_ps_goes_silent_fails_at_the_finish_instead_of_hanging():
    # the ReplyClock thread is the only waiter of the reply: its transport error reaches finish_push_pull
    import time

    hub = _Hub()
    routing = KeySpace(TABLES, 1)
    worker = QueueTransport(hub, 0, [1], [0], timeout_s=0.3)
    client = PsClient(routing, SparseOptimizer(), worker, timed_replies=True)
    p = client.post_push_pull(torch.empty(0, dtype=torch.int64), torch.empty(0, DIM), torch.tensor([1, 2]))
    assert p.clock is not None and len(p.markers) == 1
    t0 = time.perf_counter()
    with pytest.raises(queue.Empty):  # this test transport's timeout error (gloo's names the peer)
        client.finish_push_pull(p)
    assert time.perf_counter() - t0 < 5.0


class _HoldingTransport(QueueTransport):
    """A QueueTransport that keeps back the messages ``hold(buf)`` picks until
    :meth:`release` (a worker whose gradient values are still on a slow uplink)."""

    hold = staticmethod(lambda buf: False)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.held = []

    def _isend(self, buf, peer):
        if self.hold(buf):
            self.held.append((buf.clone(), peer))
            return None
        return super()._isend(buf, peer)

    def release(self):
        for buf, peer in self.held:
            self.hub.q(self.rank, peer).put(buf)
        self.held = []


def _is_values(value):
    """Picks a message of float32 gradients that are all ``value``."""
    def pick(buf):
        data = buf.view(-1).view(torch.uint8)
        if data.numel() % (DIM * 4):
            return False
        return bool((data.view(torch.float32) == value).all())
    return pick


def test_a_split_gradient_phase_answers_the_rows_that_wait_only_for_the_others_first():
    # EsdConfig.split_reply: worker 0 sends its gradients' keys, its next push/pull's keys, then
    # its gradient values and pushed rows, and those stay on its uplink (held) until its first
    # reply part is in: the rows it sent no gradient for. Worker 1 sends its gradients whole
    # (and pulls the row worker 0 pushes), worker 2 splits too.
    w0 = _weights(2)
    glob = torch.cat([w0["t0"], w0["t1"]])
    lr = 0.5
    no_keys, no_rows = torch.empty(0, dtype=torch.int64), torch.empty(0, DIM)
    g0, g2 = 123.0, 5.0

    class Holding(_HoldingTransport):  # worker 0's uplink
        hold = staticmethod(_is_values(g0))

    ps = [3, 4]
    routing = KeySpace(TABLES, 2)
    opt = SparseOptimizer("sgd", lr)
    pushed12 = torch.full((1, DIM), 9.0)
    # worker 0's next pulls: 3 (its own gradient and worker 1's), 8 (only its own), 4 (worker 1's
    # gradient), 12 (worker 2 pushes it), 15 (nothing changes it)
    pulls0 = torch.tensor([3, 4, 8, 12, 15])
    first = pulls0[[1, 3, 4]]  # what does not wait for worker 0's values
    out = {}

    def worker0(c):
        c.push_pull(no_keys, no_rows, no_keys)
        p, traffic = c.post_grads_push_pull(torch.tensor([3, 8]), torch.full((2, DIM), g0), torch.tensor([6]),
                                            torch.full((1, DIM), g0), pulls0)
        # its first parts come while its values are held back: one message per PS that owns such a row
        owners = set(routing.locate(first)[0].tolist())
        for i in owners:
            q = c.transport.hub.q(ps[i], 0)
            deadline = 200
            while q.qsize() < 1 and deadline:
                threading.Event().wait(0.05)
                deadline -= 1
            out.setdefault("early", []).append(q.qsize())
        c.transport.release()
        out["rows"] = c.finish_push_pull(p)
        out["grads"], out["pp"] = traffic, c.last_traffic
        out["tables"] = c.gather_tables()
        c.stop()

    def worker1(c):
        c.push_pull(no_keys, no_rows, no_keys)
        c.push_grads(torch.tensor([3, 4]), torch.ones(2, DIM))
        out["rows1"], _, _ = c.push_pull(no_keys, no_rows, torch.tensor([8, 6]))
        c.gather_tables()
        c.stop()

    def worker2(c):
        c.push_pull(no_keys, no_rows, no_keys)
        p, _ = c.post_grads_push_pull(torch.tensor([9]), torch.full((1, DIM), g2), torch.tensor([12]), pushed12,
                                      torch.tensor([3, 9]))
        out["rows2"] = c.finish_push_pull(p)
        c.gather_tables()
        c.stop()

    # worker 0 has the slow link: the PS takes its values last (ParameterServer.arrival_order)
    _, servers, _, errors = _world(3, 2, False, opt, w0, [worker0, worker1, worker2], transport_of={0: Holding},
                                   arrival_order=[1, 2, 0])
    assert errors == {}
    assert out["early"] == [1] * len(out["early"]) and out["early"]  # the first parts came before the values
    expect = glob.clone()
    expect[3] -= lr * (g0 + 1.0)
    expect[4] -= lr * 1.0
    expect[8] -= lr * g0
    expect[9] -= lr * g2
    expect[12] = pushed12[0]
    expect[6] = g0
    assert torch.equal(out["rows"], expect[pulls0])  # both parts back in pull order
    assert torch.equal(out["rows1"], expect[[8, 6]]) and torch.equal(out["rows2"], expect[[3, 9]])
    tables, _ = out["tables"]
    assert torch.equal(tables["t0"], expect[:10]) and torch.equal(tables["t1"], expect[10:])
    assert all(s.iterations == 1 for s in servers)
    # what the gradients moved: a frame to each PS, keys to the owners, after the push/pull a VALUES
    # frame to each PS and the values to the owners
    owners = len(set(routing.locate(torch.tensor([3, 8]))[0].tolist()))
    assert out["grads"].link == LinkStats(bytes_sent=4 * FRAME_BYTES + 2 * 8 + 2 * DIM * 4, messages_sent=4 + 2 * owners)
    assert out["grads"].section(Section.ROW_GRADS) == SectionSize(2, 2 * DIM * 4)
    assert out["pp"].section(Section.PULL_ROWS) == SectionSize(5, 5 * DIM * 4)
    assert out["pp"].section(Section.PUSH_ROWS) == SectionSize(1, DIM * 4)


class _HoldFromValues(_HoldingTransport):
    """Holds everything this rank sends from its first VALUES frame until
    :meth:`release` (a split worker whose values are still on its uplink)."""

    holding = False

    def hold(self, buf):
        if buf.dtype == torch.int64 and buf.numel() == FRAME_WORDS and int(buf[0]) == int(Command.VALUES):
            self.holding = True
        return self.holding

    def release(self):
        self.holding = False
        super().release()


def test_the_worker_summed_last_makes_its_rows_from_the_others_gradient_sums_before_its_values_go():
    # EsdConfig.split_sums: worker 0 (the slow link, last of arrival_order) asks for the rest of its
    # split reply as the other workers' gradient sums. Both its parts come while its gradient values
    # are held on its uplink, and the rows it makes of them (its own gradient added last, the
    # optimizer step on the rows it read) are the PS's bits. Workers 1 (whole) and 2 (split) send
    # gradients of the same rows, so the summing order matters.
    w0 = _weights(3)
    glob = torch.cat([w0["t0"], w0["t1"]])
    opt = SparseOptimizer("rowwise_adagrad", 0.3)
    gen = torch.Generator().manual_seed(7)
    keys = torch.tensor([3, 8, 12])
    g = [torch.randn(3, DIM, generator=gen) * 10 for _ in range(3)]
    pulls0 = torch.tensor([3, 4, 8, 12, 15])
    no_keys, no_rows = torch.empty(0, dtype=torch.int64), torch.empty(0, DIM + 1)
    routing = KeySpace(TABLES, 2)
    ps = [3, 4]
    out = {}

    def worker0(c):
        old, _, _ = c.push_pull(no_keys, no_rows, keys)  # the rows (value + state) its gradients are computed on
        p, _ = c.post_grads_push_pull(keys, g[0], no_keys, no_rows, pulls0, old_rows=old)
        owner = routing.locate(pulls0)[0]
        own = torch.isin(pulls0, keys)
        want = {i: int((~own[owner == i]).any()) + int(own[owner == i].any()) for i in range(2)}
        for i, n in want.items():  # every part of the reply, while the values are held back
            q = c.transport.hub.q(ps[i], 0)
            deadline = 200
            while q.qsize() < n and deadline:
                threading.Event().wait(0.05)
                deadline -= 1
            out.setdefault("early", []).append((q.qsize(), n))
        assert c.transport.held  # (the values are held)
        c.transport.release()
        out["rows"] = c.finish_push_pull(p)
        out["pp"] = c.last_traffic
        out["tables"] = c.gather_tables()
        c.stop()

    def worker1(c):
        c.push_pull(no_keys, no_rows, no_keys)
        c.push_grads(keys, g[1])
        c.push_pull(no_keys, no_rows, torch.tensor([8]))
        c.gather_tables()
        c.stop()

    def worker2(c):
        c.push_pull(no_keys, no_rows, no_keys)
        p, _ = c.post_grads_push_pull(keys, g[2], no_keys, no_rows, torch.tensor([4]))
        c.finish_push_pull(p)
        c.gather_tables()
        c.stop()

    _, _, _, errors = _world(3, 2, False, opt, w0, [worker0, worker1, worker2], transport_of={0: _HoldFromValues},
                             arrival_order=[1, 2, 0])
    assert errors == {}
    assert all(got == n for got, n in out["early"]), out["early"]  # the parts came before the values
    rows, state = glob[keys].clone(), torch.zeros(3, 1)
    total = torch.zeros(3, DIM)
    for r in (1, 2, 0):  # arrival_order: worker 0 last
        total += g[r]
    opt.apply_(rows, state, total)
    expect = torch.cat([glob, torch.zeros(glob.shape[0], 1)], dim=1)
    expect[keys] = torch.cat([rows, state], dim=1)
    assert torch.equal(out["rows"], expect[pulls0])
    tables, states = out["tables"]
    assert torch.equal(torch.cat([tables["t0"], tables["t1"]]), expect[:, :DIM])
    assert torch.equal(torch.cat([states["t0"], states["t1"]]), expect[:, DIM:])
    # the order matters here: the sum in worker order has other bits
    assert not torch.equal(g[0] + g[1] + g[2], total)
    # the wire: the 3 own rows came as gradient sums (DIM values each), the other 2 as rows
    assert out["pp"].section(Section.PULL_ROWS) == SectionSize(5, 3 * DIM * 4 + 2 * (DIM + 1) * 4)


def test_gradient_sums_only_for_the_worker_summed_last_and_never_for_a_pushed_row():
    no_keys, no_rows = torch.empty(0, dtype=torch.int64), torch.empty(0, DIM)

    def asks(c):  # worker 0, but the PS sums worker 1 last
        c.push_pull(no_keys, no_rows, no_keys)
        c.post_split_head(torch.tensor([3]), no_keys, torch.tensor([3]), sums=True)

    def quiet(c):
        c.push_pull(no_keys, no_rows, no_keys)

    _, _, _, errors = _world(2, 1, False, SparseOptimizer(), _weights(), [asks, quiet], arrival_order=[0, 1])
    assert isinstance(errors.get(2), EsdProtocolError), errors
    assert "sums worker 1's gradients last" in str(errors[2])

    # worker 1 pushes row 3, which worker 0 sent a gradient for and pulls as a gradient sum: its value
    # would be the pushed row, so the PS fails instead of answering a sum
    def summed(c):
        c.push_pull(no_keys, no_rows, no_keys)
        c.post_grads_push_pull(torch.tensor([3]), torch.ones(1, DIM), no_keys, no_rows, torch.tensor([3]),
                               old_rows=torch.zeros(1, DIM))

    def pushes(c):
        c.push_pull(no_keys, no_rows, no_keys)
        c.push_grads(no_keys, no_rows)
        c.post_push_pull(torch.tensor([3]), torch.ones(1, DIM), no_keys)

    _, _, _, errors = _world(2, 1, False, SparseOptimizer(), _weights(), [summed, pushes], arrival_order=[1, 0])
    assert isinstance(errors.get(2), EsdRemoteError), errors
    assert "gradient sums of rows that a worker also pushes" in str(errors[2])


def test_split_gradients_not_followed_by_a_push_pull_are_a_protocol_error():
    words = encode_frame(GradsFrame(1, 0, True), 8)
    stop = encode_frame(dataclasses.replace(PrePushFrame(0)), 0)

    def rogue(c):
        t = c.transport
        t.wait([t.send(t.ps_ranks[0], words), t.send(t.ps_ranks[0], torch.zeros(8, dtype=torch.uint8)),
                t.send(t.ps_ranks[0], stop)])

    _, _, _, errors = _world(1, 1, False, SparseOptimizer(), _weights(), [rogue])
    assert isinstance(errors[1], EsdProtocolError)
    assert "split gradients of iteration 1 must be followed by a push/pull" in str(errors[1])
    # and a split frame to a DES PS
    _, _, _, errors = _world(1, 1, True, SparseOptimizer(), _weights(), [_Rogue(words, torch.zeros(8, dtype=torch.uint8))])
    assert isinstance(errors[1], EsdProtocolError) and "split GRADS frame to a PS with DES" in str(errors[1])


@pytest.mark.parametrize("grad_rows", [2, 12])
def test_a_worker_that_fails_between_the_keys_and_the_values_of_a_split_exchange_aborts_the_ps(grad_rows):
    # the keys of a split exchange go in the forward (PsSync.post_head); a worker whose backward then
    # fails sends an ABORT where its VALUES frame would be, its message in the messages the PS posted
    # for the values (2 rows: 32 B, the rest of the message after them; 12 rows: 192 B, padded)
    no_keys, no_rows = torch.empty(0, dtype=torch.int64), torch.empty(0, DIM)

    def worker0(c):
        c.push_pull(no_keys, no_rows, no_keys)
        c.post_split_head(torch.tensor([3, 8, 0, 1, 2, 5, 6, 7, 9, 10, 11, 12][:grad_rows]), no_keys,
                          torch.tensor([4]))
        c.abort("worker 0: the backward of step 1 failed")

    def worker1(c):
        c.push_pull(no_keys, no_rows, no_keys)
        c.push_grads(torch.tensor([3]), torch.ones(1, DIM))
        c.post_push_pull(no_keys, no_rows, torch.tensor([5]))
        c.abort("worker 1 follows")

    _, _, _, errors = _world(2, 1, False, SparseOptimizer(), _weights(), [worker0, worker1])
    assert isinstance(errors.get(2), EsdRemoteError), errors
    assert "ESD job aborted by the workers: worker 0: the backward of step 1 failed" in str(errors[2])


def test_values_that_do_not_match_their_split_keys_are_a_protocol_error():
    from torchrec_esd.ps.protocol import ValuesFrame

    no_keys, no_rows = torch.empty(0, dtype=torch.int64), torch.empty(0, DIM)

    def worker0(c):
        c.push_pull(no_keys, no_rows, no_keys)
        c.post_split_head(torch.tensor([3, 8]), no_keys, torch.tensor([4]))
        t = c.transport
        t.wait([t.send(t.ps_ranks[0], encode_frame(ValuesFrame(1, 0), DIM * 4))])  # 1 row, not 2

    _, _, _, errors = _world(1, 1, False, SparseOptimizer(), _weights(), [worker0])
    assert isinstance(errors.get(1), EsdProtocolError), errors
    assert "split its gradients (2 rows)" in str(errors[1]) and "instead of their values" in str(errors[1])
    # and a VALUES frame as a request of its own
    _, _, _, errors = _world(1, 1, False, SparseOptimizer(), _weights(), [_Rogue(encode_frame(ValuesFrame(0, 0), 0))])
    assert isinstance(errors[1], EsdProtocolError) and "VALUES frame outside a split exchange" in str(errors[1])
