"""The early pull's bookkeeping (distributed/ps_sync.py): when it posts and when it does not.

The end-to-end exactness is in tests/test_esd_equivalence.py::test_equivalence_early_pull; here
fakes stand in for the transport so that the order of the calls is visible."""

from types import SimpleNamespace

import torch

from torchrec_esd.distributed.link_estimates import PROBE_REPLY_BYTES
from torchrec_esd.distributed.ps_sync import PROBE_EVERY, PsSync
from torchrec_esd.layout import RowFormat


class _Plans:
    def __init__(self):
        self.plans = {}

    def peek(self, iteration, wait_s=0.0):
        return self.plans.get(iteration)


class _Client:
    timed_replies = False
    routing = SimpleNamespace(wire_dim=4)
    fmt = RowFormat(dim=4, state_dim=1)

    def __init__(self):
        self.calls = []

    def post_push_pull(self, push_keys, push_vals, pull_keys, batch_fingerprint=0):
        self.calls.append(("post", pull_keys.tolist()))
        self.pushed = push_keys.tolist()
        return "pending"

    def pre_push(self, keys, rows):
        self.calls.append(("pre_push", keys.tolist()))

    def push_grads(self, keys, grads, route, bag_grads):
        self.calls.append(("grads", keys.tolist()))

    last_traffic = None


class _Store:
    def read(self, slots):
        return torch.zeros(slots.numel(), 5)


def _sync(early_pull=True, des=False, pre_push=False, uplink_bytes_per_s=1e3, slowest=1e3):
    meter = SimpleNamespace(early_pulls=0, prefetched_rows=0, pre_pushed_rows=0, record_grads=lambda *a: None)
    client = _Client()
    links = [SimpleNamespace(bytes_per_second=uplink_bytes_per_s), SimpleNamespace(bytes_per_second=slowest)]
    rt = SimpleNamespace(client=client, meter=meter, link=links[0], link_estimates=None, estimates_group=None, plans=_Plans(),
                         worker_index=0,
                         config=SimpleNamespace(prefetch_depth=0, collective_timeout_s=1.0, early_pull=early_pull,
                                                des_misses=des, pre_push=pre_push, workers=links,
                                                split_reply=False))
    return PsSync(rt), rt, client


def _plan(iteration, push_keys=(5,), used_keys=()):
    wp = SimpleNamespace(push_keys=torch.tensor(list(push_keys), dtype=torch.int64),
                         push_slots=torch.arange(len(push_keys)), pull_keys=torch.tensor([1, 2]),
                         used_keys=torch.tensor(list(used_keys), dtype=torch.int64), global_fingerprint=7)
    return SimpleNamespace(iteration=iteration, workers=[wp])


def test_the_next_push_pull_goes_after_the_gradients_when_its_plan_is_there():
    ps, rt, client = _sync()
    rt.plans.plans[4] = _plan(4)
    ps.push_grads(torch.tensor([9]), torch.zeros(1, 4), None, torch.zeros(0, 4))
    ps.post_next(3, _Store())
    assert client.calls == [("grads", [9]), ("post", [1, 2])]
    assert ps.posted(4) and not ps.posted(5) and rt.meter.early_pulls == 1
    ps.post_next(3, _Store())  # posted already: nothing more
    assert len(client.calls) == 2


def test_no_post_without_the_next_plan_or_when_the_early_pull_is_off():
    ps, rt, client = _sync()
    ps.post_next(3, _Store())  # the dispatch thread has not delivered plan 4 yet: the forward pulls
    assert not ps.posted(4) and client.calls == [] and rt.meter.early_pulls == 0
    for off in (_sync(early_pull=False), _sync(des=True)):
        ps, rt, client = off
        rt.plans.plans[4] = _plan(4)
        ps.post_next(3, _Store())
        assert not ps.posted(4) and client.calls == []


def test_a_posted_push_pull_for_another_iteration_is_a_clear_error():
    import pytest

    from torchrec_esd.config import EsdConfigError

    ps, rt, client = _sync()
    rt.plans.plans[4] = _plan(4)
    ps.post_next(3, _Store())
    with pytest.raises(EsdConfigError, match="posted after the previous gradients, but the module computes "
                                             "iteration 5"):
        ps.push_pull(_plan(5).workers[0], None, iteration=5)


