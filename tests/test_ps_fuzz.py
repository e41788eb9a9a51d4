"""PS fuzz (issue 16): random and malformed frames and payloads sent to a real
ParameterServer (its serve loop, through a Transport; in-process queues stand
in for gloo): the PS answers with an EsdProtocolError (an EsdRemoteError where
the workers disagree on the phase or the batch; for a payload that never
comes, the transport's timeout), never another exception, and its memory
stays within a stated bound.

The bound: one request makes a PS allocate at most its frame's payload, which
decode_frame bounds by the PS's own rows and ``ProtocolLimits.max_des_pairs``
(4 Mi DES pairs = 48 MB with weights) before anything is allocated; for the
small PS here that is < 64 MB per request, and the process RSS grows < 64 MB
over the whole fuzz run.
"""

import queue
import random

import pytest
import torch

from test_ps_transport import TABLES, QueueTransport, _Hub, _weights  # noqa: E402  (tests/ is on sys.path)
from torchrec_esd.layout import KeySpace
from torchrec_esd.ps import EsdProtocolError, EsdRemoteError, ParameterServer, SparseOptimizer
from torchrec_esd.ps.protocol import FRAME_BYTES, FRAME_WORDS, Command, PrefetchFrame, PushPullFrame, RowFormat, encode_frame

BOUND_BYTES = 64 << 20
WORKERS, PS_RANK = [0, 1], 2


