"""The dispatcher's directory step split over group ranks and row shards
(cache/split_step.py) must be the one directory's step, exactly: the same plans
and summaries for every worker, and shard bits and owners equal to the full
holder index's, step after step (evictions, dirty rows, staleness, flushes)."""

import pytest
import torch

from torchrec_esd.apps.workload import SyntheticWorkload, SyntheticWorkloadConfig
from torchrec_esd.cache import CacheDirectory, directory as directory_mod
from torchrec_esd.cache import split_step as split_mod
from torchrec_esd.cache.split_step import RowShard, make_split_ranks, shard_of, split_flush, split_step
from torchrec_esd.config import EsdConfig, EsdConfigError, WorkerSpec
from tests.test_cache_scale import _tables

PLAN_FIELDS = ("used_keys", "used_slot", "push_keys", "push_slots", "pull_pos", "local_pos", "grad_pos")


def _same_plan(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in PLAN_FIELDS) and a.rows == b.rows \
        and a.num_samples == b.num_samples


def _setup(staleness: int, seed: int = 7, policy: str = "lru"):
    wl = SyntheticWorkload(SyntheticWorkloadConfig(num_sparse=3, cardinalities=[40, 200, 7], bag_size=(0, 4),
                                                   alpha=1.1, seed=seed))
    tables = _tables(wl.config.cardinalities)
    cfg = EsdConfig([WorkerSpec(c, 1.0) for c in (7, 3, 5, 4, 6, 2, 1)], staleness=staleness, cache_policy=policy,
                    cache_lookahead=2)
    return wl, tables, cfg


def _check_shards(full: CacheDirectory, shards, group_of) -> int:
    """Every shard's bits and owners equal the full index's for every key cached anywhere,
    and the shards hold exactly those keys.  Returns the dirty keys seen."""
    index = full.holder_index()
    cached = torch.unique(index.gkey[index.gkey >= 0])
    held, fresh = index.group_bits(group_of, cached)
    owner = index.dirty_owner(group_of, cached)
    where = shard_of(cached, len(shards))
    for r, shard in enumerate(shards):
        mine = where == r
        h, f = shard.group_bits(cached[mine])
        assert torch.equal(h, held[mine]) and torch.equal(f, fresh[mine]), r
        assert torch.equal(shard.dirty_owner(cached[mine]), owner[mine]), r
        keys, _ = shard.bits.items()
        assert torch.equal(keys, cached[mine]), r  # nothing kept for a row cached nowhere
        okeys, _ = shard.owners.items()
        assert torch.equal(okeys, cached[mine][owner[mine] >= 0]), r
        assert shard.bits.rows == keys.numel() and shard.owners.rows == okeys.numel()
    return int((owner >= 0).sum())


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("staleness,num_shards,policy", [(0, 3, "lru"), (1, 1, "lfu"), (2, 4, "lru"),
                                                         (0, 2, "lookahead")])
def test_split_step_equals_the_dispatcher_directory(monkeypatch, kernel, staleness, num_shards, policy):
    monkeypatch.setattr(directory_mod, "USE_PLAN_KERNEL", kernel)
    wl, tables, cfg = _setup(staleness, policy=policy)
    W = cfg.num_workers
    groups = [[0, 4], [1, 2, 5], [3, 6]]
    full = CacheDirectory(cfg, tables)
    ranks, shards, group_of = make_split_ranks(cfg, tables, groups, num_shards)
    g = torch.Generator().manual_seed(11)
    dirty = evicted = local = 0
    for step in range(30):
        kjt = wl.global_batch(step, 28).sparse_features
        a = torch.randint(0, W, (28,), generator=g)
        flush = [2] if step == 9 else ()
        keys, sample = full.batch_keys(kjt)
        want_sums = full.step_summaries(kjt, a)
        upcoming = [wl.global_batch(step + k, 28).sparse_features for k in (1, 2)] if policy == "lookahead" else ()
        want = full.plan(kjt, a, flush=flush, upcoming=upcoming)
        got = split_step(ranks, shards, keys, a[sample], torch.bincount(a, minlength=W).tolist(), summaries=True,
                         flush=flush, upcoming=upcoming)
        for w in range(W):
            assert _same_plan(got.plans[w], want.workers[w]), (step, w)
            s, e = got.summaries[w], want_sums[w]
            assert torch.equal(s.keys, e.keys) and torch.equal(s.user_keys, e.user_keys), (step, w)
            assert torch.equal(s.user_counts, e.user_counts) and s.num_samples == e.num_samples, (step, w)
        assert set(got.phase_s) == {"count", "route", "step", "apply"}
        assert [len(v) for v in got.phase_s.values()] == [3, num_shards, 3, num_shards]
        # what crosses ranks: each group's (row, count) pairs of its distinct rows, 16 B a row
        for gi, ws in enumerate(groups):
            mine = torch.isin(a[sample], torch.tensor(ws))
            assert got.sent_bytes["count"][gi] == 16 * torch.unique(keys[mine]).numel(), (step, gi)
        assert len(got.sent_bytes["route"]) == num_shards and sum(got.sent_bytes["route"]) >= sum(
            got.sent_bytes["count"])  # every used row goes back to its users, held rows to holders too
        dirty += _check_shards(full, shards, group_of)
        evicted += sum(p.rows["miss_push"] for p in want.workers)
        local += sum(p.local_pos.numel() for p in want.workers)
        if step == 20:  # checkpoint-style flush outside a step: owners cleared on the shards too
            want_f = full.flush_plan()
            got_f = split_flush(ranks, shards)
            for w in range(W):
                assert torch.equal(got_f[w].push_keys, want_f[w].push_keys)
            assert _check_shards(full, shards, group_of) == 0
    # the run had dirty rows (local updates), evictions pushing dirty rows, and shared rows
    assert dirty > 0 and evicted > 0 and local > 0