def test_pre_push_sends_the_next_pushes_this_batch_does_not_use_and_the_next_push_pull_leaves_them_out():
    ps, rt, client = _sync(pre_push=True)
    rt.plans.plans[4] = _plan(4, push_keys=(5, 8, 11))
    ps.pre_push(_plan(3, used_keys=(8, 20)), _Store())  # right after the push/pull of 3: 8 changes in 3
    assert client.calls == [("pre_push", [5, 11])] and rt.meter.pre_pushed_rows == 2
    ps.push_grads(torch.tensor([9]), torch.zeros(1, 4), None, torch.zeros(0, 4))
    ps.post_next(3, _Store())
    assert client.calls[1:] == [("grads", [9]), ("post", [1, 2])] and client.pushed == [8]


def test_pre_push_waits_for_the_next_plan_before_the_gradients_and_is_empty_when_none_comes():
    ps, rt, client = _sync(pre_push=True)
    ps.pre_push(_plan(3, used_keys=(8,)), _Store())  # plan 4 not dispatched yet: deferred
    assert client.calls == []
    rt.plans.plans[4] = _plan(4, push_keys=(5, 8))
    ps.push_grads(torch.tensor([9]), torch.zeros(1, 4), None, torch.zeros(0, 4))
    assert client.calls == [("pre_push", [5]), ("grads", [9])]
    ps.post_next(3, _Store())
    assert client.pushed == [8]
    # the last batch: no plan comes, the PS phase still gets its (empty) request before the gradients
    ps.pre_push(_plan(4), _Store())
    ps.push_grads(torch.tensor([1]), torch.zeros(1, 4), None, torch.zeros(0, 4))
    assert client.calls[-2:] == [("pre_push", []), ("grads", [1])]


def test_pre_push_leaves_rows_to_the_push_pull_where_they_are_quick_on_the_uplink():
    # 2 rows x (8 + 4 x 5) B = 56 B: at 1e6 B/s 0.056 ms, under PRE_PUSH_MIN_S (the request is empty)
    ps, rt, client = _sync(pre_push=True, uplink_bytes_per_s=1e6)
    rt.plans.plans[4] = _plan(4, push_keys=(5, 11))
    ps.pre_push(_plan(3), _Store())
    assert client.calls == [("pre_push", [])]
    ps.post_next(3, _Store())
    assert client.pushed == [5, 11]
    # and where another worker's link is much slower: that one's pushes are the ones that matter
    ps, rt, client = _sync(pre_push=True, uplink_bytes_per_s=1e3, slowest=1e2)
    rt.plans.plans[4] = _plan(4, push_keys=(5, 11))
    ps.pre_push(_plan(3), _Store())
    assert client.calls == [("pre_push", [])]


def test_no_pre_push_when_off():
    ps, rt, client = _sync(pre_push=False)
    rt.plans.plans[4] = _plan(4)
    ps.pre_push(_plan(3), _Store())
    ps.push_grads(torch.tensor([9]), torch.zeros(1, 4), None, torch.zeros(0, 4))
    assert client.calls == [("grads", [9])]


def test_pre_push_reads_the_links_from_the_online_estimates_when_there_are_some():
    # configured: this worker the slowest; estimated: another worker 10x slower, so this one stays quiet
    ps, rt, client = _sync(pre_push=True, uplink_bytes_per_s=1e3, slowest=1e3)
    ps._estimates = SimpleNamespace(bytes_per_second=lambda: [1e3, 1e2])
    rt.plans.plans[4] = _plan(4, push_keys=(5, 11))
    ps.pre_push(_plan(3), _Store())
    assert client.calls == [("pre_push", [])]
    ps._estimates = SimpleNamespace(bytes_per_second=lambda: [1e2, 1e3])  # now it is the slow one
    ps.pre_push(_plan(3), _Store())
    assert client.calls[-1] == ("pre_push", [5, 11])


