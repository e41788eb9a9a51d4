"""benchmarks/rate_change.py: the --rate-change argument and the per-phase report."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import rate_change  # noqa: E402


def test_parse():
    assert rate_change.parse("3:40=100,20=10") == {"worker": 3, "changes": [[20, 10.0], [40, 100.0]]}
    assert rate_change.parse(None) is None
    for bad in ("3", "x:20=10", "3:0=10", "3:20=-1"):
        with pytest.raises(SystemExit):
            rate_change.parse(bad)


def test_step_times_take_out_the_waits_and_phases_settle():
    workers = [{"step_s": [0.1, 0.5, 0.1], "rate_waits": {"1": 0.4}}, {"step_s": [0.2, 0.1, 0.1]}]
    # the wait after step 1 (index 1) lands in the next step's time, step_s[1]
    assert rate_change.step_times(workers) == pytest.approx([0.2, 0.1, 0.1])
    # steps 1..30: 100 ms, a change at step 11: 300 ms for 3 steps then 200 ms
    times = [0.1] * 10 + [0.3] * 3 + [0.2] * 17
    ph = rate_change.phases(times, [[11, 10.0]])
    assert [p["from_step"] for p in ph] == [1, 11]
    assert ph[0]["level_ms"] == pytest.approx(100) and ph[0]["steps_to_settle"] == 0
    assert ph[1]["level_ms"] == pytest.approx(200) and ph[1]["steps_to_settle"] == 3


def _rank(rank, method, rep, step_s):
    return {"rank": rank, "method": method, "rep": rep, "step_s": step_s, "local_samples": [1] * len(step_s)}


def test_analyse_takes_the_per_step_median_of_the_repeats_and_leaves_out_the_drained_steps():
    spec = {"worker": 1, "changes": [[5, 10.0]]}
    # 2 workers, 3 repeats, steps 1..12 timed (step_s[k]: step k + 1): 100 ms, 200 ms from step 5 on;
    # one repeat has a spike at step 8, all are faster in the last two (drained) steps
    base = [0.1] * 4 + [0.2] * 8
    reps = [list(base) for _ in range(3)]
    reps[1][7] = 0.9
    for r in reps:
        r[-1] = r[-2] = 0.05  # drained steps: faster, left out
    raw = {"per_rank": [[_rank(0, "m", r, reps[r]) for r in range(3)],
                        [_rank(1, "m", r, [0.0] * 12) for r in range(3)]]}
    res = rate_change.analyse(raw, ["m"], spec, 2)["m"]
    assert res["step_ms"][7] == pytest.approx(200)  # the spike is the odd one out of 3
    assert len(res["step_ms_repeats"]) == 3
    ph = res["phases"]
    assert [(p["from_step"], p["to_step"]) for p in ph] == [(1, 4), (5, 12 - rate_change.DRAIN_STEPS)]
    assert ph[1]["level_ms"] == pytest.approx(200) and ph[1]["steps_to_settle"] == 0


def test_settle_against_a_reference_is_one_sided_and_the_reference_uses_the_same_steps():
    # 300 ms for 2 steps after the change, then 190 ms: 5 % below a 200 ms reference counts as recovered
    xs = [0.3, 0.3] + [0.19] * 8
    assert rate_change.settle(xs, 0.2, above_only=True) == 2
    assert rate_change.settle([0.3, 0.3] + [0.17] * 8, 0.2, above_only=True) == 2
    assert rate_change.settle([0.3, 0.3] + [0.17] * 8, 0.2) == 10  # two-sided: 15 % below never settles
    ph = rate_change.phases(xs, [], {0: 200.0})
    assert ph[0]["steps_to_reference"] == 2 and ph[0]["level_vs_reference"] == pytest.approx(0.95)
    # a reference run whose level drifts with the step: the phase's own steps are taken
    ref = {"results": {"mix": {"methods": {
        "esd": {"step_ms_slowest_repeats": [[100.0] * 10 + [300.0] * 12] * 3},
        "esd+online": {"step_ms_slowest_repeats": [[90.0] * 10 + [200.0] * 12] * 3}}}}}
    assert rate_change.reference_level_ms(ref, 11, 20) == (200.0, "esd+online")
    assert rate_change.reference_level_ms(ref, 1, 10) == (90.0, "esd+online")
    with pytest.raises(SystemExit, match="no steps"):
        rate_change.reference_level_ms(ref, 30, 40)


def _e2e():
    import end_to_end  # noqa: E402  (benchmarks/ is on the path above)

    return end_to_end


def test_reference_mixes_take_every_rate_of_the_changing_worker_once():
    e2e = _e2e()
    spec = rate_change.parse("3:20=10,40=100")
    refs = e2e.reference_mixes({"name": "edge", "bandwidths": [100.0, 50.0, 100.0, 100.0]}, spec)
    assert [(m["name"], m["bandwidths"], m["reference_rate"]) for m in refs] == [
        ("ref_w3_100", [100.0, 50.0, 100.0, 100.0], 100.0), ("ref_w3_10", [100.0, 50.0, 100.0, 10.0], 10.0)]
    with pytest.raises(SystemExit, match="workers 0..1"):
        e2e.reference_mixes({"name": "x", "bandwidths": [1.0, 2.0]}, spec)


def test_schedule_interleaves_the_mixes_repeat_by_repeat_only_when_asked():
    e2e = _e2e()
    mm = [["a", "b"], ["r"]]
    assert e2e.schedule(mm, 2, interleave=False) == [
        [0, 0, "a"], [0, 0, "b"], [0, 1, "b"], [0, 1, "a"], [1, 0, "r"], [1, 1, "r"]]
    assert e2e.schedule(mm, 2, interleave=True) == [
        [0, 0, "a"], [0, 0, "b"], [1, 0, "r"], [0, 1, "b"], [0, 1, "a"], [1, 1, "r"]]


def test_in_run_references_read_each_phase_from_the_mix_with_its_rate_over_its_own_steps():
    spec = rate_change.parse("1:6=10,11=100")
    mixes = [{"name": "edge", "bandwidths": [100.0, 100.0]},
             {"name": "ref_w1_100", "bandwidths": [100.0, 100.0], "reference_rate": 100.0},
             {"name": "ref_w1_10", "bandwidths": [100.0, 10.0], "reference_rate": 10.0}]
    # 16 timed steps (step k + 1 at index k); the fast reference drifts from 100 to 120 ms at step 11
    fast = [[100.0] * 10 + [120.0] * 6] * 3
    slow = [[400.0] * 16, [380.0] * 16, [390.0] * 16]
    summary = {"ref_w1_100": {"methods": {"esd": {"step_ms_slowest_repeats": fast}}},
               "ref_w1_10": {"methods": {"esd": {"step_ms_slowest_repeats": slow},
                                         "esd+online": {"step_ms_slowest_repeats": [[385.0] * 16] * 3}}}}
    refs = rate_change.in_run_references(summary, mixes, spec, 16, warmup=2)
    assert refs["0"] == {"mix": "ref_w1_100", "steps": [1, 5], "level_ms": 100.0, "method": "esd"}
    assert refs["1"] == {"mix": "ref_w1_10", "steps": [6, 10], "level_ms": 385.0, "method": "esd+online"}
    # the last phase: steps 11..14 (the last DRAIN_STEPS of 16 left out), the drifted level
    assert refs["2"] == {"mix": "ref_w1_100", "steps": [11, 14], "level_ms": 120.0, "method": "esd"}
    d = {"step_ms": [100.0] * 5 + [900.0, 430.0] + [400.0] * 3 + [130.0] * 6}
    rate_change.apply_references(d, spec, refs)
    ph = d["phases"]
    assert [p["steps_to_reference"] for p in ph] == [0, 2, 0]
    assert ph[1]["level_vs_reference"] == pytest.approx(400.0 / 385.0)


def test_analyse_reads_only_the_named_mix():
    spec = {"worker": 1, "changes": [[3, 10.0]]}
    recs = [[dict(_rank(0, "m", 0, [0.1] * 6), mix="main"), dict(_rank(0, "m", 0, [0.9] * 6), mix="ref")],
            [dict(_rank(1, "m", 0, [0.0] * 6), mix="main"), dict(_rank(1, "m", 0, [0.0] * 6), mix="ref")]]
    res = rate_change.analyse({"per_rank": recs}, ["m"], spec, 2, mix="main")["m"]
    assert res["step_ms"] == pytest.approx([100.0] * 6)


def test_reach_counts_the_steps_to_the_first_one_near_the_reference():
    xs = [0.5, 0.25, 0.2, 0.25, 0.19, 0.2]
    assert rate_change.first_within(xs, 0.2) == 2  # 0.25 is 25 % above, 0.2 within
    assert rate_change.first_within([0.5, 0.5], 0.2) == 2  # never
    ph = rate_change.phases(xs, [], {0: 200.0})
    assert ph[0]["steps_to_reach_reference"] == 2 and ph[0]["steps_to_reference"] == 4


def test_rate_server_leaves_a_link_already_at_the_rate_alone(tmp_path):
    import json

    class Link:
        def __init__(self, r):
            self.rate_mbit = r

    class Cluster:
        def __init__(self):
            self.links, self.calls = [Link(100.0), Link(100.0)], []

        def set_rate(self, rank, mbit):
            self.calls.append((rank, mbit))
            self.links[rank] = Link(float(mbit))

    cl, srv = Cluster(), rate_change.RateServer(str(tmp_path), 2)
    for n, mbit in enumerate([100.0, 10.0, 10.0, 100.0]):
        with open(tmp_path / f"rate{n}.request", "w") as f:
            json.dump({"worker": 1, "mbit": mbit}, f)
        srv.poll(cl, 0.0)
        assert (tmp_path / f"rate{n}.ready").exists()
    assert cl.calls == [(1, 10.0), (1, 100.0)]
    assert [r["unchanged"] for r in srv.applied] == [True, False, True, False]


def test_steady_decisions_take_every_repeat_after_the_warm_up_and_leave_out_split_verdicts():
    e2e = _e2e()
    nan = float("nan")

    def rec(rank, rep, solve, inputs, cpu, wait, stall=None):
        d = {"decision_ms": solve, "inputs_ms": inputs, "cpu_ms": cpu, "runqueue_ms": wait}
        if stall is not None:
            d["wait_ms"] = stall
        return {"rank": rank, "rep": rep, "dispatch": d}

    every = [
        # repeat 0: a first decision with one-time costs (left out with the warm-up), then 2 + 3 ms and 4 + 4 ms
        rec(0, 0, [40.0, 9.0, 2.0, 4.0], [20.0, 1.0, 3.0, 4.0], [30.0, 5.0, 4.0, 6.0], [10.0, 2.0, 1.0, 2.0]),
        # repeat 1: a plain-split verdict (no CPU, no wait) among the steady decisions
        rec(0, 1, [50.0, 9.0, 0.1, 6.0], [10.0, 1.0, 0.0, 2.0], [25.0, 5.0, nan, 7.0], [9.0, 2.0, nan, 3.0]),
        rec(1, 0, [99.0] * 4, [99.0] * 4, [99.0] * 4, [99.0] * 4),  # not the dispatching worker
    ]
    out = e2e.steady_decisions(every, repeats=2, skip=2)
    assert out["steady_decisions"] == 4
    assert out["steady_full_decision_ms"] == pytest.approx((5.0 + 8.0 + 0.1 + 8.0) / 4)
    assert out["steady_full_decision_ms_repeats"] == pytest.approx([6.5, 4.05])
    assert out["steady_full_decision_cpu_ms"] == pytest.approx((4.0 + 6.0 + 7.0) / 3)
    assert out["steady_full_decision_runqueue_ms"] == pytest.approx((1.0 + 2.0 + 3.0) / 3)
    assert e2e.steady_decisions([rec(1, 0, [1.0], [1.0], [1.0], [1.0])], repeats=1, skip=0) == {}
    # a repeat that ended within the warm-up adds nothing, not a zero
    short = [rec(0, 0, [1.0], [1.0], [1.0], [1.0]), rec(0, 1, [9.0, 9.0, 2.0], [9.0, 9.0, 2.0], [9.0, 9.0, 3.0],
                                                           [9.0, 9.0, 1.0])]
    out = e2e.steady_decisions(short, repeats=2, skip=2)
    assert out["steady_full_decision_ms_repeats"] == [4.0] and out["steady_decisions"] == 1
    assert "steady_training_wait_ms" not in out  # records without the training thread's wait
    # the training thread's wait for its batch's dispatch: every steady step, NaN (inline) left out
    stalls = [rec(0, 0, [1.0] * 4, [1.0] * 4, [1.0] * 4, [1.0] * 4, [30.0, 20.0, 0.5, 1.5]),
              rec(0, 1, [1.0] * 4, [1.0] * 4, [1.0] * 4, [1.0] * 4, [30.0, 20.0, nan, 4.0])]
    assert e2e.steady_decisions(stalls, repeats=2, skip=2)["steady_training_wait_ms"] == pytest.approx(2.0)


def test_steady_link_time_starts_after_the_warm_up_and_the_issue18_line_prints_its_cut():
    e2e = _e2e()
    args = e2e.parse_args(["--steps", "30"])
    assert e2e.steady_link_from(args) == 3  # iter_ms averages steps 3..29
    assert e2e.steady_link_from(e2e.parse_args(["--steps", "90", "--link-warmup-steps", "30"])) == 30
    assert e2e.steady_link_from(e2e.parse_args(["--steps", "10", "--link-warmup-steps", "40"])) == 9
    with pytest.raises(SystemExit, match="must be >= 0"):
        e2e.steady_link_from(e2e.parse_args(["--link-warmup-steps", "-1"]))

    def emb(total, steady):
        return {"emb": {"total_link_s": total, "training_link_s": total - 0.5, "steady_link_s": steady,
                        "steady_steps": 27}}

    rows = e2e.issue18_targets("hetero", {"laia+plan": emb(10.0, 6.0), "esd+plan": emb(8.5, 4.5)},
                               "emulated-tc", "iid")
    assert len(rows) == 1 and rows[0]["met"] is False  # judged on the whole run: 15 % < 20 %
    assert "15.0 % less" in rows[0]["measured"] and "25.0 % over the last 27 steps" in rows[0]["measured"]
