"""PS protocol: typed frames round-trip, payloads round-trip, and every size
read off the wire is bounded before anything is allocated."""

import pytest
import torch

from torchrec_esd.ps import EsdProtocolError, EsdRemoteError
from torchrec_esd.ps.protocol import (
    FRAME_WORDS,
    AbortFrame,
    Command,
    GatherFrame,
    GatherReply,
    GradsFrame,
    GradsRequest,
    PayloadReader,
    PrefetchFrame,
    PrePushFrame,
    PrePushRequest,
    ProtocolLimits,
    PushPullFrame,
    PushPullReply,
    PushPullRequest,
    RowFormat,
    Section,
    SectionSize,
    StopFrame,
    abort_message,
    abort_parts,
    add_sections,
    decode_frame,
    encode_frame,
    pack,
)

FMT = RowFormat(dim=4, state_dim=1)
LIMITS = ProtocolLimits(rows=100, max_des_pairs=1000)


def _words(cmd, payload_bytes, *counts):
    w = torch.zeros(FRAME_WORDS, dtype=torch.int64)
    w[0], w[1] = int(cmd), payload_bytes
    w[2 : 2 + len(counts)] = torch.tensor(counts, dtype=torch.int64)
    return w


def _decode(words):
    return decode_frame(words, LIMITS, FMT, "test PS")


def test_protocol_error_is_a_remote_error():
    assert issubclass(EsdProtocolError, EsdRemoteError)


@pytest.mark.parametrize(
    "frame",
    [
        PushPullFrame(3, 5),
        PushPullFrame(0, 7, des_pairs=9, des_bags=4, weighted=True),
        PushPullFrame(2, 0, des_pairs=1, des_bags=1, weighted=False),
        GradsFrame(6, 2),
        PrefetchFrame(9),
        PrePushFrame(4),
        GatherFrame(),
        StopFrame(),
        AbortFrame(17),
    ],
)
def test_frames_round_trip(frame):
    words = encode_frame(frame, frame.payload_bytes(FMT))
    assert words.dtype == torch.int64 and words.numel() == FRAME_WORDS
    assert int(words[0]) == int(frame.COMMAND)
    back = _decode(words)
    assert back == frame and type(back) is type(frame)


def test_payload_bytes_follow_the_counts():
    # keys 8 B, rows (4 + 1) x 4 B, weights 4 B, vectors 4 x 4 B
    assert PushPullFrame(2, 3, 4, 2, True).payload_bytes(FMT) == (2 + 3 + 4) * 8 + 2 * 20 + 4 * 4
    assert PushPullFrame(2, 3, 4, 2, True).reply_bytes(FMT) == 3 * 20 + 2 * 16
    assert GradsFrame(3, 2).payload_bytes(FMT) == 3 * (8 + 16) + 2 * 16
    assert PrefetchFrame(3).payload_bytes(FMT) == 3 * 8 and PrefetchFrame(3).reply_bytes(FMT) == 3 * 20


@pytest.mark.parametrize(
    "words, field, value, bound",
    [
        (_words(Command.PUSH_PULL, 0, 2**40, 0), "pushes", 2**40, 100),
        (_words(Command.PUSH_PULL, 0, 0, 101), "pulls", 101, 100),
        (_words(Command.PUSH_PULL, 0, 0, 0, 1001, 1001), "des_pairs", 1001, 1000),
        (_words(Command.PUSH_PULL, 0, 0, 0, 5, 6), "des_bags", 6, 5),
        (_words(Command.PUSH_PULL, 0, 0, 0, 300, 2), "des_pairs", 300, 200),  # 2 bags x 100 rows
        (_words(Command.PUSH_PULL, 0, 0, 0, 1, 1, 2), "weighted", 2, 1),
        (_words(Command.GRADS, 0, 2**62, 0), "rows", 2**62, 100),
        (_words(Command.GRADS, 0, 1, 10**9), "bags", 10**9, 1000),
        (_words(Command.PREFETCH, 0, 101), "pulls", 101, 100),
        (_words(Command.PRE_PUSH, 0, 2**50), "pushes", 2**50, 100),
        (_words(Command.ABORT, 2**40, 2**40), "message_bytes", 2**40, 4096),
    ],
)
def test_huge_counts_raise_naming_field_value_and_bound(words, field, value, bound):
    with pytest.raises(EsdProtocolError) as info:
        _decode(words)
    msg = str(info.value)
    assert f"'{field}' = {value}" in msg and f"bound {bound}" in msg and "test PS" in msg


def test_payload_bytes_must_equal_what_the_counts_imply():
    good = PushPullFrame(1, 2).payload_bytes(FMT)
    assert _decode(_words(Command.PUSH_PULL, good, 1, 2)) == PushPullFrame(1, 2)
    for bad in (good + 1, good - 1, 2**60):
        with pytest.raises(EsdProtocolError, match=rf"'payload_bytes' = {bad} but its counts imply {good}"):
            _decode(_words(Command.PUSH_PULL, bad, 1, 2))
    with pytest.raises(EsdProtocolError, match="'payload_bytes' = 8 but its counts imply 0"):
        _decode(_words(Command.STOP, 8))