class MeteredTransport(QueueTransport):
    """Records the size of every receive buffer the PS posts."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.largest = 0

    def recv(self, peer, buf):
        self.largest = max(self.largest, buf.numel() * buf.element_size())
        return super().recv(peer, buf)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _serve_one(messages, des=True):
    """A fresh PS (rank 2, PS 0 of 1) serving workers 0 and 1 whose queued
    messages are ``messages[w]`` (raw byte tensors); the outcome of its serve
    loop and the largest buffer it posted."""
    hub = _Hub()
    t = MeteredTransport(hub, PS_RANK, [PS_RANK], WORKERS, timeout_s=0.05)
    server = ParameterServer(0, KeySpace(TABLES, 1, state_dim=1), SparseOptimizer("rowwise_adagrad", 0.1), t,
                             _weights(), des=des)
    for w in WORKERS:
        for m in messages[w]:
            hub.q(w, PS_RANK).put(m)
    try:
        server.serve()
        outcome = "served"
    except EsdRemoteError as e:  # EsdProtocolError, or workers in different phases / batches
        outcome = e
    except queue.Empty:  # a payload the frame announced never came: the transport's timeout
        outcome = "timeout"
    return outcome, t.largest


def _frame(words):
    return torch.tensor(words, dtype=torch.int64)


def _stop():
    return encode_frame_words(Command.STOP, 0)


def encode_frame_words(cmd, payload, *counts):
    w = [int(cmd), int(payload)] + [int(c) for c in counts]
    return _frame(w + [0] * (FRAME_WORDS - len(w)))


FMT = RowFormat(4, state_dim=1)


def _valid_empty_push_pull():
    return encode_frame(PushPullFrame(0, 0), 0)


HUGE = [
    # (frame words of worker 0, what the PS must name)
    (encode_frame_words(Command.PUSH_PULL, 2**33, 0, 0), "'payload_bytes' = 8589934592"),
    (encode_frame_words(Command.PUSH_PULL, 0, 2**40, 0), "'pushes'"),
    (encode_frame_words(Command.PUSH_PULL, 0, 0, 2**62), "'pulls'"),
    (encode_frame_words(Command.PUSH_PULL, 0, 0, 0, 2**33, 2**33), "'des_pairs' = 8589934592"),
    (encode_frame_words(Command.PUSH_PULL, 0, 0, 0, 2**22, 2**22 + 1), "'des_bags'"),
    (encode_frame_words(Command.PUSH_PULL, 0, 0, 0, 1, 1, 5), "'weighted'"),
    (encode_frame_words(Command.GRADS, 0, 1, 2**40), "'bags'"),
    (encode_frame_words(Command.PREFETCH, 0, 2**40), "'pulls'"),
    (encode_frame_words(Command.PREFETCH, 8, 1, 1), "unused"),
    (encode_frame_words(Command.PREFETCH, 9, 1), "'payload_bytes' = 9"),
    (encode_frame_words(Command.ABORT, 2**33, 2**33), "'message_bytes'"),
    (encode_frame_words(Command.PUSH_PULL, -1, 0, 0), "is negative"),
    (encode_frame_words(99, 0), "'command' = 99"),
    (encode_frame_words(Command.STOP, 0, 0, 0, 0, 0, 0, 7), "unused"),
]


@pytest.mark.parametrize("words,named", HUGE, ids=[n for _, n in HUGE])
def test_huge_and_malformed_frames_are_protocol_errors_before_any_allocation(words, named):
    outcome, largest = _serve_one({0: [words], 1: [_valid_empty_push_pull()]})
    assert isinstance(outcome, EsdProtocolError) and named in str(outcome), outcome
    assert largest <= FRAME_BYTES  # only frames were posted


def test_a_frame_at_the_des_bound_whose_payload_never_comes_stays_within_the_bound():
    # the largest request a PS accepts from one frame: 4 Mi weighted DES pairs
    n = 1 << 22
    frame = PushPullFrame(0, 0, n, n, True)
    words = encode_frame(frame, frame.payload_bytes(FMT))
    before = _rss_bytes()
    outcome, largest = _serve_one({0: [words], 1: [_valid_empty_push_pull()]})
    assert outcome == "timeout"
    assert largest == n * 12 <= BOUND_BYTES  # keys 8 B + weights 4 B per pair
    assert _rss_bytes() - before < BOUND_BYTES


def _bad_payload_cases():
    ks = KeySpace(TABLES, 1)
    rows = ks.total_rows
    pp = PushPullFrame(1, 1)
    good = torch.cat([torch.tensor([0, 1], dtype=torch.int64).view(torch.uint8), torch.zeros(5 * 4, dtype=torch.uint8)])
    out_of_range = torch.cat([torch.tensor([rows, 1], dtype=torch.int64).view(torch.uint8), good[16:]])
    negative = torch.cat([torch.tensor([0, -3], dtype=torch.int64).view(torch.uint8), good[16:]])
    des = PushPullFrame(0, 0, 2, 1)
    neg_pair = torch.tensor([-1, 0], dtype=torch.int64).view(torch.uint8)
    far_pair = torch.tensor([rows * 5, 0], dtype=torch.int64).view(torch.uint8)  # key 5 x rows with 1 bag
    return [
        ("out of range", [encode_frame(pp, good.numel()), out_of_range], "outside"),
        ("negative key", [encode_frame(pp, good.numel()), negative], "outside"),
        ("negative DES pair", [encode_frame(des, 16), neg_pair], "negative DES pair"),
        ("DES key out of range", [encode_frame(des, 16), far_pair], "outside"),
        ("GRADS bags not served", [encode_frame_words(Command.GRADS, 16, 0, 1)], "served 0 DES bags"),
        ("PREFETCH key out of range", [encode_frame(PrefetchFrame(1), 8), out_of_range[:8]], "outside"),
        ("PREFETCH negative key", [encode_frame(PrefetchFrame(1), 8), negative[8:16]], "outside"),
    ]


@pytest.mark.parametrize("case", _bad_payload_cases(), ids=lambda c: c[0])
def test_malformed_payloads_are_protocol_errors(case):
    _, msgs, named = case
    # worker 1 sends an empty request of the same phase
    other = encode_frame(PrefetchFrame(0), 0) if int(msgs[0][0]) == Command.PREFETCH else _valid_empty_push_pull()
    outcome, _ = _serve_one({0: msgs, 1: [other]})
    assert isinstance(outcome, EsdProtocolError) and named in str(outcome), outcome


def test_random_frames_and_payloads():
    rng = random.Random(16)
    gen = torch.Generator().manual_seed(16)
    before = _rss_bytes()
    outcomes = {}
    for i in range(400):
        kind = rng.random()
        if kind < 0.3:  # random bytes
            words = torch.randint(-2**63, 2**63 - 1, (FRAME_WORDS,), dtype=torch.int64, generator=gen)
        else:  # a real command with random counts (small, huge or at a bound)
            cmd = rng.choice([Command.PUSH_PULL, Command.GRADS, Command.PREFETCH, Command.GATHER, Command.STOP,
                              Command.ABORT])
            counts = [rng.choice([0, 1, 2, rng.randrange(30), 2**rng.randrange(64) - 1]) for _ in range(6)]
            if cmd is Command.PUSH_PULL:
                counts[4] = rng.choice([0, 1, counts[4]])  # weighted flag
                counts[5] = rng.choice([0, 0, 0, rng.randrange(2**62)])  # batch fingerprint (worker 1 sends 0)
            words = encode_frame_words(cmd, 0, *counts)
            if rng.random() < 0.7:  # payload size consistent with the counts, so decoding goes on
                try:
                    from torchrec_esd.ps.protocol import FRAME_TYPES, fields

                    typ = FRAME_TYPES[cmd]
                    n = len(fields(typ))
                    vals = counts[:n]
                    if "weighted" in [f.name for f in fields(typ)]:
                        vals[3] = bool(vals[3])
                    words[1] = typ(*vals).payload_bytes(FMT)
                except Exception:  # noqa: BLE001 - counts the frame type does not take
                    pass
        msgs = [words]
        nbytes = int(words[1])
        if 0 < nbytes <= 1 << 16:  # a payload of that size, random bytes
            msgs.append(torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen))
        outcome, largest = _serve_one({0: msgs, 1: [_valid_empty_push_pull(), _stop()]})
        assert largest <= BOUND_BYTES, (words.tolist(), largest)
        key = outcome if isinstance(outcome, str) else type(outcome).__name__
        outcomes[key] = outcomes.get(key, 0) + 1
    assert _rss_bytes() - before < BOUND_BYTES
    assert set(outcomes) <= {"EsdProtocolError", "EsdRemoteError", "timeout", "served"}, outcomes
    assert outcomes["EsdProtocolError"] > 200, outcomes