def test_held_rows_must_reach_their_group(monkeypatch):
    """A group must also learn of rows it only holds (another group uses them): its
    workers then push their dirty copies and age them.  Routing the totals to the using
    groups alone changes the plans: the split step would not be the directory's."""
    wl, tables, cfg = _setup(0, seed=3)
    W = cfg.num_workers

    route = RowShard.route

    def users_only(self, parts):
        out = route(self, parts)
        return [(k[torch.isin(k, parts[g][0])], c[torch.isin(k, parts[g][0])]) for g, (k, c) in enumerate(out)]

    monkeypatch.setattr(RowShard, "route", users_only)
    full = CacheDirectory(cfg, tables)
    ranks, shards, _ = make_split_ranks(cfg, tables, [[0, 1, 2], [3, 4, 5, 6]], 2)
    g = torch.Generator().manual_seed(5)
    differed = False
    for step in range(20):
        kjt = wl.global_batch(step, 28).sparse_features
        a = torch.randint(0, W, (28,), generator=g)
        keys, sample = full.batch_keys(kjt)
        want = full.plan(kjt, a)
        got = split_step(ranks, shards, keys, a[sample], torch.bincount(a, minlength=W).tolist())
        if not all(_same_plan(got.plans[w], want.workers[w]) for w in range(W)):
            differed = True
            break
    assert differed


def test_split_step_refuses_malformed_input():
    wl, tables, cfg = _setup(0)
    with pytest.raises(EsdConfigError, match="not a partition"):
        make_split_ranks(cfg, tables, [[0, 1], [2, 3]], 2)
    with pytest.raises(EsdConfigError, match="num_shards"):
        make_split_ranks(cfg, tables, [[0, 1, 2, 3, 4, 5, 6]], 0)
    ranks, shards, _ = make_split_ranks(cfg, tables, [[0, 1, 2], [3, 4, 5, 6]], 2)
    keys = torch.tensor([1, 2, 3], dtype=torch.int64)
    with pytest.raises(EsdConfigError, match="outside"):
        ranks[0].count(keys, torch.tensor([0, 1, 4]), [1, 1, 1])  # worker 4 is in the other group
    with pytest.raises(EsdConfigError, match="sample counts"):
        ranks[0].count(keys, torch.tensor([0, 1, 2]), [1, 1])
    with pytest.raises(EsdConfigError, match="before count"):
        ranks[1].step([])

    wrong = keys[shard_of(keys, 2) == 1]
    if wrong.numel():
        with pytest.raises(EsdConfigError, match="another shard"):
            shards[0].route([(wrong, torch.ones_like(wrong)), (wrong[:0], wrong[:0])])
    mine = keys[shard_of(keys, 2) == 0]
    if mine.numel():
        twice = torch.cat([mine, mine])
        with pytest.raises(EsdConfigError, match="twice"):
            shards[0].route([(twice, torch.ones_like(twice)), (mine[:0], mine[:0])])
    with pytest.raises(EsdConfigError, match="from 1 groups"):
        shards[0].route([(keys[:0], keys[:0])])
    assert split_mod.HELD_MASK == (1 << 31) - 1
    empty = torch.zeros(0, dtype=torch.int64)
    with pytest.raises(EsdConfigError, match="reports from 1 groups"):
        shards[0].apply([(empty, empty, empty, empty)])
    if mine.numel():
        one = torch.ones_like(twice)
        with pytest.raises(EsdConfigError, match="reported one row twice"):
            shards[0].apply([(twice, one, one, -one), (empty, empty, empty, empty)])