def test_the_link_observation_of_a_push_pull_counts_its_pre_push_bytes():
    from torchrec_esd.ps.transport import LinkStats, Traffic

    ps, rt, client = _sync(pre_push=True)
    seen = []
    ps._estimates = SimpleNamespace(bytes_per_second=lambda: [1e3, 1e3],
                                    record=lambda nbytes, *a: seen.append(nbytes), publish=lambda group: None)
    client.last_traffic = Traffic(LinkStats(bytes_sent=300), {}, 0.0)  # what the pre-push moved
    rt.plans.plans[4] = _plan(4, push_keys=(5, 11))
    ps.pre_push(_plan(3), _Store())

    def push_pull(push_keys, push_vals, pull_keys, des, batch_fingerprint=0, **probe):
        client.last_traffic = Traffic(LinkStats(bytes_sent=100, bytes_received=50), {}, 0.01)
        return torch.zeros(pull_keys.numel(), 5), torch.zeros(0, 4), None

    client.push_pull = push_pull
    rt.meter.record_push_pull = lambda *a: None
    rt.meter.flushed_rows = 0
    wp = _plan(4, push_keys=(5, 11)).workers[0]
    wp.rows, wp.flushed_rows, wp.num_samples = {}, 0, 3
    ps.push_pull(wp, torch.zeros(2, 5), iteration=4)
    assert seen == [450]  # 100 + 50 of the push/pull, 300 of its pre-push


def test_with_online_links_every_other_small_reply_is_padded_to_a_measurable_size():
    ps, rt, client = _sync()
    assert ps._probe(3) == {}  # no online links: no padding
    ps._estimates = SimpleNamespace()
    row = client.fmt.row_bytes
    asks = [ps._probe(3) for _ in range(2 * PROBE_EVERY)]
    assert asks == ([{}] * (PROBE_EVERY - 1) + [{"probe_bytes": PROBE_REPLY_BYTES - 3 * row}]) * 2
    big = PROBE_REPLY_BYTES // row + 1
    assert [ps._probe(big) for _ in range(PROBE_EVERY)] == [{}] * PROBE_EVERY  # large enough already


def test_split_reply_sends_the_keys_in_the_forward_and_the_values_after_the_backward():
    from torchrec_esd.ps.transport import Traffic

    ps, rt, client = _sync()
    ps._split = True
    rt.meter.split_replies = 0
    client.post_split_head = lambda gk, pk, qk, batch_fingerprint=0, sums=False: (
        client.calls.append(("head", gk.tolist(), pk.tolist(), qk.tolist())), "pending")[1]
    client.send_split_tail = lambda p, grads, push, old_rows=None: (
        client.calls.append(("tail", p, grads.shape[0], push.shape[0])), Traffic())[1]
    current = _plan(3, used_keys=(20, 21))
    current.workers[0].grad_pos = torch.tensor([1])
    ps.post_head(current)  # plan 4 not dispatched yet: nothing goes in the forward
    assert client.calls == []
    rt.plans.plans[4] = _plan(4, push_keys=(5, 11))
    ps.post_head(current)
    assert client.calls == [("head", [21], [5, 11], [1, 2])]
    ps.push_grads_and_next(torch.tensor([21]), torch.zeros(1, 4), None, torch.zeros(0, 4), 3, _Store())
    assert client.calls[1] == ("tail", "pending", 1, 2)  # the values and the pushed rows, read now
    assert ps.posted(4) and rt.meter.split_replies == 1 and rt.meter.early_pulls == 1


def test_a_worker_whose_values_are_quick_on_its_link_does_not_split():
    # 1 gradient x 16 B + 2 pushed rows x 20 B = 56 B: at 1e6 B/s 0.056 ms, under SPLIT_MIN_S
    ps, rt, client = _sync(uplink_bytes_per_s=1e6)
    ps._split = True
    rt.meter.split_replies = 0
    client.post_split_head = lambda *a, **k: client.calls.append(("head",))
    current = _plan(3, used_keys=(20, 21))
    current.workers[0].grad_pos = torch.tensor([1])
    rt.plans.plans[4] = _plan(4, push_keys=(5, 11))
    ps.post_head(current)
    ps.push_grads_and_next(torch.tensor([21]), torch.zeros(1, 4), None, torch.zeros(0, 4), 3, _Store())
    assert client.calls == [("grads", [21]), ("post", [1, 2])]  # whole gradients, then the early push/pull
    assert rt.meter.split_replies == 0 and rt.meter.early_pulls == 1
