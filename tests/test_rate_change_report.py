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
