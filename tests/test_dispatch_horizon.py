"""benchmarks/dispatch_horizon.py: its batch concatenation, its share repair
and every variant on a small world (each keeps the shares at every step: the
benchmark checks every assignment)."""

import os
import sys

import numpy as np
import pytest
import torch

from torchrec_esd.apps.sessions import make_workload, make_workload_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import dispatch_horizon as dh  # noqa: E402


def test_concat_batches_puts_the_second_batch_after_the_first():
    wl = make_workload(make_workload_config("sessions", max_cardinality=500, bag_size=(0, 3)))
    a, b = wl.global_batch(0, 7).sparse_features, wl.global_batch(1, 5).sparse_features
    c = dh.concat_batches(a, b)
    assert c.stride() == 12 and c.keys() == a.keys()
    da, db, dc = a.to_dict(), b.to_dict(), c.to_dict()
    for k in a.keys():
        assert torch.equal(dc[k].lengths(), torch.cat([da[k].lengths(), db[k].lengths()]))
        assert torch.equal(dc[k].values(), torch.cat([da[k].values(), db[k].values()]))


def test_to_shares_moves_only_the_surplus():
    rng = np.random.default_rng(0)
    a = np.array([0, 0, 0, 0, 1, 2, 2, 3, 3, 3])
    shares = [2, 3, 2, 3]
    b = dh.to_shares(a, shares, rng)
    assert np.bincount(b, minlength=4).tolist() == shares
    assert int((a != b).sum()) == 2 and set(a[a != b].tolist()) == {0}


def test_every_variant_keeps_the_shares_and_reports_a_cut(capsys):
    out = dh.main(["--iters", "4", "--batch", "64", "--shares", "30,20,10,4", "--warmup-skip", "1",
                   "--variants", "laia,esd,esd+ils:2,esd+next,esd+reuse:1"])["results"]
    assert set(out) == {"laia", "esd", "esd+ils:2", "esd+next", "esd+reuse:1"}
    for r in out.values():
        assert r["total_s"] > 0 and len(r["per_worker_s"]) == 4 and r["shares"] == [30, 20, 10, 4]
        assert np.isclose(r["cut_vs_laia_pct"], 100 * (1 - r["total_s"] / out["laia"]["total_s"]))
    assert out["laia"]["predicted_total_s"] is None
    assert "less than laia" in capsys.readouterr().out


def test_an_unknown_variant_is_refused_before_any_run(capsys):
    for bad in ("esd+foo", "esd+ils:x", "laia:3", "esd+reuse:", "esd:"):
        with pytest.raises(SystemExit, match="unknown variant"):
            dh.main(["--iters", "2", "--batch", "16", "--shares", "8,4,2,2", "--variants", "laia," + bad])
    assert capsys.readouterr().out == ""  # refused before the header: laia, listed first, never ran


def test_laia_at_the_per_batch_shares_replays_the_shares_esd_chose(capsys):
    # listed alone, laia@esd+shares runs esd+shares first, and takes its shares batch by batch
    out = dh.main(["--iters", "4", "--batch", "64", "--shares", "30,20,10,4", "--warmup-skip", "1",
                   "--samples-per-s", "2000,3000,1500,500", "--variants", "laia,laia@esd+shares"])["results"]
    assert list(out) == ["laia", "esd+shares", "laia@esd+shares"]
    chosen, replayed = out["esd+shares"]["shares_per_step"], out["laia@esd+shares"]["shares_per_step"]
    assert chosen == replayed and len(chosen) == 4 and all(sum(n) == 64 for n in chosen)
    assert out["laia"]["shares_per_step"] == [[30, 20, 10, 4]] * 4
    assert out["laia@esd+shares"]["predicted_total_s"] is None
    same = out["esd+shares"]["cut_vs_laia_same_shares_pct"]
    assert np.isclose(same, 100 * (1 - out["esd+shares"]["total_s"] / out["laia@esd+shares"]["total_s"]))
    assert "at the same per-batch shares" in capsys.readouterr().out
    for r in out.values():  # what the end of training writes back: at most every slot, priced per link
        dirty, secs = np.asarray(r["final_dirty_rows"]), np.asarray(r["final_write_back_s"])
        assert dirty.shape == (4,) and (dirty >= 0).all() and dirty.sum() > 0
        held = dirty > 0
        per_row_bits = secs[held] / dirty[held] * np.array([1000.0, 100.0, 50.0, 10.0])[held]  # x 1e6
        assert np.allclose(per_row_bits, per_row_bits[0]) and (secs[~held] == 0).all()


def test_laia_at_the_per_batch_shares_needs_their_run():
    with pytest.raises(SystemExit, match="needs the shares"):
        dh.run_variant("laia@esd+shares", dh.parse_args(["--iters", "2"]), None, [1.0] * 4, replay=None)
