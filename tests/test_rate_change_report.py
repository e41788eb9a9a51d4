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