def test_malformed_words_raise():
    with pytest.raises(EsdProtocolError, match="'command' = 77"):
        _decode(_words(77, 0))
    with pytest.raises(EsdProtocolError, match="'payload_bytes' = -5 is negative"):
        _decode(_words(Command.PUSH_PULL, -5, 0, 0))
    with pytest.raises(EsdProtocolError, match="'pulls' = -1 is negative"):
        _decode(_words(Command.PUSH_PULL, 0, 0, -1))
    with pytest.raises(EsdProtocolError, match="'word 6' = 4 is unused"):  # GRADS: rows, bags, split, sums
        _decode(_words(Command.GRADS, 0, 0, 0, 0, 0, 4))
    with pytest.raises(EsdProtocolError, match="'sums' = 4 exceeds its bound 1"):
        _decode(_words(Command.GRADS, 0, 0, 0, 1, 4))
    with pytest.raises(EsdProtocolError, match="'sums' = 1 exceeds its bound 0 .gradient sums answer only a split"):
        _decode(_words(Command.GRADS, 0, 0, 0, 0, 1))
    with pytest.raises(EsdProtocolError, match=f"{FRAME_WORDS} int64 words"):
        _decode(torch.zeros(4, dtype=torch.int64))


def test_push_pull_payloads_round_trip_and_sections():
    req = PushPullRequest(
        push_keys=torch.tensor([3, 9]), pull_keys=torch.tensor([1, 2, 7]),
        push_rows=torch.randn(2, 5), des_packed=torch.tensor([4, 11, 13]), des_bags=2,
        des_weights=torch.tensor([1.0, 0.5, 2.0]),
    )
    frame = req.frame()
    assert frame == PushPullFrame(2, 3, 3, 2, True)
    buf = pack(req.parts())
    assert buf.dtype == torch.uint8 and buf.numel() == frame.payload_bytes(FMT)
    back = PushPullRequest.decode(_decode(encode_frame(frame, buf.numel())), buf, FMT)
    for name in ("push_keys", "pull_keys", "push_rows", "des_packed", "des_weights"):
        assert torch.equal(getattr(back, name), getattr(req, name)), name
    assert back.des_bags == 2
    sections = {}
    add_sections(sections, req.parts())
    assert sections[Section.KEYS] == SectionSize(5, 40)
    assert sections[Section.PUSH_ROWS] == SectionSize(2, 40)
    assert sections[Section.DES_PAIRS] == SectionSize(3, 24)
    assert sections[Section.DES_WEIGHTS] == SectionSize(3, 12)
    # unweighted: no weights on the wire
    plain = PushPullRequest(torch.tensor([3]), torch.tensor([1]), torch.randn(1, 5), torch.tensor([4]), 1)
    assert plain.frame().weighted is False
    assert pack(plain.parts()).numel() == 3 * 8 + 20
    assert PushPullRequest.decode(plain.frame(), pack(plain.parts()), FMT).des_weights is None

    reply = PushPullReply(torch.randn(3, 5), torch.randn(2, 4))
    rbuf = pack(reply.parts())
    assert rbuf.numel() == frame.reply_bytes(FMT)
    rback = PushPullReply.decode(frame, rbuf, FMT)
    assert torch.equal(rback.rows, reply.rows) and torch.equal(rback.partials, reply.partials)


def test_pre_push_payload_round_trips_and_is_sized_by_its_count():
    # keys 8 B + rows (4 + 1) x 4 B each
    assert PrePushFrame(3).payload_bytes(FMT) == 3 * (8 + 20)
    req = PrePushRequest(torch.tensor([7, 2, 9]), torch.randn(3, 5))
    buf = pack(req.parts())
    frame = _decode(encode_frame(req.frame(), buf.numel()))
    assert frame == PrePushFrame(3)
    back = PrePushRequest.decode(frame, buf, FMT)
    assert torch.equal(back.keys, req.keys) and torch.equal(back.rows, req.rows)
    with pytest.raises(EsdProtocolError):
        PrePushRequest.decode(frame, buf[:-4], FMT)


def test_grads_gather_and_abort_payloads_round_trip():
    req = GradsRequest(torch.tensor([5, 6, 8]), torch.randn(3, 4), torch.randn(2, 4))
    buf = pack(req.parts())
    back = GradsRequest.decode(_decode(encode_frame(req.frame(), buf.numel())), buf, FMT)
    assert torch.equal(back.keys, req.keys) and torch.equal(back.grads, req.grads)
    assert torch.equal(back.bag_grads, req.bag_grads)

    g = GatherReply(torch.randn(6, 4), torch.randn(6, 1))
    gbuf = pack(g.parts())
    assert gbuf.numel() == GatherReply.reply_bytes(6, FMT)
    gback = GatherReply.decode(6, gbuf, FMT)
    assert torch.equal(gback.weights, g.weights) and torch.equal(gback.state, g.state)

    frame, parts = abort_parts("bad batch at step 2 ✓")
    abuf = pack(parts)
    assert _decode(encode_frame(frame, abuf.numel())) == frame
    assert abort_message(abuf) == "bad batch at step 2 ✓"
    long_frame, _ = abort_parts("x" * 10000)
    assert long_frame.message_bytes == 4096


def test_payload_reader_rejects_short_and_long_payloads():
    buf = pack([(Section.KEYS, torch.tensor([1, 2, 3]))])
    with pytest.raises(EsdProtocolError, match="shorter than its counts say"):
        PayloadReader(buf).take(4, torch.int64)
    rd = PayloadReader(buf)
    assert torch.equal(rd.take(2, torch.int64), torch.tensor([1, 2]))
    with pytest.raises(EsdProtocolError, match="longer than its counts say"):
        rd.done()


def test_decoding_a_huge_frame_allocates_nothing(monkeypatch):
    # the decoder must reject before any buffer is sized from the frame
    words = _words(Command.PUSH_PULL, 2**62, 2**30, 2**30)
    sizes = []
    real_empty = torch.empty

    def spy(*args, **kwargs):
        sizes.append(args)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", spy)
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: pytest.fail(f"torch.zeros{a} while decoding"))
    with pytest.raises(EsdProtocolError, match="'pushes'"):
        _decode(words)
    assert sizes == []
