"""Criteo-format TSV workload: parsing, hashing, determinism, wrap-around,
errors, and short vanilla / ESD runs on a generated sample file."""

import math
import random

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_esd.apps.criteo as criteo
from torchrec_esd.config import EsdConfig, EsdConfigError, WorkerSpec
from torchrec_esd.apps.criteo import CriteoTsvConfig, CriteoTsvWorkload, write_criteo_tsv
from torchrec_esd.apps.workload import SyntheticWorkload, SyntheticWorkloadConfig


def _random_rows(n, seed=0, num_dense=13, num_sparse=26):
    """Criteo-like rows: some missing values, negative dense values, 8-hex-digit
    categorical values from a small vocabulary per feature."""
    rng = random.Random(seed)
    labels = [rng.random() < 0.3 for _ in range(n)]
    dense = [
        [None if rng.random() < 0.2 else rng.randint(-3, 5000) for _ in range(num_dense)] for _ in range(n)
    ]
    vocab = [[rng.getrandbits(32) for _ in range(rng.randint(2, 60))] for _ in range(num_sparse)]
    cats = [[None if rng.random() < 0.1 else rng.choice(vocab[j]) for j in range(num_sparse)] for _ in range(n)]
    return labels, dense, cats


def _write(tmp_path, n, name="train.txt", seed=0, **kw):
    path = tmp_path / name
    rows = _random_rows(n, seed, **kw)
    write_criteo_tsv(path, *rows)
    return str(path), rows


def _expected(rows, cards):
    labels, dense, cats = rows
    d = torch.tensor([[0.0 if x is None else math.log1p(max(x, 0)) for x in xs] for xs in dense])
    ids = torch.tensor(
        [[0 if v is None else 1 + v % (cards[j] - 1) for j, v in enumerate(cs)] for cs in cats]
    )
    return d, ids, torch.tensor([float(y) for y in labels])


