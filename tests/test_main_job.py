"""benchmarks/main_job.py: the link models behind the main job's modelled
table, and its summary line (the spawned run itself is scripts/main.sh)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import main_job  # noqa: E402
from torchrec_esd.apps.workload import SyntheticWorkload, SyntheticWorkloadConfig  # noqa: E402


def test_vanilla_link_bytes_counts_ids_pooled_embeddings_and_the_ring():
    wl = SyntheticWorkloadConfig(num_sparse=3, cardinalities=[40, 200, 70], bag_size=(1, 3), seed=5)
    owner = {"t_cat_0": 0, "t_cat_1": 1, "t_cat_2": 1}
    W, B, dim, dense = 2, 8, 4, 1000
    got = main_job.vanilla_link_bytes(owner, wl, 1, B, W, dim, dense)
    # by hand: each worker's slice of the features it does not own goes to the owner
    kjts = [SyntheticWorkload(wl).local_batch(0, B, w, W).sparse_features.to_dict() for w in range(W)]

    def ids(w, f):
        jt = kjts[w][f]
        return jt.lengths().numel() * 4 + jt.values().numel() * 8

    ids0 = ids(0, "cat_1") + ids(0, "cat_2") + ids(1, "cat_0")  # worker 0 sends two, receives one
    ids1 = ids0
    per = B // W
    pooled0 = 2 * per * dim * 4 * ((W - 1) * 1 + 2)  # owns 1 table, the other 2 come to it
    pooled1 = 2 * per * dim * 4 * ((W - 1) * 2 + 1)
    ring = 2 * (2 * (W - 1) / W * dense)
    assert got == pytest.approx([ids0 + pooled0 + ring, ids1 + pooled1 + ring])


def test_esd_link_bytes_adds_the_star_dense_sync_and_the_assignment():
    got = main_job.esd_link_bytes([100, 200, 300], steps=2, batch=10, bandwidths=[10.0, 1000.0, 50.0],
                                  dense_sync="star", dense_bytes=1000)
    # hub = worker 1 (fastest): 2 x 1000 each way per step; the others 1000 each way
    assert got == [100 + 2 * (2 * 1000 + 2 * 10 * 8), 200 + 2 * (2 * 2000 + 10 * 8), 300 + 2 * (2 * 1000 + 10 * 8)]


def test_summary_line_compares_esd_with_vanilla_and_laia(capsys):
    def row(label, iter_ms, mb):
        return {"label": label, "compute_ms": iter_ms / 2, "slowest_link_ms_per_step": iter_ms / 2,
                "iter_ms": iter_ms, "samples_per_s": 1.0, "traffic_mb": mb, "link_s_per_worker": [0.1, 0.2],
                "final_loss": 0.69, "auc": 0.5, "shares": [6, 2]}

    rows = {"vanilla": row("vanilla TorchRec", 300.0, 100.0), "laia": row("LAIA", 150.0, 40.0),
            "hybrid": row("HybridDis", 140.0, 39.0), "hybrid+plan": row("ESD", 75.0, 36.0)}
    args = type("A", (), {"steps": 30, "batch": 8})()
    line = main_job.print_table(rows, "modelled", [100.0, 10.0], args)
    assert line == ("ESD vs vanilla: 4.00x faster, 64 % less traffic; vs LAIA: 2.00x faster, "
                    "10 % less traffic (modelled links)")
    out = capsys.readouterr().out
    assert "MODELLED links" in out and line in out
