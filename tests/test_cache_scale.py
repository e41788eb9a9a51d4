"""The cache directory at scale: hashed slot maps (memory O(cache rows), not
table rows), the id-table edits they rest on, and per-worker planning from a
:class:`StepSummary` equal to the full directory's plans."""

import random

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_esd import ops, reference_ops
from torchrec_esd.apps.workload import SyntheticWorkload, SyntheticWorkloadConfig
from torchrec_esd.cache import CacheDirectory, use_dense_slot_map
from torchrec_esd.config import EsdConfig, EsdConfigError, WorkerSpec

FIELDS = ("used_keys", "used_slot", "push_keys", "push_slots", "pull_pos", "local_pos", "grad_pos")


def _tables(cards, dim=4):
    return [
        EmbeddingBagConfig(name=f"t_cat_{i}", embedding_dim=dim, num_embeddings=n, feature_names=[f"cat_{i}"])
        for i, n in enumerate(cards)
    ]


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_id_table_assign_keeps_every_key_reachable(impl):
    """Random erases and inserts (backward-shift deletion, overwrites) on a
    small table with long probe clusters: lookups always equal a dict."""
    assign = ops.id_table_assign if impl == "kernel" else reference_ops.id_table_assign_ref
    if impl == "kernel":
        assert ops.HAS_TABLE_ASSIGN, "the extension is built without id_table_assign"
    rng = random.Random(3)
    table = torch.full((64, 2), -1, dtype=torch.int64)
    truth = {}
    universe = list(range(0, 4000, 7))
    for _ in range(300):
        erase = rng.sample(sorted(truth), k=min(len(truth), rng.randint(0, 6))) + [rng.choice(universe)]
        for k in erase:
            truth.pop(k, None)
        room = 32 - len(truth)
        new = [k for k in rng.sample(universe, k=8) if k not in truth][: max(0, min(room, rng.randint(0, 8)))]
        over = rng.sample(sorted(truth), k=min(2, len(truth)))  # overwrite present keys
        keys = new + over
        vals = [rng.randint(0, 10**6) for _ in keys]
        assign(table, torch.tensor(erase), torch.tensor(keys, dtype=torch.int64), torch.tensor(vals))
        truth.update(zip(keys, vals))
        q = torch.tensor(universe)
        got = ops.id_table_lookup(table, q)
        assert got.tolist() == [truth.get(k, -1) for k in universe]
        assert int((table[:, 0] >= 0).sum()) == len(truth)
    full = torch.full((4, 2), -1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="full"):
        assign(full, torch.zeros(0, dtype=torch.int64), torch.arange(5), torch.arange(5))


def test_dense_map_rule():
    assert use_dense_slot_map(1 << 20, 1)  # small tables: always dense
    assert use_dense_slot_map(8_000_000, 1_000_000)  # <= 8 rows per slot
    assert not use_dense_slot_map(8_000_001 + (1 << 20), 1_000_000)
    assert not use_dense_slot_map(1 << 30, 1 << 20)
    assert not use_dense_slot_map(1 << 32, 1 << 30)  # int32 slots cannot index it