def _check_rows(batch, exp, rows_idx, cfg):
    d, ids, y = exp
    idx = torch.tensor(rows_idx)
    assert torch.allclose(batch.dense_features, d[idx].float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(batch.labels, y[idx])
    for j, f in enumerate(cfg.feature_names):
        assert torch.equal(batch.sparse_features[f].values(), ids[idx, j])


# ---------------------------------------------------------------- parsing
def test_parses_one_line_by_hand(tmp_path):
    p = tmp_path / "one.tsv"
    dense = ["", "-5", "0", "3", "1000"] + ["7"] * 8
    cats = ["", "0000000a", "FFFFFFFF"] + ["68fd1e64"] * 23
    p.write_text("\t".join(["1"] + dense + cats) + "\r\n")
    cfg = CriteoTsvConfig(str(p), cardinalities=[5] * 25 + [1])
    b = CriteoTsvWorkload(cfg).global_batch(0, 1)
    assert b.dense_features.shape == (1, 13) and b.dense_features.dtype == torch.float32
    want = [0.0, 0.0, 0.0, math.log(4.0), math.log(1001.0)] + [math.log(8.0)] * 8
    assert torch.allclose(b.dense_features[0], torch.tensor(want))
    assert b.labels.tolist() == [1.0]
    kjt = b.sparse_features
    assert kjt["cat_0"].values().tolist() == [0]  # missing -> reserved id 0
    assert kjt["cat_1"].values().tolist() == [1 + 10 % 4]
    assert kjt["cat_2"].values().tolist() == [1 + 0xFFFFFFFF % 4]
    assert kjt["cat_3"].values().tolist() == [1 + 0x68FD1E64 % 4]
    assert kjt["cat_25"].values().tolist() == [0]  # a one-row table


def test_batches_match_the_file_and_the_synthetic_interface(tmp_path):
    path, rows = _write(tmp_path, 50)
    cfg = CriteoTsvConfig(path, max_cardinality=40)
    wl = CriteoTsvWorkload(cfg)
    b = wl.global_batch(1, 16)
    kjt = b.sparse_features
    assert isinstance(kjt, KeyedJaggedTensor) and kjt.stride() == 16
    assert b.dense_features.shape == (16, 13) and b.labels.shape == (16,)
    assert set(b.labels.unique().tolist()) <= {0.0, 1.0}
    syn = SyntheticWorkload(SyntheticWorkloadConfig(max_cardinality=40))
    # same features, table names and sizes as the synthetic workload
    assert kjt.keys() == syn.config.feature_names == cfg.feature_names
    assert [(t.name, t.num_embeddings, t.feature_names) for t in wl.table_configs(4)] == [
        (t.name, t.num_embeddings, t.feature_names) for t in syn.table_configs(4)
    ]
    for f, n in zip(kjt.keys(), cfg.cardinalities):
        ids = kjt[f].values()
        assert ids.dtype == torch.int64 and int(ids.min()) >= 0 and int(ids.max()) < n
        assert torch.all(kjt[f].lengths() == 1)
    _check_rows(b, _expected(rows, cfg.cardinalities), list(range(16, 32)), cfg)
    assert wl.num_rows == 50
    # local batches are contiguous slices of the global batch
    loc = wl.local_batch(1, 16, 1, 4)
    assert torch.equal(loc.dense_features, b.dense_features[4:8])
    assert torch.equal(loc.sparse_features["cat_7"].values(), kjt["cat_7"].values()[4:8])


def test_deterministic_and_wraps_around_over_small_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(criteo, "CHUNK_ROWS", 3)  # many chunks, eviction, offset index
    path, rows = _write(tmp_path, 23)
    cfg = CriteoTsvConfig(path, num_dense=13, num_sparse=26, max_cardinality=30)
    exp = _expected(rows, cfg.cardinalities)
    a = CriteoTsvWorkload(cfg, cache_chunks=2)
    B = 5
    for step in [0, 1, 7, 2, 4, 5, 0, 9, 13]:  # out of order and past the end
        _check_rows(a.global_batch(step, B), exp, [(step * B + i) % 23 for i in range(B)], cfg)
    b = CriteoTsvWorkload(cfg)
    x, y = a.global_batch(4, B), b.global_batch(4, B)  # rows 20, 21, 22, 0, 1
    assert torch.equal(x.sparse_features.values(), y.sparse_features.values())
    assert torch.equal(x.dense_features, y.dense_features) and torch.equal(x.labels, y.labels)
    # a batch bigger than the cache
    _check_rows(a.global_batch(1, 20), exp, [(20 + i) % 23 for i in range(20)], cfg)


def test_max_rows_and_blank_lines(tmp_path):
    path, rows = _write(tmp_path, 12)
    lines = open(path).read().splitlines(keepends=True)
    with open(path, "w") as f:  # blank lines are skipped
        f.write("".join(lines[:3]) + "\n" + "".join(lines[3:]) + "\n\n")
    cfg = CriteoTsvConfig(path, max_rows=7, max_cardinality=30)
    wl = CriteoTsvWorkload(cfg)
    assert wl.num_rows == 7
    _check_rows(wl.global_batch(1, 4), _expected(rows, cfg.cardinalities), [4, 5, 6, 0], cfg)
    assert CriteoTsvWorkload(CriteoTsvConfig(path)).num_rows == 12


def test_no_wrap_raises_past_the_end(tmp_path):
    path, _ = _write(tmp_path, 10)
    wl = CriteoTsvWorkload(CriteoTsvConfig(path, wrap=False))
    wl.global_batch(1, 5)
    with pytest.raises(EsdConfigError, match="past the end.*lasts 2 steps"):
        wl.global_batch(2, 5)


# ---------------------------------------------------------------- errors
def _line(label="0", dense=None, cats=None):
    dense = ["1"] * 13 if dense is None else dense
    cats = ["0a0b0c0d"] * 26 if cats is None else cats
    return "\t".join([label] + dense + cats) + "\n"


@pytest.mark.parametrize(
    "bad, match",
    [
        (_line()[:-1] + "\textra\n", r"bad.tsv:3: expected 40 tab-separated columns .* found 41"),
        ("\t".join(["1"] * 39) + "\n", r"bad.tsv:3: expected 40 .* found 39"),
        (_line(dense=["1.5"] + ["1"] * 12), r"bad.tsv:3: dense feature I1 is '1.5', not an integer"),
        (_line(dense=["1"] * 12 + ["abc"]), r"bad.tsv:3: dense feature I13 is 'abc'"),
        (_line(dense=["1", "9" * 400] + ["1"] * 11), r"bad.tsv:3: dense feature I2 is an integer of 400 digits"),
        (_line(cats=["0a0b0c0d"] * 25 + ["zz12"]), r"bad.tsv:3: categorical feature C26 is 'zz12', not a hex"),
        (_line(cats=["0x1f"] + ["0a0b0c0d"] * 25), r"bad.tsv:3: categorical feature C1 is '0x1f'"),
        (_line(label="2"), r"bad.tsv:3: label is '2'"),
        (_line(label=""), r"bad.tsv:3: label is ''"),
    ],
    ids=["41-columns", "39-columns", "float-dense", "text-dense", "huge-int-dense", "non-hex", "0x-hex", "label-2", "no-label"],
)
def test_malformed_line_names_the_line(tmp_path, bad, match):
    p = tmp_path / "bad.tsv"
    p.write_text(_line() + "\n" + bad + _line())  # line 2 is blank
    with pytest.raises(EsdConfigError, match=match):
        CriteoTsvWorkload(CriteoTsvConfig(str(p)))


def test_malformed_line_further_down_raises_when_reached(tmp_path, monkeypatch):
    monkeypatch.setattr(criteo, "CHUNK_ROWS", 4)
    p = tmp_path / "late.tsv"
    p.write_text(_line() * 9 + _line(dense=["x"] + ["1"] * 12))
    wl = CriteoTsvWorkload(CriteoTsvConfig(str(p)))
    wl.global_batch(0, 4)
    with pytest.raises(EsdConfigError, match=r"late.tsv:10: dense feature I1 is 'x'"):
        wl.global_batch(2, 4)


def test_file_errors(tmp_path):
    with pytest.raises(EsdConfigError, match="does not exist"):
        CriteoTsvConfig(str(tmp_path / "nope.tsv"))
    with pytest.raises(EsdConfigError, match="is not a file"):
        CriteoTsvConfig(str(tmp_path))
    for name, text in [("empty.tsv", ""), ("blank.tsv", "\n\n \n")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(EsdConfigError, match="has no data lines"):
            CriteoTsvWorkload(CriteoTsvConfig(str(tmp_path / name)))
    (tmp_path / "bin.tsv").write_bytes(b"\xff\xfe\n")
    with pytest.raises(EsdConfigError, match="bin.tsv:1: not an ASCII line"):
        CriteoTsvWorkload(CriteoTsvConfig(str(tmp_path / "bin.tsv")))


def test_config_and_batch_errors(tmp_path):
    path, _ = _write(tmp_path, 6)
    with pytest.raises(EsdConfigError, match="max_rows must be a positive int"):
        CriteoTsvConfig(path, max_rows=0)
    with pytest.raises(EsdConfigError, match="3 cardinalities given for 26 sparse features"):
        CriteoTsvConfig(path, cardinalities=[4, 4, 4])
    with pytest.raises(EsdConfigError, match="cardinality of feature 1 must be a positive int"):
        CriteoTsvConfig(path, num_sparse=2, cardinalities=[4, 0])
    wl = CriteoTsvWorkload(CriteoTsvConfig(path))
    with pytest.raises(EsdConfigError, match="batch of 7 samples is larger than the 6 rows"):
        wl.global_batch(0, 7)
    with pytest.raises(EsdConfigError, match=r"larger than the 4 rows .*\(max_rows=4\)"):
        CriteoTsvWorkload(CriteoTsvConfig(path, max_rows=4)).global_batch(3, 5)
    with pytest.raises(EsdConfigError, match="batch_size must be a positive int"):
        wl.global_batch(0, 0)
    with pytest.raises(EsdConfigError, match="step must be an int >= 0"):
        wl.global_batch(-1, 2)
    with pytest.raises(EsdConfigError, match="not divisible by 4 ranks"):
        wl.local_batch(0, 6, 0, 4)


# ---------------------------------------------------------------- training
def test_vanilla_and_esd_train_the_same_on_a_tsv_file(tmp_path):
    from torchrec_esd.apps.launch import run_local_world
    from torchrec_esd.apps.trainer import JobConfig, run

    path, _ = _write(tmp_path, 40)  # 3 steps of 16 rows wrap around
    wl = CriteoTsvConfig(path, max_cardinality=40)
    cache = {f"t_{f}": max(1, n // 4) for f, n in zip(wl.feature_names, wl.cardinalities)}
    common = dict(steps=3, global_batch=16, workload=wl, sparse_optimizer="sgd", sparse_lr=0.1, dense_lr=0.1)
    vanilla = run_local_world(run, 2, JobConfig(method="vanilla", **common), timeout_s=120)
    cfg = EsdConfig([WorkerSpec(cache, 1.0), WorkerSpec(cache, 4.0)], num_ps=1)
    esd = run_local_world(run, 3, JobConfig(method="esd", esd=cfg, dispatcher="heuristic", **common), timeout_s=120)
    v, e = torch.tensor(vanilla[0]["losses"]), torch.tensor(esd[0]["losses"])
    assert v.shape == (3,) and torch.isfinite(v).all() and torch.isfinite(e).all()
    assert esd[2] == {"role": "ps"}
    err = float((v - e).abs().max())
    assert err <= 1e-5 * float(v.abs().max()), f"ESD losses {e.tolist()} != vanilla {v.tolist()}"
    assert esd[0]["metrics"]["total_bytes"] > 0


@pytest.mark.parametrize("dispatch_ahead,policy", [(0, "lru"), (1, "lru"), (1, "lookahead")],
                         ids=["inline", "dispatch-ahead", "dispatch-ahead-lookahead"])
def test_bad_line_mid_training_fails_every_rank_including_the_ps(tmp_path, dispatch_ahead, policy):
    # with the lookahead policy the loader fails while the dispatch thread reads
    # ahead (2 batches beyond the one it dispatches); the error comes at its batch
    from torchrec_esd.apps.launch import RankFailed, run_local_world
    from torchrec_esd.apps.trainer import JobConfig, run

    # line 4101 is bad: it sits in the second chunk the reader parses, which the
    # third global batch of 2048 rows (rows 4096..6143, wrapping) reaches first
    assert criteo.CHUNK_ROWS == 4096
    p = tmp_path / "late.tsv"
    p.write_text(_line() * 4100 + _line(cats=["zz"] + ["0a0b0c0d"] * 25) + _line() * 99)
    wl = CriteoTsvConfig(str(p), max_cardinality=40)
    cache = {f"t_{f}": 2 for f in wl.feature_names}
    cfg = EsdConfig([WorkerSpec(cache, 1.0), WorkerSpec(cache, 4.0)], collective_timeout_s=60,
                    cache_policy=policy, cache_lookahead=2)
    job = JobConfig(method="esd", esd=cfg, dispatcher="random", steps=3, global_batch=2048, workload=wl,
                    dispatch_ahead=dispatch_ahead)
    with pytest.raises(RankFailed) as info:
        run_local_world(run, 3, job, timeout_s=120)
    errors = info.value.errors
    assert sorted(errors) == [0, 1, 2]
    for r in (0, 1):
        assert "late.tsv:4101: categorical feature C1 is 'zz'" in errors[r]["error"]
    # the PS stops on the workers' ABORT carrying the message (not on a collective timeout)
    assert "aborted by the workers" in errors[2]["error"] and "bad input batch at step 2" in errors[2]["error"]
    assert "late.tsv:4101" in errors[2]["error"]