def _split_world(staleness: int, steps: int):
    """One rank of a gloo world running the split step (SplitRank): group and shard
    ``rank``, checked against a one-directory replica every step."""
    import torch.distributed as dist

    from torchrec_esd.cache.split_step import SplitRank

    wl, tables, cfg = _setup(staleness)
    W = cfg.num_workers
    groups = [[0, 4], [1, 2, 5], [3, 6]]
    me = dist.get_rank()
    split = SplitRank(cfg, tables, groups)
    full = CacheDirectory(cfg, tables)  # the reference, replicated on every rank
    g = torch.Generator().manual_seed(11)
    checked = dirty = 0
    for step in range(steps):
        kjt = wl.global_batch(step, 28).sparse_features
        a = torch.randint(0, W, (28,), generator=g)
        flush = [groups[1][0]] if step == 7 else ()
        keys, sample = full.batch_keys(kjt)
        owner = a[sample]
        mine = torch.isin(owner, torch.tensor(groups[me]))
        want_sums = full.step_summaries(kjt, a)
        want = full.plan(kjt, a, flush=flush)
        plans, sums = split.step(keys[mine], owner[mine], torch.bincount(a, minlength=W).tolist(), summaries=True,
                                 flush=flush)
        assert sorted(plans) == groups[me]
        for w in groups[me]:
            assert _same_plan(plans[w], want.workers[w]), (me, step, w)
        for s in sums:
            assert torch.equal(s.user_keys, want_sums[s.worker].user_keys), (me, step, s.worker)
            assert torch.equal(s.user_counts, want_sums[s.worker].user_counts), (me, step, s.worker)
        # this rank's shard: the bits and owners of its rows, as the one directory has them
        index = full.holder_index()
        cached = torch.unique(index.gkey[index.gkey >= 0])
        cached = cached[shard_of(cached, dist.get_world_size()) == me]
        held, fresh = index.group_bits(split.group_of, cached)
        h, f = split.shard.group_bits(cached)
        owner_want = index.dirty_owner(split.group_of, cached)
        assert torch.equal(h, held) and torch.equal(f, fresh), (me, step)
        assert torch.equal(split.shard.dirty_owner(cached), owner_want), (me, step)
        assert split.shard.bits.rows == cached.numel(), (me, step)
        checked += len(groups[me])
        dirty += int((owner_want >= 0).sum())
    return checked, dirty


def test_split_step_on_a_gloo_world_equals_the_dispatcher_directory():
    """The four phases on three real ranks (a group and a shard each), their messages
    moved by all_to_all_single: every rank's plans, summaries, bits and owners are the
    one directory's, step after step."""
    from torchrec_esd.apps.launch import run_local_world

    out = run_local_world(_split_world, 3, 1, 16, timeout_s=120)
    assert [c for c, _ in out] == [2 * 16, 3 * 16, 2 * 16]
    assert sum(d for _, d in out) > 0  # some rows were dirty on some shard


def _split_rank_refuses(kind: str):
    import torch.distributed as dist

    from torchrec_esd.cache.split_step import SplitRank

    _, tables, cfg = _setup(0)
    if kind == "groups":
        SplitRank(cfg, tables, [[0, 1, 2, 3, 4, 5, 6]])  # one group on two ranks
    split = SplitRank(cfg, tables, [[0, 1, 2], [3, 4, 5, 6]], max_rows=4)
    keys = torch.arange(30, dtype=torch.int64) if dist.get_rank() == 0 else torch.zeros(0, dtype=torch.int64)
    owner = torch.zeros_like(keys)
    split.step(keys, owner, [30, 0, 0, 0, 0, 0, 0])  # 30 distinct rows over 2 shards: more than 4 to one


@pytest.mark.parametrize("kind,match", [("groups", "one group per rank"), ("size", "announced")])
def test_split_rank_refuses_bad_setups_and_oversized_messages(kind, match):
    from torchrec_esd.apps.launch import RankFailed, run_local_world

    with pytest.raises(RankFailed, match=match):
        run_local_world(_split_rank_refuses, 2, kind, timeout_s=60)