def _hashed_ids_batch(step, b, table_rows, nf, bag, seed):
    """A batch of hashed ids (zipf-like over 2^20 raw values, hashed into the table)."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    raw = (torch.rand(nf * b * bag, generator=g) ** 4 * (1 << 20)).long()
    vals = torch.cat([ops.hash_ids(raw[f * b * bag:(f + 1) * b * bag], f, table_rows) for f in range(nf)])
    return KeyedJaggedTensor(keys=[f"cat_{f}" for f in range(nf)], values=vals,
                             lengths=torch.full((nf * b,), bag, dtype=torch.int32))


def _plans_from_summaries_match(full, mine, kjt, a, step, flush=()):
    """Plan ``step`` with the full directory and with each worker's own one
    from its summary; every plan field must be equal.  Returns (summaries,
    the full plan, the workers' own plans)."""
    summaries = full.step_summaries(kjt, a)
    pf = full.plan(kjt, a, flush=flush)
    own = []
    for w in range(len(mine)):
        pw = mine[w].plan_from_summary(summaries[w], flush=w in flush)
        for f in FIELDS:
            assert torch.equal(getattr(pf.workers[w], f), getattr(pw, f)), (step, w, f)
        own.append(pw)
    return summaries, pf, own


@pytest.mark.parametrize("policy,staleness", [("lru", 0), ("lfu", 1)])
def test_a_billion_row_directory_stays_bounded_by_its_caches(policy, staleness):
    """Two tables of 2^30 rows: the directory's state is O(cache slots) (no
    per-row array), every worker's plans read as in a version simulation, and
    a worker planning from its StepSummary gets the full directory's plans."""
    rows = 1 << 30
    tables = _tables([rows, rows])
    cfg = EsdConfig([WorkerSpec(600, 1.0), WorkerSpec(300, 1.0), WorkerSpec(100, 1.0)], staleness=staleness,
                    cache_policy=policy)
    full = CacheDirectory(cfg, tables)
    mine = [CacheDirectory(cfg, tables, track=[w]) for w in range(3)]
    for w in range(3):
        assert not full._w[w].dense
        # slots: 8*3 + 8 + 8 + 8 + 1 B, map: 16 B per id-table row (cap <= 4 * slots)
        assert full.nbytes(w) <= 1000 * 1200
    g = torch.Generator().manual_seed(0)
    for step in range(15):
        kjt = _hashed_ids_batch(step, 30, rows, 2, 3, seed=1)
        a = torch.randint(0, 3, (30,), generator=g)
        flush = [step % 3] if step % 5 == 4 else []  # a worker writing back its dirty rows: the same plans
        summaries, pf, own = _plans_from_summaries_match(full, mine, kjt, a, step, flush)
        for w in flush:
            assert full.dirty_keys(w).numel() == 0 or pf.workers[w].local_pos.numel() > 0
        for w, pw in enumerate(own):
            assert pf.workers[w].rows == pw.rows
            assert summaries[w].user_keys.numel() <= pf.workers[w].used_keys.numel() + full.cached_keys(w).numel()
    for w in range(3):
        for f in ("keys", "lag", "dirty", "last_use", "freq"):
            assert torch.equal(getattr(full._w[w], f), getattr(mine[w]._w[w], f)), (w, f)
    # the dispatcher's directory also holds the holder index (built by step_summaries)
    assert full.nbytes() == sum(m.nbytes() for m in mine) + full.holder_index().nbytes()


def test_summary_planning_matches_on_a_skewed_workload_with_evictions():
    """Small tables (dense maps), dirty rows shared and evicted: per-worker
    planning from summaries equals the full directory step after step."""
    wl = SyntheticWorkload(SyntheticWorkloadConfig(num_sparse=3, cardinalities=[40, 200, 7], bag_size=(0, 4), alpha=1.1, seed=2))
    tables = _tables(wl.config.cardinalities)
    cfg = EsdConfig([WorkerSpec({"t_cat_0": 8, "t_cat_1": 30, "t_cat_2": 7}, 1.0), WorkerSpec(3, 1.0), WorkerSpec(5, 1.0)],
                    staleness=1)
    full = CacheDirectory(cfg, tables)
    mine = [CacheDirectory(cfg, tables, track=[w]) for w in range(3)]
    g = torch.Generator().manual_seed(4)
    pushes = 0
    for step in range(30):
        kjt = wl.global_batch(step, 24).sparse_features
        a = torch.randint(0, 3, (24,), generator=g)
        sums, _, own = _plans_from_summaries_match(full, mine, kjt, a, step)
        for pw in own:
            pushes += pw.rows["miss_push"] + pw.push_keys.numel()
    assert pushes > 0
    with pytest.raises(EsdConfigError, match="alone"):
        full.plan_from_summary(sums[0])
    with pytest.raises(EsdConfigError, match="tracks every worker"):
        mine[0].step_summaries(kjt, a)
